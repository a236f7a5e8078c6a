"""The maths in float64: the solve (Lemma 1, λ → ∞, n = 0, non-finite input, tiny λ), the
statistics (centered chunks, the split float32 product) and the n×n form."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from trainact.maths import PatchStatistics, precondition
from trainact.maths.rows import row_inverse, transform_output_grad
from trainact.maths.solve import cholesky_finite
from trainact.maths.statistics import SPLIT_BITS, SPLIT_BLOCK, SplitSums, split_quantum

F64 = torch.float64


def _problem(seed: int, groups: int, out: int, n: int, d: int):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(groups, n, d, generator=gen, dtype=F64) * torch.rand(
        d, generator=gen, dtype=F64
    )
    g = torch.randn(groups, out, d, generator=gen, dtype=F64)
    return g, x


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**31),
    groups=st.integers(1, 3),
    out=st.integers(1, 5),
    n=st.integers(1, 12),
    d=st.integers(1, 12),
    lam=st.floats(1e-3, 10.0),
)
def test_solve_agrees_with_explicit_inverse(seed, groups, out, n, d, lam):
    g, x = _problem(seed, groups, out, n, d)
    expected = g @ torch.linalg.inv(x.mT @ x / n + lam * torch.eye(d, dtype=F64))
    solved = precondition(g, x.mT @ x, torch.tensor(float(n), dtype=F64), lam)
    torch.testing.assert_close(solved, expected, rtol=1e-8, atol=1e-10)


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**31),
    groups=st.integers(1, 3),
    d=st.integers(1, 9),
    sizes=st.lists(st.integers(0, 20), min_size=1, max_size=4),
    offset=st.sampled_from([0.0, 1.0, 230.0]),
    shifted=st.booleans(),
)
def test_statistics_of_centered_chunks_are_the_raw_second_moments(
    seed, groups, d, sizes, offset, shifted
):
    """Chunks arrive minus a shift (any shift); S = Σ xxᵀ and n come out exactly, merged."""
    gen = torch.Generator().manual_seed(seed)
    chunks = [offset + torch.randn(groups, d, c, generator=gen, dtype=F64) for c in sizes]
    stats = PatchStatistics.zeros(groups, d, torch.device("cpu"))
    for i, chunk in enumerate(chunks):
        shift = chunk.mean(-1) if shifted and chunk.shape[-1] else torch.full((groups, d), 3.0 * i)
        part = PatchStatistics.zeros(groups, d, torch.device("cpu"))
        part.add_chunk(chunk - shift.unsqueeze(-1), shift.to(F64))
        stats.merge_(part)
    x = torch.cat(chunks, dim=-1)
    torch.testing.assert_close(stats.gram, x @ x.mT, rtol=1e-10, atol=1e-9 * (1 + offset**2))
    assert stats.count.item() == sum(sizes)


def test_float32_chunks_of_raw_pixels_stay_accurate_when_centered():
    """Pixels around 230 (over-exposed): float32 raw sums lose the covariance, centered ones keep
    it. This is the reason for the centering: the raw product must fail here."""
    gen = torch.Generator().manual_seed(0)
    x = 230 + 10 * torch.rand(1, 12, 20000, generator=gen, dtype=F64)
    exact = x @ x.mT
    centered = PatchStatistics.zeros(1, 12, torch.device("cpu"))
    shift = x.mean(-1).float()
    centered.add_chunk((x.float() - shift.unsqueeze(-1)), shift)
    raw = PatchStatistics.zeros(1, 12, torch.device("cpu"))
    raw.add_chunk(x.float(), torch.zeros(1, 12))
    g = torch.randn(1, 4, 12, generator=gen, dtype=F64)
    n = torch.tensor(20000.0, dtype=F64)
    expected = precondition(g, exact, n, 0.1)

    def error(stats):
        return ((stats.precondition(g, 0.1) - expected).norm() / expected.norm()).item()

    assert error(centered) < 1e-3
    assert error(raw) > 10 * error(centered)


def test_lemma_1_update_minimizes_the_activation_objective():
    """ΔW = −η·G_tract zeroes the gradient of ‖z − η·n·∇zL − (W+ΔW)X‖² + λ·n·‖ΔW‖²."""
    torch.manual_seed(0)
    n, d, out, lam, eta = 50, 7, 4, 0.3, 0.05
    x = torch.randn(n, d, dtype=F64) * torch.linspace(0.1, 3, d, dtype=F64)
    w = torch.randn(out, d, dtype=F64, requires_grad=True)
    target = torch.randn(n, out, dtype=F64)
    z = x @ w.T
    loss = ((z - target) ** 2).mean()
    grad_z, grad_w = torch.autograd.grad(loss, (z, w))
    tract = precondition(grad_w[None], x.T @ x, torch.tensor(float(n), dtype=F64), lam)[0]
    delta = (-eta * tract).requires_grad_(True)
    objective = ((z.detach() - eta * n * grad_z - x @ (w.detach() + delta).T) ** 2).sum() + (
        lam * n * (delta**2).sum()
    )
    (grad_delta,) = torch.autograd.grad(objective, delta)
    assert grad_delta.abs().max() < 1e-10 * (1 + objective.item())
    # and the plain gradient step is not a minimizer: the test can fail
    plain = (-eta * grad_w).requires_grad_(True)
    objective_plain = ((z.detach() - eta * n * grad_z - x @ (w.detach() + plain).T) ** 2).sum() + (
        lam * n * (plain**2).sum()
    )
    assert torch.autograd.grad(objective_plain, plain)[0].abs().max() > 1e-3


def test_large_lambda_recovers_the_plain_gradient():
    g, x = _problem(1, 2, 3, 20, 6)
    for lam in (1e4, 1e6):
        scaled = lam * precondition(g, x.mT @ x, torch.tensor(20.0, dtype=F64), lam)
        torch.testing.assert_close(scaled, g, rtol=100 / lam, atol=100 / lam)


def test_empty_batch_gives_zero_not_nan():
    g = torch.zeros(1, 3, 5)
    out = precondition(g, torch.zeros(1, 5, 5), torch.tensor(0.0), 0.1)
    assert torch.equal(out, torch.zeros_like(g))


def test_non_finite_input_stays_non_finite_and_never_raises():
    g, x = _problem(2, 1, 3, 10, 4)
    g = g.float()
    gram = (x.mT @ x).float()
    count = torch.tensor(10.0)
    bad_grad = g.clone()
    bad_grad[0, 0, 0] = float("inf")
    assert not precondition(bad_grad, gram, count, 0.1).isfinite().all()
    bad_gram = gram.clone()
    bad_gram[0, 1, 1] = float("nan")
    assert not precondition(g, bad_gram, count, 0.1).isfinite().all()


def test_result_keeps_the_gradient_dtype():
    g, x = _problem(3, 1, 2, 8, 3)
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        out = precondition(g.to(dtype), (x.mT @ x).float(), torch.tensor(8.0), 0.1)
        assert out.dtype == dtype


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 2**31),
    groups=st.integers(1, 2),
    d=st.integers(1, 10),
    cols=st.lists(st.integers(1, 3000), min_size=1, max_size=3),
    offset=st.sampled_from([0.0, 1.0, 230.0]),
    scale=st.sampled_from([1e-3, 1.0, 255.0]),
)
def test_split_product_is_accurate_without_float64(seed, groups, d, cols, offset, scale):
    """Σ yyᵀ from float32 alone (exact 7-bit part + float32 rest) to float64 accuracy of the
    inputs, over several chunks, for features of very different scales."""
    gen = torch.Generator().manual_seed(seed)
    feature_scale = scale * torch.rand(groups, d, 1, generator=gen) ** 4
    chunks = [
        (offset + feature_scale * torch.randn(groups, d, c, generator=gen)).float() for c in cols
    ]
    shift = torch.full((groups, d), offset)
    centered = [c - shift.unsqueeze(-1) for c in chunks]
    largest = torch.cat(centered, -1).abs().amax(-1)
    sums = SplitSums(split_quantum(largest), torch.int64)
    for chunk in centered:
        sums.add(chunk)
    stats = PatchStatistics.zeros(groups, d, torch.device("cpu"))
    sums.add_to(stats, shift)
    x = torch.cat(chunks, -1).double()
    exact = x @ x.mT
    # 2**-7 of float32 summation rounding (≈ 1e-6 relative) on the rest, the exact part exact
    tol = 2e-8 * exact.diagonal(dim1=-2, dim2=-1).amax(-1)[:, None, None]
    assert ((stats.gram - exact).abs() <= tol).all()
    assert stats.count.item() == sum(cols)


def test_split_product_exact_part_is_exact_and_small_enough_for_tf32():
    """The integer part k of each entry has at most 8 significant bits (|k| ≤ 128), so TF32
    (11 bits) and bfloat16 (8 bits) hold it exactly, and a block's Σ kk fits float32's 24 bits."""
    gen = torch.Generator().manual_seed(0)
    y = 255 * torch.rand(1, 6, 5000, generator=gen) - 120
    q = split_quantum(y.abs().amax(-1))
    k = torch.round(y / q.unsqueeze(-1))
    assert k.abs().max() <= 2**SPLIT_BITS
    assert torch.equal(k.to(torch.bfloat16).float(), k)
    assert SPLIT_BLOCK * 4**SPLIT_BITS <= 2**24


def test_split_quantum_keeps_non_finite_input_non_finite():
    q = split_quantum(torch.tensor([[1.0, float("inf"), float("nan"), 0.0]]))
    assert q[0, 0] == 2**-7 and not q[0, 1:3].isfinite().any() and q[0, 3] > 0


@pytest.mark.parametrize("lam", [1e-12, 1e-9, 1e-6])
def test_tiny_lambda_on_rank_deficient_statistics_is_finite(lam):
    """Rounding of S can make S/n + λI indefinite for λ far below it: the solve still gives a
    finite result (it used to give NaN), and an accurate one where λ is not that small."""
    gen = torch.Generator().manual_seed(0)
    x = 200 + torch.randn(1, 40, 3, generator=gen) @ torch.randn(3, 30, generator=gen)
    x = x.double()
    g = torch.randn(1, 4, 30, generator=gen, dtype=F64) @ (x[0].T @ x[0])  # in the row space
    gram = x.mT @ x
    out = precondition(g, gram, torch.tensor(40.0, dtype=F64), lam)
    assert out.isfinite().all()
    factor, info = torch.linalg.cholesky_ex(gram / 40 + lam * torch.eye(30, dtype=F64))
    if info.item() == 0:  # where plain Cholesky works, the result is the plain one
        expected = torch.cholesky_solve(g.mT, factor).mT
        torch.testing.assert_close(out, expected)


def test_cholesky_finite_matches_cholesky_where_it_succeeds():
    a = torch.tensor([[[4.0, 1.0], [1.0, 3.0]], [[1.0, 2.0], [2.0, 4.0 - 1e-14]]], dtype=F64)
    factor = cholesky_finite(a)
    torch.testing.assert_close(factor[0], torch.linalg.cholesky(a[0]))
    # indefinite by rounding: factored with a raised diagonal (a true factor of nearly ``a``)
    torch.testing.assert_close(factor[1] @ factor[1].T, a[1], rtol=0, atol=1e-6)
    bad = a.clone()
    bad[0, 0, 0] = float("inf")
    assert cholesky_finite(bad)[0].isnan().all() and cholesky_finite(bad)[1].isfinite().all()


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
def test_row_form_equals_the_gram_form(seed, groups, out, n, extra, lam, offset):
    """Dᵀ·(XXᵀ/n + λI)⁻¹·X = Dᵀ·X·(XᵀX/n + λI)⁻¹ (push-through)."""
    gen = torch.Generator().manual_seed(seed)
    d = n + extra
    x = offset + torch.randn(groups, n, d, generator=gen, dtype=F64)
    grad_out = torch.randn(groups, n, out, generator=gen, dtype=F64)
    inverse = row_inverse(x, lam, host=False)
    gram = precondition(grad_out.mT @ x, x.mT @ x, torch.tensor(float(n), dtype=F64), lam)
    rows = transform_output_grad(grad_out, inverse, F64).mT @ x
    torch.testing.assert_close(rows, gram, rtol=1e-7, atol=1e-9 * gram.abs().max().item())
