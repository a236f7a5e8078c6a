"""The runs of a compare or sweep, trained one after another or several at once.

The runs are independent and each is deterministic on its own (seeded by its configuration),
and on a CPU each uses one thread by default: on a machine with more cores, training them side
by side in worker processes divides the wall time and changes no result. Workers are spawned
(never forked, which can deadlock torch's thread pools), get the loaded data once, and report
each run's start, epochs and end to the parent, which logs and records them; an error in one
run stops the others and is raised in the parent.
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import queue
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from trainact.experiments.config import Config
from trainact.experiments.data import ImageDataset
from trainact.experiments.train import train


@dataclass(frozen=True)
class Run:
    """One run of a job: its place in "run k of N", its configuration and its directory."""

    number: int
    cfg: Config
    out: Path


# Memory set aside per worker: a worker training ResNet-tiny on the embedded subset holds about
# 0.45 GB (its resident size, 2026-12-06), full CIFAR-10's images add 0.15 GB.
WORKER_BYTES = 1 << 30


def default_jobs(device: torch.device, runs: int, threads: int | None = None) -> int:
    """Runs at once by default: on a CPU device as many as the usable cores hold at
    ``threads`` (torch's current number) each, and the available memory at
    :data:`WORKER_BYTES` each; on an accelerator one."""
    if device.type != "cpu":
        return 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    jobs = min(runs, (cores or 1) // (threads or torch.get_num_threads()))
    available = _available_memory()
    if available is not None:
        jobs = min(jobs, available // WORKER_BYTES)
    return max(1, jobs)


def _available_memory() -> int | None:
    """The memory available for new processes (Linux's MemAvailable), None where unknown."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def train_runs(
    runs: Sequence[Run],
    data: ImageDataset,
    *,
    jobs: int = 1,
    progress: bool = True,
    on_start: Callable[[Run], None],
    on_epoch: Callable[[dict[str, Any]], None],
    on_end: Callable[[Run, list[dict[str, Any]]], None],
) -> None:
    """Train every run to its end (resuming what is on disk), ``jobs`` at a time; the callbacks
    run in this process, in the order the runs report (``progress`` bars only with one job)."""
    if jobs < 1:
        raise ValueError(f"jobs must be at least 1, got {jobs}")
    if jobs == 1 or len(runs) == 1:
        for run in runs:
            on_start(run)
            records = train(
                run.cfg, run.out, resume=True, data=data, on_epoch=on_epoch, progress=progress
            )
            on_end(run, records)
        return
    _in_workers(runs, data, jobs, on_start, on_epoch, on_end)


def _in_workers(
    runs: Sequence[Run],
    data: ImageDataset,
    jobs: int,
    on_start: Callable[[Run], None],
    on_epoch: Callable[[dict[str, Any]], None],
    on_end: Callable[[Run, list[dict[str, Any]]], None],
) -> None:
    context = multiprocessing.get_context("spawn")
    tasks, events = context.Queue(), context.Queue()
    workers = [
        context.Process(
            target=_worker, args=(data, torch.get_num_threads(), tasks, events), daemon=True
        )
        for _ in range(min(jobs, len(runs)))
    ]
    for item in [*runs, *[None] * len(workers)]:  # each worker stops at its None
        tasks.put(item)
    for worker in workers:
        worker.start()
    by_number = {run.number: run for run in runs}
    running: dict[int, Run] = {}  # worker pid -> the run it reported starting and not ending
    exited: dict[int, float] = {}  # workers gone before their last report was read: since when
    ended = 0
    try:
        while ended < len(runs):
            try:
                kind, number, payload = events.get(timeout=1.0)
            except queue.Empty:
                _check_alive(workers, running, exited)
                continue
            run = by_number[number]
            if kind == "start":
                running[payload] = run
                on_start(run)
            elif kind == "epoch":
                on_epoch(payload)
            elif kind == "end":
                running = {pid: r for pid, r in running.items() if r is not run}
                ended += 1
                on_end(run, payload)
            else:  # "error": the worker's exception, raised here
                raise payload
        for worker in workers:  # each has its None: let it exit on its own
            worker.join(timeout=10)
    finally:
        for worker in workers:
            if worker.is_alive():
                worker.terminate()
            worker.join()
        tasks.close()
        events.close()


def _check_alive(
    workers: Sequence[multiprocessing.process.BaseProcess],
    running: dict[int, Run],
    exited: dict[int, float],
) -> None:
    """A worker that died in a run without reporting (killed, out of memory) stops the job; one
    that exited normally gets a few seconds for its last report to arrive."""
    for worker in workers:
        if worker.is_alive() or worker.pid not in running:
            continue
        first_seen = exited.setdefault(worker.pid, time.monotonic())
        if worker.exitcode != 0 or time.monotonic() - first_seen > 10:
            raise RuntimeError(
                f"the worker training {running[worker.pid].out.name} stopped (exit code "
                f"{worker.exitcode}) without finishing; rerun with the same --out to resume"
            )


def _worker(data: ImageDataset, threads: int, tasks: Any, events: Any) -> None:
    """Train the runs taken from ``tasks`` until a None, reporting to ``events``."""
    torch.set_num_threads(threads)
    parent = os.getppid()
    while (run := tasks.get()) is not None:

        def report(record: dict[str, Any], run: Run = run) -> None:
            events.put(("epoch", run.number, record))
            if os.getppid() != parent:  # the job was killed: stop at this epoch (it resumes)
                raise SystemExit(f"the job of {run.out.name} is gone")

        try:
            events.put(("start", run.number, os.getpid()))
            records = train(
                run.cfg, run.out, resume=True, data=data, progress=False, on_epoch=report
            )
            events.put(("end", run.number, records))
        except BaseException as err:  # reported to the parent, which raises it
            try:
                pickle.dumps(err)
            except Exception:
                err = RuntimeError(f"{type(err).__name__}: {err}")
            events.put(("error", run.number, err))
            return
