"""Every check TrAct makes: when it is enabled (settings, the layer, the model), and at each
training call (the machinery around the call that TrAct cannot follow). Each failure is an error
that names the problem and says what to do; a frozen weight is a warning (it may be unfrozen
later, and until then TrAct does nothing).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from trainact import distributed
from trainact.nn import compat
from trainact.nn.adapters import SUPPORTED_TYPES

STATISTICS_DTYPES = (None, torch.float32, torch.float64)


# ---- settings ------------------------------------------------------------------------------


def validate_lam(lam: Any) -> float:
    """λ as a float; ValueError unless it is a positive finite number."""
    if isinstance(lam, bool) or not isinstance(lam, (int, float)):
        raise ValueError(f"lam (λ) must be a positive finite number, got {lam!r}")
    if not math.isfinite(lam) or lam <= 0:
        raise ValueError(f"lam (λ) must be a positive finite number, got {lam!r}")
    return float(lam)


def validate_settings(lam: Any, statistics_dtype: Any, process_group: Any) -> float:
    """Check every setting of :func:`trainact.TrAct`; returns λ as a float."""
    value = validate_lam(lam)
    if statistics_dtype not in STATISTICS_DTYPES:
        raise ValueError(
            "statistics_dtype must be None, torch.float32 or torch.float64, "
            f"got {statistics_dtype!r}"
        )
    if not (
        process_group is None
        or process_group == "auto"
        or (dist.is_available() and isinstance(process_group, dist.ProcessGroup))
    ):
        raise ValueError(
            f'process_group must be "auto", None or a torch.distributed.ProcessGroup, '
            f"got {process_group!r}"
        )
    return value


# ---- the layer and the model ---------------------------------------------------------------


def check_supported(cls: type[nn.Module]) -> None:
    """TypeError naming ``cls`` unless it is a supported layer class.

    Subclasses are accepted only when they keep the parent's forward, since TrAct re-runs that
    forward with its own weight tensor; a subclass with its own forward (weight standardization,
    say) would silently change meaning.
    """
    for base in SUPPORTED_TYPES:
        if issubclass(cls, base) and cls.forward is base.forward:
            if (
                issubclass(cls, nn.modules.conv._ConvNd)
                and not issubclass(base, nn.Linear)
                and cls._conv_forward is not base._conv_forward
            ):
                break
            return
    names = ", ".join(f"nn.{t.__name__}" for t in SUPPORTED_TYPES)
    raise TypeError(
        f"TrAct does not support {cls.__module__}.{cls.__qualname__}; "
        f"supported layers are {names} (subclasses only when they keep the parent's forward)"
    )


def weight_parameter(layer: nn.Module) -> Tensor:
    """The layer's weight Parameter (its original under parametrize, weight_norm or
    spectral_norm), read without running a parametrization (spectral_norm's power iteration
    would change the model)."""
    sources: tuple[Callable[[], Tensor | None], ...] = (
        lambda: layer._parameters["weight"],
        # original, or original0/1
        lambda: next(layer.get_submodule("parametrizations.weight").parameters()),
        lambda: layer._parameters["weight_orig"],
        lambda: layer._parameters["weight_v"],
    )
    for source in sources:
        try:
            weight = source()
        except (AttributeError, KeyError, StopIteration):
            continue
        if weight is not None:
            return weight
    raise TypeError(f"{type(layer).__name__} has no weight parameter")


def deferrable_weight(layer: nn.Module) -> nn.Parameter:
    """The weight Parameter whose ``.grad`` deferred TrAct rewrites; a clear error where the
    weight is computed (parametrize, weight_norm, spectral_norm, pruning): its ``.grad`` is
    that of another tensor."""
    weight = layer._parameters.get("weight")
    if weight is None:
        raise RuntimeError(
            f"TrAct with defer=True needs {type(layer).__name__}.weight to be a Parameter, but "
            "it is computed (torch.nn.utils.parametrize, weight_norm, spectral_norm or "
            "torch.nn.utils.prune, also when added after enabling TrAct), so its .grad is "
            "another tensor's: use defer=False (the default), which preconditions the computed "
            "weight's own gradient"
        )
    return weight


def check_layer(layer: nn.Module, label: str, plain_class: type[nn.Module], defer: bool) -> Tensor:
    """Check that TrAct can be enabled on ``layer``; returns its weight Parameter."""
    check_supported(plain_class)
    if isinstance(layer, nn.modules.lazy.LazyModuleMixin) and layer.has_uninitialized_params():
        raise RuntimeError(
            f"{label} is a lazy layer whose weight is not initialized yet (its class changes at "
            "the first forward): run one forward before enabling TrAct"
        )
    if "forward" in layer.__dict__:
        raise RuntimeError(
            f"{label} already has its forward replaced by {layer.__dict__['forward']!r}; TrAct "
            "would discard it"
        )
    weight = weight_parameter(layer)  # never runs a parametrization
    if weight.is_complex():
        raise TypeError(f"TrAct supports real weights only; {label} has a {weight.dtype} weight")
    if defer:
        deferrable_weight(layer)
    if not weight.requires_grad:
        warnings.warn(
            f"TrAct enabled on {label}, whose weight does not require grad (frozen): it does "
            "nothing until the weight is trained (weight.requires_grad_(True)); a frozen layer "
            "costs nothing. If the model's first trainable layer is another one, pass layer=",
            UserWarning,
            stacklevel=4,
        )
    return weight


def check_model(model: nn.Module, name: str, defer: bool) -> None:
    """Model-level checks of :func:`trainact.apply`: with ``defer=True`` the layer's weight
    must not be tied to another module's."""
    if not defer:
        return
    weight = weight_parameter(model.get_submodule(name))
    users = [n for n, p in model.named_parameters(remove_duplicate=False) if p is weight]
    if len(users) > 1:
        raise ValueError(
            f"the weight of {name or '<model>'} is tied to {', '.join(users)}: with defer=True "
            "TrAct preconditions the whole of weight.grad, the other uses' share included, while "
            "without defer it preconditions the layer's own share only. Use defer=False (and no "
            "gradient accumulation), or untie the weights"
        )


# ---- a training call -----------------------------------------------------------------------


def check_weight(layer: nn.Module, weight: Tensor) -> None:
    """Refuse a weight TrAct cannot precondition, before anything reads it (Opacus's expanded
    weights answer no attribute read)."""
    if type(weight).__name__ == "ExpandedWeight":
        raise _opacus(type(layer).__name__)


def _opacus(name: str) -> RuntimeError:
    return RuntimeError(
        f"TrAct on {name} cannot be combined with Opacus: its per-sample gradients come from "
        "the plain layer's activations and output gradients, which TrAct does not change, and "
        "they replace .grad. Train with Opacus after trainact.remove(model)"
    )


def warn_quantization(layer: nn.Module) -> None:
    """Warn that torch.ao.quantization (which sets ``qconfig`` on every module before it swaps
    them) will leave this layer unquantized: its eager mode matches exact module types."""
    name = type(layer).__name__
    warnings.warn(
        f"{name} gets a qconfig: torch.ao.quantization (quantize_dynamic, quantize, prepare, "
        f"prepare_qat) swaps modules by their exact type, and {name} is TrAct's subclass of "
        "the layer, so it stays unquantized (and prepare_qat's training then raises): call "
        "trainact.remove(model) before quantizing",
        UserWarning,
        stacklevel=3,
    )


def check_call(layer: nn.Module, weight: Tensor, input: Tensor, defer: bool) -> None:
    """Refuse a training call whose surroundings TrAct cannot follow."""
    name = type(layer).__name__
    if getattr(layer, "_is_replica", False):
        raise RuntimeError(
            "TrAct does not support nn.DataParallel (its replicas would each precondition with "
            "their own device's statistics): use DistributedDataParallel, one process per GPU"
        )
    if compat.exporting():
        raise RuntimeError(
            "torch.export captures the forward only, and TrAct changes only the backward: "
            "export in eval mode (model.eval()) or after trainact.remove(model)"
        )
    if compat.in_dynamo():
        compat.require("torch.compile")
    if torch.jit.is_tracing():
        raise RuntimeError(
            f"torch.jit.trace of {name} in training mode would record one example batch's "
            "statistics and precondition every later batch with them: trace in eval mode "
            "(model.eval()) or after trainact.remove(model)"
        )
    if (
        not torch.compiler.is_compiling()
        and torch._C._functorch.peek_interpreter_stack() is not None
    ):
        raise RuntimeError(
            f"TrAct on {name} does not support torch.func transforms (grad, vjp, jacrev, "
            "vmap; Opacus uses them for per-sample gradients): each sample would be "
            "preconditioned with its own statistics. Call the plain model: "
            "trainact.remove(model), or put it in eval mode"
        )
    if any(
        getattr(h, "__module__", "").startswith("opacus.") for h in layer._forward_hooks.values()
    ):
        raise _opacus(name)
    if getattr(layer, "qconfig", None) is not None:
        raise RuntimeError(
            f"{name} has a qconfig, but TrAct's layer is not one that "
            "torch.ao.quantization.prepare_qat swaps for its fake-quantized version, so it "
            "would train unquantized: call trainact.remove(model) before prepare_qat (TrAct "
            "does not support quantization-aware training)"
        )
    if input.layout != torch.strided and not input.is_nested and not isinstance(layer, nn.Linear):
        raise TypeError(
            f"TrAct on {name} does not support sparse inputs ({input.layout}): pass "
            "input.to_dense() (TrAct on nn.Linear accepts sparse COO and CSR inputs)"
        )
    if input.is_nested and not isinstance(layer, nn.Linear):
        raise TypeError(
            f"TrAct on {name} does not support nested tensors: pass a padded batch "
            "(TrAct on nn.Linear accepts a jagged nested tensor)"
        )
    if defer:
        deferrable_weight(layer)


def check_summed_call(label: str) -> None:
    """Refuse a call whose statistics are summed over processes inside a DDP whose join is
    enabled, which cannot shadow TrAct's all-reduce for a process that ran out of inputs."""
    if distributed.in_ddp_join():
        raise RuntimeError(
            f"TrAct on {label} sums its statistics over the processes with an all-reduce that "
            "DistributedDataParallel's join() (torch.distributed.algorithms.Join) cannot shadow "
            "for a process that ran out of inputs, so the group would hang or fail; join is "
            "enabled on this DDP model (it stays enabled after the context ends). Give every "
            "process the same number of batches (e.g. DistributedSampler(..., drop_last=True)) "
            "and train without join(), or enable TrAct with process_group=None (each "
            "process's own statistics, as torch_tract does)"
        )
