"""Accuracy at every input scale on real photos, against the float64 reference (issue 8).

The cases and their targets live in benchmarks/accuracy.py, which prints the same table.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

pytest.importorskip("numpy")
pytest.importorskip("PIL")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import accuracy  # noqa: E402

import trainact  # noqa: E402
from trainact.testing import reference_tract_grad, relative_error  # noqa: E402


def tract_error(layer: nn.Module, x: torch.Tensor, lam: float = 0.1) -> float:
    """Relative error of TrAct's gradient on ``layer`` (a plain copy gives G) against the float64
    reference; asserts it is finite."""
    plain = copy.deepcopy(layer)
    tract = trainact.TrAct(layer, l=lam)
    out = plain(x)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    tract(x).backward(grad_out)
    assert tract.weight.grad.isfinite().all()
    expected = reference_tract_grad(tract, x, plain.weight.grad, lam)
    return relative_error(tract.weight.grad, expected)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> torch.Tensor:
    return accuracy.photos(256, str(tmp_path_factory.mktemp("cifar-cache")))


@pytest.mark.parametrize("case", accuracy.CASES, ids=[c.name for c in accuracy.CASES])
def test_default_statistics_meet_the_target(images, case):
    assert accuracy.case_error(case, images) <= case.target


@pytest.mark.parametrize("case", accuracy.CASES, ids=[c.name for c in accuracy.CASES])
def test_float64_statistics_are_exact(images, case):
    assert accuracy.case_error(case, images, torch.float64) <= 1e-6


SCALES = {
    "standardized": (accuracy.standardized, 3e-5),
    "unit": (lambda x: x / 255, 3e-5),
    "raw": (lambda x: x, 2e-3),
    "smooth raw": (lambda x: accuracy.smooth(x, 64), 1e-2),
    "over-exposed": (lambda x: 200 + accuracy.smooth(x, 64) * (55 / 255), 5e-2),
}


@settings(max_examples=30, deadline=None)
@given(
    scale=st.sampled_from(sorted(SCALES)),
    kernel=st.integers(1, 8),
    stride=st.integers(1, 8),
    padding=st.integers(0, 3),
    start=st.integers(0, 200),
    batch=st.integers(1, 48),
    lam=st.sampled_from([0.01, 0.1, 1.0]),
    seed=st.integers(0, 2**16),
)
def test_any_stem_at_any_scale_is_finite_and_accurate(
    images, scale, kernel, stride, padding, start, batch, lam, seed
):
    transform, target = SCALES[scale]
    x = transform(images[start : start + batch])
    torch.manual_seed(seed)
    layer = nn.Conv2d(3, 8, kernel, stride=stride, padding=min(padding, kernel - 1))
    assert tract_error(layer, x, lam) <= target


def test_over_exposed_smooth_photos_no_longer_give_nan(images):
    """Regression: float32 statistics of pixels in [200, 255] made the 8×8/8 stem's gradient NaN,
    and under a GradScaler every step would then be skipped."""
    x = 200 + accuracy.smooth(images[:32]) * (55 / 255)
    layer = trainact.TrAct(nn.Conv2d(3, 16, 8, stride=8))
    layer(x).square().mean().backward()
    assert layer.weight.grad.isfinite().all()


def test_float32_gemm_is_chosen_only_where_it_is_accurate(images, monkeypatch):
    """Standardized input: the fast float32 GEMM; raw pixels: float64. Forcing float32 on raw
    pixels breaks the target, so the choice is what keeps the default accurate."""
    from trainact.nn import layer as tract_layer

    chosen = []
    original = tract_layer.gemm_dtype
    monkeypatch.setattr(
        tract_layer, "gemm_dtype", lambda *a: chosen.append(original(*a)) or chosen[-1]
    )
    case = next(c for c in accuracy.CASES if c.name == "[0, 255], 8x8/8")
    accuracy.case_error(accuracy.CASES[0], images)
    accuracy.case_error(case, images)
    assert chosen == [torch.float32, torch.float64]
    monkeypatch.setattr(tract_layer, "FLOAT32_MAX_RATIO", float("inf"))
    assert accuracy.case_error(case, images) > case.target


@pytest.mark.parametrize(
    "layer,x",
    [
        (nn.Conv1d(2, 8, 7, padding="same"), 1013 + 0.3 * torch.randn(8, 2, 512)),
        (nn.Conv2d(3, 8, 7, 2, 3), 255 - 0.3 * torch.rand(8, 3, 32, 32)),
        (nn.Conv2d(3, 8, 7, 2, 3), 1013 + 0.1 * torch.randn(8, 3, 32, 32)),
    ],
    ids=["hPa-conv1d-same", "near-white", "large-mean-small-variance"],
)
def test_zero_padding_of_large_mean_inputs_is_accurate(layer, x):
    """Zero padding puts centered entries at −mean: a large mean with a small variance must not
    pick the float32 product (it gave 0.22 and NaN)."""
    torch.manual_seed(0)
    assert tract_error(layer, x) <= 1e-5


def test_linear_moments_do_not_alias_with_token_positions():
    """Every second token zero, the others bright: evenly spaced sampling saw only zeros."""
    torch.manual_seed(0)
    x = torch.zeros(2048, 4, 48)
    x[:, 1::2] = 200 + 50 * torch.rand(2048, 2, 1) + torch.rand(2048, 2, 48)  # smooth rows
    assert tract_error(nn.Linear(48, 8), x) <= 2e-3
