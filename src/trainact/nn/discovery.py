"""Finding a model's first layer: the layer that the model's input reaches first.

The model is seen either through its ``torch.fx`` graph (no input needed) or, for models fx
cannot trace, through one forward run on example inputs that follows which tensors derive from
them (a ``TorchFunctionMode`` plus forward pre-hooks). Both apply the same rule: see
:func:`find_first_layer`.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary

from trainact.nn.adapters import SUPPORTED_TYPES

#: Layers with parameters that act on each channel alone: the input's values pass through them.
PASS_THROUGH_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,  # BatchNorm*, InstanceNorm*, SyncBatchNorm
    nn.LayerNorm,
    nn.GroupNorm,
    nn.RMSNorm,
    nn.PReLU,
)

#: Functions that mix input features with a weight, wherever the weight comes from.
_WEIGHT_FUNCTIONS = {
    F.conv1d,
    F.conv2d,
    F.conv3d,
    F.conv_transpose1d,
    F.conv_transpose2d,
    F.conv_transpose3d,
    F.linear,
    F.bilinear,
    F.embedding,
    F.embedding_bag,
    torch.embedding,  # what fx records for F.embedding
    F.multi_head_attention_forward,
}
#: Products that act as a layer when one operand is a parameter (``x @ self.weight``).
_PRODUCT_METHODS = {"matmul", "mm", "bmm", "addmm", "baddbmm", "__matmul__", "__rmatmul__"}
_PRODUCT_FUNCTIONS = {
    torch.matmul,
    torch.mm,
    torch.bmm,
    torch.addmm,
    torch.baddbmm,
    torch.einsum,
    torch.tensordot,
    operator.matmul,
} | {getattr(Tensor, name) for name in _PRODUCT_METHODS}

#: Operations that read only a tensor's metadata: the input's values do not flow through them.
_METADATA_ATTRS = {"shape", "dtype", "device", "ndim", "is_cuda"}
_METADATA_METHODS = {"size", "dim", "numel", "type", "get_device"}
_FROM_METADATA_METHODS = {"new_zeros", "new_ones", "new_empty", "new_full"}
_FROM_METADATA_FUNCTIONS = {
    torch.zeros_like,
    torch.ones_like,
    torch.empty_like,
    torch.full_like,
    torch.rand_like,
    torch.randn_like,
    torch.randint_like,
} | {getattr(Tensor, name) for name in _FROM_METADATA_METHODS}

_IN_PLACE_OPERATORS = {"setitem", "__setitem__"} | {
    f"__i{op}__"
    for op in "add sub mul truediv floordiv mod pow matmul and or xor lshift rshift".split()
}


def _in_place(name: str) -> bool:
    """Whether an operation of this name writes into its first argument (``add_``, ``x[i] = y``)."""
    return name in _IN_PLACE_OPERATORS or (name.endswith("_") and not name.endswith("__"))


_NOT_LAYERS = {"torch.nn.modules.module", "torch.nn.modules.container", "torch.nn.modules.lazy"}


def _is_torch_layer_class(cls: type) -> bool:
    module = cls.__module__
    return module.startswith("torch.nn.modules.") and module not in _NOT_LAYERS


def _kind(module: nn.Module) -> str | None:
    """'supported' (a TrAct layer), 'unsupported' (another torch.nn layer with weights: Embedding,
    MultiheadAttention, RNNs, ConvTranspose, ...) or None (the input's values pass through)."""
    if isinstance(module, SUPPORTED_TYPES):
        return "supported"
    if isinstance(module, PASS_THROUGH_TYPES) or next(module.parameters(), None) is None:
        return None
    return "unsupported" if any(map(_is_torch_layer_class, type(module).__mro__)) else None


def _torch_name(module: nn.Module) -> str:
    cls = next(c for c in type(module).__mro__ if _is_torch_layer_class(c))
    own = "" if cls is type(module) else f"{type(module).__name__}, "
    return f"{own}nn.{cls.__name__}"


def _function_name(func: Any) -> str:
    if func is torch.embedding:
        return "F.embedding"
    name = getattr(func, "__name__", repr(func))
    return f"F.{name}" if func in _WEIGHT_FUNCTIONS else name


@dataclass(frozen=True)
class _Meeting:
    """Where the input first meets a weight: a layer's forward, or a function given a weight."""

    name: str  # the layer's dotted name, or the weight's ('' when it is no model parameter)
    module: nn.Module | None  # the layer, or for a function the module owning the weight
    function: str | None = None  # the function's name when the weight is used functionally

    def describe(self) -> str:
        if self.function is None:
            assert self.module is not None  # a layer's forward: the layer
            if isinstance(self.module, SUPPORTED_TYPES):
                return self.name or "<model>"
            return f"{self.name or '<model>'} ({_torch_name(self.module)})"
        return f"{self.function} with weight {self.name or '<computed>'}"

    def refusal(self, model_name: str) -> str:
        """Why TrAct cannot be enabled where the input first meets a weight."""
        supported = ", ".join(f"nn.{t.__name__}" for t in SUPPORTED_TYPES)
        if self.function is None:
            return (
                f"the first layer of {model_name} is {self.describe()}, which TrAct does not "
                f"support (it supports {supported}); pass layer= to choose another one"
            )
        owner = self.name.rpartition(".")[0]
        if isinstance(self.module, SUPPORTED_TYPES) and self.name.endswith(".weight"):
            return (
                f"the first layer of {model_name} is {owner} ({type(self.module).__name__}), but "
                f"it is called functionally ({self.describe()}), not through its forward: TrAct "
                f"cannot precondition it; call self.{owner}(x) in the model's forward"
            )
        return (
            f"the input of {model_name} first meets {self.describe()}, outside the forward of "
            f"any {supported}: TrAct cannot precondition it; pass layer= to choose another one"
        )


def _owners(model: nn.Module) -> dict[int, tuple[str, nn.Module]]:
    """id(parameter) -> (its dotted name, the module that owns it)."""
    return {
        id(p): (f"{prefix}.{n}" if prefix else n, m)
        for prefix, m in model.named_modules()
        for n, p in m.named_parameters(recurse=False)
    }


def _functional_meeting(
    func: Any, operands: list[Any], owners: dict[int, tuple[str, nn.Module]]
) -> _Meeting | None:
    """The meeting if ``func`` given ``operands`` acts as a layer: a weight function, or a
    product with a parameter."""
    owned = [owners[id(t)] for t in operands if isinstance(t, Tensor) and id(t) in owners]
    if not (func in _WEIGHT_FUNCTIONS or (func in _PRODUCT_FUNCTIONS and owned)):
        return None
    name, owner = owned[0] if owned else ("", None)
    return _Meeting(name, owner, _function_name(func))


def _decide(model: nn.Module, meetings: list[_Meeting], note: str = "") -> str:
    model_name = type(model).__name__
    if len(meetings) == 1:
        (meeting,) = meetings
        if meeting.function is None and isinstance(meeting.module, SUPPORTED_TYPES):
            return meeting.name
        raise ValueError(meeting.refusal(model_name))
    if not meetings:
        raise ValueError(
            f"cannot find the first layer of {model_name}: no layer takes its input; "
            f"pass layer= one of: {_listing(_eligible(model))}"
        )
    raise ValueError(
        f"cannot decide the first layer of {model_name}: its input reaches several layers "
        f"first: {_listing([m.describe() for m in meetings])}; pass layer={note}"
    )


def _eligible(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, SUPPORTED_TYPES)]


def _listing(names: list[str], most: int = 6) -> str:
    shown = ", ".join(names[:most])
    return shown + (f", ... ({len(names)} in all)" if len(names) > most else "")


# ---- torch.fx: the graph, no input needed ------------------------------------------------------


class _LayerTracer(torch.fx.Tracer):
    """fx's default tracer that also keeps subclasses of torch.nn layers whole (fx would trace
    into their forward and see only the functional call)."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return _kind(m) is not None or super().is_leaf_module(m, module_qualified_name)


def _from_metadata(node: torch.fx.Node) -> bool:
    if node.op == "call_method":
        return node.target in _METADATA_METHODS | _FROM_METADATA_METHODS
    if node.op != "call_function":
        return False
    if node.target is getattr:
        return node.args[1] in _METADATA_ATTRS
    return node.target in _FROM_METADATA_FUNCTIONS


def _graph_meetings(model: nn.Module, graph: torch.fx.Graph) -> list[_Meeting]:
    modules = dict(model.named_modules())
    owners = _owners(model)
    params = dict(model.named_parameters())
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    # Inputs: the arguments without a default (``attn_mask=None``, ``is_causal=False`` are not).
    inputs = [n for n in placeholders if not n.args] or placeholders[:1]
    reaches = dict.fromkeys(inputs, True)  # node -> an input reaches it through no layer
    meetings: list[_Meeting] = []
    for node in graph.nodes:
        if node in reaches or _from_metadata(node):
            continue
        if not any(reaches.get(a, False) for a in node.all_input_nodes):
            continue
        meeting = None
        if node.op == "call_module" and _kind(modules[node.target]) is not None:
            meeting = _Meeting(node.target, modules[node.target])
        elif node.op in ("call_function", "call_method"):
            func = node.target
            if node.op == "call_method":
                func = getattr(Tensor, func) if func in _PRODUCT_METHODS else None
            weights = [
                params[a.target]
                for a in node.all_input_nodes
                if a.op == "get_attr" and a.target in params
            ]
            meeting = _functional_meeting(func, weights, owners) if func is not None else None
        if meeting is None:
            reaches[node] = True
            name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
            if _in_place(name) and isinstance(node.args[0], torch.fx.Node):
                reaches[node.args[0]] = True  # later uses of the mutated tensor see the input
        elif meeting not in meetings:
            meetings.append(meeting)
    return meetings


# ---- one forward run on example inputs ---------------------------------------------------------


class _TaintMode(TorchFunctionMode):
    """Marks every tensor computed from the example inputs as tainted, and records where a
    tainted tensor first meets a weight: a layer's forward (pre-hook) or a function."""

    def __init__(self, model: nn.Module, sources: list[Tensor]) -> None:
        super().__init__()
        self.owners = _owners(model)
        self.tainted: WeakIdKeyDictionary = WeakIdKeyDictionary()
        for t in sources:
            self.tainted[t] = True
        self.meetings: list[_Meeting] = []
        self.inside_layer = 0  # depth of layer forwards entered with a tainted input
        self.entered: list[bool] = []

    def _any_tainted(self, leaves: list[Any]) -> bool:
        return any(isinstance(t, Tensor) and t in self.tainted for t in leaves)

    def _meet(self, meeting: _Meeting) -> None:
        if meeting not in self.meetings:
            self.meetings.append(meeting)

    def __torch_function__(  # noqa: D105
        self,
        func: Callable[..., Any],
        types: Collection[type],
        args: Sequence[Any] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.inside_layer or func in _FROM_METADATA_FUNCTIONS:
            return out
        leaves = tree_leaves((args, kwargs))
        if not self._any_tainted(leaves):
            return out
        meeting = _functional_meeting(func, leaves, self.owners)
        if meeting is not None:
            self._meet(meeting)
            return out
        mutated = []
        if args and isinstance(args[0], Tensor) and _in_place(getattr(func, "__name__", "")):
            mutated = [args[0], args[0]._base]  # a write into a view changes its base too
        for t in tree_leaves([out, mutated]):
            if isinstance(t, Tensor) and t.dtype != torch.bool:  # a mask selects, not supplies
                self.tainted[t] = True
        return out

    def pre_hook(self, name: str) -> Callable[[nn.Module, Any, Any], None]:
        def hook(module: nn.Module, args: Any, kwargs: Any) -> None:
            hit = not self.inside_layer and self._any_tainted(tree_leaves((args, kwargs)))
            if hit:
                self._meet(_Meeting(name, module))
            entered = hit or self.inside_layer > 0
            self.entered.append(entered)
            self.inside_layer += int(entered)

        return hook

    def post_hook(self, module: nn.Module, args: Any, output: Any) -> None:
        self.inside_layer -= int(self.entered.pop())


def _split_inputs(example_inputs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if isinstance(example_inputs, Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, tuple):
        return example_inputs, {}
    if isinstance(example_inputs, dict):
        return (), example_inputs
    raise TypeError(
        "example_inputs must be a tensor, a tuple of positional arguments or a dict of keyword "
        f"arguments, got {type(example_inputs).__name__}"
    )


def _run_meetings(model: nn.Module, example_inputs: Any) -> list[_Meeting]:
    args, kwargs = _split_inputs(example_inputs)
    sources = [t for t in tree_leaves((args, kwargs)) if isinstance(t, Tensor)]
    if not sources:
        raise ValueError("example_inputs holds no tensor")
    mode = _TaintMode(model, sources)
    handles = []
    for name, module in model.named_modules():
        if _kind(module) is not None:
            handles.append(module.register_forward_pre_hook(mode.pre_hook(name), with_kwargs=True))
            handles.append(module.register_forward_hook(mode.post_hook, always_call=True))
    training = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        with torch.no_grad(), mode:
            model(*args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
        for m, mode_was in training:
            m.training = mode_was
    return mode.meetings


def find_first_layer(model: nn.Module, example_inputs: Any = None) -> str:
    """The dotted name of the model's first layer.

    The rule: the first layer is the layer whose input derives from the model's input through
    no other layer with weights. A layer with weights is any ``torch.nn`` module holding
    parameters (Linear, Conv, Embedding, MultiheadAttention, RNNs, ConvTranspose, ...) except
    normalizations and PReLU, which act per channel and let the input through, and any
    function given a weight (``F.conv2d``/``F.linear``/``F.embedding`` in any case, a matrix
    product when an operand is a parameter). A tensor the input is written into
    (``buf.copy_(x)``, ``buf[:, :3] = x``) derives from it; reading only the input's shape or
    dtype (a class token's ``expand(x.shape[0], ...)``, ``zeros_like(x)``) does not pass it
    on, nor, in a forward run, does a boolean tensor computed from it (a mask selects values,
    it does not supply them: a padding mask is no input to the attention it masks).

    How the model is seen: with ``example_inputs`` (a tensor, a tuple of positional arguments
    or a dict of keyword arguments; every tensor in it is an input), by one forward run in eval
    mode under ``no_grad`` that tracks the tensors derived from them (the model's train/eval
    modes are restored). Without, by tracing it with ``torch.fx``; the inputs are then the
    forward's arguments without a default (``attn_mask=None``, ``is_causal=False`` are not),
    or its first argument if all have one. A model that is itself a layer needs no search; one
    fx cannot trace is accepted only when a single Linear/Conv holds all its weights.

    Exactly one first layer, an ``nn.Linear``/``nn.Conv1d/2d/3d`` called through its forward,
    is the answer. Anything else raises rather than picking a later layer: the input meets
    an unsupported layer first (``nn.Embedding``, attention, ...), or a supported layer's
    weight used functionally (``F.conv2d(x, self.stem.weight)``: TrAct works in the layer's
    forward only), or several layers at once, or fx cannot trace the model (pass
    ``example_inputs=``).

    Raises:
        ValueError: no eligible layer, no single first one, an unsupported first layer, or a
            model fx cannot trace and no ``example_inputs``.
        TypeError: ``example_inputs`` is not a tensor, tuple or dict.
    """
    eligible = _eligible(model)
    if not eligible:
        kinds = ", ".join(f"nn.{t.__name__}" for t in SUPPORTED_TYPES)
        raise ValueError(f"{type(model).__name__} has no layer TrAct supports ({kinds})")
    if _kind(model) is not None:
        return _decide(model, [_Meeting("", model)])
    if example_inputs is not None:
        note = " (every tensor in example_inputs is an input)"
        return _decide(model, _run_meetings(model, example_inputs), note)
    tracer = _LayerTracer()
    try:
        graph = tracer.trace(model)
    except Exception as err:  # fx raises many error types on untraceable models
        tracer.__dict__.clear()
        if len(eligible) == 1 and _holds_every_weight(model, eligible[0]):
            return eligible[0]
        reason = str(err).strip().splitlines()[0][:100] if str(err).strip() else ""
        main = getattr(model, "main_input_name", None)  # Hugging Face models name their input
        hint = f"{{'{main}': batch}}" if isinstance(main, str) else "batch"
        raise ValueError(
            f"cannot find the first layer of {type(model).__name__}: torch.fx cannot trace it "
            f"({type(err).__name__}: {reason}).\nPass example_inputs={hint} to find it in one "
            f"forward run, or layer= one of: {_listing(eligible)}"
        ) from err
    meetings = _graph_meetings(model, graph)
    # The tracer's patched methods close over the tracer, which holds the model: without this,
    # the model would stay alive in a reference cycle until the next garbage collection.
    tracer.__dict__.clear()
    return _decide(model, meetings)


def _holds_every_weight(model: nn.Module, name: str) -> bool:
    """Whether every parameter of ``model`` outside per-channel layers belongs to ``name``."""
    layer = model.get_submodule(name)
    own = {id(p) for p in layer.parameters()}
    return all(
        id(p) in own or isinstance(m, PASS_THROUGH_TYPES)
        for m in model.modules()
        for p in m.parameters(recurse=False)
    )
