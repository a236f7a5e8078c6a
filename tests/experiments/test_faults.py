"""Faults and misuse of the experiments: run directories owned by one job and locked, logs that
are checked and rewritten atomically, bad knobs, file-system errors, odd image folders, and
thread counts that crashed oneDNN. All on tiny real data."""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from trainact.experiments import cli, compare, rundir, train
from trainact.experiments.data import ImageDataset, load_dataset

SRC = str(Path(__file__).resolve().parents[2] / "src")


def small(**kw) -> train.Config:
    return train.Config(**{"epochs": 1, "batch_size": 100, "eval_batch_size": 100, **kw})


def quiet() -> dict:
    return {"progress": False, "log": lambda line: None}


def error_line(capsys) -> str:
    """The CLI's stderr, which must be one line and no traceback."""
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def trainact_cli(args: list[str], **kw) -> subprocess.CompletedProcess:
    """``python -m trainact ARGS`` in a fresh process (a crash there cannot kill pytest)."""
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [*kw.pop("prefix", []), sys.executable, "-m", "trainact", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        **kw,
    )


# ---------------------------------------------------------------------------------------------
# Run directories: one owner, one process at a time


def test_a_directory_belongs_to_one_job(tiny: ImageDataset, tmp_path: Path) -> None:
    cfg = small()
    train.train(cfg, tmp_path / "run", data=tiny, progress=False)
    run_results = (tmp_path / "run" / "results.jsonl").read_text()
    with pytest.raises(FileExistsError, match=r"run belongs to a train job .*compare cannot"):
        compare.compare(cfg, [0], tmp_path / "run", data=tiny, **quiet())
    assert (tmp_path / "run" / "results.jsonl").read_text() == run_results

    compare.compare(cfg, [0], tmp_path / "cmp", data=tiny, **quiet())
    combined = (tmp_path / "cmp" / "results.jsonl").read_text()
    with pytest.raises(FileExistsError, match=r"cmp belongs to a compare job .*train cannot"):
        train.train(cfg, tmp_path / "cmp", data=tiny, resume=True, progress=False)
    with pytest.raises(FileExistsError, match="belongs to a compare job"):
        compare.sweep(cfg, [1], [0], tmp_path / "cmp", **quiet())
    assert (tmp_path / "cmp" / "results.jsonl").read_text() == combined

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "results.jsonl").write_text('{"epoch": 1}\n')
    with pytest.raises(FileExistsError, match=r"no trainact job \(results.jsonl\)"):
        compare.compare(cfg, [0], foreign, data=tiny, **quiet())
    assert (foreign / "results.jsonl").read_text() == '{"epoch": 1}\n'


def test_a_second_job_on_one_directory_is_refused_at_once(tmp_path: Path, capsys) -> None:
    out = tmp_path / "busy"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\n"
            "from trainact.experiments.rundir import claim\n"
            "with claim(sys.argv[1], 'compare', {}):\n"
            "    print('held', flush=True)\n"
            "    time.sleep(120)\n",
            str(out),
        ],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": SRC},
    )
    try:
        assert holder.stdout.readline() == "held\n"
        assert cli.main(["compare", "--out", str(out), "--no-progress"]) == 1
        assert f"in use by another trainact job (compare, pid {holder.pid})" in error_line(capsys)
    finally:
        holder.send_signal(signal.SIGKILL)  # a killed job leaves no stale lock
        holder.wait()
    with rundir.claim(out, "compare", {}) as resuming:
        assert resuming


def test_repeated_seeds_and_budgets_are_refused(tmp_path: Path, capsys) -> None:
    out = ["--out", str(tmp_path / "o"), "--dataset", str(tmp_path / "none")]  # never reached
    assert cli.main(["compare", "--seeds", "0", "1", "0", *out]) == 1
    assert "--seeds must list distinct values, got [0, 1, 0] (0 repeated)" in error_line(capsys)
    assert cli.main(["sweep", "--budgets", "1", "1", *out]) == 1
    assert "--budgets must list distinct values, got [1, 1]" in error_line(capsys)
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------------------------------------
# Results checked against the checkpoint, rewritten atomically; corrupt files named


@pytest.fixture(scope="module")
def finished(tiny: ImageDataset, subset_cache: Path, tmp_path_factory) -> Path:
    """A finished 2-epoch run, to copy and damage (its data_dir serves the CLI)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    train.train(small(epochs=2, data_dir=str(subset_cache)), out, data=tiny, progress=False)
    return out


def resume(run: Path, tiny: ImageDataset) -> list[dict]:
    return train.train(small(epochs=2), run, data=tiny, resume=True, progress=False)


def test_a_resume_drops_an_unfinished_last_line_and_rewrites_atomically(
    finished: Path, tiny: ImageDataset, tmp_path: Path
) -> None:
    run = shutil.copytree(finished, tmp_path / "run")
    results = run / "results.jsonl"
    good = results.read_text()
    for tail in ('{"method": "baseline", "epoch": 3, "test', '{"epoch": 3}', '{"epoch": 3}\n'):
        results.write_text(good + tail)  # cut short, unterminated, an epoch past the checkpoint
        inode = results.stat().st_ino
        assert [r["epoch"] for r in resume(run, tiny)] == [1, 2]
        assert results.read_text() == good
        assert results.stat().st_ino != inode  # replaced by a new file, never truncated in place
    assert not list(run.glob(".*.tmp"))


@pytest.mark.parametrize(
    "damage,message",
    [
        ("delete", r"lack epochs \[1, 2\]"),
        ("empty", r"lack epochs \[1, 2\]"),
        ("drop first", r"lack epochs \[1\]"),
        ("repeat", r"hold epochs \[1, 1, 2\]"),
        ("corrupt first", r"results.jsonl, line 1: corrupt record"),
    ],
)
def test_results_that_disagree_with_the_checkpoint_are_an_error(
    finished: Path, tiny: ImageDataset, tmp_path: Path, damage: str, message: str
) -> None:
    run = shutil.copytree(finished, tmp_path / "run")
    results = run / "results.jsonl"
    lines = results.read_text().splitlines(keepends=True)
    if damage == "delete":
        results.unlink()
    else:
        kept = {"empty": [], "drop first": lines[1:], "repeat": [lines[0], *lines]}
        results.write_text("".join(kept.get(damage, ['{"epoch": 1, "te\n', *lines[1:]])))
    before = results.read_text() if results.exists() else None
    with pytest.raises(ValueError, match=message):
        resume(run, tiny)
    assert (results.read_text() if results.exists() else None) == before


def test_corrupt_job_file_and_checkpoint_name_the_file(
    finished: Path, tmp_path: Path, capsys
) -> None:
    run = shutil.copytree(finished, tmp_path / "run")
    (run / "checkpoint.pt").write_bytes(b"PK\x03\x04 not a checkpoint")
    assert cli.main(["train", "--out", str(run), "--resume", "--no-progress"]) == 1
    assert f"{run / 'checkpoint.pt'} is not a readable checkpoint" in error_line(capsys)
    job = run / "job.json"
    job.write_text(job.read_text()[:40])
    assert cli.main(["train", "--out", str(run), "--resume", "--no-progress"]) == 1
    assert f"{job}, line " in error_line(capsys)
    assert cli.main(["compare", "--out", str(run), "--no-progress"]) == 1
    assert f"{job}, line " in error_line(capsys)
    results = run / "results.jsonl"
    results.write_text("{oops\n" + results.read_text())
    assert cli.main(["plot", str(run)]) == 1
    assert f"{results}, line 1: corrupt record" in error_line(capsys)


# ---------------------------------------------------------------------------------------------
# --resume alone reuses the saved configuration; differing values are named


def test_resume_reuses_the_saved_configuration(subset_cache: Path, tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    cfg = small(epochs=2, lr=0.05, train_subset=200, data_dir=str(subset_cache))

    class Interrupt(Exception):
        pass

    def stop(record: dict) -> None:
        raise Interrupt

    with pytest.raises(Interrupt):
        train.train(cfg, run, on_epoch=stop, progress=False)
    argv = ["train", "--out", str(run), "--resume", "--no-progress"]
    assert cli.main([*argv, "--lr", "0.5", "--epochs", "3"]) == 1
    assert "(epochs: saved 2, given 3; lr: saved 0.05, given 0.5)" in error_line(capsys)
    assert cli.main([*argv, "--device", "cpu", "--eval-batch-size", "500"]) == 0
    assert "epoch   2/2" in capsys.readouterr().out
    records = rundir.read_jsonl(run / "results.jsonl")
    assert [r["epoch"] for r in records] == [1, 2] and records[1]["lr"] < 0.05
    saved = json.loads((run / "job.json").read_text())["config"]
    assert saved["eval_batch_size"] == 500 and saved["device"] == "cpu"  # where, not what

    assert cli.main(["train", "--out", str(tmp_path / "rnu"), "--resume"]) == 1
    assert "rnu holds no train run to resume" in error_line(capsys)
    assert not (tmp_path / "rnu").exists()


def test_compare_names_the_field_that_differs(tiny: ImageDataset, tmp_path: Path) -> None:
    compare.compare(small(), [0], tmp_path, data=tiny, **quiet())
    with pytest.raises(ValueError, match=r"gamma: saved 0.2, given 0.5"):
        compare.compare(small(gamma=0.5), [0], tmp_path, data=tiny, **quiet())
    with pytest.raises(ValueError, match=r"seeds: saved \[0\], given \[0, 1\]"):
        compare.compare(small(), [0, 1], tmp_path, data=tiny, **quiet())


# ---------------------------------------------------------------------------------------------
# Bad knobs, refused before anything is written


@pytest.mark.parametrize(
    "args,message",
    [
        (["--gamma", "0"], "--gamma must be greater than 0 (and finite), got 0.0"),
        (["--gamma", "nan"], "--gamma must be greater than 0 (and finite), got nan"),
        (["--final-lr-fraction", "1.5"], "--final-lr-fraction must be in [0, 1], got 1.5"),
        (["--final-lr-fraction", "-0.1"], "--final-lr-fraction must be in [0, 1], got -0.1"),
        (["--momentum", "1"], "--momentum must be in [0, 1), got 1.0"),
        (["--std", "0.2", "0", "0.2"], "--std must be positive, got (0.2, 0.0, 0.2)"),
        (["--mean", "0", "inf", "0"], "--mean must be three finite numbers"),
        (["--warmup-epochs", "3"], "--warmup-epochs must be at least 0 and below --epochs (3)"),
        (["--warmup-epochs", "-1"], "--warmup-epochs must be at least 0"),
        (["--seed", str(2**32)], f"--seed must be in [0, {2**32 - 1}], got {2**32}"),
        (["--seed", "-1"], "--seed must be in [0, 4294967295], got -1"),
        (["--weight-decay", "inf"], "--weight-decay must be at least 0 (and finite), got inf"),
        (["--label-smoothing", "2"], "--label-smoothing must be in [0, 1], got 2.0"),
        (["--lr", "-0.1"], "--lr must be greater than 0"),
        (["--lr", "1e39"], "--lr must be at most 3.4028235e+38 (float32's largest), got 1e+39"),
        (["--weight-decay", "1e39"], "--weight-decay must be at most 3.4028235e+38"),
        (["--lr", "1e-50"], "--lr must be at least 1.1754944e-38 (float32's smallest)"),
        (["--weight-decay", "1e-50"], "--weight-decay must be 0 or at least 1.1754944e-38"),
        (
            ["--first-layer-optimizer", "sgd", "--first-layer-lr", "1e39"],
            "--first-layer-lr must be at most 3.4028235e+38",
        ),
    ],
)
@pytest.mark.parametrize("command", ["train", "compare"])
def test_bad_knobs_are_refused_naming_option_and_value(
    command: str, args: list[str], message: str, tmp_path: Path, capsys
) -> None:
    never = ["--dataset", str(tmp_path / "none")]  # a refused knob never reaches the data
    assert cli.main([command, *args, "--out", str(tmp_path / "o"), *never]) == 1
    assert message in error_line(capsys)
    assert not (tmp_path / "o").exists()


def test_a_sweep_checks_every_budget_up_front(tmp_path: Path, capsys) -> None:
    argv = ["sweep", "--budgets", "4", "2", "--warmup-epochs", "3", "--out", str(tmp_path / "o")]
    assert cli.main([*argv, "--dataset", str(tmp_path / "none")]) == 1
    assert "--warmup-epochs must be at least 0 and below --epochs (2), got 3.0" in error_line(
        capsys
    )
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------------------------------------
# File-system errors: one line naming the path


def test_an_out_below_a_file_names_the_path(tmp_path: Path, capsys) -> None:
    (tmp_path / "file").write_text("")
    assert cli.main(["train", "--out", str(tmp_path / "file" / "run")]) == 1
    assert error_line(capsys) == f"error: {tmp_path / 'file' / 'run'}: Not a directory"


def without_root_overrides() -> list[str]:
    """A command prefix that makes root obey file permissions (it ignores them otherwise)."""
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: permissions cannot be enforced")
    return ["setpriv", "--bounding-set", "-dac_override,-dac_read_search,-fowner"]


def test_a_read_only_out_names_the_path(tmp_path: Path) -> None:
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o555)
    done = trainact_cli(["train", "--out", str(out)], prefix=without_root_overrides())
    assert done.returncode == 1
    assert done.stderr.strip() == f"error: {out / 'job.lock'}: Permission denied"


def test_a_full_disk_names_the_path(subset_cache: Path, tmp_path: Path) -> None:
    """A file-size limit fails writes like a full disk: results fit, the checkpoint does not."""

    def limit_file_size() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # fail the write instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))

    out = tmp_path / "full"
    args = ["train", "--train-subset", "100", "--epochs", "1", "--batch-size", "100"]
    args += ["--data-dir", str(subset_cache), "--out", str(out), "--no-progress"]
    done = trainact_cli(args, preexec_fn=limit_file_size)
    assert done.returncode == 1, done.stderr
    err = done.stderr.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith(f"error: cannot write {out / 'checkpoint.pt'}: ")
    assert [r["epoch"] for r in rundir.read_jsonl(out / "results.jsonl")] == [1]
    assert not list(out.glob(".*.tmp"))


# ---------------------------------------------------------------------------------------------
# Image folders


def image_folder(root: Path, sizes: dict[str, tuple[int, int]], mode: str = "RGB") -> Path:
    for split, size in sizes.items():
        for cls in ("ant", "bee"):
            (root / split / cls).mkdir(parents=True)
            Image.new(mode, size).save(root / split / cls / "0.png")
    return root


def test_test_images_of_another_size_are_refused(tmp_path: Path) -> None:
    folder = image_folder(tmp_path / "f", {"train": (8, 8), "test": (8, 6)})
    with pytest.raises(ValueError, match=r"test images are 8x6 .*ant/0.png\) but train images are"):
        load_dataset(folder, tmp_path / "cache", progress=False)


def test_a_cache_of_mismatched_splits_is_not_used(tmp_path: Path) -> None:
    folder = image_folder(tmp_path / "f", {"train": (8, 8), "test": (8, 8)})
    load_dataset(folder, tmp_path / "cache", progress=False)
    (cache,) = (tmp_path / "cache").glob("*.npz")
    with np.load(cache) as z:
        arrays = dict(z)
    arrays["test_images"] = np.zeros((2, 3, 6, 8), np.uint8)  # as an older trainact wrote it
    np.savez(cache, **arrays)
    with pytest.warns(RuntimeWarning, match="corrupt"):
        ds = load_dataset(folder, tmp_path / "cache", progress=False)
    assert ds.test_images.shape == (2, 3, 8, 8)


def test_16_bit_grayscale_is_scaled_to_8_bits(tmp_path: Path) -> None:
    folder = image_folder(tmp_path / "f", {"train": (4, 1), "test": (4, 1)})
    levels = np.array([[0, 257, 40000, 65535]], np.uint16)
    image = Image.fromarray(levels)
    assert image.mode == "I;16"
    image.save(folder / "train" / "ant" / "0.png")
    ds = load_dataset(folder, tmp_path / "cache", progress=False)
    assert ds.train_images[0, :, 0].tolist() == [[0, 1, 156, 255]] * 3


# ---------------------------------------------------------------------------------------------
# Threads: oneDNN's strided 1x1 convolution corrupted the heap at 3 threads on channels-last


def test_training_at_three_threads_does_not_crash(subset_cache: Path, tmp_path: Path) -> None:
    args = ["train", "--threads", "3", "--train-subset", "256", "--epochs", "1"]
    args += ["--data-dir", str(subset_cache), "--out", str(tmp_path / "t3"), "--no-progress"]
    done = trainact_cli(args)
    assert done.returncode == 0, f"exit {done.returncode}: {done.stderr[-2000:]}"
    assert "final test accuracy" in done.stdout


def test_the_cli_starts_and_locks_without_fcntl(tmp_path: Path) -> None:
    """Windows has no fcntl: the command must start and still keep a directory to one job."""
    code = (
        "import sys, warnings; sys.modules['fcntl'] = None; warnings.simplefilter('ignore')\n"
        "from trainact.experiments import cli, rundir\n"
        "with rundir.claim(sys.argv[1], 'compare', {}):\n"
        "    try:\n"
        "        with rundir.claim(sys.argv[1], 'compare', {}):\n"
        "            print('second claim held')\n"
        "    except FileExistsError as err:\n"
        "        print('refused:', err)\n"
        "sys.exit(cli.main(['--version']))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "out")],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": SRC},
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "refused:" in done.stdout
    assert "in use by another trainact job (compare, pid" in done.stdout
    assert "trainact 0." in done.stdout


def test_a_sweep_takes_a_warmup_its_budgets_allow(tmp_path: Path, capsys) -> None:
    """The sweep's own configuration has no budget of its own: a warm-up longer than the
    default --epochs is fine when every budget is longer still."""
    argv = ["sweep", "--budgets", "10", "20", "--warmup-epochs", "5", "--out", str(tmp_path / "o")]
    assert cli.main([*argv, "--dataset", str(tmp_path / "none")]) == 1
    assert "no such file or directory" in error_line(capsys)  # it got as far as the data
