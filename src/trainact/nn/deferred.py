"""Deferred statistics (``defer=True``): the one owner of the statistics a layer's backward
passes leave for :func:`trainact.precondition_`.

The statistics of a backward pass belong to the gradient that pass accumulates into the weight's
``.grad``, and follow it:

- a pass's statistics count once its gradient has been accumulated (a post-accumulate-grad hook
  on the weight sees it); a pass that computed the layer's gradient without accumulating it
  (``torch.autograd.grad``) raises when it ends;
- a gradient cleared since the previous pass (``zero_grad()``, ``.grad = None``, or zeroed in
  place) takes the statistics of that pass and the earlier ones with it, so a discarded backward
  leaves nothing behind. Under FSDP2 the gradient lives in the sharded parameter, out of the
  layer's reach between passes, so there a clearing is not seen (all statistics are kept);
- one call of the layer per backward pass: deferred statistics pool the micro-batches of a step,
  while without ``defer`` each call is preconditioned with its own statistics, so two calls of
  one pass (two views through one encoder) raise rather than train differently.
"""

from __future__ import annotations

import weakref

import torch
from torch import Tensor, nn

from trainact import distributed
from trainact.maths import PatchStatistics
from trainact.nn import checks
from trainact.nn.state import TrActState


def _merge(a: PatchStatistics | None, b: PatchStatistics | None) -> PatchStatistics | None:
    if a is None or b is None:
        return a if b is None else b
    return a.merge_(b)


class _Pending:
    """A layer's statistics since its gradient was last cleared (``kept``), those before it
    (``cleared``, kept for FSDP2 only), and the pass in progress."""

    __slots__ = ("kept", "cleared", "passing", "task", "accumulated", "grad", "version")

    def __init__(self) -> None:
        self.kept: PatchStatistics | None = None
        self.cleared: PatchStatistics | None = None
        self.passing: PatchStatistics | None = None  # the current pass, until it accumulates
        self.task = -2  # the graph task of the current pass
        self.accumulated = False
        self.grad: weakref.ref[Tensor] | None = None  # the .grad the kept statistics belong to
        self.version = -1


_pending: weakref.WeakKeyDictionary[nn.Module, _Pending] = weakref.WeakKeyDictionary()
# (layer, weight) pairs whose weight carries the post-accumulate hook of that layer
_hooked: weakref.WeakKeyDictionary[nn.Module, weakref.ref[Tensor]] = weakref.WeakKeyDictionary()


def accumulate(layer: nn.Module, state: TrActState, stats: PatchStatistics, weight: Tensor) -> None:
    """Take one call's statistics in its backward (``weight``: the leaf the gradient goes to)."""
    task = torch._C._current_graph_task_id()
    entry = _pending.setdefault(layer, _Pending())
    if entry.task == task:
        raise RuntimeError(
            f"TrAct (defer=True) on {state.name or type(layer).__name__}: the layer ran twice "
            "in one backward pass (two views through one encoder?). Deferred statistics pool "
            "the micro-batches of a step, while without defer each call is preconditioned with "
            "its own statistics, so the two would train differently: pass the views as one "
            "batch (torch.cat), or use defer=False without gradient accumulation"
        )
    _forget_if_cleared(entry, weight)
    entry.task, entry.accumulated, entry.passing = task, False, stats.clone()
    _hook(layer, weight)
    label = state.name or type(layer).__name__
    torch.autograd.Variable._execution_engine.queue_callback(lambda: _end_of_pass(entry, label))


def _forget_if_cleared(entry: _Pending, weight: Tensor) -> None:
    """Move the kept statistics to ``cleared`` if the gradient they belong to is gone."""
    if entry.kept is None:
        return
    grad = weight.grad
    if grad is None or entry.grad is None or entry.grad() is not grad:
        same = False
    else:  # changed in place: cleared if zeroed (zero_grad(False))
        same = grad._version == entry.version or bool(grad.any())
    if not same:
        entry.cleared, entry.kept, entry.grad = _merge(entry.cleared, entry.kept), None, None


def _hook(layer: nn.Module, weight: Tensor) -> None:
    known = _hooked.get(layer)
    if known is not None and known() is weight:
        return
    layer_ref = weakref.ref(layer)
    weight.register_post_accumulate_grad_hook(lambda param: _accumulated(layer_ref, param))
    _hooked[layer] = weakref.ref(weight)


def _accumulated(layer_ref: weakref.ref[nn.Module], param: Tensor) -> None:
    layer = layer_ref()
    entry = None if layer is None else _pending.get(layer)
    if entry is None or entry.task != torch._C._current_graph_task_id():
        return
    grad = param.grad
    assert grad is not None  # the hook runs once the gradient is accumulated into it
    entry.accumulated = True
    entry.grad, entry.version = weakref.ref(grad), grad._version


def _end_of_pass(entry: _Pending, label: str) -> None:
    stats, entry.passing, entry.task = entry.passing, None, -2
    if not entry.accumulated:
        raise RuntimeError(
            f"TrAct (defer=True) on {label}: this backward pass computed the layer's weight "
            "gradient but did not accumulate it into weight.grad (torch.autograd.grad, or "
            "backward(inputs=...)), which is the gradient trainact.precondition_ preconditions: "
            "use loss.backward(), or enable TrAct with defer=False, which preconditions the "
            "gradient autograd.grad returns"
        )
    entry.kept = _merge(entry.kept, stats)


def has_pending(layer: nn.Module) -> bool:
    """Whether ``layer`` holds statistics that its weight's gradient still carries."""
    entry = _pending.get(layer)
    weight = layer._parameters.get("weight")
    if entry is None or weight is None or weight.grad is None:
        return False
    return entry.kept is not None or (entry.cleared is not None and distributed.is_dtensor(weight))


def pending_layers() -> list[nn.Module]:
    """Every layer with :func:`has_pending` statistics."""
    return [layer for layer in list(_pending) if has_pending(layer)]


def drop(layer: nn.Module) -> None:
    """Forget the layer's deferred statistics (TrAct removed)."""
    _pending.pop(layer, None)


def finish(layer: nn.Module, state: TrActState) -> bool:
    """Replace ``weight.grad`` by G·(XᵀX/n + λI)⁻¹ with the layer's deferred statistics (summed
    over the process group), and forget them. False when nothing was pending."""
    entry = _pending.pop(layer, None)
    if entry is None:
        return False
    weight = checks.deferrable_weight(layer)
    stats = entry.kept
    if distributed.is_dtensor(weight):  # FSDP2: a clearing between passes is not visible
        stats = _merge(entry.cleared, stats)
    if stats is None or weight.grad is None:  # cleared since the last backward
        return False
    distributed.all_reduce(stats.data, distributed.resolve(state.process_group))
    shard = distributed.local(weight.grad)
    if shard.shape != weight.grad.shape and stats.groups > 1:
        raise NotImplementedError("sharded gradients of grouped convolutions")
    with torch.no_grad():
        shard.copy_(stats.tract_gradient(shard, state.lam))
    return True
