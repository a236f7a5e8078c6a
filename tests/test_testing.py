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
