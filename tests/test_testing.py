"""The references and checks of trainact/testing.py, against computations independent of them."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from trainact import testing

F64 = torch.float64


def test_conv_patches_are_unfold_s_columns():
    """The identity-kernel patches equal F.unfold's (zero padding, stride, dilation)."""
    torch.manual_seed(0)
    layer = nn.Conv2d(3, 4, (3, 2), stride=(2, 1), padding=1, dilation=(1, 2)).double()
    x = torch.randn(2, 3, 9, 8, dtype=F64)
    unfolded = F.unfold(x, (3, 2), dilation=(1, 2), padding=1, stride=(2, 1))  # (B, d, L)
    expected = unfolded.transpose(1, 2).reshape(1, -1, 3 * 3 * 2)
    torch.testing.assert_close(testing.reference_patches(layer, x), expected)


def test_grouped_conv_patches_are_per_group():
    layer = nn.Conv1d(4, 6, 3, groups=2).double()
    x = torch.randn(2, 4, 7, dtype=F64)
    patches = testing.reference_patches(layer, x)
    assert patches.shape == (2, 2 * 5, 2 * 3)
    first = F.unfold(x[:, :2, None], (1, 3)).transpose(1, 2).reshape(-1, 6)
    torch.testing.assert_close(patches[0], first)


def test_reference_gradient_is_the_explicit_formula():
    torch.manual_seed(0)
    layer = nn.Linear(5, 3).double()
    x = torch.randn(2, 7, 5, dtype=F64)
    g = torch.randn(3, 5, dtype=F64)
    rows = x.reshape(-1, 5)
    expected = g @ torch.linalg.inv(rows.T @ rows / 14 + 0.3 * torch.eye(5, dtype=F64))
    torch.testing.assert_close(testing.reference_tract_grad(layer, x, g, 0.3), expected)


def test_relative_error():
    a = torch.tensor([3.0, 4.0])
    assert testing.relative_error(a * 1.5, a) == pytest.approx(0.5)
    assert math.isnan(testing.relative_error(torch.tensor([math.nan, 0.0]), a))
    with pytest.raises(ValueError, match="zero"):
        testing.relative_error(a, torch.zeros(2))


def test_float64_device():
    assert testing.float64_device("cpu") == torch.device("cpu")
    assert testing.float64_device("cuda:1") == torch.device("cuda:1")
    assert testing.float64_device("mps") == torch.device("cpu")


def _exact_push_through(patches: torch.Tensor, grad: torch.Tensor, lam: float) -> torch.Tensor:
    """Dᵀ·(XXᵀ/n + λI)⁻¹·X per group in rational arithmetic (float64 inputs are exact
    rationals): ``patches`` (groups, n, d), ``grad`` (groups, n, out) -> (groups, out, d)."""
    from fractions import Fraction

    result = []
    for x_rows, d_rows in zip(patches.tolist(), grad.tolist(), strict=True):
        x = [[Fraction(v) for v in row] for row in x_rows]
        n, out = len(x), len(d_rows[0])
        system = [
            [sum(a * b for a, b in zip(x[i], x[j], strict=True)) / n + Fraction(lam) * (i == j)
             for j in range(n)] + [Fraction(v) for v in d_rows[i]]
            for i in range(n)
        ]  # fmt: skip
        for c in range(n):  # Gauss-Jordan; K is positive definite, so no pivot is zero
            for r in range(n):
                if r != c:
                    f = system[r][c] / system[c][c]
                    system[r] = [a - f * b for a, b in zip(system[r], system[c], strict=True)]
        t = [[system[i][n + o] / system[i][i] for o in range(out)] for i in range(n)]
        result.append(
            [[float(sum(t[i][o] * x[i][k] for i in range(n))) for k in range(len(x[0]))]
             for o in range(out)]
        )  # fmt: skip
    return torch.tensor(result, dtype=F64)


@pytest.mark.parametrize("scale", [1.0, 1e3, 1e5, 1e6, 1e8])
@pytest.mark.parametrize("kind", ["linear", "conv", "grouped conv"])
def test_exact_tract_grad_is_exact_for_n_below_d_at_every_input_scale(kind, scale):
    """Against rational arithmetic: 1e-12 at every scale (inverting the d×d matrix was 4e-5 to
    8e-5 off at scale 1e5, 5e-3 to 6e-3 at 1e6 and 3 to 40 at 1e8 on the linear and conv
    cases; the push-through form is within 4e-14)."""
    torch.manual_seed(0)
    if kind == "linear":
        layer, x = nn.Linear(10, 3).double(), 1 + torch.rand(4, 10, dtype=F64)
    elif kind == "conv":
        layer, x = nn.Conv2d(2, 3, 3).double(), 1 + torch.rand(1, 2, 4, 4, dtype=F64)
    else:
        layer, x = nn.Conv1d(4, 6, 3, groups=2).double(), 1 + torch.rand(1, 4, 5, dtype=F64)
    x = scale * x
    grad = torch.randn_like(layer(x))
    patches = testing.reference_patches(layer, x)
    groups, n, _ = patches.shape
    rows = (
        grad.reshape(1, n, -1) if kind == "linear" else grad.movedim(1, -1).reshape(n, groups, -1)
    )
    expected = _exact_push_through(patches, rows.transpose(0, 1) if kind != "linear" else rows, 0.1)
    got = testing.exact_tract_grad(layer, x, grad, 0.1)
    assert testing.relative_error(got, expected.reshape(layer.weight.shape)) < 1e-12
