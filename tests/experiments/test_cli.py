"""The command line as a user meets it: --version, options that would be ignored refused, "run k
of N" with the time left, quiet bars off a terminal, what job.json records, top-5, the first
layer's own optimizer, and the figures' labels and titles. On tiny real data."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import trainact
from trainact.experiments import cli, compare, plot, provenance, train


def quick(**kw) -> train.Config:
    return train.Config(**{"epochs": 2, "batch_size": 100, "eval_batch_size": 100, **kw})


def quiet_log(lines: list[str]) -> dict:
    return {"progress": False, "log": lines.append}


def test_version(capsys):
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"trainact {trainact.__version__}"
    with pytest.raises(SystemExit) as done:  # argparse's own action, anywhere before a command
        cli._parser().parse_args(["--version"])
    assert done.value.code == 0


# ---------------------------------------------------------------------------------------------
# Options that would be ignored


@pytest.mark.parametrize(
    "argv,message",
    [
        (["compare", "--seed", "7"], "compare runs every seed of --seeds: use --seeds 7"),
        (["sweep", "--seed", "7"], "sweep runs every seed of --seeds: use --seeds 7"),
        (["sweep", "--epochs", "3"], "sweep trains every budget of --budgets: use --budgets 3"),
        (["train", "--gamma", "0.5"], "--gamma shapes --schedule step only, not cosine"),
        (["compare", "--milestones", "2"], "--milestones shapes --schedule step only"),
        (["train", "--schedule", "step", "--final-lr-fraction", "0.1"], "ends a cosine schedule"),
        (["train", "--optimizer", "adam", "--momentum", "0.5"], "--momentum is SGD's"),
        (["train", "--lam", "1"], "--lam is TrAct's: use --method tract"),
        (["train", "--no-augment", "--rotation", "10"], "--rotation augments the training"),
        (["compare", "--no-augment", "--autoaugment"], "--autoaugment augments the training"),
        (["train", "--first-layer-lr", "0.1"], "give that too"),
    ],
)
def test_an_option_that_would_be_ignored_is_refused(argv, message, tmp_path, capsys):
    never = ["--dataset", str(tmp_path / "none"), "--out", str(tmp_path / "o")]
    assert cli.main([*argv, *never]) == 1
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_options_that_are_used_are_not_refused():
    parse = cli._parser().parse_args
    for argv in (
        ["train", "--optimizer", "adam", "--first-layer-optimizer", "sgd", "--momentum", "0.5"],
        ["train", "--schedule", "step", "--gamma", "0.5", "--milestones", "2"],
        ["train", "--method", "tract", "--lam", "1"],
        ["sweep", "--budgets", "3", "--seeds", "7"],
        ["train", "--preset", "resnet18-cifar100", "--no-augment"],  # the preset's rotation: off
    ):
        args = parse(argv)
        fixed = {} if argv[0] == "train" else {"method": "baseline"}
        cli.refuse_ignored(args, cli.build_config(args, **fixed))


def test_plot_refuses_options_it_would_ignore(tmp_path, capsys):
    (tmp_path / "sweep.jsonl").write_text("")
    assert cli.main(["plot", str(tmp_path), "--x", "time"]) == 1
    assert "holds a sweep, whose axis is the budget: drop --x" in capsys.readouterr().err
    assert cli.main(["plot", str(tmp_path), "--out", str(tmp_path / "f.png")]) == 1
    assert "drop --out" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Progress: run k of N with the time left; bars only on a terminal


def test_time_left_is_the_mean_epoch_time_times_the_epochs_left():
    left = compare.TimeLeft([2, 2, 4])
    assert left.text() == "8 epochs left, time unknown until one has run"
    left.add({"seconds": 10.0})
    left.add({"seconds": 20.0})
    assert left.text() == "about 1 min 30 s left"  # 6 epochs of 15 s
    left.skip(4)
    assert left.text() == "about 30 s left"
    left.skip(2)
    assert left.text() == "no epoch left"
    assert compare._duration(7380) == "2 h 03 min"


def test_compare_and_sweep_announce_run_k_of_n_with_the_time_left(tiny, tmp_path):
    lines: list[str] = []
    compare.compare(quick(), [0, 1], tmp_path / "c", data=tiny, **quiet_log(lines))
    runs = [line for line in lines if line.startswith("run ")]
    assert runs[0] == "run 1 of 4: baseline seed 0 (8 epochs left, time unknown until one has run)"
    assert runs[1].startswith("run 2 of 4: tract seed 0 (about ") and runs[1].endswith(" left)")
    assert [r.split(":")[0] for r in runs] == [f"run {k} of 4" for k in (1, 2, 3, 4)]
    epochs = [line for line in lines if " epoch " in line and "left" in line]
    assert len(epochs) == 8 and epochs[-1].endswith("no epoch left")

    lines.clear()
    sweep_cfg = dataclasses.replace(quick(), dataset="cifar10-subset", train_subset=300)
    sweep_cfg = dataclasses.replace(sweep_cfg, data_dir=str(tmp_path / "cache"))
    compare.sweep(sweep_cfg, [1, 2], [0], tmp_path / "s", **quiet_log(lines))
    runs = [line for line in lines if line.startswith("run ")]
    assert (
        runs[0] == "run 1 of 4: baseline-e1-seed0 (6 epochs left, time unknown until one has run)"
    )
    assert runs[3].startswith("run 4 of 4: tract-e2-seed0 (about ")
    lines.clear()
    compare.sweep(sweep_cfg, [1, 2], [0], tmp_path / "s", **quiet_log(lines))
    assert [line for line in lines if line.startswith("run ")][0] == (
        "run 1 of 4: skip baseline-e1-seed0: finished"
    )


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_bars_show_only_where_stderr_is_a_terminal(monkeypatch):
    monkeypatch.setattr(sys, "stderr", Terminal())
    assert not train._progress(3, "epoch", True).disable
    assert train._progress(3, "epoch", False).disable  # --no-progress
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # redirected: no bars, no flood
    assert train._progress(3, "epoch", True).disable


def image_folder(root: Path) -> Path:
    """2 classes × 3 random 8×8 images per split."""
    from PIL import Image

    gen = torch.Generator().manual_seed(0)
    for split in ("train", "test"):
        for cls in ("a", "b"):
            (root / split / cls).mkdir(parents=True)
            for i in range(3):
                pixels = torch.randint(0, 256, (8, 8, 3), dtype=torch.uint8, generator=gen)
                Image.fromarray(pixels.numpy()).save(root / split / cls / f"{i}.png")
    return root


def test_a_redirected_stderr_gets_no_bars(tmp_path, capsys, monkeypatch):
    folder = image_folder(tmp_path / "images")
    argv = ["train", "--dataset", str(folder), "--data-dir", str(tmp_path / "cache")]
    argv += ["--epochs", "2", "--batch-size", "2", "--out", str(tmp_path / "t")]
    assert cli.main(argv) == 0  # decoding the images and training, both with bars
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(sys, "stderr", Terminal())
    assert cli.main([*argv[:-1], str(tmp_path / "t2")]) == 0
    assert "baseline seed 0 epoch 1" in sys.stderr.getvalue()  # the bars were drawn


# ---------------------------------------------------------------------------------------------
# What is recorded


def test_job_json_records_code_versions_device_and_threads(tiny, tmp_path):
    train.train(quick(epochs=1), tmp_path / "run", data=tiny, progress=False)
    job = json.loads((tmp_path / "run" / "job.json").read_text())
    assert job["environment"] == {
        "code": provenance.code_identity(),
        "torch": torch.__version__,
        "device": "cpu",
        "threads": torch.get_num_threads(),
    }
    # a resume updates where it ran and compares only what it computes
    torch.set_num_threads(2)
    try:
        train.train(quick(epochs=2), tmp_path / "run", data=tiny, progress=False, resume=True)
    except ValueError as err:  # epochs differ: refused, whatever the environment
        assert "epochs: saved 1, given 2" in str(err)
    train.train(quick(epochs=1), tmp_path / "run", data=tiny, progress=False, resume=True)
    torch.set_num_threads(1)
    assert json.loads((tmp_path / "run" / "job.json").read_text())["environment"]["threads"] == 2


def test_a_dataset_path_is_recorded_relative_to_the_current_directory(subset_cache, tmp_path):
    folder = image_folder(tmp_path / "images")
    out = tmp_path / "run"
    argv = ["train", "--dataset", str(folder), "--data-dir", str(subset_cache), "--epochs", "1"]
    assert cli.main([*argv, "--out", str(out), "--no-progress"]) == 0
    recorded = json.loads((out / "job.json").read_text())["config"]["dataset"]
    assert not os.path.isabs(recorded) and Path(recorded).resolve() == folder.resolve()
    assert cli.main(["train", "--out", str(out), "--resume", "--no-progress"]) == 0


def test_top5_in_results_summary_verdict_and_plot(tiny, tmp_path, capsys):
    lines: list[str] = []
    summary = compare.compare(quick(), [0, 1, 2], tmp_path / "c", data=tiny, **quiet_log(lines))
    records = [json.loads(x) for x in (tmp_path / "c" / "results.jsonl").read_text().splitlines()]
    assert all(r["test_acc"] <= r["test_top5"] <= 1 for r in records)
    assert summary["final"]["tract"]["top5"]["mean"] >= summary["final"]["tract"]["top1"]["mean"]
    assert summary["final"]["tract"]["mean"] == summary["final"]["tract"]["top1"]["mean"]
    assert summary["final_top5_difference"]["n"] == 3 and "final_top5_verdict" in summary
    assert any(line.startswith("top-5 at the end: TrAct - baseline") for line in summary["verdict"])
    assert any(line.startswith("  top-5: baseline") for line in lines)
    assert cli.main(["plot", str(tmp_path / "c"), "--metric", "top5"]) == 0
    rows = compare.sweep_evidence([{**r, "epochs": 2} for r in records if r["epoch"] == 2])
    assert rows[0]["top5_verdict"] and rows[0]["top5_baseline"]["mean"] > 0


def test_datasets_of_five_classes_or_fewer_record_no_top5(tiny, tmp_path, capsys):
    few = dataclasses.replace(
        tiny,
        classes=tiny.classes[:5],
        train_labels=tiny.train_labels % 5,
        test_labels=tiny.test_labels % 5,
    )
    records = train.train(quick(epochs=1), tmp_path / "r", data=few, progress=False)
    assert "test_top5" not in records[0]
    compare.compare(quick(epochs=1), [0], tmp_path / "c", data=few, progress=False, log=print)
    assert cli.main(["plot", str(tmp_path / "c"), "--metric", "top5"]) == 1
    assert "hold no top5 accuracy" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# The first layer's own optimizer (the paper's Figure 9)


def test_the_first_layer_can_have_its_own_optimizer(tiny, tmp_path):
    cfg = quick(optimizer="adam", lr=1e-3, first_layer_optimizer="sgd", first_layer_lr=0.05)
    model = train.build_model(cfg.model, 10)
    first, rest = train.make_optimizers(cfg, model, "conv1")
    assert isinstance(first, torch.optim.SGD) and isinstance(rest, torch.optim.Adam)
    assert [p for g in first.param_groups for p in g["params"]] == [model.conv1.weight]
    assert (
        len([p for g in rest.param_groups for p in g["params"]])
        == len(list(model.parameters())) - 1
    )
    assert first.param_groups[0]["momentum"] == 0.9 and first.param_groups[0]["peak_lr"] == 0.05

    def first_layer_change(run_cfg: train.Config, name: str) -> tuple[float, float]:
        torch.manual_seed(run_cfg.seed)
        start = train.build_model(run_cfg.model, 10).state_dict()
        train.train(run_cfg, tmp_path / name, data=tiny, progress=False)
        end = torch.load(tmp_path / name / "checkpoint.pt", weights_only=False)
        assert len(end["optimizers"]) == (2 if run_cfg.first_layer_optimizer else 1)
        moved = {
            k: (end["model"][k] - start[k]).abs().max().item()
            for k in ("conv1.weight", "fc.weight")
        }
        return moved["conv1.weight"], moved["fc.weight"]

    frozen = dataclasses.replace(cfg, first_layer_lr=1e-12, method="tract")
    stem, head = first_layer_change(frozen, "frozen")
    assert stem < 1e-9 and head > 1e-4  # SGD at lr 1e-12 on the stem, Adam on the rest
    stem, head = first_layer_change(dataclasses.replace(cfg, method="tract"), "sgd")
    assert stem > 1e-4


# ---------------------------------------------------------------------------------------------
# Figures: the band labelled, titles kept, budgets as 1 2 4 8


@pytest.fixture
def figures(monkeypatch) -> list:
    drawn = []

    def keep(fig, path):
        drawn.append(fig)
        return path

    monkeypatch.setattr(plot, "_save", keep)
    return drawn


def test_the_band_is_labelled_and_a_redrawn_figure_keeps_its_title(tiny, tmp_path, figures):
    summary = compare.compare(quick(), [0, 1], tmp_path / "c", data=tiny, progress=False, log=len)
    assert summary["title"] == "resnet-tiny on cifar10-subset, 2 seeds"
    figures.clear()
    plot.plot_dir(tmp_path / "c")
    (ax, _) = figures[0].axes
    assert ax.get_title() == summary["title"]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["baseline", "TrAct", "shaded: ± 1 std over 2 seeds"]
    # a directory written before summaries had a title: made from job.json
    saved = json.loads((tmp_path / "c" / "summary.json").read_text())
    del saved["title"]
    (tmp_path / "c" / "summary.json").write_text(json.dumps(saved))
    assert plot.saved_title(tmp_path / "c") == summary["title"]


def test_the_budget_axis_reads_the_budgets(figures, tmp_path):
    finals = [
        {"method": m, "seed": s, "epochs": e, "test_acc": 0.5 + 0.01 * e + 0.001 * s}
        for m in ("baseline", "tract")
        for s in range(3)
        for e in (1, 2, 4, 8)
    ]
    plot.plot_budgets(finals, tmp_path / "b.png", "title")
    ax = figures[0].axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["1", "2", "4", "8"]
    assert ax.get_title() == "title"


def test_the_main_job_is_three_epochs_of_five_seeds_on_one_thread(monkeypatch):
    """``trainact compare`` with no options: the configuration docs/experiments.md measured."""
    called = {}

    def fake_compare(cfg, seeds, out, **kw):
        called.update(cfg=cfg, seeds=list(seeds), threads=torch.get_num_threads(), **kw)

    monkeypatch.setattr(compare, "compare", fake_compare)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert cli.main(["compare"]) == 0
    finally:
        torch.set_num_threads(threads)
    cfg = called["cfg"]
    assert (cfg.model, cfg.dataset, cfg.epochs, cfg.batch_size) == (
        "resnet-tiny",
        "cifar10-subset",
        3,
        128,
    )
    assert cfg.train_subset is None and cfg.test_subset is None  # all 10,000 and 2,000 images
    assert called["seeds"] == [0, 1, 2, 3, 4] and called["threads"] == 1
    # its runs side by side, as many as the machine holds (compare resolves None: test_runner)
    assert called["jobs"] is None
    assert cli.main(["compare", "--jobs", "0"]) == 1


def test_help_and_version_import_no_training_code():
    """--help and --version parse before importing the experiments' heavy modules (matplotlib,
    Pillow, the trainer and data code): they answer as fast as importing torch."""
    code = (
        "import sys, contextlib, io\n"
        "from trainact.experiments.cli import main\n"
        "for argv in (['--help'], ['--version']):\n"
        "    with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):\n"
        "        main(argv)\n"
        "heavy = ['matplotlib', 'PIL', 'trainact.experiments.train', 'trainact.experiments.data']\n"
        "print([m for m in heavy if m in sys.modules])\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_the_code_identity_names_this_checkout_s_commit():
    """Run from a git checkout (as the tests are), the code is the checkout's commit, its
    dirtiness the package's own, and the sources' hash that of the package's files."""
    code = provenance.code_identity.__wrapped__()  # now, not when the process first asked
    package = Path(trainact.__file__).parent
    assert code["trainact"] == trainact.__version__
    assert code["sources_sha256"] == provenance.sources_sha256(package)
    head = subprocess.run(
        ["git", "-C", str(package), "rev-parse", "HEAD"], capture_output=True, text=True
    )
    if head.returncode != 0:
        pytest.skip("trainact is not imported from a git checkout here")
    status = subprocess.run(
        ["git", "-C", str(package), "status", "--porcelain", "--", "."],
        capture_output=True,
        text=True,
        check=True,
    )
    assert code["git_commit"] == head.stdout.strip()
    assert code["git_dirty"] == bool(status.stdout.strip())


def test_sources_hash_changes_with_any_source_and_untracked_code_has_no_commit(tmp_path):
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("x = 1\n")
    (package / "sub" / "m.py").write_text("y = 2\n")
    before = provenance.sources_sha256(package)
    (package / "sub" / "m.py").write_text("y = 3\n")
    assert provenance.sources_sha256(package) != before
    (package / "sub" / "m.py").write_text("y = 2\n")
    assert provenance.sources_sha256(package) == before
    (package / "sub" / "m.py").rename(package / "sub" / "n.py")  # a file's name counts too
    assert provenance.sources_sha256(package) != before
    assert provenance._git(package) == {}  # not tracked by git: no commit to claim
