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
A10, L4, L40, Jetson, Radeon.

Sources: NVIDIA's CUDA C++ Programming Guide (arithmetic instruction throughput by compute
capability) and product datasheets; AMD Instinct and Radeon datasheets; for MPS, PyTorch's
"MPS framework doesn't support float64" (pytorch/pytorch#122602).

The split float32 product (:class:`trainact.maths.statistics.SplitSums`) is accurate without
float64 on the device: each entry is an integer multiple of a per-feature power of two (7 bits,
summed exactly) plus a small float32 remainder. ``statistics_dtype=torch.float32`` selects it on
any device, ``torch.float64`` the float64 product (refused where the device has no float64).
For n < d (n < 0.6·d without full-rate float64) the n×n form runs instead: see
:mod:`trainact.maths.rows`.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from dataclasses import dataclass

import torch

#: CUDA compute capabilities whose float64 throughput is half of float32's or better.
FULL_RATE_FLOAT64_CUDA = frozenset({(6, 0), (7, 0), (8, 0), (9, 0), (10, 0)})
#: ROCm architectures (``gcnArchName`` prefixes) with full-rate float64: MI100, MI200, MI300, MI355.
FULL_RATE_FLOAT64_ROCM = ("gfx908", "gfx90a", "gfx940", "gfx941", "gfx942", "gfx950")

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

    def describe(self) -> str:
        """The policy in words (the log line)."""
        product = {
            FLOAT64: "float64 product",
            CHECKED_FLOAT32: "float32 product of centered patches where their spread/lambda "
            "allows it (checked on its diagonal), float64 otherwise",
            SPLIT_FLOAT32: "split float32 product (exact 7-bit part + float32 remainder, TF32 off)",
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
        return Precision(SPLIT_FLOAT32, base.host_solve, base.fast_float64, base.device)
    if device.type == "mps" and not _overrides:
        raise TypeError(
            "statistics_dtype=torch.float64 needs float64, which MPS does not have: use "
            "statistics_dtype=None (the default) or torch.float32, both accurate without it"
        )
    return Precision(FLOAT64, False, base.fast_float64, base.device)


def _device_precision(device: torch.device) -> Precision:
    if device.type == "cpu":
        return Precision(CHECKED_FLOAT32, False, True, "cpu")
    if device.type == "cuda":
        return _cuda_precision(device.index if device.index is not None else 0)
    return Precision(SPLIT_FLOAT32, True, False, f"{device.type} (float64 assumed absent)")


@functools.cache
def _cuda_precision(index: int) -> Precision:
    props = torch.cuda.get_device_properties(index)
    arch = (getattr(props, "gcnArchName", "") or "") if torch.version.hip else None
    return gpu_precision(f"cuda:{index} {props.name}", props.major, props.minor, arch)


def gpu_precision(name: str, major: int, minor: int, rocm_arch: str | None = None) -> Precision:
    """The policy of a CUDA device of compute capability ``major.minor``, or of a ROCm device
    of architecture ``rocm_arch`` (its ``gcnArchName``, e.g. ``"gfx90a:sramecc+:xnack-"``)."""
    if rocm_arch is not None:
        fast = rocm_arch.startswith(FULL_RATE_FLOAT64_ROCM)
        name = f"{name} ({rocm_arch.split(':')[0]})"
    else:
        fast = (major, minor) in FULL_RATE_FLOAT64_CUDA
        name = f"{name} (compute capability {major}.{minor})"
    rate = "full-rate float64" if fast else "reduced-rate float64"
    return Precision(FLOAT64 if fast else SPLIT_FLOAT32, False, fast, f"{name}, {rate}")


#: The host-solve policy of MPS and unknown device types (for :func:`use_precision`).
HOST_SOLVE = Precision(SPLIT_FLOAT32, True, False, "no float64 on the device")


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
