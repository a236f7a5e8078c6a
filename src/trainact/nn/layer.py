"""TrAct inside a layer: its forward and the autograd functions of both forms.

Enabling TrAct swaps the layer's class for a generated subclass (``TrActConv2d`` for a
``Conv2d``, as ``torch.nn.utils.parametrize`` does) and keeps a
:class:`trainact.nn.state.TrActState` (the settings) on the layer. In a training call the
statistics of the call's input are computed, and:

- the d×d form routes the weight through :class:`PreconditionWeight`, an identity whose backward
  turns this call's plain G into G·(XᵀX/n + λI)⁻¹ (or, with ``defer=True``, hands the statistics
  to :mod:`trainact.nn.deferred` and G passes through); the layer's own kernels compute the
  forward, the input and bias gradients and G. Summed over a process group, the statistics'
  all-reduce starts when the call's output gradient arrives (:class:`ReduceInBackward`), so a
  forward whose backward never runs communicates nothing;
- the n×n form (n < d) runs the layer's op inside :class:`RowForm`; for an input that needs a
  gradient (adversarial training, gradient penalties) the layer's own kernels run instead,
  between :class:`RowFormWeight` and :class:`CaptureOutputGrad`, so that the input gradient is
  the plain one and the weight gradient still comes from the output gradient D.

Each call is preconditioned with its own statistics (the paper's Lemma, per forward); several
calls (checkpoint recomputation, two inputs) and torch.compile keep that pairing. The state holds
no reference to the layer (no cycle: ``del model`` frees it at once) and nothing in
``state_dict()``.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, SupportsIndex, cast

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

from trainact import distributed
from trainact.maths import PatchStatistics
from trainact.maths.precision import Precision, precision_for
from trainact.maths.rows import CenteredRows, center, row_inverse, weight_grad
from trainact.nn import checks, compat, deferred, report, step_guard
from trainact.nn.adapters import Adapter, Layer, adapter_for
from trainact.nn.call_statistics import call_statistics
from trainact.nn.state import STATE, TrActState


class _Reduction:
    """One call's statistics summed over a process group: started in backward (see
    :class:`ReduceInBackward`), waited where the gradient is preconditioned."""

    __slots__ = ("stats", "group", "work")

    def __init__(self, stats: PatchStatistics, group: dist.ProcessGroup) -> None:
        self.stats, self.group = stats, group
        self.work: dist.Work | None = None

    def start(self) -> dist.Work:
        if self.work is None:
            self.work = distributed.all_reduce_async(self.stats.data, self.group)
        return self.work

    def wait(self) -> None:
        self.start().wait()


class ReduceInBackward(torch.autograd.Function):
    """Identity on the layer's output; its backward, which runs when the output gradient
    arrives (before the layer's own backward kernels), starts the statistics' all-reduce, so
    that it overlaps them."""

    @staticmethod
    def forward(ctx: Any, output: Tensor, reduction: _Reduction) -> Tensor:  # noqa: D102
        ctx.reduction = reduction
        return output.view_as(output)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:  # noqa: D102
        ctx.reduction.start()
        return grad, None


class PreconditionWeight(torch.autograd.Function):
    """Identity on the weight in forward; in backward, G becomes G·(XᵀX/n + λI)⁻¹ per group.

    With ``state.defer`` the statistics go to :mod:`trainact.nn.deferred` instead and G passes
    through unchanged.
    """

    @staticmethod
    def forward(  # noqa: D102
        ctx: Any,
        weight: Tensor,
        stats: PatchStatistics,
        state: TrActState,
        layer: Layer,
        reduction: _Reduction | None,
    ) -> Tensor:
        # Kept on ctx, not saved: non-reentrant checkpointing would otherwise hand backward the
        # recomputed statistics.
        ctx.stats, ctx.state, ctx.layer, ctx.reduction = stats, state, layer, reduction
        ctx.weight = weight if state.defer else None  # the leaf the deferred gradient goes to
        return weight.view_as(weight)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None, None, None]:  # noqa: D102
        stats, state = ctx.stats, ctx.state
        if state.defer:
            deferred.accumulate(ctx.layer, state, stats, ctx.weight, grad)
            step_guard.install()  # a step must not use this gradient before precondition_
            return grad, None, None, None, None
        if ctx.reduction is not None:
            ctx.reduction.wait()
        return stats.tract_gradient(grad, state.lam), None, None, None, None


class RowForm(torch.autograd.Function):
    """The layer's op in the n×n form (:mod:`trainact.maths.rows`): its own forward; in
    backward the weight gradient is (M·D)ᵀ·X per group, from the output gradient D and the
    centered patch rows (n < d: a small matrix), computed in at least float32 whatever the
    layer's dtype; the bias gets ΣD. (The input has no gradient on this path.)"""

    @staticmethod
    def forward(  # noqa: D102
        ctx: Any,
        x: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        extended: Tensor,
        row_shift: Tensor,
        inverse: Tensor,
        layer: Layer,
        adapter: Adapter,
    ) -> Tensor:
        # the parts of CenteredRows as tensor arguments: torch.compile keeps their sizes dynamic
        ctx.rows, ctx.inverse = CenteredRows(extended, row_shift), inverse
        ctx.adapter = adapter
        ctx.weight_meta = weight.shape, weight.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        return layer_forward(layer, x, weight, bias)

    @staticmethod
    def backward(  # noqa: D102
        ctx: Any, grad: Tensor
    ) -> tuple[None, Tensor | None, Tensor | None, None, None, None, None, None]:
        adapter = ctx.adapter
        grad_weight = None
        if ctx.needs_input_grad[1]:
            shape, weight_dtype = ctx.weight_meta
            per_group = weight_grad(adapter.grad_rows(grad), ctx.inverse, ctx.rows)
            grad_weight = per_group.reshape(shape).to(weight_dtype)
        bias = adapter.bias_grad(grad).to(ctx.bias_dtype) if ctx.needs_input_grad[2] else None
        return None, grad_weight, bias, None, None, None, None, None


class _RowCall:
    """One n×n-form call whose input needs a gradient: its rows and M, and the output gradient
    D that :class:`CaptureOutputGrad` saw in the current backward pass."""

    __slots__ = ("rows", "inverse", "adapter", "lam", "grad", "task", "differentiated")

    def __init__(self, rows: CenteredRows, inverse: Tensor, adapter: Adapter, lam: float) -> None:
        self.rows, self.inverse, self.adapter, self.lam = rows, inverse, adapter, lam
        self.grad: Tensor | None = None
        self.task = -2
        self.differentiated = False  # a backward through the call ran with create_graph

    def capture(self, grad: Tensor) -> None:
        self.grad, self.task = grad, torch._C._current_graph_task_id()
        self.differentiated |= torch.is_grad_enabled()

    def weight_grad(self, plain: Tensor) -> Tensor:
        """TrAct's weight gradient for the plain G = ``plain``: (M·D)ᵀ·X from this pass's D;
        where G holds more than DᵀX (a double backward through the layer: G also gets the
        gradient penalty's share), G·(XᵀX/n + λI)⁻¹ from G itself, by the push-through
        identity G·A⁻¹ = (G − (G·Xᵀ)·M·X/n)/λ, in float64."""
        grad, self.grad = self.grad, None
        groups = self.rows.extended.shape[0]
        if grad is not None and not self.differentiated:
            if self.task == torch._C._current_graph_task_id():
                per_group = weight_grad(self.adapter.grad_rows(grad), self.inverse, self.rows)
                return per_group.reshape(plain.shape).to(plain.dtype)
        rows64 = CenteredRows(*(t.to(self.inverse.device, torch.float64) for t in self.rows))
        z, a = rows64.extended[:, :-2], rows64.row_shift
        b = rows64.extended[:, -1:]
        g = plain.reshape(groups, plain.shape[0] // groups, -1).to(z)
        # X·Gᵀ with X = Z + a·1ᵀ + 1·bᵀ
        xg = z @ g.mT + a[..., None] * g.sum(-1)[:, None, :] + b @ g.mT
        projected = weight_grad(xg, self.inverse, rows64)
        tract = (g - projected / max(a.shape[1], 1)) / self.lam
        return tract.reshape(plain.shape).to(plain.device, plain.dtype)


class CaptureOutputGrad(torch.autograd.Function):
    """Identity on the layer's output in the n×n form with an input that needs a gradient: its
    backward hands the output gradient D to the call (:class:`_RowCall`)."""

    @staticmethod
    def forward(ctx: Any, output: Tensor, call: _RowCall) -> Tensor:  # noqa: D102
        ctx.call = call
        return output.view_as(output)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:  # noqa: D102
        ctx.call.capture(grad)
        return grad, None


class RowFormWeight(torch.autograd.Function):
    """Identity on the weight in the n×n form with an input that needs a gradient: the layer's
    own kernels compute the plain input and bias gradients (and G), and this backward replaces
    G by the n×n form's gradient from D (:meth:`_RowCall.weight_grad`)."""

    @staticmethod
    def forward(ctx: Any, weight: Tensor, call: _RowCall) -> Tensor:  # noqa: D102
        ctx.call = call
        return weight.view_as(weight)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:  # noqa: D102
        return ctx.call.weight_grad(grad), None


def layer_forward(layer: Layer, input: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """The plain layer's forward with the given weight and bias tensors."""
    if isinstance(layer, nn.Linear):
        return F.linear(input, weight, bias)
    output: Tensor = layer._conv_forward(input, weight, bias)
    return output


def tract_forward(layer: Layer, state: TrActState, input: Tensor) -> Tensor:
    """The layer's forward with TrAct: plain in eval mode, under no_grad or with a frozen
    weight; otherwise the weight's gradient is preconditioned (:func:`_preconditioned_forward`)."""
    weight = layer.weight  # read once (parametrizations run here)
    checks.check_weight(layer, weight)
    if not (layer.training and torch.is_grad_enabled() and weight.requires_grad):
        return layer_forward(layer, input, weight, layer.bias)
    checks.check_call(layer, weight, input, state.defer)
    if state.defer or distributed.resolve(state.process_group) is not None:
        if torch.compiler.is_compiling():
            return _eagerly()(layer, state, input, weight)
    return _preconditioned_forward(layer, state, input, weight)


@functools.cache
def _eagerly() -> Callable[[Layer, TrActState, Tensor, Tensor], Tensor]:
    """:func:`_preconditioned_forward` run eagerly under torch.compile: deferred statistics and
    the n×n form's output gradient for an input that needs a gradient (Python state), and
    asynchronous collectives (Work handles) do not trace, so this layer runs eagerly and the
    rest stays compiled. Made on first use (torch.compiler.disable imports dynamo)."""
    eager: Callable[[Layer, TrActState, Tensor, Tensor], Tensor]
    eager = torch.compiler.disable(_preconditioned_forward)
    return eager


def _preconditioned_forward(
    layer: Layer, state: TrActState, input: Tensor, weight: Tensor
) -> Tensor:
    adapter = adapter_for(layer)
    x = input.detach()
    if x.layout != torch.strided and not x.is_nested:  # sparse rows (nn.Linear): dense copies
        x = x.to_dense()
    patches = x.values() if x.is_nested else x  # a jagged batch's rows (nn.Linear)
    if not adapter.valid(patches):  # a kernel larger than the input: the layer's own error
        return layer_forward(layer, input, weight, layer.bias)
    precision = precision_for(input.device, state.statistics_dtype, input.dtype)
    group = distributed.resolve(state.process_group)
    if group is not None:
        checks.check_summed_call(state.name or type(layer).__name__)
        group = None if state.defer else group
    report.log_first_call(
        state.name,
        plain_class(layer).__name__,
        state.settings,
        distributed.world_size(state.process_group),
        precision.product,
        precision.host_solve,
        precision.fast_float64,
        precision.device,
    )
    with _no_autocast(input.device):
        use_rows = group is None and not x.is_nested and _row_form(state, adapter, input, precision)
        if use_rows and input.requires_grad and torch.compiler.is_compiling():
            # the D that CaptureOutputGrad hands to RowFormWeight is Python state: eagerly
            return _eagerly()(layer, state, input, weight)
        if use_rows:
            rows = center(adapter.rows(x))
            inverse = row_inverse(rows, state.lam, precision.host_solve)
        else:
            inverse = None
            stats = call_statistics(adapter, patches, precision, state)
    # (torch leaves autograd.Function.apply unannotated: each returns its forward's tensor)
    if inverse is not None and input.requires_grad:  # the n×n form around the layer's kernels
        call = _RowCall(rows, inverse, adapter, state.lam)
        routed_weight: Tensor = RowFormWeight.apply(weight, call)  # type: ignore[no-untyped-call]
        output = layer_forward(layer, input, routed_weight, layer.bias)
        captured: Tensor = CaptureOutputGrad.apply(output, call)  # type: ignore[no-untyped-call]
        return captured
    if inverse is not None:  # the n×n form
        row_output: Tensor = RowForm.apply(  # type: ignore[no-untyped-call]
            input.detach(), weight, layer.bias, *rows, inverse, layer, adapter
        )
        return row_output
    reduction = None if group is None else _Reduction(stats, group)
    routed: Tensor = PreconditionWeight.apply(  # type: ignore[no-untyped-call]
        weight, stats, state, layer, reduction
    )
    output = layer_forward(layer, input, routed, layer.bias)
    if reduction is None:
        return output
    reduced: Tensor = ReduceInBackward.apply(output, reduction)  # type: ignore[no-untyped-call]
    return reduced


def _row_form(state: TrActState, adapter: Adapter, input: Tensor, precision: Precision) -> bool:
    """Whether this call takes the n×n form: fewer patches than the d×d form would cost
    (n < d with fast float64, n < 0.6·d otherwise: K = XXᵀ is float64) and its own statistics
    (not deferred, not summed over processes)."""
    n = adapter.num_patches(input)
    limit = adapter.dim if precision.fast_float64 else 0.6 * adapter.dim
    return 0 < n < limit and not state.defer


def _no_autocast(device: torch.device) -> contextlib.AbstractContextManager[None]:
    """Autocast off for the statistics, on devices that have autocast."""
    if compat.has_autocast(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


class TrActLayer(nn.Module):
    """The base of the generated ``TrAct<Layer>`` classes; never instantiated directly.

    Under ``torch.jit.script`` the forward compiles to the plain layer's (TrAct's own forward and
    backward are Python), and the scripted module refuses training mode, where it would train
    without TrAct; the Python module keeps TrAct.
    """

    _trainact_base: type[nn.Module]

    if TYPE_CHECKING:  # from _LinearForward or _ConvForward, mixed into every generated class

        def _plain_forward(self, input: Tensor) -> Tensor: ...

    def forward(self, input: Tensor) -> Tensor:  # noqa: D102
        if torch.jit.is_scripting():
            if self.training:
                raise RuntimeError(
                    "this module was scripted with torch.jit.script, which cannot keep TrAct: "
                    "it runs the plain layer, for inference in eval mode only; train the Python "
                    "module"
                )
            return self._plain_forward(input)
        return self._tract_call(input)

    @torch.jit.unused
    def _tract_call(self, input: Tensor) -> Tensor:
        state = self.__dict__.get(STATE)
        if state is None:  # removed while the class could not be restored (see disable)
            plain: Tensor = self._trainact_base.forward(self, input)
            return plain
        # every generated class derives from a supported layer (checks.check_supported)
        return tract_forward(cast(Layer, self), state, input)

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "qconfig":  # torch.ao.quantization is about to swap modules by exact type
            checks.warn_quantization(self)
        super().__setattr__(name, value)

    def __reduce_ex__(self, protocol: SupportsIndex) -> tuple[Any, ...]:
        # The generated class cannot be imported by name: rebuild it from the layer's own class.
        # (Module.__getstate__ is unannotated; parametrize's class overrides it to refuse)
        state = self.__getstate__()  # type: ignore[no-untyped-call]
        return (_rebuild, (self._trainact_base,), state)


class _LinearForward:
    """The plain forward of a Linear, in a form TorchScript compiles."""

    if TYPE_CHECKING:  # the attributes of the nn.Linear this is mixed into
        weight: Tensor
        bias: Tensor | None

    def _plain_forward(self, input: Tensor) -> Tensor:
        return F.linear(input, self.weight, self.bias)


class _ConvForward:
    """The plain forward of a ConvNd, in a form TorchScript compiles."""

    if TYPE_CHECKING:  # the attributes of the nn.Conv1d/2d/3d this is mixed into
        weight: Tensor
        bias: Tensor | None

        def _conv_forward(self, input: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor: ...

    def _plain_forward(self, input: Tensor) -> Tensor:
        return self._conv_forward(input, self.weight, self.bias)


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
        plain = _LinearForward if issubclass(base, nn.Linear) else _ConvForward
        cls = type(f"TrAct{base.__name__}", (TrActLayer, plain, base), namespace)
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
    deferred.drop(layer)
    cls = type(layer)
    if cls in _PARAMETRIZED_ORIGINAL:
        layer.__class__ = _PARAMETRIZED_ORIGINAL[cls]
    elif issubclass(cls, TrActLayer) and cls in _CLASSES.values():
        layer.__class__ = cls._trainact_base
