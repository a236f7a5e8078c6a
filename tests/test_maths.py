"""The solver in float64: Lemma 1, the λ → ∞ limit, push-through, n = 0 and non-finite input."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from trainact.maths import precondition_with_gram, precondition_with_patches

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
def test_gram_and_push_through_agree_with_explicit_inverse(seed, groups, out, n, d, lam):
    g, x = _problem(seed, groups, out, n, d)
    expected = g @ torch.linalg.inv(x.mT @ x / n + lam * torch.eye(d, dtype=F64))
    by_gram = precondition_with_gram(g, x.mT @ x, torch.tensor(float(n), dtype=F64), lam)
    by_patches = precondition_with_patches(g, x, lam)
    torch.testing.assert_close(by_gram, expected, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(by_patches, expected, rtol=1e-8, atol=1e-10)


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
    tract = precondition_with_gram(grad_w[None], x.T @ x, torch.tensor(float(n), dtype=F64), lam)[0]
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
        scaled = lam * precondition_with_gram(g, x.mT @ x, torch.tensor(20.0, dtype=F64), lam)
        torch.testing.assert_close(scaled, g, rtol=100 / lam, atol=100 / lam)


def test_empty_batch_gives_zero_not_nan():
    g = torch.zeros(1, 3, 5)
    out = precondition_with_gram(g, torch.zeros(1, 5, 5), torch.tensor(0.0), 0.1)
    assert torch.equal(out, torch.zeros_like(g))


def test_non_finite_input_stays_non_finite_and_never_raises():
    g, x = _problem(2, 1, 3, 10, 4)
    g = g.float()
    gram = (x.mT @ x).float()
    count = torch.tensor(10.0)
    bad_grad = g.clone()
    bad_grad[0, 0, 0] = float("inf")
    assert not precondition_with_gram(bad_grad, gram, count, 0.1).isfinite().all()
    bad_gram = gram.clone()
    bad_gram[0, 1, 1] = float("nan")
    assert not precondition_with_gram(g, bad_gram, count, 0.1).isfinite().all()
    bad_x = x.float().clone()
    bad_x[0, 0, 0] = float("inf")
    assert not precondition_with_patches(g, bad_x, 0.1).isfinite().all()


def test_result_keeps_the_gradient_dtype():
    g, x = _problem(3, 1, 2, 8, 3)
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        out = precondition_with_gram(g.to(dtype), (x.mT @ x).float(), torch.tensor(8.0), 0.1)
        assert out.dtype == dtype
