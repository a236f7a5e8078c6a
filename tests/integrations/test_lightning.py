"""trainact.lightning.TrActCallback against the real Lightning Trainer (CPU, float64)."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import trainact
from testing.tiny_task import N, make_data, make_net, reference

pl = pytest.importorskip("lightning.pytorch")
from trainact.lightning import TrActCallback  # noqa: E402

LR, MOMENTUM = 0.5, 0.9

pytestmark = pytest.mark.filterwarnings(
    "ignore:.*does not have many workers",
    "ignore:.*smaller than the logging interval",
    "ignore:You defined a `validation_step` but have no `val_dataloader`",
    "ignore:`isinstance\\(treespec, LeafSpec\\)` is deprecated",
)


class Module(pl.LightningModule):
    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.net = make_net(seed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=LR, momentum=MOMENTUM)


def loader(batch_size: int) -> DataLoader:
    return DataLoader(TensorDataset(*make_data()), batch_size=batch_size)


def fit(module, callbacks, epochs, *, batch_size=N, ckpt_path=None, val=False, **kwargs):
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        precision="64-true",
        max_epochs=epochs,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=1.0 if val else 0,
        **kwargs,
    )
    trainer.fit(
        module,
        loader(batch_size),
        loader(N) if val else None,
        ckpt_path=ckpt_path,
    )
    return trainer


def ref(steps, **kwargs):
    x, y = make_data()
    return reference(make_net(0), x, y, steps, lr=LR, momentum=MOMENTUM, **kwargs)


@pytest.mark.parametrize("clip", [None, 0.05])
@pytest.mark.parametrize(("accumulate", "defer"), [(1, False), (1, True), (4, False)])
def test_micro_batches_equal_one_big_batch_and_tract_comes_before_clipping(accumulate, defer, clip):
    """With accumulation the callback defers the statistics even when defer=False."""
    module, epochs = Module(), 3  # every step is all N samples: N/accumulate per micro-batch
    fit(
        module,
        [TrActCallback(0.1, defer=defer)],
        epochs,
        batch_size=N // accumulate,
        accumulate_grad_batches=accumulate,
        gradient_clip_val=clip,
    )
    assert not trainact.is_enabled(module)  # removed on teardown
    weight = module.net[0].weight.detach()
    steps = [slice(None)] * epochs
    expected, min_norm = ref(steps, clip=clip)
    torch.testing.assert_close(weight, expected[-1], rtol=1e-12, atol=1e-12)
    assert (weight - ref(steps, clip=clip, order="plain")[0][-1]).abs().max() > 1e-3
    if clip is not None:
        assert min_norm > 2 * clip  # clipping binds at every step
        wrong_order = ref(steps, clip=clip, order="clip_then_tract")[0][-1]
        assert (weight - wrong_order).abs().max() > 1e-3


class BuiltInConfigureModel(Module):
    """A module that builds its layers in configure_model(), as Lightning recommends for large
    models: they do not exist when the callbacks' setup runs."""

    def __init__(self) -> None:
        pl.LightningModule.__init__(self)
        self.net: nn.Module | None = None
        self.initial = make_net(0).state_dict()  # (built here: the hook runs in float64 mode)

    def configure_model(self) -> None:
        if self.net is None:  # (Lightning asks for an idempotent hook)
            self.net = make_net(0)
            self.net.load_state_dict(self.initial)


def test_layers_built_in_configure_model_are_found():
    """The callback used to look before Lightning built them ("has no layer TrAct supports");
    it enables TrAct right after configure_model(), and training is the big batch's."""
    module, epochs = BuiltInConfigureModel(), 2
    fit(module, [TrActCallback(0.1)], epochs, batch_size=N // 2, accumulate_grad_batches=2)
    assert not trainact.is_enabled(module) and "configure_model" not in module.__dict__
    expected, _ = ref([slice(None)] * epochs)
    torch.testing.assert_close(module.net[0].weight, expected[-1], rtol=1e-12, atol=1e-12)


def test_accumulation_scheduler_uses_deferred_statistics():
    """Epoch 0 accumulates 2 micro-batches of 4, epoch 1 all 4: three steps in all."""
    module, scheduler = Module(), pl.callbacks.GradientAccumulationScheduler({0: 2, 1: 4})
    fit(module, [TrActCallback(0.1), scheduler], 2, batch_size=N // 4)
    expected, _ = ref([slice(0, N // 2), slice(N // 2, N), slice(None)])
    torch.testing.assert_close(module.net[0].weight.detach(), expected[-1], rtol=1e-12, atol=1e-12)


def test_last_shorter_accumulation_of_an_epoch():
    """Micro-batches of 4, accumulating 3: each epoch steps on samples 0-11, then on 12-15
    alone (Lightning still divides that loss by 3)."""
    module = Module()
    fit(module, [TrActCallback(0.1)], 2, batch_size=4, accumulate_grad_batches=3)
    expected, _ = ref([(slice(0, 12), 12), (slice(12, N), 12)] * 2)
    torch.testing.assert_close(module.net[0].weight.detach(), expected[-1], rtol=1e-12, atol=1e-12)


def test_manual_optimization_accumulating_with_defer():
    class Manual(Module):
        def __init__(self) -> None:
            super().__init__()
            self.automatic_optimization = False

        def training_step(self, batch, batch_idx):
            x, y = batch
            self.manual_backward(nn.functional.cross_entropy(self(x), y) / 2)
            if batch_idx % 2 == 1:
                self.optimizers().step()
                self.optimizers().zero_grad()

    module = Manual()
    fit(module, [TrActCallback(0.1, defer=True)], 3, batch_size=N // 2)
    expected, _ = ref([slice(None)] * 3)
    torch.testing.assert_close(module.net[0].weight.detach(), expected[-1], rtol=1e-12, atol=1e-12)


def test_pytorch_lightning_trainer_and_scheduler():
    """The older package's Trainer and GradientAccumulationScheduler (classes of their own)."""
    ptl = pytest.importorskip("pytorch_lightning")

    class OldModule(ptl.LightningModule):
        training_step, configure_optimizers = Module.training_step, Module.configure_optimizers

        def __init__(self) -> None:
            super().__init__()
            self.net = make_net(0)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

    module = OldModule()
    scheduler = ptl.callbacks.GradientAccumulationScheduler({0: 2, 1: 4})
    ptl.Trainer(
        accelerator="cpu",
        precision="64-true",
        max_epochs=2,
        callbacks=[TrActCallback(0.1), scheduler],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    ).fit(module, loader(N // 4))
    expected, _ = ref([slice(0, N // 2), slice(N // 2, N), slice(None)])
    torch.testing.assert_close(module.net[0].weight.detach(), expected[-1], rtol=1e-12, atol=1e-12)


def test_accumulation_switched_on_behind_its_back_raises():
    class Accumulate(pl.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            trainer.accumulate_grad_batches = 2

    with pytest.raises(RuntimeError, match="defer=True"):
        fit(Module(), [TrActCallback(0.1), Accumulate()], 1, batch_size=N // 2)


class Untraceable(Module):
    """A forward torch.fx cannot trace (a branch on the input's values)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x if bool(x.abs().sum() > 0) else -x)


def test_first_layer_found_from_example_input_array():
    module = Untraceable()
    module.example_input_array = make_data()[0][:2]
    seen = LayerSeen()
    fit(module, [TrActCallback(0.1), seen], 1)
    assert seen.names == ["net.0"]
    expected, _ = ref([slice(None)])
    torch.testing.assert_close(module.net[0].weight.detach(), expected[-1], rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="example_input_array") as raised:
        fit(Untraceable(), [TrActCallback(0.1)], 1)
    # the callback's words, not apply()'s
    assert "TrActCallback's layer=" in str(raised.value) and "example_inputs" not in str(
        raised.value
    )


def test_where_tract_runs_is_said_in_lightnings_rank_zero_log(caplog):
    with caplog.at_level(logging.INFO):
        fit(Module(), [TrActCallback(0.1)], 1)
    # Lightning's rank-zero logger: lightning.pytorch's, or pytorch_lightning's once that package
    # was imported in the process (lightning_utilities keeps one logger for both)
    lines = [r.getMessage() for r in caplog.records if r.name.endswith(".utilities.rank_zero")]
    assert any(
        line.startswith("TrAct on net.0 (Conv2d): lambda=0.1, applied in backward")
        for line in lines
    ), lines


class LayerSeen(pl.Callback):
    """Records the layer TrAct is enabled on while training."""

    def on_train_start(self, trainer, pl_module):
        self.names = [name for name, _ in trainact.enabled_layers(pl_module)]


def test_already_enabled_module_is_refused():
    module = Module()
    trainact.apply(module, layer="net.0")
    with pytest.raises(RuntimeError, match="already enabled"):
        fit(module, [TrActCallback(0.1)], 1)


def test_checkpoint_resume_continues_identically(tmp_path):
    """2 epochs, save, a new module and trainer resume to 4: the same as 4 without a stop."""
    kwargs = {"batch_size": N // 2, "accumulate_grad_batches": 2}
    straight = Module()
    fit(straight, [TrActCallback(0.1)], 4, **kwargs)

    first = Module()
    trainer = fit(first, [TrActCallback(0.1)], 2, **kwargs)
    path = tmp_path / "two.ckpt"
    trainer.save_checkpoint(path)
    saved = torch.load(path, weights_only=True)["state_dict"]
    assert saved.keys() == first.state_dict().keys()  # the plain model's keys

    resumed = Module(seed=5)  # other initial weights: the checkpoint must restore them
    fit(resumed, [TrActCallback(0.1)], 4, ckpt_path=path, **kwargs)
    for a, b in zip(resumed.parameters(), straight.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_ema_weight_averaging():
    """EMA (with validation swapping the averaged weights in and out) leaves the TrAct
    trajectory as it is, and the final weights are its exponential moving average."""
    decay, epochs, module = 0.5, 3, Module()
    ema = pl.callbacks.EMAWeightAveraging(decay=decay)
    fit(
        module,
        [TrActCallback(0.1), ema],
        epochs,
        batch_size=N // 2,
        accumulate_grad_batches=2,
        val=True,
    )
    trajectory, _ = ref([slice(None)] * epochs)
    average = trajectory[0]
    for weight in trajectory[1:]:
        average = decay * average + (1 - decay) * weight
    torch.testing.assert_close(module.net[0].weight.detach(), average, rtol=1e-12, atol=1e-12)


class Probing(Module):
    """Manual optimization with a probing backward whose gradient is thrown away each step."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        x, y = batch
        opt = self.optimizers()
        self.manual_backward(nn.functional.cross_entropy(self(3 * x + 1), y))  # discarded
        opt.zero_grad()
        self.manual_backward(nn.functional.cross_entropy(self(x), y))
        opt.step()
        opt.zero_grad()


def test_a_discarded_backward_leaves_nothing_in_the_deferred_statistics():
    """With deferred statistics (what the callback uses when accumulating), the probing
    backward's statistics go with its gradient: the steps equal the kept backwards alone."""
    module = Probing()
    fit(module, [TrActCallback(0.1, defer=True)], 3)
    expected, _ = ref([slice(None)] * 3)
    torch.testing.assert_close(module.net[0].weight.detach(), expected[-1], rtol=1e-12, atol=1e-12)


class TwoViews(Module):
    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y) + nn.functional.cross_entropy(self(2 * x), y)


def test_two_views_per_micro_batch_with_accumulation_raise():
    """Accumulating, the callback defers the statistics, which cannot pool two calls per
    micro-batch the way the non-deferred path preconditions them: refused."""
    with pytest.raises(RuntimeError, match="torch.cat"):
        fit(TwoViews(), [TrActCallback(0.1)], 1, batch_size=N // 2, accumulate_grad_batches=2)


def test_lightning_cli_with_the_callback_from_the_command_line(tmp_path, capsys):
    """trainact[lightning] brings what LightningCLI needs (jsonargparse[signatures]): the
    callback given as ``--trainer.callbacks``, as the docs show."""
    from lightning.pytorch.cli import LightningCLI

    args = [
        "fit",
        "--trainer.callbacks+=trainact.lightning.TrActCallback",
        "--trainer.callbacks.lam=0.2",
        "--trainer.max_epochs=1",
        "--trainer.accelerator=cpu",
        "--trainer.logger=false",
        "--trainer.enable_checkpointing=false",
        "--trainer.enable_progress_bar=false",
        f"--trainer.default_root_dir={tmp_path}",
    ]
    cli = LightningCLI(CLIModule, args=args, save_config_callback=None)
    (callback,) = [c for c in cli.trainer.callbacks if isinstance(c, TrActCallback)]
    assert callback.lam == 0.2 and not trainact.is_enabled(cli.model)  # removed after fit


class CLIModule(Module):
    """A module the CLI can build (its own data)."""

    def __init__(self) -> None:
        super().__init__()

    def train_dataloader(self) -> DataLoader:
        return loader(N)
