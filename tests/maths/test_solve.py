"""The solve G·(XᵀX/n + λI)⁻¹ (trainact/maths/solve.py), in float64: Lemma 1, λ → ∞, n = 0,
non-finite input, tiny λ."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import trainact
from trainact.maths import tract_gradient
from trainact.maths.solve import cholesky_finite

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
def test_solve_agrees_with_explicit_inverse(device64, seed, groups, out, n, d, lam):
    g, x = _problem(seed, groups, out, n, d)
    expected = g @ torch.linalg.inv(x.mT @ x / n + lam * torch.eye(d, dtype=F64))
    g, x = g.to(device64), x.to(device64)
    solved = tract_gradient(g, x.mT @ x, torch.tensor(float(n), dtype=F64, device=device64), lam)
    assert solved.device == g.device
    torch.testing.assert_close(solved.cpu(), expected, rtol=1e-8, atol=1e-10)


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
    tract = tract_gradient(grad_w[None], x.T @ x, torch.tensor(float(n), dtype=F64), lam)[0]
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
        scaled = lam * tract_gradient(g, x.mT @ x, torch.tensor(20.0, dtype=F64), lam)
        torch.testing.assert_close(scaled, g, rtol=100 / lam, atol=100 / lam)


def test_empty_batch_gives_zero_not_nan(device):
    g = torch.zeros(1, 3, 5, device=device)
    out = tract_gradient(
        g, torch.zeros(1, 5, 5, device=device), torch.tensor(0.0, device=device), 0.1
    )
    assert torch.equal(out, torch.zeros_like(g))


def test_non_finite_input_stays_non_finite_and_never_raises(device):
    g, x = _problem(2, 1, 3, 10, 4)
    g = g.float().to(device)
    gram = (x.mT @ x).float().to(device)
    count = torch.tensor(10.0, device=device)
    bad_grad = g.clone()
    bad_grad[0, 0, 0] = float("inf")
    assert not tract_gradient(bad_grad, gram, count, 0.1).isfinite().all()
    bad_gram = gram.clone()
    bad_gram[0, 1, 1] = float("nan")
    assert not tract_gradient(g, bad_gram, count, 0.1).isfinite().all()


def test_result_keeps_the_gradient_dtype(device):
    g, x = _problem(3, 1, 2, 8, 3)
    gram, count = (x.mT @ x).float().to(device), torch.tensor(8.0, device=device)
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        out = tract_gradient(g.to(device, dtype), gram, count, 0.1)
        assert out.dtype == dtype


@pytest.mark.parametrize("lam", [1e-12, 1e-9, 1e-6])
def test_tiny_lambda_on_rank_deficient_statistics_is_finite(device64, lam):
    """Rounding of S can make S/n + λI indefinite for λ far below it: the solve still gives a
    finite result (it used to give NaN), and an accurate one where λ is not that small."""
    gen = torch.Generator().manual_seed(0)
    x = 200 + torch.randn(1, 40, 3, generator=gen) @ torch.randn(3, 30, generator=gen)
    x = x.double()
    g = torch.randn(1, 4, 30, generator=gen, dtype=F64) @ (x[0].T @ x[0])  # in the row space
    g, gram = g.to(device64), (x.mT @ x).to(device64)
    out = tract_gradient(g, gram, torch.tensor(40.0, dtype=F64, device=device64), lam)
    assert out.isfinite().all()
    eye = torch.eye(30, dtype=F64, device=device64)
    factor, info = torch.linalg.cholesky_ex(gram / 40 + lam * eye)
    if info.item() == 0:  # where plain Cholesky works, the result is the plain one
        expected = torch.cholesky_solve(g.mT, factor).mT
        torch.testing.assert_close(out, expected)


def test_cholesky_finite_matches_cholesky_where_it_succeeds(device64):
    a = torch.tensor([[[4.0, 1.0], [1.0, 3.0]], [[1.0, 2.0], [2.0, 4.0 - 1e-14]]], dtype=F64)
    a = a.to(device64)
    factor = cholesky_finite(a)
    torch.testing.assert_close(factor[0], torch.linalg.cholesky(a[0]))
    # indefinite by rounding: factored with a raised diagonal (a true factor of nearly ``a``)
    torch.testing.assert_close(factor[1] @ factor[1].T, a[1], rtol=0, atol=1e-6)
    bad = a.clone()
    bad[0, 0, 0] = float("inf")
    assert cholesky_finite(bad)[0].isnan().all() and cholesky_finite(bad)[1].isfinite().all()


@pytest.mark.parametrize("statistics_dtype", [None, torch.float32])
@pytest.mark.parametrize("shape", [(64, 12), (4, 12)], ids=["n>=d", "n<d"])
def test_any_lambda_on_rank_deficient_input_is_finite(device, shape, statistics_dtype):
    """λ = 1e-12 on patches of rank 1 (every row the same bright vector), both forms."""
    linear = nn.Linear(12, 4).to(device)
    layer = trainact.TrAct(linear, l=1e-12, statistics_dtype=statistics_dtype)
    x = 200 + torch.arange(12.0, device=device).expand(*shape)
    layer(x).square().mean().backward()
    assert layer.weight.grad.isfinite().all()


@pytest.mark.parametrize("where", ["diagonal", "off-diagonal", "last diagonal"])
@pytest.mark.parametrize("value", [float("inf"), float("nan")])
def test_cholesky_finite_is_nan_for_any_non_finite_entry(device64, where, value):
    """A non-finite entry anywhere gives an all-NaN factor, also where LAPACK reports success
    (an infinite last diagonal entry factors 'successfully' into an infinite one)."""
    a = (2 * torch.eye(4, dtype=F64)).to(device64)
    i, j = {"diagonal": (1, 1), "off-diagonal": (3, 1), "last diagonal": (3, 3)}[where]
    a[i, j] = a[j, i] = value
    assert cholesky_finite(a).isnan().all()
