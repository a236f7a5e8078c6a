"""One process: no collective at world size 1, and deferred accumulation equals one big batch."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import scenarios
import torch
import torch.distributed as dist

import trainact


@pytest.fixture
def all_reduce_calls(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Every call of ``torch.distributed.all_reduce`` made during the test."""
    calls: list[Any] = []
    original = dist.all_reduce

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls.append((args, kwargs))
        return original(*args, **kwargs)

    monkeypatch.setattr(dist, "all_reduce", counting)
    return calls


@pytest.fixture
def world_of_one() -> Iterator[None]:
    """torch.distributed initialized with a single gloo process, for the test's duration."""
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{scenarios.free_port()}", rank=0, world_size=1
    )
    try:
        yield
    finally:
        dist.destroy_process_group()


def train_accumulated(defer: bool, on_step: bool = False) -> torch.nn.Module:
    """The MICRO steps on one process: one backward per micro-batch, loss over the step's n."""
    model = scenarios.conv_model()
    trainact.apply(model, scenarios.LAM, defer=defer)
    opt = scenarios.sgd(model)
    if on_step:
        trainact.precondition_on_step(opt, model)
    steps = scenarios.MICRO
    data_per_step = scenarios.global_data(scenarios.conv_model, steps)
    for micro_batches, data in zip(steps, data_per_step, strict=True):
        opt.zero_grad()
        scale = 1.0 / scenarios.step_size(micro_batches)
        for micro in data:
            for x, y in micro:
                scenarios.loss_fn(model(x), y, scale).backward()
        if defer and not on_step:
            assert trainact.precondition_(model) == 1
        opt.step()
    return model


def big_batch() -> torch.nn.Module:
    return scenarios.reference(scenarios.conv_model, scenarios.MICRO, per_rank=False)


@pytest.mark.parametrize("on_step", [False, True])
def test_accumulation_equals_one_big_batch(on_step: bool) -> None:
    """k uneven micro-batches (empty ones included), then precondition_: the k·B batch."""
    assert scenarios.max_diff(train_accumulated(True, on_step), big_batch()) < scenarios.EXACT


def test_without_defer_accumulation_is_per_micro_batch() -> None:
    """The control: preconditioning each micro-batch alone is not the big batch's update."""
    assert scenarios.max_diff(train_accumulated(False), big_batch()) > 1e-3


@pytest.mark.parametrize("initialized", [False, True])
@pytest.mark.parametrize("defer", [False, True])
def test_world_size_one_issues_no_collective(
    request: pytest.FixtureRequest, all_reduce_calls: list[Any], initialized: bool, defer: bool
) -> None:
    if initialized:
        request.getfixturevalue("world_of_one")
        assert dist.get_world_size() == 1
    model = train_accumulated(defer)
    assert not all_reduce_calls
    if defer:
        assert scenarios.max_diff(model, big_batch()) < scenarios.EXACT


def test_explicit_process_group_survives_deepcopy_and_refuses_pickle(world_of_one: None) -> None:
    """An EMA copy shares the group; pickling says why it cannot (a group belongs to a process)."""
    import copy
    import pickle

    group = dist.new_group([0])
    layer = trainact.TrAct(torch.nn.Conv2d(3, 4, 3), process_group=group)
    ema = copy.deepcopy(layer)
    assert ema.trainact_state.process_group is group
    ema(torch.randn(2, 3, 5, 5)).sum().backward()
    with pytest.raises(TypeError, match="process_group"):
        pickle.dumps(layer)
