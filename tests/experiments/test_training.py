"""The trainer, compare, sweep, plot and the command line, end to end on tiny real data."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
from PIL import Image

import trainact
from trainact.experiments import augment, cli, compare, provenance, runner, train
from trainact.experiments.data import ImageDataset, load_dataset
from trainact.experiments.models import FIRST_LAYER, MODEL_NAMES, build_model
from trainact.experiments.presets import PRESET_NAMES


@pytest.fixture(scope="module")
def archive(tiny: ImageDataset, tmp_path_factory) -> Path:
    """A .tar.gz image folder (train/<class>/*.png, test/<class>/*.png) of 3 classes."""
    root = tmp_path_factory.mktemp("folder")
    for split, images, labels in (
        ("train", tiny.train_images, tiny.train_labels),
        ("test", tiny.test_images, tiny.test_labels),
    ):
        for i, (img, label) in enumerate(zip(images, labels, strict=True)):
            if label < 3:
                d = root / split / tiny.classes[label]
                d.mkdir(parents=True, exist_ok=True)
                Image.fromarray(img.permute(1, 2, 0).numpy()).save(d / f"{i}.png")
    path = root.parent / "tiny.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        tar.add(root / "train", "train")
        tar.add(root / "test", "test")
    return path


def quick(**kw) -> train.Config:
    return train.Config(**{"epochs": 2, "batch_size": 64, "eval_batch_size": 100, **kw})


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_models_build_and_tract_finds_their_first_layer(name):
    model = build_model(name, 10)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    first = trainact.apply(model)  # found by trainact, the layer the trainer names
    assert first == FIRST_LAYER[name] == ("emb" if name.startswith("vit") else "conv1")


def test_augment_is_a_reproducible_crop_and_flip():
    images = torch.randint(0, 255, (16, 3, 32, 32), dtype=torch.uint8)
    a = augment.crop_flip(images, torch.Generator().manual_seed(0))
    b = augment.crop_flip(images, torch.Generator().manual_seed(0))
    assert a.dtype == torch.uint8 and a.shape == images.shape and torch.equal(a, b)
    # every output is a shifted (and maybe mirrored) window of its zero-padded input
    padded = torch.nn.functional.pad(images, (4, 4, 4, 4))
    for img, out in zip(padded, a, strict=True):
        windows = img.unfold(1, 32, 1).unfold(2, 32, 1).permute(1, 2, 0, 3, 4)
        assert any(
            torch.equal(w, out) or torch.equal(w, out.flip(2)) for w in windows.flatten(0, 1)
        )


def test_learning_rate_schedules():
    cfg = train.Config(lr=1.0, epochs=10, warmup_epochs=1, final_lr_fraction=0.01)
    # warm-up from 0 per step, as weiaicunzai's WarmUpLR: step i of the first epoch at i / 10
    assert [train.lr_at(cfg, i, 10) for i in (0, 1, 9)] == pytest.approx([0.0, 0.1, 0.9])
    assert train.lr_at(cfg, 10, 10) == pytest.approx(1.0)
    assert train.lr_at(cfg, 99, 10) == pytest.approx(0.01, abs=1e-3)
    step = dataclasses.replace(cfg, schedule="step", milestones=(5, 8), gamma=0.2, warmup_epochs=0)
    assert [train.lr_at(step, s, 1) for s in (4, 5, 8)] == pytest.approx([1.0, 0.2, 0.04])


class GradualWarmupScheduler(torch.optim.lr_scheduler.LRScheduler):
    """ildoonet/pytorch-gradual-warmup-lr's scheduler, which ViT-CIFAR uses (multiplier 1, the
    non-plateau path), transcribed."""

    def __init__(self, optimizer, total_epoch, after_scheduler):
        self.total_epoch, self.after_scheduler, self.finished = total_epoch, after_scheduler, False
        super().__init__(optimizer)

    def get_lr(self):
        if self.last_epoch > self.total_epoch:
            if not self.finished:
                self.after_scheduler.base_lrs = list(self.base_lrs)
                self.finished = True
            return self.after_scheduler.get_last_lr()
        return [base * self.last_epoch / self.total_epoch for base in self.base_lrs]

    def step(self, epoch=None):
        if self.finished:
            self.after_scheduler.step()
            self.last_epoch = self.after_scheduler.last_epoch + self.total_epoch + 1
            self._last_lr = self.after_scheduler.get_last_lr()
        else:
            super().step()


def vit_cifar_lrs(base: float, eta_min: float, warmup: int, epochs: int) -> list[float]:
    """The learning rate of each epoch in ViT-CIFAR: its schedulers stepped once per epoch."""
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.Adam([param], lr=base)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs, eta_min=eta_min)
    scheduler = GradualWarmupScheduler(opt, warmup, cosine)
    lrs = []
    for _ in range(epochs):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        scheduler.step()
    return lrs


def test_the_vit_cifar_schedule_is_vit_cifars_per_epoch_warmup_and_cosine():
    cfg = train.Config(
        lr=1e-3, epochs=20, warmup_epochs=5, schedule="vit-cifar", final_lr_fraction=0.01
    )
    expected = vit_cifar_lrs(1e-3, 1e-5, 5, 20)
    for steps in (1, 7):  # constant within an epoch
        got = [train.lr_at(cfg, e * steps + steps - 1, steps) for e in range(20)]
        assert got == pytest.approx(expected, rel=1e-9, abs=1e-15)
    assert expected[0] == 0 and expected[5] == expected[6] == 1e-3 and expected[-1] > 1e-5
    with pytest.raises(ValueError, match="whole number of epochs"):
        dataclasses.replace(cfg, warmup_epochs=2.5)


def test_drop_last_skips_the_partial_batch(tiny, tmp_path):
    assert train.steps_in_epoch(quick(batch_size=128), 50_000) == 391
    assert train.steps_in_epoch(quick(batch_size=128, drop_last=True), 50_000) == 390
    seen = []
    real = train.build_model

    def counting(*args):
        model = real(*args)
        model.register_forward_pre_hook(lambda m, inputs: seen.append(len(inputs[0])))
        return model

    train.build_model = counting
    try:
        train.train(quick(epochs=1, batch_size=128, drop_last=True), tmp_path, data=tiny,
                    progress=False)  # fmt: skip
    finally:
        train.build_model = real
    assert seen[:2] == [128, 128] and len(seen) == 2 + 1  # two steps of 300 images, then the test
    with pytest.raises(ValueError, match="leaves no step"):
        train.train(quick(batch_size=512, drop_last=True), tmp_path / "b", data=tiny)


def test_presets_follow_the_paper_and_stay_overridable():
    parse = cli._parser().parse_args
    vit = {
        e: cli.build_config(parse(["train", "--preset", "vit-cifar10", "--epochs", str(e)]))
        for e in (100, 200, 400, 800)
    }
    assert [vit[e].lr for e in vit] == pytest.approx([1e-3, 10**-3.2, 10**-3.5, 10**-3.5])
    assert [vit[e].lr * vit[e].final_lr_fraction for e in vit] == pytest.approx([1e-5] * 4)
    v = vit[100]
    assert (v.schedule, v.warmup_epochs, v.weight_decay, v.amp) == ("vit-cifar", 5, 5e-5, "fp16")
    assert v.label_smoothing == pytest.approx(0.1 * 10 / 9) and v.autoaugment and not v.drop_last
    assert v.std == (0.2470, 0.2435, 0.2616)  # ViT-CIFAR's, not the authors' (0.2023, ...)
    adam = [
        cli.build_config(parse(["train", "--preset", "resnet18-cifar10-adam", "--epochs", e]))
        for e in ("200", "400")
    ]
    assert [c.lr for c in adam] == [1e-2, 1e-3]
    sgd = cli.build_config(
        parse(["train", "--preset", "resnet18-cifar10-sgd", "--lr", "0.5", "--std", "1", "1", "1"])
    )
    assert sgd.lr == 0.5 and sgd.momentum == 0.9 and sgd.model == "resnet18" and sgd.drop_last
    assert sgd.mean == (0.4914, 0.4822, 0.4465) and sgd.std == (1, 1, 1)
    c100 = cli.build_config(parse(["train", "--preset", "resnet18-cifar100"]))
    assert c100.milestones == (59, 119, 159) and c100.epochs == 200 and c100.schedule == "step"
    assert c100.model == "resnet18-nopool" and c100.rotation == 15 and c100.weight_decay == 5e-4
    # the lr of weiaicunzai's MultiStepLR(milestones=[60, 120, 160]).step(epoch), 1-based epochs
    for epoch, lr in ((59, 0.1), (60, 0.02), (119, 0.02), (120, 0.004), (160, 0.0008)):
        assert train.lr_at(c100, (epoch - 1) * 391, 391) == pytest.approx(lr)
    # a sweep takes each budget's lr from the preset, unless --lr is given
    sweep = parse(["sweep", "--preset", "vit-cifar10"])
    assert cli.build_config(sweep, epochs=400).lr == pytest.approx(10**-3.5)
    sweep = parse(["sweep", "--preset", "vit-cifar10", "--lr", "0.1"])
    assert cli.build_config(sweep, epochs=400).lr == 0.1
    for name in PRESET_NAMES:  # every preset's model builds on the CPU
        cfg = cli.build_config(parse(["train", "--preset", name]))
        build_model(cfg.model, 100 if "100" in cfg.dataset else 10)


def test_resume_ends_exactly_where_an_uninterrupted_run_does(tiny, tmp_path):
    cfg = quick(method="tract", epochs=3)
    whole = train.train(cfg, tmp_path / "whole", data=tiny, progress=False)

    class Interrupt(Exception):
        pass

    def stop_after_first(record):
        if record["epoch"] == 1:
            raise Interrupt

    with pytest.raises(Interrupt):
        train.train(cfg, tmp_path / "cut", data=tiny, progress=False, on_epoch=stop_after_first)
    with pytest.raises(FileExistsError, match="already holds a train run"):
        train.train(cfg, tmp_path / "cut", data=tiny, progress=False)
    with pytest.raises(ValueError, match="lr: saved 0.08, given 0.5"):
        train.train(dataclasses.replace(cfg, lr=0.5), tmp_path / "cut", data=tiny, resume=True)
    resumed = train.train(cfg, tmp_path / "cut", data=tiny, progress=False, resume=True)
    strip = [{k: v for k, v in r.items() if k != "seconds"} for r in whole]
    assert [{k: v for k, v in r.items() if k != "seconds"} for r in resumed] == strip
    lines = (tmp_path / "cut" / "results.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3]
    a = torch.load(tmp_path / "whole" / "checkpoint.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=False)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_nan_loss_stops_naming_epoch_and_step_and_keeps_results(tiny, tmp_path, monkeypatch):
    real = train.build_model

    def poisoned(*args):
        model, calls = real(*args), [0]

        def hook(module, inputs, output):
            calls[0] += module.training
            return output * float("nan") if calls[0] > 6 else output  # 5 steps per epoch

        model.register_forward_hook(hook)
        return model

    monkeypatch.setattr(train, "build_model", poisoned)
    with pytest.raises(train.NonFiniteLoss, match="epoch 2, step 2 of 5"):
        train.train(quick(), tmp_path, data=tiny, progress=False)
    records = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1]


def test_compare_from_an_archive_writes_results_summary_and_plot(archive, tmp_path, capsys):
    out = tmp_path / "cmp"
    argv = [
        "compare",
        "--dataset",
        str(archive),
        "--epochs",
        "2",
        "--batch-size",
        "32",
        "--seeds",
        "0",
        "1",
        "--out",
        str(out),
        "--no-progress",
    ]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "final test accuracy over 2 seeds" in printed and "TrAct" in printed
    lines = (out / "results.jsonl").read_text().splitlines()
    assert len(lines) == 2 * 2 * 2  # methods x seeds x epochs
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["final"]) == {"baseline", "tract"} and "speedup" in summary
    assert summary["code"] == provenance.code_identity()
    with Image.open(out / "accuracy.png") as png:
        assert png.size[0] > 100
    # same comparison again (its runs in two workers by default): resumed, nothing duplicated
    assert cli.main(argv) == 0
    assert (out / "results.jsonl").read_text().splitlines() == lines
    # a different comparison in the same directory is refused, nothing overwritten
    assert cli.main([*argv[:4], "3", *argv[5:]]) == 1
    assert "epochs: saved 2, given 3" in capsys.readouterr().err


def test_sweep_skips_finished_runs_and_plots(archive, tmp_path, monkeypatch, capsys):
    argv = [
        "sweep",
        "--jobs",
        "1",  # in this process, where the check below can see a rerun
        "--dataset",
        str(archive),
        "--budgets",
        "1",
        "2",
        "--seeds",
        "0",
        "--batch-size",
        "64",
        "--out",
        str(tmp_path),
        "--no-progress",
    ]
    assert cli.main(argv) == 0
    finals = (tmp_path / "sweep.jsonl").read_text().splitlines()
    assert sorted((json.loads(r)["epochs"], json.loads(r)["method"]) for r in finals) == [
        (1, "baseline"),
        (1, "tract"),
        (2, "baseline"),
        (2, "tract"),
    ]
    with Image.open(tmp_path / "budgets.png"):
        pass
    monkeypatch.setattr(runner, "train", lambda *a, **k: pytest.fail("a finished run reran"))
    assert cli.main(argv) == 0
    assert capsys.readouterr().out.count("skip ") == 4
    assert cli.main(["plot", str(tmp_path)]) == 0


@pytest.mark.parametrize(
    "argv,message",
    [
        (["train", "--dataset", "imagenet"], "cifar10-subset"),
        (["train", "--model", "vgg"], "resnet18"),
        (["compare", "--preset", "mnist"], "resnet18-cifar10-sgd"),
        (["train", "--epochs", "0"], "epochs"),
        (["sweep", "--preset", "resnet18-cifar10-sgd", "--lam", "-1"], "lam"),
        (["train", "--threads", "0"], "threads"),
        (["plot", "/nonexistent"], "neither"),
    ],
)
def test_bad_input_is_an_error_listing_the_valid_choices(argv, message, tmp_path, capsys):
    assert cli.main([*argv, *(["--out", str(tmp_path / "o")] if argv[0] != "plot" else [])]) == 1
    assert message in capsys.readouterr().err


def test_resume_without_out_is_an_error(capsys):
    assert cli.main(["train", "--resume"]) == 1
    assert "--out" in capsys.readouterr().err


def test_missing_extras_name_the_extra(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert cli.main(["compare"]) == 2
    assert "trainact[experiments]" in capsys.readouterr().err


def test_python_dash_m_trainact_help():
    out = subprocess.run(
        [sys.executable, "-m", "trainact", "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert "compare" in out and "sweep" in out


def test_an_interrupted_compare_resumes_without_losing_or_repeating_epochs(archive, tmp_path):
    data = load_dataset(str(archive), tmp_path / "cache", progress=False)
    cfg = quick(batch_size=32)
    quiet = {"progress": False, "log": lambda line: None}
    whole = compare.compare(cfg, [0], tmp_path / "whole", data=data, **quiet)

    class Interrupt(Exception):
        pass

    real = runner.train

    def interrupted(run_cfg, run_dir, **kw):
        def stop(record):
            kw["on_epoch"](record)
            if record["method"] == "tract" and record["epoch"] == 1:
                raise Interrupt

        return real(run_cfg, run_dir, **{**kw, "on_epoch": stop})

    runner.train = interrupted
    try:
        with pytest.raises(Interrupt):
            compare.compare(cfg, [0], tmp_path / "cut", data=data, **quiet)
    finally:
        runner.train = real
    resumed = compare.compare(cfg, [0], tmp_path / "cut", data=data, **quiet)
    assert resumed["final"] == whole["final"]
    rows = [json.loads(line) for line in (tmp_path / "cut" / "results.jsonl").open()]
    assert sorted((r["method"], r["epoch"]) for r in rows) == [
        ("baseline", 1),
        ("baseline", 2),
        ("tract", 1),
        ("tract", 2),
    ]
