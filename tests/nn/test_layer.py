"""The TrAct layer (trainact/nn/layer.py): every supported layer family and option against the
float64 reference G·(XᵀX/n + λI)⁻¹."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import trainact
from testing.harness import check_layer, plain_and_tract
from trainact.testing import float64_device, reference_tract_grad

CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


@st.composite
def conv_configs(draw):
    """A random ConvNd with every constructor option and an input it accepts."""
    dims = draw(st.sampled_from([1, 2, 2, 3]))
    groups = draw(st.sampled_from([1, 1, 2, 3]))
    in_ch = groups * draw(st.integers(1, 2))
    out_ch = groups * draw(st.integers(1, 2))
    kernel = tuple(draw(st.integers(1, 3)) for _ in range(dims))
    dilation = tuple(draw(st.integers(1, 2)) for _ in range(dims))
    padding_mode = draw(st.sampled_from(["zeros", "reflect", "replicate", "circular"]))
    kind = draw(st.sampled_from(["int", "tuple", "same", "valid"]))
    if kind == "same":
        padding, stride = "same", 1
    else:
        stride = tuple(draw(st.integers(1, 3)) for _ in range(dims))
        if kind == "valid":
            padding = "valid"
        elif kind == "int":
            padding = draw(st.integers(0, 2))
        else:
            padding = tuple(draw(st.integers(0, 2)) for _ in range(dims))
    spans = [dilation[i] * (kernel[i] - 1) + 1 for i in range(dims)]
    size = tuple(
        draw(st.integers(max(s, 3), max(s, 3) + 4)) for s in spans
    )  # reflect needs pad < size
    batch = draw(st.integers(1, 3))
    layer = CONV[dims](
        in_ch,
        out_ch,
        kernel,
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=groups,
        bias=draw(st.booleans()),
        padding_mode=padding_mode,
    )
    return layer, (batch, in_ch, *size)


@settings(max_examples=60, deadline=None)
@given(config=conv_configs(), seed=st.integers(0, 2**31), lam=st.sampled_from([0.01, 0.1, 1.0]))
def test_conv_matches_float64_reference(device64, config, seed, lam):
    layer, shape = config
    torch.manual_seed(seed)
    check_layer(layer.double(), torch.randn(shape, dtype=torch.float64), lam, 1e-7, 1e-9, device64)


@settings(max_examples=25, deadline=None)
@given(config=conv_configs(), seed=st.integers(0, 2**31))
def test_conv_float32_matches_float64_reference(device, config, seed):
    layer, shape = config
    torch.manual_seed(seed)
    check_layer(layer, torch.randn(shape), 0.1, 2e-3, 2e-4, device)


@settings(max_examples=30, deadline=None)
@given(
    lead=st.lists(st.integers(0, 4), min_size=0, max_size=3),
    in_f=st.integers(1, 9),
    out_f=st.integers(1, 5),
    bias=st.booleans(),
    seed=st.integers(0, 2**31),
)
def test_linear_any_leading_dims_matches_float64_reference(device64, lead, in_f, out_f, bias, seed):
    torch.manual_seed(seed)
    layer = nn.Linear(in_f, out_f, bias=bias).double()
    check_layer(layer, torch.randn(*lead, in_f, dtype=torch.float64), 0.1, 1e-7, 1e-9, device64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_parameter_dtypes(device, dtype, kind):
    if dtype == torch.float64 and float64_device(device) != device:
        pytest.skip(f"{device.type} has no float64")
    torch.manual_seed(0)
    if kind == "linear":
        layer, x = nn.Linear(6, 4), torch.randn(40, 6)
    else:
        layer, x = nn.Conv2d(3, 4, 3, padding=1), torch.randn(4, 3, 8, 8)
    layer, x = layer.to(device, dtype), x.to(device, dtype)
    plain, tract = plain_and_tract(layer)
    assert torch.equal(plain(x), tract(x))
    plain(x).square().sum().backward()
    tract(x).square().sum().backward()
    assert tract.weight.grad.dtype == dtype
    expected = reference_tract_grad(tract, x, plain.weight.grad, 0.1)
    tol = {torch.float64: 1e-9, torch.float32: 1e-4}.get(dtype, 2e-2)
    torch.testing.assert_close(
        tract.weight.grad.double(), expected, rtol=tol, atol=tol * expected.abs().max().item()
    )


def test_channels_last_input_and_weights(device):
    torch.manual_seed(0)
    layer = nn.Conv2d(3, 5, 3, stride=2, padding=1).to(device, memory_format=torch.channels_last)
    x = torch.randn(4, 3, 11, 9).to(device, memory_format=torch.channels_last)
    check_layer(layer, x, 0.1, 2e-3, 2e-4)
    layer3 = nn.Conv3d(2, 3, 2).to(device)
    x3 = torch.randn(2, 2, 4, 5, 4).to(device, memory_format=torch.channels_last_3d)
    check_layer(layer3, x3, 0.1, 2e-3, 2e-4)


def test_unbatched_conv_input(device64):
    torch.manual_seed(0)
    conv2d, x2 = nn.Conv2d(2, 3, 3, padding=1).double(), torch.randn(2, 6, 5, dtype=torch.float64)
    check_layer(conv2d, x2, 0.1, 1e-7, 1e-9, device64)
    conv1d, x1 = nn.Conv1d(2, 3, 2).double(), torch.randn(2, 7, dtype=torch.float64)
    check_layer(conv1d, x1, 0.1, 1e-7, 1e-9, device64)


def test_empty_batch_gives_zero_gradient(device):
    layer = nn.Conv2d(3, 4, 3).to(device)
    trainact.TrAct(layer)
    layer(torch.randn(0, 3, 8, 8, device=device)).sum().backward()
    assert torch.equal(layer.weight.grad, torch.zeros_like(layer.weight))


def test_non_finite_gradient_stays_non_finite(device):
    layer = trainact.TrAct(nn.Conv2d(3, 4, 3).to(device))
    x = torch.randn(2, 3, 6, 6, device=device)
    x[0, 0, 0, 0] = float("inf")
    layer(x).sum().backward()  # never raises
    assert not layer.weight.grad.isfinite().all()
    layer.weight.grad = None
    out = layer(torch.randn(2, 3, 6, 6, device=device))
    (out.sum() * float("inf")).backward()
    assert not layer.weight.grad.isfinite().all()


def test_several_calls_each_use_their_own_input(device64):
    torch.manual_seed(0)
    layer = nn.Conv2d(2, 3, 3).to(device64, torch.float64)
    plain, tract = plain_and_tract(layer)
    xs = [torch.randn(2, 2, 6, 6, dtype=torch.float64).to(device64) * s for s in (1.0, 5.0)]
    sum(tract(x).square().sum() for x in xs).backward()
    expected = 0
    for x in xs:
        p = copy.deepcopy(plain)
        p(x).square().sum().backward()
        expected = expected + reference_tract_grad(tract, x, p.weight.grad, 0.1)
    torch.testing.assert_close(tract.weight.grad, expected, rtol=1e-7, atol=1e-9)
