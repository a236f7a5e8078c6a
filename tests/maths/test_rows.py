"""The n×n form (trainact/maths/rows.py): the push-through identity, in float64."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from trainact.maths import tract_gradient
from trainact.maths.rows import center, row_inverse, weight_grad

F64 = torch.float64


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**31),
    groups=st.integers(1, 3),
    out=st.integers(1, 5),
    n=st.integers(1, 8),
    extra=st.integers(1, 10),
    lam=st.floats(1e-3, 10.0),
    offset=st.sampled_from([0.0, 50.0]),
)
def test_row_form_equals_the_gram_form(device64, seed, groups, out, n, extra, lam, offset):
    """Dᵀ·(XXᵀ/n + λI)⁻¹·X = Dᵀ·X·(XᵀX/n + λI)⁻¹ (push-through)."""
    gen = torch.Generator().manual_seed(seed)
    d = n + extra
    x = (offset + torch.randn(groups, n, d, generator=gen, dtype=F64)).to(device64)
    grad_out = torch.randn(groups, n, out, generator=gen, dtype=F64).to(device64)
    rows = center(x)
    inverse = row_inverse(rows, lam, host=False)
    count = torch.tensor(float(n), dtype=F64, device=device64)
    gram = tract_gradient(grad_out.mT @ x, x.mT @ x, count, lam)
    result = weight_grad(grad_out, inverse, rows)
    torch.testing.assert_close(result, gram, rtol=1e-7, atol=1e-9 * gram.abs().max().item())


@pytest.mark.parametrize(
    "case",
    ["near-duplicate rows", "large offset", "over-exposed"],
)
def test_float32_rows_whose_entries_dwarf_their_differences(case):
    """In float32, rows far from the origin (near-duplicates, a shared offset, saturated
    pixels) keep the float64 answer's accuracy: the rows are centered before the products,
    where TᵀX from the raw rows cancels (1e-2 off on near-duplicate rows)."""
    gen = torch.Generator().manual_seed(0)
    n, d, out, lam = 64, 600, 16, 0.1
    if case == "near-duplicate rows":
        x = 255 * torch.rand(1, 1, d, generator=gen) + 1e-3 * torch.randn(1, n, d, generator=gen)
    elif case == "large offset":
        x = 1e4 + torch.randn(1, n, d, generator=gen)
    else:
        x = (4 * 255 * torch.rand(1, n, d, generator=gen)).clamp(max=255)
    x = x.float()
    grad_out = torch.randn(1, n, out, generator=gen)
    x64 = x.double()
    count = torch.tensor(float(n), dtype=F64)
    exact = tract_gradient(grad_out.double().mT @ x64, x64.mT @ x64, count, lam)
    rows = center(x)
    result = weight_grad(grad_out, row_inverse(rows, lam, host=False), rows)
    assert result.dtype == torch.float32
    error = ((result.double() - exact).norm() / exact.norm()).item()
    assert error < 1e-5, error
