"""The n×n form of TrAct, for a call with fewer patches than entries per patch (n < d).

With G = Dᵀ·X (D the gradient of the layer's output, one row per patch), the push-through
identity gives G·(XᵀX/n + λI)⁻¹ = Dᵀ·(XXᵀ/n + λI)⁻¹·X: the d×d system becomes an n×n one.
So the weight gradient is (M·D)ᵀ·X with M = (XXᵀ/n + λI)⁻¹, computed from the output gradient
and the patch rows (in at least float32) instead of the plain G. No d×d matrix is formed, and
the result carries no amplified rounding: the d×d form multiplies the rounding of the computed
G outside the span of X's rows by 1/λ (for a float16 G, by far more than the answer), while
the true G has no component there.

K = XXᵀ (n²·d multiply-adds) is formed in float64 (a float32 K measured up to 5e-5 off on raw
photos), on the CPU for a device without float64; M is the explicit inverse of its n×n
Cholesky factor, applied to D as one product.
"""

from __future__ import annotations

import torch
from torch import Tensor

from trainact.maths.solve import cholesky_finite


def row_inverse(rows: Tensor, lam: float, host: bool) -> Tensor:
    """M = (XXᵀ/n + λI)⁻¹ per group for patches ``rows`` ``(groups, n, d)``, in float64 (on
    the CPU when ``host``); NaN where the patches are not finite."""
    x = rows.to("cpu" if host else rows.device, torch.float64)
    a = x @ x.mT / max(x.shape[1], 1)
    a.diagonal(dim1=-2, dim2=-1).add_(lam)
    return torch.cholesky_inverse(cholesky_finite(a))


def transform_output_grad(grad: Tensor, inverse: Tensor, dtype: torch.dtype) -> Tensor:
    """M·D per group, for ``grad`` ``(groups, n, out)``, in ``dtype`` on ``grad``'s device."""
    return (inverse @ grad.to(inverse.device, torch.float64)).to(grad.device, dtype)
