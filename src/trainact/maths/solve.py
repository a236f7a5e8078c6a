"""The TrAct update G·(XᵀX/n + λI)⁻¹ (Lemma 1 of the paper), solved in float64, never inverted.

With raw pixels XᵀX/n + λI has condition numbers of 1e6 to 1e8 (its entries are dominated by
the mean patch), beyond float32; the d×d system is small, so it is always solved in float64.
The solve never raises on bad numbers: a non-finite gradient or statistic gives a non-finite
result, so that a GradScaler skips the step exactly as it would without TrAct; finite inputs
always give a finite result (see :func:`cholesky_finite`).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake

#: Where λ is below the statistics' own rounding (λ = 1e-12 on rank-deficient patches), the
#: rounded S/n + λI may not be positive definite; it is then factored with λ raised by this
#: fraction of its trace, above any rounding of the statistics (at most 1e-9 of it). (Written
#: as a literal below: dynamo keeps a global float symbolic with dynamic=True.)
RETRY_FRACTION = 1e-8


def cholesky_finite(a: Tensor) -> Tensor:
    """Cholesky factors of the symmetric positive semi-definite-plus-λI matrices ``a``
    ``(..., d, d)``: NaN where ``a`` is not finite; where rounding made a finite ``a``
    indefinite, the factor of ``a + RETRY_FRACTION·trace(a)·I``. No host synchronization off
    the CPU (the retry then always runs, and is selected per matrix)."""
    factor: Tensor
    factor, info = torch.linalg.cholesky_ex(a)
    # A non-finite entry of ``a`` makes a diagonal entry of the factor non-finite (the factor of
    # row i reads every entry left of the diagonal), so the usual case costs two small checks.
    if _sync_is_free(a) and not info.any() and factor.diagonal(0, -2, -1).isfinite().all():
        return factor
    finite = a.isfinite().all(-1).all(-1)
    failed = (info != 0) & finite
    usable = (info == 0) & finite
    if not _sync_is_free(a) or failed.any():
        trace = a.diagonal(dim1=-2, dim2=-1).sum(-1).abs()
        eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
        retry, retry_info = torch.linalg.cholesky_ex(
            a + (1e-8 * trace)[..., None, None] * eye  # RETRY_FRACTION
        )
        factor = torch.where(failed[..., None, None], retry, factor)
        usable = usable | (failed & (retry_info == 0))
    return torch.where(usable[..., None, None], factor, torch.full_like(factor, float("nan")))


def _sync_is_free(t: Tensor) -> bool:
    """Whether branching on ``t``'s values costs nothing: an eager CPU tensor with real data."""
    return t.device.type == "cpu" and not torch.compiler.is_compiling() and not is_fake(t)


def tract_gradient(grad: Tensor, gram: Tensor, count: Tensor, lam: float | Tensor) -> Tensor:
    """G·(gram/n + λI)⁻¹ per group by a float64 Cholesky solve, returned in ``grad``'s dtype.

    Args:
        grad: weight gradient, ``(groups, out, d)``.
        gram: XᵀX summed over the patches, ``(groups, d, d)``.
        count: n, the number of patches (0-dim tensor); n = 0 gives G/λ, which is zero.
        lam: λ > 0 (a float, or a 0-dim tensor).
    """
    a = gram.to(torch.float64) / count.to(torch.float64).clamp_min(1)
    a.diagonal(dim1=-2, dim2=-1).add_(lam)
    factor = cholesky_finite(a)
    # A is symmetric, so G·A⁻¹ = (A⁻¹·Gᵀ)ᵀ.
    return torch.cholesky_solve(grad.to(torch.float64).mT, factor).mT.to(grad.dtype)
