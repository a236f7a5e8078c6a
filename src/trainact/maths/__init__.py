"""The maths of TrAct, free of modules and hooks: patch statistics and the preconditioner solve."""

from trainact.maths.solve import precondition
from trainact.maths.statistics import PatchStatistics

__all__ = ["PatchStatistics", "precondition"]
