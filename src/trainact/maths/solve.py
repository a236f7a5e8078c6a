"""The TrAct update G·(XᵀX/n + λI)⁻¹ (Lemma 1 of the paper), solved in float64, never inverted.

With raw pixels XᵀX/n + λI has condition numbers of 1e6 to 1e8 (its entries are dominated by
the mean patch), beyond float32; the d×d system is small, so it is always solved in float64.
The solve never raises on bad numbers: a non-finite gradient or statistic gives a non-finite
result, so that a GradScaler skips the step exactly as it would without TrAct.
"""

from __future__ import annotations

import torch
from torch import Tensor


def precondition(grad: Tensor, gram: Tensor, count: Tensor, lam: float) -> Tensor:
    """G·(gram/n + λI)⁻¹ per group by a float64 Cholesky solve, returned in ``grad``'s dtype.

    Args:
        grad: weight gradient, ``(groups, out, d)``.
        gram: XᵀX summed over the patches, ``(groups, d, d)``.
        count: n, the number of patches (0-dim tensor); n = 0 gives G/λ, which is zero.
        lam: λ > 0.
    """
    a = gram.to(torch.float64) / count.to(torch.float64).clamp_min(1)
    a.diagonal(dim1=-2, dim2=-1).add_(lam)
    factor, info = torch.linalg.cholesky_ex(a)
    # A is symmetric, so G·A⁻¹ = (A⁻¹·Gᵀ)ᵀ.
    solved = torch.cholesky_solve(grad.to(torch.float64).mT, factor).mT
    # Cholesky fails only for non-finite statistics: poison that group's result.
    failed = (info != 0).reshape(-1, 1, 1)
    solved = torch.where(failed, torch.full_like(solved, float("nan")), solved)
    return solved.to(grad.dtype)
