"""The README's accelerate recipe (``defer=True``, ``precondition_`` on the syncing micro-batch)
against the real ``accelerate.Accelerator`` (CPU, float64)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader, TensorDataset

import trainact
from testing.tiny_task import N, make_data, make_net, reference

accelerate = pytest.importorskip("accelerate")

LR, MOMENTUM = 0.5, 0.9


@pytest.fixture(autouse=True)
def fresh_state():
    """Accelerator keeps process-wide state; each test builds its own from scratch."""
    yield
    accelerate.state.AcceleratorState._reset_state(reset_partial_state=True)
    accelerate.state.GradientState._reset_state()


class Run:
    """The recipe: a model with TrAct (``defer=True``), prepared by an Accelerator that
    accumulates ``accumulate`` micro-batches of N/accumulate samples per optimizer step."""

    def __init__(self, accumulate: int, seed: int = 0, batch_size: int | None = None) -> None:
        self.accelerator = accelerate.Accelerator(cpu=True, gradient_accumulation_steps=accumulate)
        net = make_net(seed)
        trainact.apply(net, defer=True)
        optimizer = torch.optim.SGD(net.parameters(), lr=LR, momentum=MOMENTUM)
        loader = DataLoader(TensorDataset(*make_data()), batch_size=batch_size or N // accumulate)
        self.model, self.optimizer, self.loader = self.accelerator.prepare(net, optimizer, loader)

    def epoch(self, clip: float | None = None, on_step=None) -> None:
        accelerator, model, optimizer = self.accelerator, self.model, self.optimizer
        for x, y in self.loader:
            with accelerator.accumulate(model):
                accelerator.backward(nn.functional.cross_entropy(model(x), y))
                if accelerator.sync_gradients:
                    trainact.precondition_(model)
                    if clip is not None:
                        accelerator.clip_grad_norm_(model.parameters(), clip)
                optimizer.step()
                optimizer.zero_grad()
            if accelerator.sync_gradients and on_step is not None:
                on_step(accelerator.unwrap_model(model))


def ref(steps, **kwargs):
    x, y = make_data()
    return reference(make_net(0), x, y, steps, lr=LR, momentum=MOMENTUM, **kwargs)


def stem(model: nn.Module) -> torch.Tensor:
    return model[0].weight.detach()


@pytest.mark.parametrize("clip", [None, 0.05])
@pytest.mark.parametrize("accumulate", [1, 4])
def test_micro_batches_equal_one_big_batch_and_tract_comes_before_clipping(accumulate, clip):
    run, epochs = Run(accumulate), 3  # every step is all N samples
    for _ in range(epochs):
        run.epoch(clip)
    steps = [slice(None)] * epochs
    expected, min_norm = ref(steps, clip=clip)
    torch.testing.assert_close(stem(run.model), expected[-1], rtol=1e-12, atol=1e-12)
    assert (stem(run.model) - ref(steps, clip=clip, order="plain")[0][-1]).abs().max() > 1e-3
    if clip is not None:
        assert min_norm > 2 * clip  # clipping binds at every step
        wrong_order = ref(steps, clip=clip, order="clip_then_tract")[0][-1]
        assert (stem(run.model) - wrong_order).abs().max() > 1e-3


def test_last_shorter_accumulation_of_an_epoch():
    """Micro-batches of 4, accumulating 3: each epoch steps on samples 0-11, then on 12-15
    alone (at the end of the data loader; accelerate still divides that loss by 3)."""
    run = Run(3, batch_size=4)
    for _ in range(2):
        run.epoch()
    expected, _ = ref([(slice(0, 12), 12), (slice(12, N), 12)] * 2)
    torch.testing.assert_close(stem(run.model), expected[-1], rtol=1e-12, atol=1e-12)


def test_save_state_and_load_state_continue_identically(tmp_path):
    """4 epochs straight, or 2, ``save_state``, and a new run from ``load_state`` for 2 more."""
    straight = Run(2)
    for _ in range(4):
        straight.epoch()
    accelerate.state.GradientState._reset_state()

    stopped = Run(2)
    for _ in range(2):
        stopped.epoch()
    stopped.accelerator.save_state(tmp_path / "state")
    accelerate.state.GradientState._reset_state()

    resumed = Run(2, seed=5)  # other initial weights: load_state must restore them
    resumed.accelerator.load_state(tmp_path / "state")
    assert trainact.is_enabled(resumed.model)
    for _ in range(2):
        resumed.epoch()
    for a, b in zip(resumed.model.parameters(), straight.model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_ema_with_averaged_model():
    decay, epochs, run = 0.5, 3, Run(2)
    average = AveragedModel(run.model, multi_avg_fn=get_ema_multi_avg_fn(decay))
    for _ in range(epochs):
        run.epoch(on_step=average.update_parameters)
    trajectory, _ = ref([slice(None)] * epochs)
    expected = trajectory[0]
    for weight in trajectory[1:]:
        expected = decay * expected + (1 - decay) * weight
    torch.testing.assert_close(stem(average.module), expected, rtol=1e-12, atol=1e-12)
