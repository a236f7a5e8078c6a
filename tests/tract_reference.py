"""Shared helpers for the core tests; the float64 references live in :mod:`trainact.testing`."""

from __future__ import annotations

import copy

from torch import nn

import trainact
from trainact.testing import reference_patches, reference_tract_grad, relative_error

__all__ = ["plain_and_tract", "reference_patches", "reference_tract_grad", "relative_error"]


def plain_and_tract(layer: nn.Module, lam: float = 0.1) -> tuple[nn.Module, nn.Module]:
    """A plain copy of ``layer`` and ``layer`` itself with TrAct enabled."""
    plain = copy.deepcopy(layer)
    return plain, trainact.TrAct(layer, l=lam)
