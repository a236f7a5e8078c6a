"""The optimizer-step guard of deferred TrAct: the missed-``precondition_`` check and
``precondition_on_step``.

Both live in one global optimizer step pre-hook, installed by its callers: a layer's backward
that defers statistics (:mod:`trainact.nn.layer`), and :func:`on_step`. The deferred statistics
themselves belong to :mod:`trainact.nn.deferred`. It runs inside every
``torch.optim`` optimizer's ``step()`` (fused and foreach kernels included, and wrappers such as
accelerate's or Lightning's that call it), before any weight changes:

1. for models registered with ``precondition_on_step`` on this optimizer, finish their deferred
   statistics (:func:`trainact.precondition_`);
2. if a layer whose parameters this optimizer updates still has deferred statistics, the step
   would use a gradient TrAct never preconditioned: raise.

``step(closure)`` (LBFGS, SAM-style optimizers, Lightning's automatic optimization) runs the
backward inside the closure, so there both happen after each call of the closure returns: the
hook replaces every closure (LBFGS calls it several times per step; each evaluation's gradient is
then preconditioned with its own statistics, or the step refused).
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook
from torch.utils.hooks import RemovableHandle

from trainact.nn import deferred

# optimizer -> {handle id: callable that preconditions one model}, for precondition_on_step.
_on_step: weakref.WeakKeyDictionary[torch.optim.Optimizer, OrderedDict[int, Callable[[], Any]]] = (
    weakref.WeakKeyDictionary()
)
_hook: RemovableHandle | None = None


def install() -> None:
    """Install the global optimizer step pre-hook (once)."""
    global _hook
    if _hook is None:
        _hook = register_optimizer_step_pre_hook(_before_step)


def unwrap(optimizer: Any) -> torch.optim.Optimizer:
    """The ``torch.optim.Optimizer`` inside wrappers (accelerate's ``AcceleratedOptimizer``,
    Lightning's ``LightningOptimizer``), which keep it as ``.optimizer`` or ``._optimizer``."""
    seen = optimizer
    for _ in range(8):  # wrappers may subclass Optimizer without being one: look inside first
        inner = getattr(optimizer, "optimizer", None) or getattr(optimizer, "_optimizer", None)
        if inner is None:
            break
        optimizer = inner
    if isinstance(optimizer, torch.optim.Optimizer):
        return optimizer
    raise TypeError(
        f"{type(seen).__name__} is not a torch.optim.Optimizer and wraps none (as .optimizer "
        "or ._optimizer)"
    )


def on_step(optimizer: Any, finish: Callable[[], Any]) -> RemovableHandle:
    """Call ``finish`` inside every ``step()`` of ``optimizer`` (unwrapped), after a closure's
    backward and before the update; the handle's ``remove()`` stops it."""
    install()
    calls = _on_step.setdefault(unwrap(optimizer), OrderedDict())  # weakly referenced by handle
    handle = RemovableHandle(calls)
    calls[handle.id] = finish
    return handle


def _before_step(
    optimizer: torch.optim.Optimizer, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Any:
    # ``args`` is (optimizer, *step's positional arguments)
    closure = kwargs.get("closure", args[1] if len(args) > 1 else None)
    if closure is None:
        _finish(optimizer)
        return None

    def closure_then_finish() -> Any:
        loss = closure()
        _finish(optimizer, in_closure=True)
        return loss

    if "closure" in kwargs:
        return args, {**kwargs, "closure": closure_then_finish}
    return (args[0], closure_then_finish, *args[2:]), kwargs


def _finish(optimizer: torch.optim.Optimizer, in_closure: bool = False) -> None:
    for finish in list(_on_step.get(optimizer, {}).values()):
        finish()
    pending = deferred.pending_layers()
    if not pending:
        return
    updated = {id(p) for group in optimizer.param_groups for p in group["params"]}
    for layer in pending:
        if id(layer._parameters.get("weight")) not in updated:
            continue
        if in_closure:
            raise RuntimeError(
                f"TrAct (defer=True) on {type(layer).__name__}: the closure passed to "
                "optimizer.step(closure) ran a backward pass whose gradient "
                "trainact.precondition_(model) never preconditioned, and the optimizer would "
                "use it (a precondition_ before step(closure) comes before the closure's "
                "backward). Call trainact.precondition_(model) inside the closure, after its "
                "backward, or use trainact.precondition_on_step(optimizer, model), which "
                "preconditions each evaluation of the closure."
            )
        raise RuntimeError(
            f"TrAct (defer=True) on {type(layer).__name__}: optimizer.step() would use a "
            "gradient that trainact.precondition_(model) never preconditioned. Call it "
            "after the last backward of each step, before clipping and optimizer.step() "
            "(or use trainact.precondition_on_step(optimizer, model))."
        )
