"""Lightning Fabric: TrAct enabled before ``fabric.setup``; with accumulation, ``defer=True``
and ``trainact.precondition_`` after the step's last backward, before clipping."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import trainact
from testing.tiny_task import N, make_data, make_net, reference

fabric_module = pytest.importorskip("lightning.fabric")

LR, MOMENTUM, CLIP = 0.1, 0.9, 0.05  # the clip is below every gradient norm: it always acts


def fabric_train(micro_batches: int, steps: int, *, defer: bool, clip: float | None) -> list:
    """The recipe of docs/integrations.md, in float64; the stem weight after each step."""
    fabric = fabric_module.Fabric(accelerator="cpu", devices=1)  # the float64 net stays float64
    net = make_net()
    trainact.apply(net, layer="0", defer=defer)  # before fabric.setup
    optimizer = torch.optim.SGD(net.parameters(), lr=LR, momentum=MOMENTUM)
    model, optimizer = fabric.setup(net, optimizer)
    x, y = make_data()
    trajectory = []
    for _ in range(steps):
        for i, (xb, yb) in enumerate(
            zip(x.chunk(micro_batches), y.chunk(micro_batches), strict=True)
        ):
            last = i == micro_batches - 1
            with fabric.no_backward_sync(model, enabled=not last):
                loss = nn.functional.cross_entropy(model(xb), yb, reduction="sum") / N
                fabric.backward(loss)
        trainact.precondition_(model)  # the summed statistics; before clipping
        if clip is not None:
            fabric.clip_gradients(model, optimizer, max_norm=clip)
        optimizer.step()
        optimizer.zero_grad()
        trajectory.append(net[0].weight.detach().clone())
    return trajectory


@pytest.mark.parametrize("clip", [None, CLIP])
@pytest.mark.parametrize("micro_batches", [1, 4])
def test_micro_batches_equal_one_big_batch_and_tract_comes_before_clipping(micro_batches, clip):
    steps = 3
    got = fabric_train(micro_batches, steps, defer=True, clip=clip)
    expected, min_norm = reference(
        make_net(), *make_data(), [slice(None)] * steps, lr=LR, momentum=MOMENTUM, clip=clip
    )
    assert clip is None or min_norm > clip
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12)


def test_without_defer_each_micro_batch_is_preconditioned_alone():
    """Why the recipe says defer=True: without it, 4 micro-batches are not one batch."""
    got = fabric_train(4, 1, defer=False, clip=None)
    expected, _ = reference(make_net(), *make_data(), [slice(None)], lr=LR, momentum=MOMENTUM)
    assert (got[0] - expected[0]).abs().max() > 1e-6
