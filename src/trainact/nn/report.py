"""What TrAct says about a layer: one line naming the layer, λ, deferral and the precision
path. It is logged (logger ``trainact``, INFO) once per layer at its first training call, eagerly
or while torch.compile traces it (either form), and :func:`trainact.summary` shows the same line.
"""

from __future__ import annotations

import logging

from trainact.maths.precision import Precision
from trainact.nn import compat

logger = logging.getLogger("trainact")


def describe(name: str, layer_class: str, settings: str, world: int, precision: Precision) -> str:
    """The line for one layer (``settings``: λ and deferral in words, ``TrActState.settings``)."""
    return (
        f"TrAct on {name or '<model>'} ({layer_class}): {settings}, world size {world}; "
        f"{precision.describe()}"
    )


_logged: set[tuple[str, str, str, int, Precision]] = set()


@compat.while_tracing
def log_first_call(
    name: str,
    layer_class: str,
    settings: str,
    world: int,
    product: str,
    host_solve: bool,
    fast_float64: bool,
    device: str,
) -> bool:
    """Log the layer's line unless it was logged already; also run while torch.compile traces
    (its arguments are constants there). Returns whether it logged."""
    precision = Precision(product, host_solve, fast_float64, device)
    key = (name, layer_class, settings, world, precision)
    if key in _logged:
        return False
    _logged.add(key)
    logger.info(describe(name, layer_class, settings, world, precision))
    return True
