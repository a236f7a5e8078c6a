"""The TrAct update G·(XᵀX/n + λI)⁻¹ (Lemma 1 of the paper), solved, never inverted.

Both functions take the weight gradient as ``(groups, out_per_group, d)`` and return it in its
own dtype. They never raise on bad numbers: a non-finite gradient or statistic gives a
non-finite result, so that a GradScaler skips the step exactly as it would without TrAct.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _nan_where_failed(result: Tensor, info: Tensor) -> Tensor:
    """Cholesky failures (only possible for non-finite input) poison the group's result."""
    failed = (info != 0).reshape(-1, *([1] * (result.dim() - 1)))
    return torch.where(failed, torch.full_like(result, float("nan")), result)


def precondition_with_gram(grad: Tensor, gram: Tensor, count: Tensor, lam: float) -> Tensor:
    """G·(gram/n + λI)⁻¹ by a Cholesky solve in ``gram``'s dtype.

    Args:
        grad: weight gradient, ``(groups, out, d)``.
        gram: XᵀX summed over the patches, ``(groups, d, d)``, float32 or float64.
        count: n, the number of patches (0-dim tensor); n = 0 gives G/λ, which is zero.
        lam: λ > 0.
    """
    a = gram / count.clamp_min(1)
    a.diagonal(dim1=-2, dim2=-1).add_(lam)
    factor, info = torch.linalg.cholesky_ex(a)
    # A is symmetric, so G·A⁻¹ = (A⁻¹·Gᵀ)ᵀ.
    solved = torch.cholesky_solve(grad.to(gram.dtype).mT, factor).mT
    return _nan_where_failed(solved, info).to(grad.dtype)


def precondition_with_patches(grad: Tensor, patches: Tensor, lam: float) -> Tensor:
    """The same update from the patches themselves, for n < d (the push-through identity).

    (XᵀX/n + λI)⁻¹ = (I − Xᵀ(XXᵀ + nλI)⁻¹X)/λ, so only an n×n system is solved.

    Args:
        grad: weight gradient, ``(groups, out, d)``.
        patches: X, ``(groups, n, d)``, float32 or float64.
        lam: λ > 0.
    """
    n = patches.shape[1]
    k = patches @ patches.mT
    k.diagonal(dim1=-2, dim2=-1).add_(n * lam)
    factor, info = torch.linalg.cholesky_ex(k)
    g = grad.to(patches.dtype)
    gx = g @ patches.mT
    y = torch.cholesky_solve(gx.mT, factor).mT
    solved = (g - y @ patches) / lam
    return _nan_where_failed(solved, info).to(grad.dtype)
