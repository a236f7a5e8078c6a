"""The maths of TrAct, free of modules and hooks: patch statistics and the preconditioner solve."""

from trainact.maths.solve import precondition_with_gram, precondition_with_patches
from trainact.maths.statistics import gram_of_chunks, patch_matrix

__all__ = [
    "gram_of_chunks",
    "patch_matrix",
    "precondition_with_gram",
    "precondition_with_patches",
]
