r"""The precision policy: what the statistics product and the d×d solve run in, per device.

The product Σ yyᵀ over the n centered patches (n·d² multiply-adds) is the expensive part; the
d×d assembly and Cholesky solve are small but ill-conditioned (raw pixels: condition numbers of
1e6 to 1e8), so they are always float64. Decided from the device alone, with no host
synchronization (the CPU may also look at the data: there a sync costs nothing).

==================  ==========================================  =================================
device              product Σ yyᵀ (n ≥ d)                       assembly and d×d solve
==================  ==========================================  =================================
CPU                 float32 of centered patches where their     float64, on the CPU
                    mean square over λ allows it (checked on
                    the product's own diagonal), else float64
CUDA/ROCm with      float64                                     float64, on the GPU
full-rate float64*
other CUDA/ROCm     split float32, TF32 off                     float64, on the GPU
(float64 at 1/32
to 1/64 of float32)
MPS, and any other  split float32, TF32 off                     exact part in int64 on the
device type (float                                              device; float64 on the CPU
64 may be absent)                                               (one host round trip per step)
==================  ==========================================  =================================

\* compute capability 6.0, 7.0, 8.0, 9.0, 10.0 (P100, V100, A100, H100/H200, B200); ROCm
gfx908, gfx90a, gfx94x, gfx950 (MI100 to MI355). Reduced-rate float64: T4, RTX 20/30/40/50,
A10, L4, L40, Jetson, Radeon. A compute capability does not settle the rate: the H20 is 9.0
with about 1 TFLOP/s of float64 (44 of float32), so the name decides where it is known
(:data:`FULL_RATE_FLOAT64_NAMES`, :data:`REDUCED_RATE_FLOAT64_NAMES`) and a one-off
measurement at the device's first use where it is not (:func:`float64_slowdown`); without a
device to measure, the split product, accurate everywhere, is the safe default.

Sources: NVIDIA's CUDA C++ Programming Guide (arithmetic instruction throughput by compute
capability) and product datasheets; AMD Instinct and Radeon datasheets; for MPS, PyTorch's
"MPS framework doesn't support float64" (pytorch/pytorch#122602).

The split float32 product (:class:`trainact.maths.statistics.SplitSums`) is accurate without
float64 on the device: each entry is an integer multiple of a per-feature power of two (|k| ≤
63, multiplied exactly in int8 with int32 sums, on tensor cores) plus a small float32
remainder. ``statistics_dtype=torch.float32`` selects it on any device, ``torch.float64`` the
float64 product (refused where the device has no float64).
For n < d (n < 0.6·d without full-rate float64) the n×n form runs instead: see
:mod:`trainact.maths.rows`.
"""

from __future__ import annotations

import contextlib
import functools
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

import torch

#: CUDA compute capabilities whose float64 throughput is half of float32's or better.
FULL_RATE_FLOAT64_CUDA = frozenset({(6, 0), (7, 0), (8, 0), (9, 0), (10, 0)})
#: ROCm architectures (``gcnArchName`` prefixes) with full-rate float64: MI100, MI200, MI300, MI355.
FULL_RATE_FLOAT64_ROCM = ("gfx908", "gfx90a", "gfx940", "gfx941", "gfx942", "gfx950")
#: Models (a word of the device's name) of a full-rate compute capability whose float64 is
#: full rate by their datasheets: no measurement needed.
FULL_RATE_FLOAT64_NAMES = frozenset(
    {"P100", "V100", "A100", "A30", "H100", "H200", "GH200", "B200", "GB200"}
)
#: Models of a full-rate compute capability whose float64 is not: the H20 (9.0; about 1 TFLOP/s
#: of float64 against 44 of float32, by its datasheet).
REDUCED_RATE_FLOAT64_NAMES = frozenset({"H20"})
#: A device whose float64 matmul takes at most this many times its float32 one (TF32 off) counts
#: as full rate: 2 where float64 runs at half rate, 32 to 64 on reduced-rate devices.
FULL_RATE_SLOWDOWN = 4.0

#: The products of Σ yyᵀ: float64; float32 where the CPU's check allows it, else float64; the
#: split float32 product.
FLOAT64, CHECKED_FLOAT32, SPLIT_FLOAT32 = "float64", "checked-float32", "split-float32"


@dataclass(frozen=True)
class Precision:
    """How one device computes a layer's statistics."""

    product: str  # FLOAT64, CHECKED_FLOAT32 or SPLIT_FLOAT32
    host_solve: bool  # no float64 on the device: assemble and solve on the CPU
    fast_float64: bool  # float64 at half of float32's rate or better (the n×n form's range)
    device: str  # the device in words, for the log line
    memory: int | None = None  # the device's memory in bytes (sizes the chunks); None: the CPU
    int8: bool = False  # the split product's exact part on int8 matrix units, where torch has them

    def describe(self) -> str:
        """The policy in words (the log line)."""
        product = {
            FLOAT64: "float64 product",
            CHECKED_FLOAT32: "float32 product of centered patches where their spread/lambda "
            "allows it (checked on its diagonal), float64 otherwise",
            SPLIT_FLOAT32: "split float32 product (exact part in "
            f"{'int8' if self.int8 else 'float32 blocks'} + float32 remainder, TF32 off)",
        }[self.product]
        solve = "on the CPU" if self.host_solve else "on the device"
        rows = "n < d" if self.fast_float64 else "n < 0.6·d"
        return f"{self.device}: {product}; float64 assembly and solve {solve}; n×n form for {rows}"


#: Largest mean square of the centered patch entries over λ for which the CPU's float32 product is
#: accurate, for d ≤ 1024 (scaled down as 1024/d beyond). Float32 sums lose about 1e-7 of the
#: spread, and the solve amplifies that by up to spread/λ (raw [0, 255] pixels: 3e4, errors of
#: 1e-3 to 1e-1; standardized: 10, ≈ 3e-6 at d = 27 and 8e-6 at d = 768; 2.5e-5 at ratio 29 and
#: d = 768; benchmarks/accuracy.py).
FLOAT32_MAX_RATIO = 30.0


def float32_spread_limit(lam: float, dim: int) -> float:
    """The CPU's float32 product is used while the centered entries' mean square is ≤ this."""
    return FLOAT32_MAX_RATIO * min(1.0, 1024 / dim) * lam


_overrides: list[Precision] = []


@contextlib.contextmanager
def use_precision(precision: Precision) -> Iterator[None]:
    """Use ``precision`` on every device inside the block, whatever the device is: lets the CPU
    run (and tests check) the path of a device it is not, such as MPS's host solve."""
    _overrides.append(precision)
    try:
        yield
    finally:
        _overrides.pop()


def precision_for(
    device: torch.device, statistics_dtype: torch.dtype | None, input_dtype: torch.dtype
) -> Precision:
    """The policy for statistics on ``device``, with the user's ``statistics_dtype`` override;
    a float64 input (a float64 layer) gets the float64 product unless float32 is asked for."""
    base = _overrides[-1] if _overrides else _device_precision(device)
    if statistics_dtype is None and input_dtype == torch.float64 and not base.host_solve:
        statistics_dtype = torch.float64
    if statistics_dtype is None:
        return base
    if statistics_dtype == torch.float32:
        return replace(base, product=SPLIT_FLOAT32)
    if device.type == "mps" and not _overrides:
        raise TypeError(
            "statistics_dtype=torch.float64 needs float64, which MPS does not have: use "
            "statistics_dtype=None (the default) or torch.float32, both accurate without it"
        )
    return replace(base, product=FLOAT64, host_solve=False)


def _device_precision(device: torch.device) -> Precision:
    if device.type == "cpu":
        return Precision(CHECKED_FLOAT32, False, True, "cpu")  # int8: slow on CPUs
    if device.type == "cuda":
        return _cuda_precision(device.index if device.index is not None else 0)
    return Precision(
        SPLIT_FLOAT32, True, False, f"{device.type} (float64 assumed absent)", int8=True
    )


@functools.cache
def _cuda_precision(index: int) -> Precision:
    props = torch.cuda.get_device_properties(index)
    arch = (getattr(props, "gcnArchName", "") or "") if torch.version.hip else None
    device = torch.device("cuda", index)
    return gpu_precision(
        f"cuda:{index} {props.name}",
        props.major,
        props.minor,
        arch,
        memory=props.total_memory,
        measure=lambda: float64_slowdown(device),
    )


def gpu_precision(
    name: str,
    major: int,
    minor: int,
    rocm_arch: str | None = None,
    memory: int | None = None,
    measure: Callable[[], float] | None = None,
) -> Precision:
    """The policy of a CUDA device of compute capability ``major.minor`` named ``name``, or of a
    ROCm device of architecture ``rocm_arch`` (its ``gcnArchName``, e.g.
    ``"gfx90a:sramecc+:xnack-"``), with ``memory`` bytes. A full-rate compute capability whose
    model is in neither name table is measured with ``measure`` (float64's slowdown against
    float32, :func:`float64_slowdown`), or, without it, taken as reduced rate (the safe side)."""
    how = ""
    if rocm_arch is not None:
        fast = rocm_arch.startswith(FULL_RATE_FLOAT64_ROCM)
        name = f"{name} ({rocm_arch.split(':')[0]})"
    else:
        fast = (major, minor) in FULL_RATE_FLOAT64_CUDA
        words = set(re.split(r"[^A-Z0-9]+", name.upper()))
        if fast and words & REDUCED_RATE_FLOAT64_NAMES:
            fast, how = False, " by its name"
        elif fast and not words & FULL_RATE_FLOAT64_NAMES:
            if measure is None:
                fast, how = False, " (unknown model, not measured)"
            else:
                slowdown = measure()
                fast, how = slowdown <= FULL_RATE_SLOWDOWN, f" (measured: {slowdown:.1f}x float32)"
        name = f"{name} (compute capability {major}.{minor})"
    rate = ("full-rate float64" if fast else "reduced-rate float64") + how
    product = FLOAT64 if fast else SPLIT_FLOAT32
    # int8 matrix units: compute capability 7.2 on (Xavier, Turing and later), every ROCm device
    int8 = rocm_arch is not None or (major, minor) >= (7, 2)
    return Precision(product, False, fast, f"{name}, {rate}", memory, int8)


def float64_slowdown(device: torch.device, size: int = 1024, repeats: int = 3) -> float:
    """How many times longer a float64 matmul takes than a float32 one (TF32 off) on
    ``device``: measured once, at the device's first use (a few milliseconds; the only host
    synchronization it adds)."""

    def seconds(dtype: torch.dtype) -> float:
        a = torch.randn(size, size, device=device, dtype=dtype)
        a @ a  # warm-up: kernels loaded, workspaces allocated
        _synchronize(device)
        start = time.perf_counter()
        for _ in range(repeats):
            a @ a
        _synchronize(device)
        return time.perf_counter() - start

    with ieee_float32_matmul():
        return seconds(torch.float64) / seconds(torch.float32)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


#: Dispatch keys of the device types :func:`has_int8_kernel` knows.
_DISPATCH_KEYS = {"cpu": "CPU", "cuda": "CUDA", "mps": "MPS", "xpu": "XPU", "meta": "Meta"}


def has_int8_kernel(device: torch.device) -> bool:
    """Whether torch multiplies int8 matrices with int32 sums on ``device`` (``torch._int_mm``:
    CUDA and ROCm, the CPU, MPS from torch 2.14), asked without running anything on it. A
    policy uses them where they run on matrix units (:attr:`Precision.int8`): not on the CPU,
    where torch's int8 product measured 25 times slower than its float32 one (2026-12-06,
    152×2900 by 2900×152); :func:`use_precision` can still run a GPU's int8 path there."""
    key = _DISPATCH_KEYS.get(device.type)
    return key is not None and torch._C._dispatch_has_kernel_for_dispatch_key("aten::_int_mm", key)


#: The host-solve policy of MPS and unknown device types (for :func:`use_precision`).
HOST_SOLVE = Precision(SPLIT_FLOAT32, True, False, "no float64 on the device", int8=True)


@contextlib.contextmanager
def ieee_float32_matmul() -> Iterator[None]:
    """Full float32 matmuls inside the block (no TF32 on CUDA, no bf16/TF32 in oneDNN on the
    CPU), whatever the user's global setting; the setting is restored afterwards."""
    cuda = torch.backends.cuda.matmul
    # torch.backends.mkldnn is replaced at import by a module object that has .matmul
    mkldnn = getattr(torch.backends.mkldnn, "matmul", None)
    if mkldnn is None or not hasattr(cuda, "fp32_precision"):  # torch < 2.9: the global knob
        before = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision("highest")
        try:
            yield
        finally:
            torch.set_float32_matmul_precision(before)
        return
    saved = cuda.fp32_precision, mkldnn.fp32_precision
    cuda.fp32_precision = mkldnn.fp32_precision = "ieee"
    try:
        yield
    finally:
        cuda.fp32_precision, mkldnn.fp32_precision = saved
