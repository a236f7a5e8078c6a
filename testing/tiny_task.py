"""A tiny float64 conv-net task, and the plain-PyTorch loop the integrations must reproduce.

Each integration test trains with its framework and compares the weights with `reference`,
which takes one batch per optimizer step (the union of that step's micro-batches).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

import trainact

N, CLASSES = 16, 3  # samples; a step over all of them is one "batch of k·B"


def make_net(seed: int = 0) -> nn.Sequential:
    """Conv stem (the layer TrAct preconditions) → head; float64 so comparisons are tight."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(16, CLASSES),
    ).double()


def make_data(seed: int = 1) -> tuple[Tensor, Tensor]:
    """Inputs with a mean and uneven channel scales, so XᵀX/n is far from the identity."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, 3, 6, 6, generator=g, dtype=torch.float64)
    x = x * torch.tensor([3.0, 1.0, 0.3], dtype=torch.float64).view(1, 3, 1, 1) + 0.5
    return x, torch.randint(0, CLASSES, (N,), generator=g)


def reference(
    net: nn.Module,
    x: Tensor,
    y: Tensor,
    steps: Sequence[slice | tuple[slice, int]],
    *,
    lr: float,
    momentum: float = 0.0,
    clip: float | None = None,
    order: str = "tract",
) -> tuple[list[Tensor], float]:
    """SGD on ``net[0]`` with one batch ``x[s]`` per step; returns the stem weight after each
    step and the smallest gradient norm seen before clipping.

    A step ``(s, divisor)`` divides the summed loss by ``divisor`` instead of the batch size
    (frameworks that divide by the accumulation factor even for a last, shorter accumulation).

    ``order``: "tract" (TrAct, then clipping: what the integrations must do), "plain" (no
    TrAct) or "clip_then_tract" (clipping before TrAct: the order they must avoid).
    """
    if order != "plain":
        trainact.apply(net, layer="0", defer=order == "clip_then_tract")
    optimizer = torch.optim.SGD(net.parameters(), lr=lr, momentum=momentum)
    trajectory, min_norm = [], float("inf")
    for step in steps:
        s, divisor = step if isinstance(step, tuple) else (step, len(y[step]))
        optimizer.zero_grad()
        (nn.functional.cross_entropy(net(x[s]), y[s], reduction="sum") / divisor).backward()
        norm = torch.nn.utils.get_total_norm([p.grad for p in net.parameters()])
        min_norm = min(min_norm, float(norm))
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(net.parameters(), clip)
        trainact.precondition_(net)
        optimizer.step()
        trajectory.append(net[0].weight.detach().clone())
    trainact.remove(net)
    return trajectory, min_norm
