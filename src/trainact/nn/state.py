"""A layer's TrAct settings (:class:`TrActState`) and where an enabled layer keeps them.

A leaf module: everything in :mod:`trainact.nn` reads the settings, and they depend on nothing
of it. The state holds no reference to the layer (no cycle: ``del model`` frees it at once) and
nothing in ``state_dict()``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from trainact import distributed

#: The attribute of an enabled layer that holds its :class:`TrActState`.
STATE = "trainact_state"


class TrActState:
    """One layer's TrAct settings."""

    def __init__(
        self,
        lam: float,
        statistics_dtype: torch.dtype | None,
        process_group: distributed.ProcessGroupArg,
        defer: bool,
        name: str = "",
    ) -> None:
        self.name = name  # the layer's name in its model, for messages and the log
        self.lam = lam
        # λ for the custom op under torch.compile: a float argument (symbolic with
        # dynamic=True) would make dynamo compile twice to specialize it, and so would a 0-dim
        # tensor, which dynamo turns into a float
        self.lam_vector = torch.tensor([lam], dtype=torch.float64, device="cpu")
        self.statistics_dtype = statistics_dtype
        self.process_group = process_group
        self.defer = defer
        # λ and deferral in words, for the log line: a string stays a constant under
        # torch.compile, where a float attribute may become symbolic
        deferral = "deferred to precondition_" if defer else "applied in backward"
        self.settings = f"lambda={lam:g}, {deferral}"

    def __getstate__(self) -> dict[str, Any]:
        if self.process_group not in (None, "auto"):
            raise TypeError(
                "cannot pickle a layer with TrAct enabled for an explicit process_group (a "
                "ProcessGroup belongs to one process): save model.state_dict(), or enable TrAct "
                'with process_group="auto"'
            )
        return self.__dict__

    def __deepcopy__(self, memo: dict[int, Any]) -> TrActState:
        """Copies (an EMA model, say) share the settings, the process group included."""
        new = TrActState.__new__(TrActState)
        new.__dict__.update(self.__dict__, lam_vector=self.lam_vector.clone())
        return new

    def __repr__(self) -> str:
        return f"TrActState(lam={self.lam}, defer={self.defer})"


def state_of(module: nn.Module) -> TrActState | None:
    """The layer's TrAct state, or None where TrAct is not enabled."""
    return module.__dict__.get(STATE)
