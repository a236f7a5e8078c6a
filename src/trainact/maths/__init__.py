"""The maths of TrAct, free of modules and hooks: the precision policy, patch statistics, the
TrAct gradient's solve and its n×n form."""

from trainact.maths.precision import Precision, precision_for
from trainact.maths.solve import tract_gradient
from trainact.maths.statistics import PatchStatistics

__all__ = ["PatchStatistics", "Precision", "precision_for", "tract_gradient"]
