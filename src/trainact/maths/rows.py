"""The n×n form of TrAct, for a call with fewer patches than entries per patch (n < d).

With G = Dᵀ·X (D the gradient of the layer's output, one row per patch), the push-through
identity gives G·(XᵀX/n + λI)⁻¹ = Dᵀ·(XXᵀ/n + λI)⁻¹·X: the d×d system becomes an n×n one.
So the weight gradient is (M·D)ᵀ·X with M = (XXᵀ/n + λI)⁻¹, computed from the output gradient
and the patch rows instead of the plain G. No d×d matrix is formed, and the result carries no
amplified rounding: the d×d form multiplies the rounding of the computed G outside the span of
X's rows by 1/λ (for a float16 G, by far more than the answer), while the true G has none.

The rows are first written X = Z + a·1ᵀ + 1·bᵀ (b the mean row, a each row's mean after that;
:func:`center`). Raw pixels, rows sharing a large offset or near-duplicate rows make X's entries
far larger than Z's, and TᵀX (T = M·D) computed from X in float32 then cancels (1.4e-2 off on the
near-duplicate rows of ``tests/maths/test_rows.py``). So K = XXᵀ is formed in float64 as ZZᵀ
plus rank-one terms (in float32, even centered, it loses the features whose scale is small
beside the others'), on the CPU for a device without float64; M is the explicit inverse of its
Cholesky factor, applied to D as one float64 product; and the gradient is TᵀZ in at least
float32 plus the rank-one terms (Tᵀa)·1ᵀ + (Tᵀ1)·bᵀ.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from trainact.maths.solve import cholesky_finite
from trainact.maths.statistics import gram_product


class CenteredRows(NamedTuple):
    """Patch rows X ``(groups, n, d)`` as X = Z + a·1ᵀ + 1·bᵀ = [I a 1]·E with E = [Z; 1ᵀ; bᵀ]
    (``extended``, ``(groups, n + 2, d)``) and ``row_shift`` a ``(groups, n)``, in one dtype
    (at least float32) on the rows' device. The identity holds up to the rounding of Z, a
    perturbation of X as small as Z's own rounding."""

    extended: Tensor
    row_shift: Tensor


def center(rows: Tensor) -> CenteredRows:
    """``rows`` ``(groups, n, d)`` centered on their mean row b, then each row on its own mean
    a, in at least float32."""
    dtype = torch.promote_types(rows.dtype, torch.float32)
    groups, n, d = rows.shape
    x = rows.to(dtype)
    extended = x.new_empty(groups, n + 2, d)
    z = extended[:, :-2]  # (negative indices: torch.compile keeps n symbolic)
    column_shift = x.mean(1, keepdim=True)  # b, (groups, 1, d)
    torch.sub(x, column_shift, out=z)
    row_shift = z.mean(2)
    z.sub_(row_shift[..., None])
    extended[:, -2] = 1
    extended[:, -1] = column_shift[:, 0]
    return CenteredRows(extended, row_shift)


def row_inverse(rows: CenteredRows, lam: float, host: bool) -> Tensor:
    """M = (XXᵀ/n + λI)⁻¹ per group, in float64 (on the CPU when ``host``); NaN where the
    patches are not finite."""
    device = "cpu" if host else rows.extended.device
    e, a = (t.to(device, torch.float64) for t in rows)
    n = a.shape[1]
    # E·Eᵀ holds ZZᵀ, Z1 and Zb, 1ᵀ1 = d, 1ᵀb and bᵀb; with X = Z + a1ᵀ + 1bᵀ,
    # XXᵀ = ZZᵀ + uaᵀ + auᵀ + v1ᵀ + 1vᵀ for u = Z1 + (d/2)·a + (1ᵀb)·1 and v = Zb + (bᵀb/2)·1.
    gram = gram_product(e)
    d, b_sum, b_dot = gram[:, -2, -2], gram[:, -2, -1], gram[:, -1, -1]
    u = gram[:, :-2, -2] + 0.5 * d[:, None] * a + b_sum[:, None]
    v = gram[:, :-2, -1] + 0.5 * b_dot[:, None]
    k = gram[:, :-2, :-2]
    k += u[:, :, None] * a[:, None, :] + a[:, :, None] * u[:, None, :]
    k += v[:, :, None] + v[:, None, :]
    k /= max(n, 1)
    k.diagonal(dim1=-2, dim2=-1).add_(lam)
    return torch.cholesky_inverse(cholesky_finite(k))


def weight_grad(grad_rows: Tensor, inverse: Tensor, rows: CenteredRows) -> Tensor:
    """(M·D)ᵀ·X per group, ``(groups, out, d)``, for the output gradient ``grad_rows``
    ``(groups, n, out)``, in ``rows``' dtype on ``grad_rows``' device."""
    e, a = rows
    t = inverse @ grad_rows.to(inverse.device, torch.float64)  # T = M·D, (groups, n, out)
    # TᵀX = TᵀZ + (Tᵀa)·1ᵀ + (Tᵀ1)·bᵀ = [T; aᵀT; 1ᵀT]ᵀ·E
    rank_one = (a.to(t)[:, None, :] @ t, t.sum(1, keepdim=True))
    extended_t = torch.cat([t, *rank_one], 1).to(e)
    return extended_t.mT @ e
