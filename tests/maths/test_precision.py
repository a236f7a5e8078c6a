"""The precision policy per device (trainact/maths/precision.py), the paths of devices this CPU
is not (no float64: MPS), and TF32 never reaching the statistics."""

from __future__ import annotations

import contextlib
import copy
import logging
import math

import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

import trainact
from testing.accuracy_cases import ACCURACY_CASES, case_error, case_target, photos
from trainact.maths import precision
from trainact.testing import exact_tract_grad, reference_tract_grad, relative_error

CPU = torch.device("cpu")


class OpLog(TorchDispatchMode):
    """Every operation's name, and the dtype and device of each tensor it returns."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[tuple[str, torch.dtype, str]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.ops.append((str(func), t.dtype, t.device.type))
        return out


@pytest.mark.parametrize(
    "name,major,minor,arch,fast",
    [
        ("A100", 8, 0, None, True),
        ("H200", 9, 0, None, True),
        ("V100", 7, 0, None, True),
        ("B200", 10, 0, None, True),
        ("RTX 4090", 8, 9, None, False),
        ("RTX 3090", 8, 6, None, False),
        ("T4", 7, 5, None, False),
        ("RTX 5090", 12, 0, None, False),
        ("B300", 10, 3, None, False),
        ("MI250X", 9, 0, "gfx90a:sramecc+:xnack-", True),
        ("MI300X", 9, 4, "gfx942", True),
        ("RX 7900", 11, 0, "gfx1100", False),
    ],
)
def test_gpu_policy_by_compute_capability(name, major, minor, arch, fast):
    p = precision.gpu_precision(name, major, minor, arch)
    assert p.product == (precision.FLOAT64 if fast else precision.SPLIT_FLOAT32)
    assert p.fast_float64 is fast and not p.host_solve
    assert ("full-rate" if fast else "reduced-rate") in p.describe()


@pytest.mark.parametrize(
    "name,measured,fast",
    [
        ("NVIDIA H20", None, False),  # 9.0 by its capability, about 1 TFLOP/s of float64
        ("NVIDIA H100 80GB HBM3", None, True),
        ("NVIDIA A100-SXM4-80GB", None, True),
        ("NVIDIA H800", 2.1, True),  # not in either table: measured at full rate
        ("NVIDIA H800", 48.0, False),  # measured slow
        ("NVIDIA H800", "unmeasured", False),  # nothing to measure with: the safe default
    ],
)
def test_float64_rate_by_name_or_measurement(name, measured, fast):
    """A full-rate compute capability (9.0) does not settle float64's rate: the name table
    decides where it knows the model, a measurement (float64's slowdown against float32)
    where it does not, and without one the split product (accurate everywhere) is chosen."""
    calls: list[int] = []

    def measure() -> float:
        calls.append(1)
        assert isinstance(measured, float)
        return measured

    p = precision.gpu_precision(name, 9, 0, measure=None if measured == "unmeasured" else measure)
    assert p.fast_float64 is fast
    assert p.product == (precision.FLOAT64 if fast else precision.SPLIT_FLOAT32)
    assert len(calls) == (1 if isinstance(measured, float) else 0)
    assert ("(measured:" in p.describe()) is isinstance(measured, float)


def test_float64_slowdown_is_measured_on_the_device():
    """The one-off measurement runs on any device and gives a ratio of times (its value is
    the machine's: a benchmark, not a test, judges it)."""
    slowdown = precision.float64_slowdown(CPU, size=256)
    assert math.isfinite(slowdown) and slowdown > 0


def test_gpu_policy_carries_the_devices_memory_for_the_chunks():
    """The device's memory reaches the chunk rule (keyword, default: unknown)."""
    assert precision.gpu_precision("NVIDIA GeForce RTX 4090", 8, 9).memory is None
    p = precision.gpu_precision("NVIDIA GeForce RTX 4090", 8, 9, memory=24 * 10**9)
    assert p.memory == 24 * 10**9
    assert precision.precision_for(CPU, torch.float32, torch.float32).memory is None


def test_int8_products_on_matrix_units_only():
    """The split product's exact part in int8 on GPUs with int8 matrix units (compute
    capability 7.2 on, ROCm) and MPS, not on the CPU, whose int8 product is slower than
    float32's (exact float32 blocks run there); and only where torch has the kernel."""
    assert precision.gpu_precision("NVIDIA GeForce RTX 4090", 8, 9).int8
    assert precision.gpu_precision("MI300X", 9, 4, "gfx942").int8
    assert not precision.gpu_precision("NVIDIA V100", 7, 0).int8
    assert not precision.precision_for(CPU, torch.float32, torch.float32).int8
    assert precision.HOST_SOLVE.int8 and "int8" in precision.HOST_SOLVE.describe()
    assert precision.has_int8_kernel(CPU) and precision.has_int8_kernel(torch.device("meta"))
    assert not precision.has_int8_kernel(torch.device("xla"))


def test_policy_by_device_type_and_override():
    cpu = precision.precision_for(CPU, None, torch.float32)
    assert cpu.product == precision.CHECKED_FLOAT32 and not cpu.host_solve
    other = precision.precision_for(torch.device("meta"), None, torch.float32)
    assert other.product == precision.SPLIT_FLOAT32 and other.host_solve  # the safe default
    f32 = precision.precision_for(CPU, torch.float32, torch.float32)
    assert f32.product == precision.SPLIT_FLOAT32 and not f32.host_solve
    assert precision.precision_for(CPU, None, torch.float64).product == precision.FLOAT64
    with pytest.raises(TypeError, match="MPS does not have"):
        precision.precision_for(torch.device("mps"), torch.float64, torch.float32)
    with precision.use_precision(precision.HOST_SOLVE):
        assert precision.precision_for(CPU, None, torch.float32).host_solve


CASES = {
    "conv": (lambda: nn.Conv2d(3, 8, 3, padding=1), (16, 3, 8, 8)),
    "linear": (lambda: nn.Linear(48, 8), (64, 48)),
    "linear n<d": (lambda: nn.Linear(300, 8), (16, 300)),
    "grouped conv": (lambda: nn.Conv2d(4, 4, 3, groups=2), (8, 4, 6, 6)),
}


@pytest.mark.parametrize("defer", [False, True])
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.cpu_only("fake tensors of an unknown device type stand for MPS, on any machine")
def test_no_float64_is_ever_created_on_a_device_without_it(case, defer):
    """The MPS path, on fake tensors of the "meta" device (an unknown device type: the safe
    default, MPS's policy): every operation that returns a tensor on the device returns no
    float64; the float64 work happens on the CPU. Fake tensors also prove the path never reads
    a value on the device (no host synchronization outside the explicit transfers)."""
    make, shape = CASES[case]
    with FakeTensorMode():
        with torch.device("meta"):
            layer = trainact.TrAct(make(), defer=defer)
        x = torch.randn(shape, device="meta")
        with OpLog() as log:
            layer(x).square().mean().backward()
            if defer:
                assert trainact.precondition_(layer) == 1
        assert layer.weight.grad.device.type == "meta"
    on_device = {dtype for _, dtype, device in log.ops if device == "meta"}
    assert torch.float64 not in on_device
    assert any(device == "cpu" and dtype == torch.float64 for _, dtype, device in log.ops)


@pytest.mark.parametrize("case", sorted(CASES))
def test_host_solve_path_is_accurate(device, case):
    """The same path on real tensors (forced by use_precision): the split product summed in
    int64 on the device, assembled and solved in float64 on the host."""
    make, shape = CASES[case]
    torch.manual_seed(0)
    layer = make().to(device)
    plain, x = copy.deepcopy(layer), (torch.rand(shape) * 255).to(device)
    out = plain(x)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    with precision.use_precision(precision.HOST_SOLVE), OpLog() as log:
        trainact.TrAct(layer)(x).backward(grad_out)
    if case == "linear n<d":
        expected = exact_tract_grad(plain, x, grad_out, 0.1)
        assert relative_error(layer.weight.grad, expected) < 1e-5
    else:
        expected = reference_tract_grad(layer, x, plain.weight.grad, 0.1)
        assert relative_error(layer.weight.grad, expected) < 2e-3
        exact = [
            op for op, dtype, where in log.ops if dtype == torch.int64 and where == device.type
        ]
        assert exact, "the exact part is summed in int64 on the device"


def matmul_settings() -> tuple[str, str]:
    """The float32 matmul precision of CUDA and oneDNN (torch 2.9 and later set each alone;
    before, one global setting serves both)."""
    if hasattr(torch.backends.cuda.matmul, "fp32_precision"):
        cuda, mkldnn = torch.backends.cuda.matmul, torch.backends.mkldnn.matmul
        return cuda.fp32_precision, mkldnn.fp32_precision
    return (torch.get_float32_matmul_precision(),) * 2


#: :func:`matmul_settings` inside ``ieee_float32_matmul``
IEEE = ("ieee",) * 2 if hasattr(torch.backends.cuda.matmul, "fp32_precision") else ("highest",) * 2


#: The statistics' products, and the index of each one's first operand (baddbmm's first
#: argument is the sum it adds to).
PRODUCTS = {
    torch.ops.aten.bmm.default: 0,
    torch.ops.aten.baddbmm.default: 1,
    torch.ops.aten.baddbmm_.default: 1,
}


class MatmulPrecision(TorchDispatchMode):
    """The matmul precision settings in force at each product of float32 operands (the
    statistics' float32 products), and how many products ran at all."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[str, str]] = []
        self.products = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in PRODUCTS:
            self.products += 1
            if args[PRODUCTS[func]].dtype == torch.float32:
                self.seen.append(matmul_settings())
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("setting", ["high", "medium"])
@pytest.mark.parametrize("statistics_dtype", [None, torch.float32])
def test_tf32_and_bf16_matmuls_never_reach_the_statistics(device, setting, statistics_dtype):
    """With TF32 (or oneDNN's bf16) allowed globally, every float32 product of the statistics
    runs in full float32 (a device whose policy is the float64 product runs none), and the
    user's setting is back afterwards."""
    policy = precision.precision_for(device, statistics_dtype, torch.float32)
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(setting)
    try:
        conv = nn.Conv2d(3, 8, 3).to(device)
        layer = trainact.TrAct(conv, statistics_dtype=statistics_dtype)
        with MatmulPrecision() as mode:
            layer(torch.randn(8, 3, 10, 10, device=device)).sum().backward()
        assert mode.products
        if policy.product == precision.FLOAT64:
            assert not mode.seen
        else:
            assert mode.seen and set(mode.seen) == {IEEE}
        assert torch.get_float32_matmul_precision() == setting
    finally:
        torch.set_float32_matmul_precision(before)


@contextlib.contextmanager
def tf32_allowed():
    """TF32 for float32 matmuls and cuDNN convolutions, as users turn it on."""
    saved = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    torch.set_float32_matmul_precision("high")
    torch.backends.cudnn.allow_tf32 = True
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(saved[0])
        torch.backends.cudnn.allow_tf32 = saved[1]


@pytest.mark.parametrize("statistics_dtype", [None, torch.float32, torch.float64])
def test_tf32_allowed_globally_keeps_every_accuracy_target(device, statistics_dtype):
    """With TF32 allowed globally, as users train on GPUs: on CUDA the test first shows that it
    is in force (a plain float32 matmul loses precision), then every accuracy case meets its
    target on each path. The CPU, which has no TF32, checks one case (the token rows that
    emulated TF32 breaks)."""
    pytest.importorskip("numpy")
    pytest.importorskip("PIL")  # the photos are JPEG-decoded
    images = photos(256, device=device)
    cases = ACCURACY_CASES
    if device.type != "cuda":
        cases = [c for c in ACCURACY_CASES if c.name == "[0, 255], Linear on 8x8 tokens"]
    elif torch.cuda.get_device_capability(device) < (8, 0):
        pytest.skip("TF32 needs compute capability 8.0 or later")
    with tf32_allowed():
        if device.type == "cuda":
            a = torch.randn(512, 512, device=device)
            lost = relative_error(a @ a, a.double() @ a.double())
            assert lost > 1e-5, f"TF32 is not in force (error {lost:.1e}): this proves nothing"
        for case in cases:
            limit = case_target(case, statistics_dtype)
            assert case_error(case, images, statistics_dtype) <= limit, case.name


def test_policy_is_logged_once_with_lambda(caplog):
    layer = trainact.TrAct(nn.Conv2d(3, 8, 3), l=0.25)
    with caplog.at_level(logging.INFO, logger="trainact"):
        for _ in range(3):
            layer(torch.randn(4, 3, 8, 8)).sum().backward()
    lines = [r.getMessage() for r in caplog.records if "lambda=0.25" in r.getMessage()]
    assert len(lines) == 1 and "cpu" in lines[0] and "float64" in lines[0]


class EmulatedTF32(TorchDispatchMode):
    """Products with their float32 operands truncated to TF32's 10 mantissa bits, as tensor
    cores do, whenever the matmul precision allows TF32."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in PRODUCTS and matmul_settings() != IEEE:
            first = PRODUCTS[func]
            args = args[:first] + tuple(
                (a.view(torch.int32) & ~0x1FFF).view(torch.float32)
                if isinstance(a, torch.Tensor) and a.dtype == torch.float32
                else a
                for a in args[first:]
            )
        return func(*args, **(kwargs or {}))


@pytest.mark.cpu_only("emulates TF32 on the CPU; on CUDA the real one is tested above")
def test_emulated_tf32_would_break_the_split_product(monkeypatch):
    """Why the split product turns TF32 off: with TF32's rounding emulated and the switch
    removed, raw pixels miss the target; with the switch, they meet it."""
    pytest.importorskip("numpy")
    pytest.importorskip("PIL")  # the photos are JPEG-decoded
    images = photos(64)
    case = next(c for c in ACCURACY_CASES if c.name == "[0, 255], Linear on 8x8 tokens")
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        with EmulatedTF32():
            assert case_error(case, images, torch.float32) <= case.target
            monkeypatch.setattr(precision, "ieee_float32_matmul", contextlib.nullcontext)
            assert case_error(case, images, torch.float32) > case.target
    finally:
        torch.set_float32_matmul_precision(before)
