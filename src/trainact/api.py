"""The public verbs: enable TrAct on a layer, remove it, ask about it, and finish deferred steps."""

from __future__ import annotations

import logging
import weakref
from typing import Any, TypeVar

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from trainact import distributed
from trainact.maths.precision import precision_for
from trainact.nn import checks, compat, deferred, report, step_guard
from trainact.nn import layer as tract_layer
from trainact.nn.discovery import find_first_layer
from trainact.nn.state import TrActState, state_of

__all__ = [
    "TrAct",
    "apply",
    "enabled_layers",
    "is_enabled",
    "precondition_",
    "precondition_on_step",
    "remove",
    "summary",
]

logger = logging.getLogger("trainact")

M = TypeVar("M", bound=nn.Module)


def _enable(
    layer: M,
    name: str,
    lam: float,
    statistics_dtype: torch.dtype | None,
    process_group: distributed.ProcessGroupArg,
    defer: bool,
) -> M:
    lam = checks.validate_settings(lam, statistics_dtype, process_group)
    label = name or type(layer).__name__
    if state_of(layer) is not None:
        raise RuntimeError(
            f"TrAct is already enabled on {label}; call trainact.remove() first to change its "
            "settings"
        )
    weight = checks.check_layer(layer, label, tract_layer.plain_class(layer), defer)
    state = TrActState(lam, statistics_dtype, process_group, defer, label)
    tract_layer.enable(layer, state)
    logger.info(
        "TrAct enabled on %s (%s): lambda=%g, weight %s%s, statistics_dtype %s; world size %d%s "
        "(the device's precision policy is logged at the first training step)",
        name or "<model>",
        tract_layer.plain_class(layer).__name__,
        lam,
        weight.dtype,
        "" if weight.requires_grad else " (frozen)",
        statistics_dtype,
        distributed.world_size(process_group),
        ", deferred" if defer else "",
    )
    return layer


def TrAct(  # noqa: N802  (the reference implementation's name, kept as a drop-in)
    layer: M,
    l: float = 0.1,  # noqa: E741
    *,
    statistics_dtype: torch.dtype | None = None,
    process_group: distributed.ProcessGroupArg = "auto",
    defer: bool = False,
) -> M:
    """Enable TrAct on ``layer`` and return the same layer (a drop-in for ``torch_tract.TrAct``).

    Example:
        >>> import torch, trainact
        >>> conv = trainact.TrAct(torch.nn.Conv2d(3, 8, 3), l=0.1)
        >>> trainact.is_enabled(conv)
        True

    Args:
        layer: an ``nn.Linear`` or ``nn.Conv1d/2d/3d`` (any options).
        l: λ > 0, the regularization of Lemma 1 (the paper's default 0.1).
        statistics_dtype: which algorithm computes the patch product Σ xxᵀ (the expensive
            part; the d×d assembly and solve always run in float64, on the CPU for a device
            without float64). ``None`` (default): the device's precision policy
            (:mod:`trainact.maths.precision`), accurate at any input scale: on the CPU a float32
            product of centered patches where their spread over λ allows it, else float64; on
            GPUs with full-rate float64 the float64 product; on other GPUs, MPS and unknown
            devices the split product below; float64 layers get the float64 product.
            ``torch.float64``: the float64 product everywhere (refused on MPS).
            ``torch.float32``: the split product everywhere: each entry an exact small-integer
            part plus a float32 remainder, with TF32 and reduced-precision matmuls off,
            accurate at any input scale without float64 on the device. Calls with fewer
            patches than entries per patch take the n×n form whatever this says.
        process_group: whose statistics a step uses, decided at every training forward:
            "auto" (XᵀX and n summed over the default group whenever torch.distributed is
            initialized with world size > 1 at that time, else this process's), None (this
            process's only, like the reference), or a ProcessGroup (summed over it). Summing
            costs one asynchronous all-reduce of ``[XᵀX, n]`` per call, started when the
            layer's output gradient arrives and waited for just before its weight gradient is
            preconditioned; with world size 1 there is no collective. Every process of
            the group must then run the layer's forward and backward each step (an empty
            batch is fine).
        defer: keep the weight gradient plain during backward and sum the statistics over
            backward passes, with no collective; :func:`precondition_` then sums them over
            the group (as ``process_group`` says) and applies TrAct once (for gradient
            accumulation). An optimizer step that would use the gradient while sums are
            pending raises RuntimeError before changing any weight (any ``torch.optim``
            optimizer, fused ones included). Needs ``layer.weight`` to be a Parameter (not a
            parametrization, weight_norm or spectral_norm).

    Raises:
        TypeError: ``layer`` is not a supported layer, or its weight is complex.
        ValueError: bad λ, ``statistics_dtype`` or ``process_group``.
        RuntimeError: TrAct is already enabled on ``layer`` (it is never applied twice);
            ``defer=True`` on a computed weight.
    """
    return _enable(layer, "", l, statistics_dtype, process_group, defer)


def apply(
    model: nn.Module,
    lam: float = 0.1,
    *,
    layer: str | None = None,
    statistics_dtype: torch.dtype | None = None,
    process_group: distributed.ProcessGroupArg = "auto",
    defer: bool = False,
    example_inputs: Any = None,
) -> str:
    """Enable TrAct on one layer of ``model`` and return that layer's name.

    The model, its forward values and its ``state_dict`` are unchanged; only the layer's weight
    gradient becomes G·(XᵀX/n + λI)⁻¹ in training mode.

    Example:
        >>> import torch, trainact
        >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(),
        ...                             torch.nn.Flatten(), torch.nn.LazyLinear(10))
        >>> trainact.apply(model)
        '0'

    Args:
        model: any module.
        lam: λ > 0.
        layer: dotted name from ``model.named_modules()``; None finds the first layer: the
            layer whose input derives from the model's input through no other layer with
            weights (see :func:`trainact.nn.discovery.find_first_layer`); '' is ``model`` itself.
        statistics_dtype, process_group, defer: as for :func:`TrAct`.
        example_inputs: with ``layer=None``, find the first layer by one forward run (eval
            mode, ``no_grad``; the model's modes are restored) instead of tracing the model with
            ``torch.fx``, for models fx cannot trace (most Hugging Face models): a tensor, a
            tuple of positional arguments or a dict of keyword arguments, e.g.
            ``{"pixel_values": images}``. Every tensor in it counts as input.

    Returns:
        The name of the layer TrAct was enabled on ('' when ``model`` is itself the layer).

    Raises:
        ValueError: bad λ, no eligible layer, no single first layer, an unsupported first
            layer (``nn.Embedding``, attention, a layer called functionally), a model fx cannot
            trace without ``example_inputs``, unknown ``layer`` name, both ``layer`` and
            ``example_inputs`` given.
        TypeError: the named layer is not supported; ``example_inputs`` of another type.
        RuntimeError: TrAct is already enabled on that layer.
    """
    if layer is None:
        layer = find_first_layer(model, example_inputs)
    elif example_inputs is not None:
        raise ValueError("pass either layer= or example_inputs= (to find the layer), not both")
    modules = dict(model.named_modules())
    if layer not in modules:
        raise ValueError(f"{type(model).__name__} has no submodule named {layer!r}")
    checks.check_model(model, layer, defer)
    _enable(modules[layer], layer, lam, statistics_dtype, process_group, defer)
    return layer


def remove(model: M) -> M:
    """Disable TrAct on every layer of ``model`` (itself included); returns ``model``.

    The class's forward is back, with the same parameters: an optimizer keeps working. Pending
    deferred statistics are dropped.
    """
    for _, module in enabled_layers(model):
        tract_layer.disable(module)
    return model


def is_enabled(module: nn.Module) -> bool:
    """Whether TrAct is enabled on ``module`` or on any of its submodules."""
    return bool(enabled_layers(module))


def enabled_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, layer) for every layer of ``model`` with TrAct enabled."""
    return [(n, m) for n, m in model.named_modules() if state_of(m) is not None]


def summary(model: nn.Module) -> str:
    """Which layers of ``model`` have TrAct, and how: one line per layer naming it, λ, whether
    its statistics are deferred, the world size and the precision path for the device and
    dtype its weight has now (the line TrAct logs at the layer's first training call).

    Example:
        >>> import torch, trainact
        >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU())
        >>> _ = trainact.apply(model, lam=0.1)
        >>> print(trainact.summary(model))  # doctest: +ELLIPSIS
        TrAct on 0 (Conv2d): lambda=0.1, applied in backward, world size 1; cpu: ...
    """
    lines = []
    for name, layer in enabled_layers(model):
        state = state_of(layer)
        assert state is not None  # an enabled layer
        weight = checks.weight_parameter(layer)
        try:
            precision = precision_for(weight.device, state.statistics_dtype, weight.dtype)
        except TypeError as err:  # a setting the device refuses (float64 on MPS)
            lines.append(f"TrAct on {name or '<model>'}: {err}")
            continue
        line = report.describe(
            name,
            tract_layer.plain_class(layer).__name__,
            state.settings,
            distributed.world_size(state.process_group),
            precision,
        )
        lines.append(line if weight.requires_grad else f"{line} (frozen: nothing to do)")
    return "\n".join(lines) or f"TrAct is enabled on no layer of {type(model).__name__}"


def precondition_(model: nn.Module) -> int:
    """Apply TrAct to the gradients accumulated by layers enabled with ``defer=True``.

    Call it once per optimizer step, after the last backward (and after DDP has averaged the
    gradients, i.e. outside ``no_sync()``) and after ``GradScaler.unscale_`` if you clip, but
    before gradient clipping and ``optimizer.step()``. The statistics summed over the
    micro-batches are summed across processes too (one blocking all-reduce per layer when
    distributed), so k micro-batches of size B on W processes give the update of one batch of
    k·W·B. The sums are then reset. TrAct is linear in G, so the order with respect to the
    loss scale of a GradScaler does not matter.

    Returns:
        How many layers were preconditioned.

    Raises:
        NotImplementedError: a sharded (FSDP2) gradient of a grouped convolution.
    """
    for _, layer in enabled_layers(model):
        grad = checks.weight_parameter(layer).grad
        if grad is not None and distributed.is_dtensor(grad):
            compat.require("FSDP2")
    return sum(
        deferred.finish(layer, state)
        for _, layer in enabled_layers(model)
        if (state := state_of(layer)) is not None
    )


def precondition_on_step(optimizer: Any, model: nn.Module) -> RemovableHandle:
    """Call :func:`precondition_` automatically inside every ``optimizer.step()``.

    It runs before the update, and after the closure's backward when ``step(closure)`` is used
    (LBFGS, Lightning's automatic optimization). ``optimizer`` may be a wrapper that keeps the
    ``torch.optim.Optimizer`` as ``.optimizer`` (accelerate's ``AcceleratedOptimizer``, what the
    Hugging Face Trainer hands callbacks). It runs after ``GradScaler.unscale_`` (which
    ``scaler.step`` calls first), which is right (TrAct is linear), but also after any
    gradient clipping done before ``optimizer.step()``, which then clipped the plain gradient:
    that is detected and warned once; to clip, call :func:`precondition_` by hand before
    clipping instead. A step that ``GradScaler`` skips (inf/NaN) never calls
    ``optimizer.step()``; its statistics are dropped with its gradient by the next
    ``zero_grad()``.

    Returns:
        A handle whose ``remove()`` stops it.

    Raises:
        TypeError: ``optimizer`` is not an optimizer and wraps none.
    """
    return step_guard.on_step(optimizer, _PreconditionModel(model))


class _PreconditionModel:
    """Finishes a model's deferred TrAct steps; holds the model weakly, so that a model which
    references its optimizer (the registry's key) can still be freed."""

    def __init__(self, model: nn.Module) -> None:
        self.model = weakref.ref(model)

    def __call__(self) -> int:
        model = self.model()
        return 0 if model is None else precondition_(model)
