"""The statistics of one call (trainact/nn/call_statistics.py): accuracy at every input scale on
real photos against the float64 reference, and the CPU's float32/float64 choice.

The cases and their targets live in testing/accuracy_cases.py; benchmarks/accuracy.py prints
them as a table.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import trainact
from testing.accuracy_cases import (
    ACCURACY_CASES,
    case_error,
    over_exposed,
    photos,
    smooth,
    standardized,
    tokens,
)
from testing.harness import tract_and_reference_grads, tract_error
from trainact.maths import precision
from trainact.testing import relative_error

pytest.importorskip("numpy")
pytest.importorskip("PIL")
CASE_IDS = [c.name for c in ACCURACY_CASES]


@pytest.fixture(scope="module")
def images(device) -> torch.Tensor:
    """256 photos of the embedded subset, raw pixels, on the device under test."""
    return photos(256, device=device)


@pytest.mark.parametrize("case", ACCURACY_CASES, ids=CASE_IDS)
def test_default_statistics_meet_the_target(images, case):
    assert case_error(case, images) <= case.target


@pytest.mark.parametrize("case", ACCURACY_CASES, ids=CASE_IDS)
def test_float32_path_meets_the_target(images, case):
    """The path of devices without fast float64 (split float32 product), on any device."""
    assert case_error(case, images, torch.float32) <= case.target


@pytest.mark.parametrize("case", ACCURACY_CASES, ids=CASE_IDS)
def test_float64_statistics_are_exact(images, case):
    assert case_error(case, images, torch.float64) <= case.exact_target


GPU_POLICIES = {
    "H100": precision.gpu_precision("NVIDIA H100 80GB HBM3", 9, 0, memory=80 * 10**9),
    "RTX 4090": precision.gpu_precision("NVIDIA GeForce RTX 4090", 8, 9, memory=24 * 10**9),
    "no float64": precision.HOST_SOLVE,
}


@pytest.mark.parametrize("policy", GPU_POLICIES)
@pytest.mark.parametrize("case", ACCURACY_CASES, ids=CASE_IDS)
def test_every_devices_path_meets_the_target(images, case, policy):
    """Each device's default path run here (forced by use_precision): the H100's float64
    product, the RTX 4090's split product with its exact part in int8, the host solve of a
    device without float64 (its exact part in int8 and int64)."""
    chosen = GPU_POLICIES[policy]
    with precision.use_precision(chosen):
        error = case_error(case, images)
    assert error <= (case.exact_target if chosen.product == precision.FLOAT64 else case.target)


SCALES = {
    "standardized": (standardized, 3e-5),
    "unit": (lambda x: x / 255, 3e-5),
    "raw": (lambda x: x, 2e-3),
    "smooth raw": (lambda x: smooth(x, 64), 1e-2),
    "over-exposed": (lambda x: over_exposed(x, 64), 5e-2),
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
    assert tract_error(layer.to(x.device), x, lam=lam) <= target


def test_over_exposed_smooth_photos_no_longer_give_nan(images):
    """Regression: float32 statistics of pixels in [200, 255] made the 8×8/8 stem's gradient NaN,
    and under a GradScaler every step would then be skipped."""
    x = over_exposed(images[:32])
    layer = trainact.TrAct(nn.Conv2d(3, 16, 8, stride=8).to(x.device))
    layer(x).square().mean().backward()
    assert layer.weight.grad.isfinite().all()


def _record_products(monkeypatch) -> list[torch.dtype]:
    """The dtype of every product the CPU's statistics run, in order."""
    from trainact.nn import call_statistics

    chosen: list[torch.dtype] = []
    original = call_statistics._product
    monkeypatch.setattr(
        call_statistics,
        "_product",
        lambda stats, adapter, x, mean, dtype, precision: (
            chosen.append(dtype) or original(stats, adapter, x, mean, dtype, precision)
        ),
    )
    return chosen


@pytest.mark.cpu_only("the CPU's data-dependent choice of the float32 product")
def test_float32_product_is_chosen_only_where_it_is_accurate(images, monkeypatch):
    """Standardized input: the fast float32 product; raw pixels: float64. Forcing float32 on
    raw pixels breaks the target, so the choice is what keeps the default accurate."""
    chosen = _record_products(monkeypatch)
    case = next(c for c in ACCURACY_CASES if c.name == "[0, 255], 8x8/8")
    case_error(ACCURACY_CASES[0], images)
    case_error(case, images)
    assert chosen == [torch.float32, torch.float64]
    monkeypatch.setattr(precision, "FLOAT32_MAX_RATIO", float("inf"))
    assert case_error(case, images) > case.target


def _strided_skipping(images: torch.Tensor) -> torch.Tensor:
    """Photos in [0, 24] on the 2×2 pixels of each 8×8 cell that a 2×2 convolution of stride
    8 sees, each channel's mean everywhere else: the whole input's variance is about 1/16 of
    what the layer sees (estimate 0.9 of the float32 limit, the patches 15 times over it)."""
    seen = images[:64] * (24 / 255)
    x = seen.mean((0, 2, 3), keepdim=True).expand_as(seen).clone()
    for i in range(2):
        for j in range(2):
            x[..., i::8, j::8] = seen[..., i::8, j::8]
    return x


def _outlier_rows(images: torch.Tensor) -> torch.Tensor:
    """Standardized token rows with 3 of 8192 rows 200 times brighter (a row sample missed
    them)."""
    x = tokens(standardized(images[:128]), 4).reshape(-1, 48)
    x[[17, 4099, 8000]] *= 200
    return x


@pytest.mark.parametrize(
    "make_layer,make_input",
    [
        (lambda: nn.Conv2d(3, 16, 2, stride=8), _strided_skipping),
        (lambda: nn.Linear(48, 16), _outlier_rows),
    ],
    ids=["strided-conv-skips-pixels", "linear-outlier-rows"],
)
@pytest.mark.cpu_only("the CPU's data-dependent choice of the float32 product")
def test_float32_choice_cannot_be_fooled(images, monkeypatch, make_layer, make_input):
    """Inputs whose cheap estimate says float32 where the float32 product misses the target:
    the product's own diagonal sends them to float64. Forcing float32 shows they need it."""
    x = make_input(images)
    torch.manual_seed(0)
    chosen = _record_products(monkeypatch)
    assert tract_error(make_layer(), x) <= 3e-5
    assert chosen[-1] == torch.float64
    torch.manual_seed(0)
    monkeypatch.setattr(precision, "FLOAT32_MAX_RATIO", float("inf"))
    assert tract_error(make_layer(), x) > 3e-5


@pytest.mark.parametrize(
    "layer,x",
    [
        (nn.Conv1d(2, 8, 7, padding="same"), 1013 + 0.3 * torch.randn(8, 2, 512)),
        (nn.Conv2d(3, 8, 7, 2, 3), 255 - 0.3 * torch.rand(8, 3, 32, 32)),
        (nn.Conv2d(3, 8, 7, 2, 3), 1013 + 0.1 * torch.randn(8, 3, 32, 32)),
    ],
    ids=["hPa-conv1d-same", "near-white", "large-mean-small-variance"],
)
def test_zero_padding_of_large_mean_inputs_is_accurate(device, layer, x):
    """Zero padding puts centered entries at −mean: a large mean with a small variance must not
    pick the float32 product (it gave 0.22 and NaN)."""
    torch.manual_seed(0)
    assert tract_error(layer.to(device), x.to(device)) <= 1e-5


def test_linear_moments_do_not_alias_with_token_positions(device):
    """Every second token zero, the others bright: evenly spaced sampling saw only zeros."""
    torch.manual_seed(0)
    x = torch.zeros(2048, 4, 48)
    x[:, 1::2] = 200 + 50 * torch.rand(2048, 2, 1) + torch.rand(2048, 2, 48)  # smooth rows
    assert tract_error(nn.Linear(48, 8).to(device), x.to(device)) <= 2e-3


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", ACCURACY_CASES, ids=CASE_IDS)
def test_half_precision_layers_meet_the_float32_targets(images, case, dtype):
    """float16 and bfloat16 layers on the same photos in that dtype: the gradient is the
    float64 answer for that half-precision input, rounded to the layer's dtype, to within the
    float32 target (the statistics accumulate in float32 or better whatever the dtype)."""
    torch.manual_seed(0)
    layer = case.layer().to(images.device, dtype)
    x = case.input(images).to(dtype)
    with torch.no_grad():
        shape = layer(x).shape
    grad_out = (1e-3 * torch.randn(shape)).to(images.device, dtype)  # float16's G in range
    got, expected = tract_and_reference_grads(layer, x, grad_output=grad_out)
    assert got.dtype == dtype and got.isfinite().all()
    rounding = relative_error(expected.to(dtype), expected)
    assert relative_error(got, expected) - rounding <= case.target


def test_float16_linear_on_raw_pixels_is_finite(device):
    """Regression: the row sums of a float16 input overflowed past 65504 (NaN gradient, and a
    GradScaler would then skip every step)."""
    torch.manual_seed(0)
    layer = trainact.TrAct(nn.Linear(48, 16).to(device, torch.float16))
    x = (torch.rand(600, 48) * 255).to(device, torch.float16)
    layer(x).float().mean().backward()
    assert layer.weight.grad.isfinite().all()
