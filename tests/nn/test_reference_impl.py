"""Differential tests against the authors' reference, ``torch_tract`` 1.0.0 (a dev extra)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import trainact
from testing.harness import tract_error

torch_tract = pytest.importorskip("torch_tract")


def _compare(layer: nn.Module, x: torch.Tensor, lam: float) -> None:
    ours = trainact.TrAct(copy.deepcopy(layer), l=lam)
    theirs = torch_tract.TrAct(copy.deepcopy(layer), l=lam)
    out_ours, out_theirs = ours(x), theirs(x)
    torch.testing.assert_close(out_ours, out_theirs)
    grad_out = torch.randn_like(out_ours)
    out_ours.backward(grad_out)
    out_theirs.backward(grad_out)
    torch.testing.assert_close(ours.weight.grad, theirs.weight.grad, rtol=1e-9, atol=1e-11)
    if layer.bias is not None:
        torch.testing.assert_close(ours.bias.grad, theirs.bias.grad.reshape(-1))


@pytest.mark.parametrize("lam", [0.01, 0.1, 1.0])
@pytest.mark.parametrize("n", [3, 50], ids=["n<d", "n>d"])
@pytest.mark.parametrize("bias", [True, False])
def test_linear(lam, n, bias):
    torch.manual_seed(0)
    _compare(nn.Linear(12, 5, bias=bias).double(), torch.randn(n, 12, dtype=torch.float64), lam)


def test_linear_with_leading_dims():
    torch.manual_seed(1)
    _compare(nn.Linear(6, 4).double(), torch.randn(3, 7, 6, dtype=torch.float64), 0.1)


@pytest.mark.parametrize(
    "kwargs,shape",
    [
        (dict(kernel_size=3), (4, 3, 8, 8)),
        (dict(kernel_size=3, stride=2, padding=1), (3, 3, 9, 11)),
        (dict(kernel_size=(2, 3), stride=(1, 2), padding=(1, 0)), (2, 3, 7, 8)),
        (dict(kernel_size=4, stride=4), (5, 3, 16, 16)),
        (dict(kernel_size=5, padding=2), (1, 3, 3, 3)),  # n = 9 < d = 75: push-through
    ],
)
def test_conv2d(kwargs, shape):
    torch.manual_seed(0)
    _compare(nn.Conv2d(3, 6, **kwargs).double(), torch.randn(shape, dtype=torch.float64), 0.1)


def test_dilation_is_kept_where_the_reference_drops_it():
    """Why this project exists: the reference ignores dilation (its output has another shape
    than the layer's); trainact's output is the layer's, and its gradient is G·(XᵀX/n + λI)⁻¹
    of the dilated patches."""
    torch.manual_seed(0)
    layer = nn.Conv2d(3, 4, 3, dilation=2).double()
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64)
    theirs = torch_tract.TrAct(copy.deepcopy(layer))
    assert theirs(x).shape != layer(x).shape
    ours = trainact.TrAct(copy.deepcopy(layer))
    torch.testing.assert_close(ours(x), layer(x), rtol=0, atol=0)
    assert tract_error(copy.deepcopy(layer), x) < 1e-9  # (tract_error enables TrAct itself)
