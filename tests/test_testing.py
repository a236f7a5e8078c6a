"""The references and checks of trainact/testing.py, against computations independent of them."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import trainact
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


def test_tract_error_tells_the_right_lambda_from_a_wrong_one():
    torch.manual_seed(0)
    x, grad = torch.randn(8, 3, 10, 10), torch.randn(8, 4, 8, 8)
    got, expected = {}, {}
    for lam in (0.1, 1.0):
        torch.manual_seed(1)
        layer = nn.Conv2d(3, 4, 3)
        got[lam], expected[lam] = testing.tract_and_reference_grads(
            layer, x, lam=lam, grad_output=grad
        )
    assert testing.relative_error(got[0.1], expected[0.1]) < 1e-5
    assert testing.relative_error(got[0.1], expected[1.0]) > 1e-2


def test_n_smaller_than_d_uses_the_exact_answer():
    """For n < d the reference is the float64 answer for the input (exact_tract_grad), which
    the n×n form meets."""
    torch.manual_seed(0)
    assert testing.tract_error(nn.Linear(300, 8), 255 * torch.rand(16, 300)) < 1e-5


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


def test_step_error_is_nan_for_a_step_a_grad_scaler_skips():
    torch.manual_seed(0)
    model = testing.small_cnn()
    trainact.apply(model)
    x, y = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])
    assert testing.step_error(model, x, y) < 1e-5
    x[0, 0, 0, 0] = math.inf
    assert math.isnan(testing.step_error(model, x, y))


def test_model_step_error_refuses_a_layer_called_twice():
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.stem(self.stem(x))

    model = Twice()
    trainact.apply(model, layer="stem")
    with pytest.raises(RuntimeError, match="called 2 times"):
        testing.model_step_error(model, "stem", (torch.randn(3, 4),))


def test_accuracy_cases_and_photos():
    pytest.importorskip("numpy")
    pytest.importorskip("PIL")  # the photos are JPEG-decoded
    names = [case.name for case in testing.ACCURACY_CASES]
    assert len(set(names)) == len(names)
    images = testing.photos(8)
    assert images.shape == (8, 3, 32, 32) and images.dtype == torch.float32
    assert 0 <= images.min() < 20 and 235 < images.max() <= 255  # raw pixels
    over = testing.over_exposed(images)
    assert over.min() >= 200 and over.max() <= 255 and over.shape[-1] == 128
    assert testing.standardized(images).mean((0, 2, 3)).abs().max() < 1e-5
    assert testing.tokens(images, 8).shape == (8, 16, 192)
