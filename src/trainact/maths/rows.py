"""The n×n form of TrAct, for a call with fewer patches than entries per patch (n < d).

With G = Dᵀ·X (D the gradient of the layer's output, one row per patch), the push-through
identity gives G·(XᵀX/n + λI)⁻¹ = Dᵀ·(XXᵀ/n + λI)⁻¹·X: the d×d system becomes an n×n one.
So the output gradient is transformed, D ↦ (XXᵀ/(nλ) + I)⁻¹·D (every eigenvalue in (0, 1], so
it never grows), and the layer's own kernel computes the weight gradient from it, which is
then divided by λ. No d×d matrix is formed, and the result carries no amplified rounding:
the d×d form multiplies the rounding of the computed G outside the span of X's rows by 1/λ,
while the true G has no component there.

K = XXᵀ (n²·d multiply-adds) is formed in float64, on the CPU for a device without float64.
"""

from __future__ import annotations

import torch
from torch import Tensor

from trainact.maths.solve import cholesky_finite


def row_factor(rows: Tensor, lam: float, host: bool) -> Tensor:
    """Cholesky factors of XXᵀ/(nλ) + I per group for patches ``rows`` ``(groups, n, d)``,
    in float64 (on the CPU when ``host``)."""
    x = rows.to("cpu" if host else rows.device, torch.float64)
    n = x.shape[1]
    a = x @ x.mT / (max(n, 1) * lam)
    a.diagonal(dim1=-2, dim2=-1).add_(1.0)
    return cholesky_finite(a)


def transform_output_grad(grad: Tensor, factor: Tensor) -> Tensor:
    """(XXᵀ/(nλ) + I)⁻¹·D per group, for ``grad`` ``(groups, n, out)``, in ``grad``'s dtype
    and device."""
    solved = torch.cholesky_solve(grad.to(factor.device, torch.float64), factor)
    return solved.to(grad.device, grad.dtype)
