"""Deferred statistics (``defer=True``): the one owner of the statistics a layer's backward
passes leave for :func:`trainact.precondition_`.

The statistics of a backward pass belong to the gradient that pass accumulates into the weight's
``.grad``, and follow it:

- a pass's statistics count once its gradient has been accumulated (a post-accumulate-grad hook
  on the weight sees it); a pass that computed the layer's gradient without accumulating it
  (``torch.autograd.grad``) raises when it ends;
- a gradient cleared since the previous pass (``zero_grad()``, ``.grad = None``, or zeroed in
  place) takes the statistics of that pass and the earlier ones with it, so a discarded backward
  leaves nothing behind. "Cleared" is read from the gradient itself, not from which tensor holds
  it: DDP with ``gradient_as_bucket_view=True`` moves ``.grad`` into its bucket and FSDP2 into
  the sharded parameter, and neither clears it. Every tensor that held the gradient when the
  previous pass settled (after DDP's and FSDP2's own end-of-backward work) is looked at: the
  gradient is cleared when each of them is gone (None) or was changed to all zeros;
- one call of the layer per backward pass: deferred statistics pool the micro-batches of a step,
  while without ``defer`` each call is preconditioned with its own statistics, so two calls of
  one pass (two views through one encoder) raise rather than train differently;
- only the layer's own share of ``.grad``: each pass compares what the layer's backward delivered
  with what reached ``.grad`` (one weight-sized tensor), and :func:`finish` refuses a gradient
  that also holds another use of the weight (a tied decoder's ``F.linear(h, layer.weight.t())``),
  which it would precondition too;
- :func:`finish` warns once when the gradient was scaled by a factor other than a power of two
  since its last pass: clipping before TrAct (a GradScaler's unscaling is a power of two, DDP's
  averaging happens before a pass settles, and neither warns);
- a weight changed in place while its gradient was still plain, and whose gradient was then
  cleared, was updated with a gradient TrAct never preconditioned (SAM's ``first_step``, a
  hand-written update, anything the optimizer-step guard does not see): the next pass raises.
"""

from __future__ import annotations

import math
import warnings
import weakref
from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch._subclasses.fake_tensor import is_fake

from trainact import distributed
from trainact.maths import PatchStatistics
from trainact.nn import checks
from trainact.nn.state import TrActState


def _merge(a: PatchStatistics | None, b: PatchStatistics | None) -> PatchStatistics | None:
    if a is None or b is None:
        return a if b is None else b
    return a.merge_(b)


class _Held(NamedTuple):
    """A parameter whose ``.grad`` held the weight's gradient when the last pass settled."""

    param: weakref.ref[Tensor]
    grad: weakref.ref[Tensor]
    version: int  # the gradient's
    param_version: int  # the parameter's own: an in-place update of the weight changes it


class _Pending:
    """A layer's statistics since its gradient was last cleared, the pass in progress, and what
    the checks of :func:`finish` need."""

    __slots__ = ("kept", "passing", "task", "accumulated", "expected", "outside", "held", "settled")

    def __init__(self) -> None:
        self.kept: PatchStatistics | None = None
        self.passing: PatchStatistics | None = None  # the current pass, until it accumulates
        self.task = -2  # the graph task of the current pass
        self.accumulated = False
        self.expected: Tensor | None = None  # .grad before the pass plus the layer's own share
        self.outside: Tensor | None = None  # a pass's .grad got more than the layer's share
        self.held: list[_Held] = []  # where the gradient was when the last pass settled
        self.settled: Tensor | None = None  # its (local) values then, for the clipping check


_pending: weakref.WeakKeyDictionary[nn.Module, _Pending] = weakref.WeakKeyDictionary()
# (layer, weight) pairs whose weight carries the post-accumulate hook of that layer
_hooked: weakref.WeakKeyDictionary[nn.Module, weakref.ref[Tensor]] = weakref.WeakKeyDictionary()
_warned_clipping = False


def accumulate(
    layer: nn.Module, state: TrActState, stats: PatchStatistics, weight: Tensor, share: Tensor
) -> None:
    """Take one call's statistics in its backward (``weight``: the leaf the gradient goes to;
    ``share``: the gradient the layer's backward delivers to it)."""
    task = torch._C._current_graph_task_id()
    entry = _pending.setdefault(layer, _Pending())
    label = state.name or type(layer).__name__
    if entry.task == task:
        raise RuntimeError(
            f"TrAct (defer=True) on {label}: the layer ran twice "
            "in one backward pass (two views through one encoder?). Deferred statistics pool "
            "the micro-batches of a step, while without defer each call is preconditioned with "
            "its own statistics, so the two would train differently: pass the views as one "
            "batch (torch.cat), or use defer=False without gradient accumulation"
        )
    if entry.kept is not None and _cleared(entry):
        _check_not_updated(entry, weight, label)
        entry.kept, entry.outside = None, None
    entry.task, entry.accumulated, entry.passing = task, False, stats.clone()
    with torch.no_grad():
        before = weight.grad
        entry.expected = share if before is None else before + share
    _hook(layer, weight)
    layer_ref, weight_ref = weakref.ref(layer), weakref.ref(weight)
    torch.autograd.Variable._execution_engine.queue_callback(
        lambda: _end_of_pass(entry, label, layer_ref, weight_ref)
    )


def _cleared(entry: _Pending) -> bool:
    """Whether the gradient the kept statistics belong to is gone from every tensor that held
    it when the last pass settled (no tensor seen holding it: kept)."""
    for held in entry.held:
        param = held.param()
        now = None if param is None else param.grad
        if now is None:
            continue
        if now is held.grad() and now._version == held.version or is_fake(now):
            return False  # untouched (fake tensors: no values to read)
        values = distributed.local(now)
        if values.numel() > 0 and bool(values.any()):
            return False  # moved or changed, not cleared
    return bool(entry.held)


def _check_not_updated(entry: _Pending, weight: Tensor, label: str) -> None:
    """Refuse a weight that changed in place since the last pass settled while its gradient
    waited for ``precondition_`` and was then cleared: it was updated with the plain gradient.
    Checked where one tensor holds both the weight and its gradient (not under FSDP2, whose
    all-gathers rewrite the unsharded weight at every forward)."""
    if len(entry.held) != 1 or is_fake(weight):
        return
    held = entry.held[0]
    if held.param() is not weight or weight._version == held.param_version:
        return
    entry.kept, entry.outside = None, None  # (the refusal must not leave them for a retry)
    raise RuntimeError(
        f"TrAct (defer=True) on {label}: the weight was changed while its gradient still "
        "waited for trainact.precondition_(model), and that gradient was then cleared: "
        "something updated the weight with the plain gradient (SAM's first_step, a "
        "hand-written update, an optimizer step the step guard does not see). Call "
        "trainact.precondition_(model) after each backward whose gradient is used, before "
        "the weight changes (with SAM: before first_step and before second_step, or before "
        "step(closure)), or enable TrAct with defer=False"
    )


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
    expected, entry.expected = entry.expected, None
    if expected is None:
        return
    with torch.no_grad():  # what reached .grad is the layer's share alone (NaN equal to NaN)
        differs = ((grad != expected) & ~(grad.isnan() & expected.isnan())).any()
    entry.outside = differs if entry.outside is None else entry.outside | differs


def _end_of_pass(
    entry: _Pending,
    label: str,
    layer_ref: weakref.ref[nn.Module],
    weight_ref: weakref.ref[Tensor],
) -> None:
    stats, entry.passing, entry.task, entry.expected = entry.passing, None, -2, None
    if not entry.accumulated:
        raise RuntimeError(
            f"TrAct (defer=True) on {label}: this backward pass computed the layer's weight "
            "gradient but did not accumulate it into weight.grad (torch.autograd.grad, or "
            "backward(inputs=...)), which is the gradient trainact.precondition_ preconditions: "
            "use loss.backward(), or enable TrAct with defer=False, which preconditions the "
            "gradient autograd.grad returns"
        )
    entry.kept = _merge(entry.kept, stats)
    # Queued from a final callback, this runs after every callback queued before it: DDP's
    # averaging (and its bucket views) and FSDP2's reduce-scatter are done by then.
    torch.autograd.Variable._execution_engine.queue_callback(
        lambda: _settle(entry, layer_ref, weight_ref)
    )


def _settle(
    entry: _Pending, layer_ref: weakref.ref[nn.Module], weight_ref: weakref.ref[Tensor]
) -> None:
    """Record where the gradient is and what it holds, once the pass's backward is done."""
    layer, weight = layer_ref(), weight_ref()
    registered = None if layer is None else layer._parameters.get("weight")
    holders = [weight] if registered is None or registered is weight else [weight, registered]
    entry.held = [
        _Held(weakref.ref(p), weakref.ref(p.grad), p.grad._version, p._version)
        for p in holders
        if p is not None and p.grad is not None
    ]
    grad = None if registered is None else registered.grad
    entry.settled = None if grad is None else grad.detach().clone()


def has_pending(layer: nn.Module) -> bool:
    """Whether ``layer`` holds statistics that its weight's gradient still carries."""
    entry = _pending.get(layer)
    weight = layer._parameters.get("weight")
    return not (entry is None or entry.kept is None or weight is None or weight.grad is None)


def pending_layers() -> list[nn.Module]:
    """Every layer with :func:`has_pending` statistics."""
    return [layer for layer in list(_pending) if has_pending(layer)]


def drop(layer: nn.Module) -> None:
    """Forget the layer's deferred statistics (TrAct removed)."""
    _pending.pop(layer, None)


def finish(layer: nn.Module, state: TrActState) -> bool:
    """Replace ``weight.grad`` by G·(XᵀX/n + λI)⁻¹ with the layer's deferred statistics (summed
    over the process group), and forget them. False when nothing was pending.

    Raises:
        RuntimeError: the gradient holds another use of the weight (on any process).
    """
    entry = _pending.pop(layer, None)
    if entry is None:
        return False
    weight = checks.deferrable_weight(layer)
    stats = entry.kept
    if stats is None or weight.grad is None:  # cleared since the last backward
        return False
    label = state.name or type(layer).__name__
    shard = distributed.local(weight.grad)
    if shard.shape != weight.grad.shape and stats.groups > 1:
        raise NotImplementedError("sharded gradients of grouped convolutions")
    # The refusal below is decided by every process together: one all-reduce carries it.
    outside = torch.zeros(1, dtype=torch.float64, device=stats.data.device)
    if entry.outside is not None:
        outside += entry.outside.to(outside.device)
    packed = distributed.all_reduce(
        torch.cat([stats.data, outside]), distributed.resolve(state.process_group)
    )
    settled = None if entry.settled is None else distributed.local(entry.settled)
    if not is_fake(packed):  # (fake tensors have no values to read)
        _check_values(packed[-1], shard, settled, label)
    reduced = PatchStatistics(packed[:-1], stats.groups, stats.dim)
    with torch.no_grad():
        shard.copy_(reduced.tract_gradient(shard, state.lam))
    return True


def _check_values(outside: Tensor, grad: Tensor, settled: Tensor | None, label: str) -> None:
    """Refuse a gradient that holds another use of the weight (``outside`` > 0: some pass, on
    some process); warn once if ``grad`` is ``settled`` (its values when the last pass settled)
    scaled by a factor below 1 that is not a power of two: clipped before TrAct (a power of two,
    a GradScaler's unscaling, is exact and commutes with TrAct, which is linear). One host
    synchronization reads everything."""
    global _warned_clipping
    values = [outside.to(grad.device, torch.float64)]
    compare = not _warned_clipping and settled is not None and settled.shape == grad.shape
    if compare:
        assert settled is not None
        with torch.no_grad():
            g, s = grad.double().flatten(), settled.double().flatten()
            norm, factor = s.dot(s), g.dot(s) / s.dot(s)
            values += [norm, factor, (g - factor * s).norm(), g.norm()]
    read = torch.stack(values).tolist()
    if read[0] > 0:
        raise RuntimeError(
            f"TrAct (defer=True) on {label}: {label}.weight.grad received gradient from outside "
            "the layer (the weight is also used elsewhere, e.g. a tied decoder "
            f"F.linear(h, {label}.weight.t())), and precondition_ would precondition that "
            "share too, while without defer only the layer's own share is preconditioned: use "
            "defer=False (and no gradient accumulation), or untie the weights"
        )
    if not compare:
        return
    norm, factor, residual, size = read[1:]
    if not (0 < norm < math.inf and 0 < factor < 1) or math.frexp(factor)[0] == 0.5:
        return
    if not residual <= 1e-5 * size:
        return  # not a uniform scaling (nothing clip_grad_norm_ does)
    _warned_clipping = True
    warnings.warn(
        f"TrAct (defer=True) on {label}: the weight's gradient was scaled by {factor:.4g} "
        "between its backward and trainact.precondition_, as gradient clipping does "
        "(clip_grad_norm_, a loss scaler's clip_grad): the plain gradient was clipped, not the "
        "preconditioned one. Call trainact.precondition_(model) after the last backward and "
        "before clipping (with a GradScaler: after scaler.unscale_(optimizer)); "
        "precondition_on_step runs inside optimizer.step(), after any clipping",
        UserWarning,
        stacklevel=3,
    )
