"""Finding a model's first layer: the Conv/Linear that the model's input reaches first."""

from __future__ import annotations

import torch.fx
from torch import nn

from trainact.nn.adapters import SUPPORTED_TYPES

#: Nodes that read only a tensor's metadata: the input's values do not flow through them.
_METADATA_ATTRS = {"shape", "dtype", "device", "ndim", "is_cuda"}
_METADATA_METHODS = {"size", "dim", "numel", "type", "get_device"}


def _metadata_only(node: torch.fx.Node) -> bool:
    if node.op == "call_method":
        return node.target in _METADATA_METHODS
    return node.op == "call_function" and node.target is getattr and node.args[1] in _METADATA_ATTRS


def _eligible(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, SUPPORTED_TYPES)]


def find_first_layer(model: nn.Module) -> str:
    """The dotted name of the model's first layer.

    How it decides: a model whose only Conv/Linear is one layer (or is itself one) needs no
    search. Otherwise the model is traced with ``torch.fx``; a candidate is a Conv/Linear call
    that some model input reaches without passing through another Conv/Linear (reading only
    the input's shape, as a class token's ``expand(x.shape[0], ...)`` does, does not count).
    Exactly one candidate is the answer. Several (inputs that feed two layers) or a model that
    fx cannot trace (data-dependent control flow) cannot be decided: a ValueError lists the
    candidates and asks for ``layer=``.

    Raises:
        ValueError: no eligible layer, or no single first one.
    """
    eligible = _eligible(model)
    if not eligible:
        kinds = ", ".join(f"nn.{t.__name__}" for t in SUPPORTED_TYPES)
        raise ValueError(f"{type(model).__name__} has no layer TrAct supports ({kinds})")
    if len(eligible) == 1:
        return eligible[0]
    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception as err:  # fx raises many error types on untraceable models
        raise ValueError(
            f"cannot find the first layer of {type(model).__name__} automatically "
            f"(torch.fx could not trace it: {type(err).__name__}: {err}); "
            f"pass layer= one of: {', '.join(eligible[:10])}"
            + (f" ... ({len(eligible)} in all)" if len(eligible) > 10 else "")
        ) from err
    modules = dict(model.named_modules())
    reaches: dict[torch.fx.Node, bool] = {}  # node -> an input reaches it through no layer
    candidates: list[str] = []
    for node in graph.nodes:
        if node.op == "placeholder":
            reaches[node] = True
            continue
        fed = not _metadata_only(node) and any(reaches.get(a, False) for a in node.all_input_nodes)
        layer = node.op == "call_module" and isinstance(modules.get(node.target), SUPPORTED_TYPES)
        if layer and fed and node.target not in candidates:
            candidates.append(node.target)
        reaches[node] = fed and not layer
    if len(candidates) == 1:
        return candidates[0]
    listed = candidates or eligible
    raise ValueError(
        f"cannot decide the first layer of {type(model).__name__}: "
        + ("the input reaches several layers first" if candidates else "no layer takes the input")
        + f"; pass layer= one of: {', '.join(listed)}"
    )
