"""The n×n form (trainact/maths/rows.py): the push-through identity, in float64."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from trainact.maths import precondition
from trainact.maths.rows import row_inverse, transform_output_grad

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
    inverse = row_inverse(x, lam, host=False)
    count = torch.tensor(float(n), dtype=F64, device=device64)
    gram = precondition(grad_out.mT @ x, x.mT @ x, count, lam)
    rows = transform_output_grad(grad_out, inverse, F64).mT @ x
    torch.testing.assert_close(rows, gram, rtol=1e-7, atol=1e-9 * gram.abs().max().item())
