"""Runs trained several at once (``--jobs``): the same records, summaries and finals as one
after another, errors raised in the parent, the time left divided among the workers. On tiny
real data."""

from __future__ import annotations

import json
import multiprocessing
import sys

import pytest
import torch

from trainact.experiments import compare, runner, train


def quick(**kw) -> train.Config:
    return train.Config(**{"epochs": 2, "batch_size": 100, "eval_batch_size": 100, **kw})


def _without_times(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in records]


def _lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_compare_in_two_workers_equals_one_after_another(tiny, tmp_path):
    lines: list[str] = []
    one = compare.compare(quick(), [0, 1], tmp_path / "one", data=tiny, progress=False, log=len)
    two = compare.compare(
        quick(), [0, 1], tmp_path / "two", data=tiny, jobs=2, progress=False, log=lines.append
    )
    assert _without_times(_lines(tmp_path / "two" / "results.jsonl")) == _without_times(
        _lines(tmp_path / "one" / "results.jsonl")
    )
    assert two["final"] == one["final"] and two["final_difference"] == one["final_difference"]
    started = sorted(line.split(":")[0] for line in lines if line.startswith("run "))
    assert started == [f"run {k} of 4" for k in (1, 2, 3, 4)]
    assert sum(" epoch " in line and "left" in line for line in lines) == 8


def test_sweep_in_two_workers_equals_one_after_another(tmp_path):
    finals = {}
    # the sweep loads its data itself: the embedded subset, cut to 300 train images
    sweep_cfg = quick(dataset="cifar10-subset", train_subset=300, data_dir=str(tmp_path / "cache"))
    for jobs in (1, 2):
        rows = compare.sweep(
            sweep_cfg, [1, 2], [0], tmp_path / f"s{jobs}", jobs=jobs, progress=False, log=len
        )
        key = lambda r: (r["epochs"], r["method"])  # noqa: E731
        finals[jobs] = sorted(_without_times(rows), key=key)
    assert finals[1] == finals[2]


def test_an_error_in_a_worker_is_raised_with_its_type(tiny, tmp_path):
    """A run whose loss diverges stops the job with NonFiniteLoss, as it does without workers
    (the command prints it as "stopped"); the other worker is stopped too."""
    with pytest.raises(train.NonFiniteLoss):
        compare.compare(
            quick(lr=1e30), [0], tmp_path / "c", data=tiny, jobs=2, progress=False, log=len
        )


def test_a_worker_that_dies_without_reporting_stops_the_job(tmp_path):
    process = multiprocessing.get_context("spawn").Process(target=sys.exit, args=(3,))
    process.start()
    process.join()
    run = runner.Run(1, quick(), tmp_path / "baseline-seed0")
    with pytest.raises(RuntimeError, match=r"baseline-seed0 stopped \(exit code 3\)"):
        runner._check_alive([process], {process.pid: run}, {})
    runner._check_alive([process], {}, {})  # a worker that ran out of runs: nothing to say


def test_default_jobs_fill_the_usable_cores_on_a_cpu_only():
    assert runner.default_jobs(torch.device("meta"), runs=10, threads=1) == 1
    jobs = runner.default_jobs(torch.device("cpu"), runs=10, threads=1)
    assert 1 <= jobs <= 10
    assert runner.default_jobs(torch.device("cpu"), runs=1, threads=1) == 1
    assert runner.default_jobs(torch.device("cpu"), runs=10, threads=10_000) == 1
    with pytest.raises(ValueError, match="jobs must be at least 1"):
        runner.train_runs([], None, jobs=0, on_start=print, on_epoch=print, on_end=print)


def test_compare_without_jobs_asks_the_machine(tiny, tmp_path, monkeypatch):
    """jobs=None (the command's default) is resolved from the device and the number of runs."""
    asked = []
    monkeypatch.setattr(compare, "default_jobs", lambda *a: asked.append(a) or 1)
    compare.compare(quick(epochs=1), [0], tmp_path / "c", data=tiny, jobs=None, log=len)
    assert asked == [(torch.device("cpu"), 2)]


def test_default_jobs_leave_each_worker_its_memory(monkeypatch):
    """A many-core machine with little free memory gets no more workers than it holds."""
    monkeypatch.setattr(runner, "_available_memory", lambda: int(2.5 * runner.WORKER_BYTES))
    assert runner.default_jobs(torch.device("cpu"), runs=10, threads=1) <= 2
    monkeypatch.setattr(runner, "_available_memory", lambda: 0)
    assert runner.default_jobs(torch.device("cpu"), runs=10, threads=1) == 1


def test_time_left_is_shared_among_the_jobs():
    left = compare.TimeLeft([2, 2, 2, 2], jobs=2)
    left.add({"seconds": 10.0})
    assert left.text() == "about 35 s left"  # 7 epochs of 10 s on 2 workers
    left.skip(6)
    assert left.text() == "about 10 s left"  # the last epoch runs alone
