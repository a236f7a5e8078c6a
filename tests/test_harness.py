"""The shared test harness (the repository-root ``testing`` package): its checks tell right
from wrong, and its accuracy cases are real photos at the scales they name."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import trainact
from testing import accuracy_cases, harness
from trainact.testing import relative_error


def test_tract_error_tells_the_right_lambda_from_a_wrong_one():
    torch.manual_seed(0)
    x, grad = torch.randn(8, 3, 10, 10), torch.randn(8, 4, 8, 8)
    got, expected = {}, {}
    for lam in (0.1, 1.0):
        torch.manual_seed(1)
        layer = nn.Conv2d(3, 4, 3)
        got[lam], expected[lam] = harness.tract_and_reference_grads(
            layer, x, lam=lam, grad_output=grad
        )
    assert relative_error(got[0.1], expected[0.1]) < 1e-5
    assert relative_error(got[0.1], expected[1.0]) > 1e-2


def test_n_smaller_than_d_uses_the_exact_answer():
    """For n < d the reference is the float64 answer for the input (exact_tract_grad), which
    the n×n form meets."""
    torch.manual_seed(0)
    assert harness.tract_error(nn.Linear(300, 8), 255 * torch.rand(16, 300)) < 1e-5


def test_step_error_is_nan_for_a_step_a_grad_scaler_skips():
    torch.manual_seed(0)
    model = harness.small_cnn()
    trainact.apply(model)
    x, y = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])
    assert harness.step_error(model, x, y) < 1e-5
    x[0, 0, 0, 0] = math.inf
    assert math.isnan(harness.step_error(model, x, y))


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
        harness.model_step_error(model, "stem", (torch.randn(3, 4),))


def test_accuracy_cases_and_photos():
    pytest.importorskip("numpy")
    pytest.importorskip("PIL")  # the photos are JPEG-decoded
    names = [case.name for case in accuracy_cases.ACCURACY_CASES]
    assert len(set(names)) == len(names)
    images = accuracy_cases.photos(8)
    assert images.shape == (8, 3, 32, 32) and images.dtype == torch.float32
    assert 0 <= images.min() < 20 and 235 < images.max() <= 255  # raw pixels
    over = accuracy_cases.over_exposed(images)
    assert over.min() >= 200 and over.max() <= 255 and over.shape[-1] == 128
    assert accuracy_cases.standardized(images).mean((0, 2, 3)).abs().max() < 1e-5
    assert accuracy_cases.tokens(images, 8).shape == (8, 16, 192)
