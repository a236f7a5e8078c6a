"""TrAct inside a layer: its per-layer state, its forward, and the autograd function on the weight.

Enabling TrAct swaps the layer's class for a generated subclass (``TrActConv2d`` for a
``Conv2d``, as ``torch.nn.utils.parametrize`` does) whose ``forward`` routes the weight through
:class:`PreconditionWeight`, and keeps a :class:`TrActState` on the layer. The layer's own
kernels still compute the forward, the input and bias gradients and the plain weight gradient G;
the identity function between the parameter and the layer hands its backward exactly the G of
this call with this call's statistics (several calls per step, checkpoint recomputation and
torch.compile keep that pairing). The state holds no reference to the layer (no cycle: ``del
model`` frees it at once) and nothing in ``state_dict()``.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

from trainact import distributed
from trainact.maths import PatchStatistics
from trainact.maths.precision import Precision, precision_for
from trainact.maths.rows import row_inverse, transform_output_grad
from trainact.nn import steps
from trainact.nn.adapters import Adapter, adapter_for
from trainact.nn.statistics import log_once, patch_statistics

#: The attribute of an enabled layer that holds its :class:`TrActState`.
STATE = "trainact_state"


class TrActState:
    """One layer's TrAct settings and its deferred statistics (``defer=True``)."""

    def __init__(
        self,
        lam: float,
        statistics_dtype: torch.dtype | None,
        process_group: distributed.ProcessGroupArg,
        defer: bool,
        name: str = "",
    ) -> None:
        self.name = name  # the layer's name in its model, for the log
        self.lam = lam
        # λ for the custom op under torch.compile: a float argument (symbolic with
        # dynamic=True) would make dynamo compile twice to specialize it, and so would a 0-dim
        # tensor, which dynamo turns into a float
        self.lam_vector = torch.tensor([lam], dtype=torch.float64, device="cpu")
        self.statistics_dtype = statistics_dtype
        self.process_group = process_group
        self.defer = defer
        self.pending: PatchStatistics | None = None  # summed over backward passes (defer)

    def accumulate(self, stats: PatchStatistics, layer: nn.Module) -> None:
        """Add one backward pass's statistics to the deferred sum (``defer=True``)."""
        self.pending = stats.clone() if self.pending is None else self.pending.merge_(stats)
        steps.mark_pending(layer)

    def precondition_pending(self, layer: nn.Module) -> bool:
        """Replace ``weight.grad`` by G·(XᵀX/n + λI)⁻¹ with the deferred sums (summed over the
        process group), then reset them. False when nothing was pending."""
        if self.pending is None:
            return False
        stats, self.pending = self.pending, None
        steps.unmark_pending(layer)
        distributed.all_reduce(stats.data, distributed.resolve(self.process_group))
        weight = deferrable_weight(layer)
        if weight.grad is None:
            raise RuntimeError(
                f"TrAct (defer=True) on {type(layer).__name__}: statistics are pending but the "
                "weight has no gradient (was zero_grad() called between backward and "
                "trainact.precondition_?)"
            )
        shard = distributed.local(weight.grad)
        if shard.shape != weight.grad.shape and stats.groups > 1:
            raise NotImplementedError("sharded gradients of grouped convolutions")
        with torch.no_grad():
            shard.copy_(stats.precondition(shard, self.lam))
        return True

    def __deepcopy__(self, memo: dict[int, Any]) -> TrActState:
        """Copies (an EMA model, say) share the settings, the process group included, and
        start with no pending statistics: those belong to the original's gradient."""
        new = TrActState.__new__(TrActState)
        new.__dict__.update(self.__dict__, pending=None)
        return new

    def __getstate__(self) -> dict[str, Any]:
        if self.process_group not in (None, "auto"):
            raise TypeError(
                "cannot pickle a layer with TrAct enabled for an explicit process_group (a "
                "ProcessGroup belongs to one process): save model.state_dict(), or enable TrAct "
                'with process_group="auto"'
            )
        return {**self.__dict__, "pending": None}

    def __repr__(self) -> str:
        return f"TrActState(lam={self.lam}, defer={self.defer})"


def deferrable_weight(layer: nn.Module) -> nn.Parameter:
    """The weight Parameter whose ``.grad`` deferred TrAct rewrites; a clear error where the
    weight is computed (parametrize, weight_norm, spectral_norm): its ``.grad`` never exists."""
    weight = layer._parameters.get("weight")
    if weight is None:
        raise RuntimeError(
            f"TrAct with defer=True needs {type(layer).__name__}.weight to be a Parameter, but "
            "it is computed (torch.nn.utils.parametrize, weight_norm or spectral_norm), so it "
            "has no .grad to precondition: use defer=False (the default)"
        )
    return weight


def weight_parameter(layer: nn.Module) -> Tensor:
    """The layer's weight Parameter (its original under parametrize, weight_norm or
    spectral_norm), read without running a parametrization (spectral_norm's power iteration
    would change the model)."""
    for source in (
        lambda: layer._parameters["weight"],
        lambda: next(layer.parametrizations.weight.parameters()),  # original, or original0/1
        lambda: layer._parameters["weight_orig"],
        lambda: layer._parameters["weight_v"],
    ):
        try:
            weight = source()
        except (AttributeError, KeyError, StopIteration):
            continue
        if weight is not None:
            return weight
    raise TypeError(f"{type(layer).__name__} has no weight parameter")


class PreconditionWeight(torch.autograd.Function):
    """Identity on the weight in forward; in backward, G becomes G·(XᵀX/n + λI)⁻¹ per group.

    With ``state.defer`` the statistics are added to the layer's deferred sums instead and G
    passes through unchanged.
    """

    @staticmethod
    def forward(ctx, weight, stats, state, layer, work):  # noqa: D102
        # Kept on ctx, not saved: non-reentrant checkpointing would otherwise hand backward the
        # recomputed statistics, whose all-reduce is not the ``work`` waited on below.
        ctx.stats, ctx.state, ctx.layer, ctx.work = stats, state, layer, work
        return weight.view_as(weight)

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        stats, state = ctx.stats, ctx.state
        if ctx.work is not None:
            ctx.work.wait()  # the all-reduce started in forward, overlapped with the step
        if state.defer:
            state.accumulate(stats, ctx.layer)
            return grad, None, None, None, None
        return stats.precondition(grad, state.lam), None, None, None, None


class RowForm(torch.autograd.Function):
    """The layer's op in the n×n form (:mod:`trainact.maths.rows`): its own forward; in
    backward the weight gradient is (M·D)ᵀ·X per group, from the output gradient D and the
    patch rows X (n < d: a small matrix), computed in at least float32 whatever the layer's
    dtype; the bias gets ΣD. (The input has no gradient on this path.)"""

    @staticmethod
    def forward(ctx, x, weight, bias, rows, inverse, layer, adapter):  # noqa: D102
        ctx.rows, ctx.inverse, ctx.adapter = rows, inverse, adapter
        ctx.weight_meta = weight.shape, weight.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        return layer_forward(layer, x, weight, bias)

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        adapter, rows = ctx.adapter, ctx.rows
        dtype = torch.promote_types(rows.dtype, torch.float32)
        transformed = transform_output_grad(adapter.grad_rows(grad), ctx.inverse, dtype)
        weight_grad = None
        if ctx.needs_input_grad[1]:
            shape, weight_dtype = ctx.weight_meta
            weight_grad = (transformed.mT @ rows.to(dtype)).reshape(shape).to(weight_dtype)
        bias = adapter.bias_grad(grad).to(ctx.bias_dtype) if ctx.needs_input_grad[2] else None
        return None, weight_grad, bias, None, None, None, None


def layer_forward(layer: nn.Module, input: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """The plain layer's forward with the given weight and bias tensors."""
    if isinstance(layer, nn.Linear):
        return F.linear(input, weight, bias)
    return layer._conv_forward(input, weight, bias)


def tract_forward(layer: nn.Module, state: TrActState, input: Tensor) -> Tensor:
    """The layer's forward with TrAct: plain in eval mode, under no_grad or with a frozen
    weight; otherwise the weight's gradient is preconditioned (:func:`_preconditioned_forward`)."""
    weight = layer.weight  # read once (parametrizations run here)
    if not (layer.training and torch.is_grad_enabled() and weight.requires_grad):
        return layer_forward(layer, input, weight, layer.bias)
    if getattr(layer, "_is_replica", False):
        raise RuntimeError(
            "TrAct does not support nn.DataParallel (its replicas would each precondition with "
            "their own device's statistics): use DistributedDataParallel, one process per GPU"
        )
    if torch.compiler.is_exporting():
        raise RuntimeError(
            "torch.export captures the forward only, and TrAct changes only the backward: "
            "export in eval mode (model.eval()) or after trainact.remove(model)"
        )
    if state.defer or distributed.resolve(state.process_group) is not None:
        if torch.compiler.is_compiling():
            return _eagerly()(layer, state, input, weight)
    return _preconditioned_forward(layer, state, input, weight)


@functools.cache
def _eagerly() -> Any:
    """:func:`_preconditioned_forward` run eagerly under torch.compile: deferred sums (Python
    state) and asynchronous collectives (Work handles) do not trace, so this layer runs eagerly
    and the rest stays compiled. Made on first use (torch.compiler.disable imports dynamo)."""
    return torch.compiler.disable(_preconditioned_forward)


def _preconditioned_forward(
    layer: nn.Module, state: TrActState, input: Tensor, weight: Tensor
) -> Tensor:
    adapter = adapter_for(layer)
    precision = precision_for(input.device, state.statistics_dtype, input.dtype)
    x = input.detach()
    group = None if state.defer else distributed.resolve(state.process_group)
    with _no_autocast(input.device):
        if group is None and _row_form(state, adapter, input, precision):
            rows = adapter.rows(x)
            inverse = row_inverse(rows, state.lam, precision.host_solve)
            if not torch.compiler.is_compiling():
                log_once(state.name, precision, state.lam, 1)
        else:
            inverse = None
            stats = patch_statistics(adapter, x, precision, state)
    if inverse is not None:  # the n×n form
        return RowForm.apply(x, weight, layer.bias, rows, inverse, layer, adapter)
    work = None if group is None else distributed.all_reduce_async(stats.data, group)
    routed = PreconditionWeight.apply(weight, stats, state, layer, work)
    return layer_forward(layer, input, routed, layer.bias)


def _row_form(state: TrActState, adapter: Adapter, input: Tensor, precision: Precision) -> bool:
    """Whether this call takes the n×n form: fewer patches than the d×d form would cost
    (n < d with fast float64, n < 0.6·d otherwise: K = XXᵀ is float64), its own statistics
    (not deferred, not summed over processes), and an input without gradient (the transformed
    output gradient is meant for the weight alone)."""
    n = adapter.num_patches(input)
    limit = adapter.dim if precision.fast_float64 else 0.6 * adapter.dim
    return 0 < n < limit and not state.defer and not input.requires_grad


def _no_autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast off for the statistics, on devices that have autocast."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


class TrActLayer(nn.Module):
    """The base of the generated ``TrAct<Layer>`` classes; never instantiated directly."""

    _trainact_base: type[nn.Module]

    def forward(self, input: Tensor) -> Tensor:  # noqa: D102
        state = self.__dict__.get(STATE)
        if state is None:  # removed while the class could not be restored (see disable)
            return self._trainact_base.forward(self, input)
        return tract_forward(self, state, input)

    def __reduce_ex__(self, protocol: int) -> tuple[Any, ...]:
        # The generated class cannot be imported by name: rebuild it from the layer's own class.
        return (_rebuild, (self._trainact_base,), self.__getstate__())


_CLASSES: dict[type[nn.Module], type[TrActLayer]] = {}
# A parametrized layer's class (parametrize's ``Parametrized<Layer>``, holding the properties)
# -> the same class rebuilt on top of ``TrAct<Layer>``, and back.
_UNDER_PARAMETRIZE: dict[type[nn.Module], type[nn.Module]] = {}
_PARAMETRIZED_ORIGINAL: dict[type[nn.Module], type[nn.Module]] = {}


def _tract_class(base: type[nn.Module]) -> type[TrActLayer]:
    cls = _CLASSES.get(base)
    if cls is None:
        # The base's module: torch.fx keeps torch.nn layers as leaves (call_module), so tracing
        # a model with TrAct (feature extractors, quantization) keeps the TrAct layer whole.
        namespace = {"_trainact_base": base, "__module__": base.__module__}
        cls = type(f"TrAct{base.__name__}", (TrActLayer, base), namespace)
        _CLASSES[base] = cls
    return cls


def _tract_under_parametrize(cls: type[nn.Module]) -> type[nn.Module]:
    """``Parametrized<Layer>`` rebuilt as ``Parametrized<TrAct<Layer>>``: TrAct goes under
    parametrize's class, so that ``remove_parametrizations`` (which deletes the property from
    the class and falls back to its first base) leaves ``TrAct<Layer>`` behind."""
    rebuilt = _UNDER_PARAMETRIZE.get(cls)
    if rebuilt is None:
        tract = _tract_class(cls.__bases__[0])
        namespace = {k: v for k, v in vars(cls).items() if k not in ("__dict__", "__weakref__")}
        rebuilt = type(f"Parametrized{tract.__name__}", (tract,), namespace)
        _UNDER_PARAMETRIZE[cls], _PARAMETRIZED_ORIGINAL[rebuilt] = rebuilt, cls
    return rebuilt


def _rebuild(base: type[nn.Module]) -> nn.Module:
    """An empty instance of ``base``'s TrAct class (unpickling and deepcopy fill its state)."""
    cls = _tract_class(base)
    return cls.__new__(cls)


def state_of(module: nn.Module) -> TrActState | None:
    """The layer's TrAct state, or None where TrAct is not enabled."""
    return module.__dict__.get(STATE)


def plain_class(layer: nn.Module) -> type[nn.Module]:
    """The layer class whose forward TrAct keeps (the class under any TrAct class, e.g. one
    that :func:`disable` had to leave behind)."""
    return layer._trainact_base if isinstance(layer, TrActLayer) else type(layer)


def enable(layer: nn.Module, state: TrActState) -> None:
    """Swap the layer's class for its TrAct subclass and attach ``state``."""
    cls = type(layer)
    layer.__dict__[STATE] = state
    if isinstance(layer, TrActLayer):  # a TrAct class is still there (see disable): reuse it
        return
    if (
        parametrize.is_parametrized(layer)
        and cls.__name__ == f"Parametrized{cls.__bases__[0].__name__}"
    ):
        layer.__class__ = _tract_under_parametrize(cls)
    else:
        layer.__class__ = _tract_class(cls)


def disable(layer: nn.Module) -> None:
    """Undo :func:`enable`: the class's own forward is back, pending statistics dropped.

    A class changed after enabling (``fully_shard`` on the layer itself, say) is left as it is;
    without its state the layer then computes the plain forward.
    """
    del layer.__dict__[STATE]
    steps.unmark_pending(layer)
    cls = type(layer)
    if cls in _PARAMETRIZED_ORIGINAL:
        layer.__class__ = _PARAMETRIZED_ORIGINAL[cls]
    elif cls in _CLASSES.values():
        layer.__class__ = cls._trainact_base
