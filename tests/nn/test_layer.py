"""Every supported layer and option against the float64 reference G·(XᵀX/n + λI)⁻¹."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from tract_reference import plain_and_tract, reference_tract_grad

import trainact
from trainact.maths import PatchStatistics
from trainact.nn import adapters

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


def _check(layer: nn.Module, x: torch.Tensor, lam: float, rtol: float, atol: float) -> None:
    plain, tract = plain_and_tract(layer, lam)
    out_plain, out_tract = plain(x), tract(x)
    assert torch.equal(out_plain, out_tract), "forward must be bit-identical"
    grad_out = torch.randn_like(out_plain)
    xp, xt = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    plain(xp).backward(grad_out)
    tract(xt).backward(grad_out)
    expected = reference_tract_grad(tract, x, plain.weight.grad, lam)
    assert tract.weight.grad.dtype == tract.weight.dtype
    torch.testing.assert_close(tract.weight.grad.double(), expected, rtol=rtol, atol=atol)
    assert torch.equal(xp.grad, xt.grad), "input gradient must be unchanged"
    if plain.bias is not None:
        assert torch.equal(plain.bias.grad, tract.bias.grad), "bias gradient must be unchanged"


@settings(max_examples=60, deadline=None)
@given(config=conv_configs(), seed=st.integers(0, 2**31), lam=st.sampled_from([0.01, 0.1, 1.0]))
def test_conv_matches_float64_reference(config, seed, lam):
    layer, shape = config
    torch.manual_seed(seed)
    _check(layer.double(), torch.randn(shape, dtype=torch.float64), lam, 1e-7, 1e-9)


@settings(max_examples=25, deadline=None)
@given(config=conv_configs(), seed=st.integers(0, 2**31))
def test_conv_float32_matches_float64_reference(config, seed):
    layer, shape = config
    torch.manual_seed(seed)
    _check(layer, torch.randn(shape), 0.1, 2e-3, 2e-4)


@settings(max_examples=30, deadline=None)
@given(
    lead=st.lists(st.integers(0, 4), min_size=0, max_size=3),
    in_f=st.integers(1, 9),
    out_f=st.integers(1, 5),
    bias=st.booleans(),
    seed=st.integers(0, 2**31),
)
def test_linear_any_leading_dims_matches_float64_reference(lead, in_f, out_f, bias, seed):
    torch.manual_seed(seed)
    layer = nn.Linear(in_f, out_f, bias=bias).double()
    _check(layer, torch.randn(*lead, in_f, dtype=torch.float64), 0.1, 1e-7, 1e-9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_parameter_dtypes(dtype, kind):
    torch.manual_seed(0)
    if kind == "linear":
        layer, x = nn.Linear(6, 4), torch.randn(40, 6)
    else:
        layer, x = nn.Conv2d(3, 4, 3, padding=1), torch.randn(4, 3, 8, 8)
    layer, x = layer.to(dtype), x.to(dtype)
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


def test_channels_last_input_and_weights():
    torch.manual_seed(0)
    layer = nn.Conv2d(3, 5, 3, stride=2, padding=1)
    x = torch.randn(4, 3, 11, 9).to(memory_format=torch.channels_last)
    _check(layer.to(memory_format=torch.channels_last), x, 0.1, 2e-3, 2e-4)
    layer3 = nn.Conv3d(2, 3, 2)
    x3 = torch.randn(2, 2, 4, 5, 4).to(memory_format=torch.channels_last_3d)
    _check(layer3, x3, 0.1, 2e-3, 2e-4)


def test_unbatched_conv_input():
    torch.manual_seed(0)
    _check(
        nn.Conv2d(2, 3, 3, padding=1).double(),
        torch.randn(2, 6, 5, dtype=torch.float64),
        0.1,
        1e-7,
        1e-9,
    )
    _check(nn.Conv1d(2, 3, 2).double(), torch.randn(2, 7, dtype=torch.float64), 0.1, 1e-7, 1e-9)


@pytest.mark.parametrize(
    "layer,shape,dtype",
    [
        (nn.Conv2d(3, 4, 3, padding=2, dilation=2, padding_mode="reflect"), (5, 3, 10, 12), None),
        (nn.Conv2d(4, 4, 2, stride=2, groups=2), (3, 4, 8, 8), None),
        (nn.Conv3d(1, 2, 2, padding=1), (2, 1, 5, 6, 5), None),
        (nn.Linear(7, 3), (6, 5, 7), torch.bfloat16),  # converted to float32 chunk by chunk
    ],
)
def test_bounded_chunks_are_exact(monkeypatch, layer, shape, dtype):
    """A tiny chunk budget forces batch chunks and splits within one sample; still exact."""
    seen: list[int] = []
    original = PatchStatistics.add_chunk

    def recording(self, centered, shift, total=None):
        seen.append(centered.numel() * centered.element_size())
        return original(self, centered, shift, total)

    monkeypatch.setattr(PatchStatistics, "add_chunk", recording)
    monkeypatch.setattr(adapters, "CHUNK_BYTES", 4 * 4 * 40)  # about 40 rows of d=4
    torch.manual_seed(0)
    dtype = dtype or torch.float64
    layer, x = layer.to(dtype), torch.randn(shape, dtype=dtype)
    tol = 1e-7 if dtype == torch.float64 else 2e-2
    _check(layer, x, 0.1, tol, tol)
    assert len(seen) > 2, "the budget must have split the patches"
    # at most the budget, or one slice of one sample along the first output dimension
    adapter = adapters.adapter_for(layer)
    out_shape = layer(x.to(layer.weight.dtype)).shape
    slice_rows = out_shape[3:].numel() if isinstance(layer, nn.Conv3d | nn.Conv2d) else 1
    slice_bytes = slice_rows * adapter.dim * adapter.groups * 8  # float64 or float32: ≤ 8
    assert max(seen) <= max(4 * 4 * 40, slice_bytes), seen


def test_non_overlapping_patches_need_no_padding_copy(monkeypatch):
    """ViT patch embedding (stride == kernel, no padding): no F.pad, exact."""
    calls = []
    monkeypatch.setattr(
        adapters.F, "pad", lambda *a, **k: calls.append(a) or torch.nn.functional.pad(*a, **k)
    )
    torch.manual_seed(0)
    _check(
        nn.Conv2d(3, 8, 4, stride=4).double(),
        torch.randn(20, 3, 16, 16, dtype=torch.float64),
        0.1,
        1e-7,
        1e-9,
    )
    assert not calls


def test_empty_batch_gives_zero_gradient():
    layer = nn.Conv2d(3, 4, 3)
    trainact.TrAct(layer)
    layer(torch.randn(0, 3, 8, 8)).sum().backward()
    assert torch.equal(layer.weight.grad, torch.zeros_like(layer.weight))


def test_non_finite_gradient_stays_non_finite():
    layer = trainact.TrAct(nn.Conv2d(3, 4, 3))
    x = torch.randn(2, 3, 6, 6)
    x[0, 0, 0, 0] = float("inf")
    layer(x).sum().backward()  # never raises
    assert not layer.weight.grad.isfinite().all()
    layer.weight.grad = None
    out = layer(torch.randn(2, 3, 6, 6))
    (out.sum() * float("inf")).backward()
    assert not layer.weight.grad.isfinite().all()


def test_several_calls_each_use_their_own_input():
    torch.manual_seed(0)
    layer = nn.Conv2d(2, 3, 3).double()
    plain, tract = plain_and_tract(layer)
    xs = [torch.randn(2, 2, 6, 6, dtype=torch.float64) * s for s in (1.0, 5.0)]
    sum(tract(x).square().sum() for x in xs).backward()
    expected = 0
    for x in xs:
        p = copy.deepcopy(plain)
        p(x).square().sum().backward()
        expected = expected + reference_tract_grad(tract, x, p.weight.grad, 0.1)
    torch.testing.assert_close(tract.weight.grad, expected, rtol=1e-7, atol=1e-9)
