"""What differs between the torch versions trainact supports (2.4 and later), in one place:
whether torch.export is tracing, which device types have autocast, what runs while dynamo
traces, and the features that need a newer torch than the core.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch

F = TypeVar("F", bound=Callable[..., object])

#: The oldest torch for each feature that needs more than the core's 2.4, and why.
MINIMUM_TORCH = {
    "torch.compile": ((2, 8), "older dynamo cannot trace TrAct's layer in one graph"),
    "FSDP2": ((2, 7), "FSDP2 itself fails on gloo up to torch 2.6"),
}


def torch_version() -> tuple[int, int]:
    """torch's (major, minor) version."""
    major, minor = torch.__version__.split(".")[:2]
    return int(major), int(minor)


def require(feature: str) -> None:
    """RuntimeError naming ``feature`` and the torch it needs, where this torch is older."""
    minimum, why = MINIMUM_TORCH[feature]
    if torch_version() < minimum:
        raise RuntimeError(
            f"{feature} of a layer with TrAct needs torch>={minimum[0]}.{minimum[1]} ({why}); "
            f"this is torch {torch.__version__}: upgrade torch, or train without {feature}"
        )


def while_tracing(fn: F) -> F:
    """Mark ``fn`` so that dynamo calls it while tracing and keeps its (constant) result,
    instead of tracing it: the mark ``torch.compiler.assume_constant_result`` sets, set here
    without importing dynamo (2 s). Eagerly ``fn`` is an ordinary function."""
    fn._dynamo_marked_constant = True  # type: ignore[attr-defined]
    return fn


@while_tracing
def _dynamo_exports() -> bool:
    """Whether the running dynamo trace is torch.export's (asked while it traces)."""
    from torch._dynamo.symbolic_convert import InstructionTranslator

    return bool(getattr(InstructionTranslator.current_tx(), "export", False))


def in_dynamo() -> bool:
    """Whether dynamo (torch.compile, strict torch.export) is tracing the call: inlining it, or,
    before torch 2.5, running the layer on fake tensors as a torch.nn leaf module."""
    if torch.compiler.is_dynamo_compiling():
        return True
    return torch._guards.TracingContext.try_get() is not None  # (never traced)


def exporting() -> bool:
    """Whether torch.export is tracing the call. torch's flag is read directly: before torch
    2.12 dynamo reads ``torch.compiler.is_exporting()`` as True in any trace, torch.compile's
    too. torch 2.4 has no flag; there a dynamo trace is asked whether it exports, and the
    compiling flag outside dynamo is non-strict export's."""
    if getattr(torch.compiler, "_is_exporting_flag", False):
        return True
    if in_dynamo():
        return _dynamo_exports()
    return not hasattr(torch.compiler, "_is_exporting_flag") and torch.compiler.is_compiling()


#: Device types with autocast, read once at import: ``torch.amp.is_autocast_available`` does
#: not trace in dynamo before torch 2.12.
AUTOCAST_DEVICE_TYPES = frozenset(
    t
    for t in ("cpu", "cuda", "mps", "xpu", "hpu", "xla", "ipu", "mtia", "maia", "privateuseone")
    if torch.amp.is_autocast_available(t)
)


def has_autocast(device_type: str) -> bool:
    """Whether ``device_type`` has autocast (another device type is asked eagerly only)."""
    if device_type in AUTOCAST_DEVICE_TYPES:
        return True
    return not torch.compiler.is_compiling() and torch.amp.is_autocast_available(device_type)
