"""Baseline against TrAct, same initialization, data order and hyperparameters, over seeds;
and the sweep over epoch budgets (and λ). Both resume: finished epochs and runs are never redone,
and both state the difference with its uncertainty (:mod:`trainact.experiments.evidence`).
Each run is announced as "run k of N" with an estimate of the time left over all runs."""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from trainact.experiments.config import METHODS, Config
from trainact.experiments.data import ImageDataset
from trainact.experiments.evidence import (
    METRICS,
    Difference,
    compare_evidence,
    compare_verdict,
    mean_std_by,
    sweep_evidence,
)
from trainact.experiments.plot import figure_title, plot_budgets, plot_curves, plot_lams
from trainact.experiments.provenance import code_identity
from trainact.experiments.rundir import append_jsonl, claim, read_jsonl, write_json, write_jsonl
from trainact.experiments.runner import Run, default_jobs, train_runs
from trainact.experiments.train import RESUMABLE_CHANGES, environment, load_data, resolve_device


def _distinct(name: str, values: Sequence[int]) -> list[int]:
    """``values`` as a list; ValueError when one repeats (it would count one run twice)."""
    repeated = sorted({v for v in values if list(values).count(v) > 1})
    if repeated or not values:
        raise ValueError(
            f"--{name} must list distinct values, got {list(values)}"
            + (f" ({', '.join(map(str, repeated))} repeated)" if repeated else "")
        )
    return list(values)


class TimeLeft:
    """The time left over the runs of a compare or sweep, from the epochs timed so far.

    Seconds per epoch are the mean over every finished epoch seen (resumed ones included, from
    their records); a run's epochs are counted as they finish; ``jobs`` runs train at once.
    """

    def __init__(self, epochs_of_runs: Sequence[int], jobs: int = 1) -> None:
        self.total = sum(epochs_of_runs)
        self.longest = max(epochs_of_runs, default=1)
        self.jobs = jobs
        self.done = 0
        self.seconds: list[float] = []

    def add(self, record: dict[str, Any]) -> None:
        self.done += 1
        self.seconds.append(record["seconds"])

    def skip(self, epochs: int) -> None:
        """Epochs of a finished run found on disk: nothing left to do for them."""
        self.done += epochs

    def text(self) -> str:
        left = self.total - self.done
        if left <= 0:
            return "no epoch left"
        if not self.seconds:
            return f"{left} epochs left, time unknown until one has run"
        at_once = max(1, min(self.jobs, math.ceil(left / self.longest)))
        per_epoch = sum(self.seconds) / len(self.seconds)
        return f"about {_duration(left * per_epoch / at_once)} left"


def _duration(seconds: float) -> str:
    """``45 s``, ``3 min 20 s``, ``2 h 05 min``."""
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def _rebuild(
    path: Path, run_dirs: Sequence[Path], name: str = "results.jsonl"
) -> list[dict[str, Any]]:
    """The combined log, rebuilt from the runs' own logs (so a resume never duplicates)."""
    records = [r for d in run_dirs if (d / name).exists() for r in read_jsonl(d / name)]
    write_jsonl(path, records)
    return records


def compare(
    cfg: Config,
    seeds: Sequence[int],
    out_dir: str | Path,
    *,
    data: ImageDataset | None = None,
    jobs: int | None = 1,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train baseline and TrAct for each seed; write results.jsonl, summary.json (the numbers of
    :func:`~trainact.experiments.evidence.compare_evidence` and the verdict in words) and
    accuracy.png (against epochs and against training time).

    ``data`` replaces the dataset ``cfg`` names (already loaded, for tests and notebooks).
    ``jobs`` runs train at once, each in its own process (the same results, in less time where
    there are cores for them; None: :func:`trainact.experiments.runner.default_jobs`).
    ``out_dir`` is claimed for this comparison; rerun with the same values it resumes.
    """
    out = Path(out_dir)
    seeds = _distinct("seeds", seeds)
    runs = [  # every run's configuration, checked before anything is written
        (dataclasses.replace(cfg, method=m, seed=s), out / f"{m}-seed{s}")
        for s in seeds
        for m in METHODS
    ]
    identity = {"config": {**dataclasses.asdict(cfg), "method": "*"}, "seeds": seeds}
    device = resolve_device(cfg.device)
    jobs = default_jobs(device, len(runs)) if jobs is None else jobs
    env = environment(device)
    with claim(out, "compare", identity, mutable=RESUMABLE_CHANGES, env=env) as resuming:
        if resuming:
            log(f"resuming the comparison in {out}")
        return _compare(cfg, seeds, runs, out, identity, data, jobs, progress, log)


def _compare(
    cfg: Config,
    seeds: list[int],
    runs: list[tuple[Config, Path]],
    out: Path,
    identity: dict[str, Any],
    data: ImageDataset | None,
    jobs: int,
    progress: bool,
    log: Callable[[str], None],
) -> dict[str, Any]:
    if data is None:
        data = load_data(cfg, progress)
    log(
        f"{data.name}: {len(data.train_labels)} train / {len(data.test_labels)} test images; "
        f"model {cfg.model}, {cfg.epochs} epochs, batch {cfg.batch_size}, {cfg.optimizer} "
        f"lr {cfg.lr:g}, seeds {list(seeds)}"
    )
    combined = out / "results.jsonl"
    earlier = _rebuild(combined, [d for _, d in runs])
    left = TimeLeft([cfg.epochs] * len(runs), jobs)
    for record in earlier:
        left.add(record)

    def append(record: dict[str, Any]) -> None:
        append_jsonl(combined, record)
        left.add(record)
        log(
            f"{record['method']:>8} seed {record['seed']} epoch {record['epoch']}/{cfg.epochs}: "
            f"train loss {record['train_loss']:.3f}, test acc {100 * record['test_acc']:.2f} %, "
            f"{record['seconds']:.1f} s; {left.text()}"
        )

    def start(run: Run) -> None:
        what = f"{run.cfg.method} seed {run.cfg.seed}"
        log(f"run {run.number} of {len(runs)}: {what} ({left.text()})")

    train_runs(
        [Run(k, run_cfg, run_dir) for k, (run_cfg, run_dir) in enumerate(runs, 1)],
        data,
        jobs=jobs,
        progress=progress,
        on_start=start,
        on_epoch=append,
        on_end=lambda run, records: None,
    )
    records = _rebuild(combined, [d for _, d in runs])

    stats = mean_std_by(records, "epoch")
    evidence = compare_evidence(records, cfg.epochs)
    header = ["baseline test acc", "TrAct test acc", "TrAct - baseline [95% CI]"]
    log(f"\n{'epoch':>5}  {header[0]:>18}  {header[1]:>18}  {header[2]:>26}")
    for epoch in range(1, cfg.epochs + 1):
        cells = [
            f"{100 * stats[m][epoch][0]:6.2f} ± {100 * stats[m][epoch][1]:5.2f} %" for m in METHODS
        ]
        diff = Difference(**evidence["per_epoch_difference"][epoch]).text()
        log(f"{epoch:>5}  {cells[0]:>18}  {cells[1]:>18}  {diff:>26}")
    title = figure_title(cfg.model, cfg.dataset, len(seeds))
    summary = {
        "config": identity["config"],
        "code": code_identity(),
        "seeds": list(seeds),
        "title": title,
        "final": _finals(records, cfg.epochs),
        **evidence,
    }
    summary["verdict"] = compare_verdict(evidence, cfg.epochs)
    write_json(out / "summary.json", summary)
    plot_curves(records, out / "accuracy.png", title)
    final = summary["final"]
    log(f"\nfinal test accuracy over {len(seeds)} seeds (mean ± sample std):")
    for metric, label in (("top1", "top-1"), ("top5", "top-5")):
        if metric in final["baseline"]:
            b, t = final["baseline"][metric], final["tract"][metric]
            log(
                f"  {label}: baseline {100 * b['mean']:.2f} ± {100 * b['std']:.2f} %, "
                f"TrAct {100 * t['mean']:.2f} ± {100 * t['std']:.2f} %"
            )
    for line in summary["verdict"]:
        log(line)
    log(f"wrote {combined}, {out / 'summary.json'}, {out / 'accuracy.png'}")
    return summary


def _finals(records: list[dict[str, Any]], epochs: int) -> dict[str, Any]:
    """method -> metric -> mean and sample std over seeds at the last epoch; top-1's also as
    the method's own ``mean`` and ``std`` (the layout of earlier summaries)."""
    out: dict[str, Any] = {}
    for method in METHODS:
        out[method] = {}
        for metric, field in METRICS.items():
            by = mean_std_by(records, "epoch", field).get(method, {})
            if epochs in by:
                out[method][metric] = dict(zip(("mean", "std"), by[epochs][:2], strict=True))
        out[method].update(out[method]["top1"])
    return out


def sweep(
    cfg: Config,
    budgets: Sequence[int],
    seeds: Sequence[int],
    out_dir: str | Path,
    *,
    lams: Sequence[float] | None = None,
    config_for_budget: Callable[[int], Config] | None = None,
    jobs: int | None = 1,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """Every (budget, method, seed) run to its end, ``jobs`` at once (as :func:`compare`);
    finished runs are skipped on a rerun.

    ``lams`` sweeps TrAct's λ: each budget and seed then has one baseline run and one TrAct run
    per λ (the baseline does not depend on λ, so it is trained once), and TrAct's records carry
    their ``lam``. Without it TrAct runs with ``cfg.lam``.
    """
    out = Path(out_dir)
    make = config_for_budget or (lambda e: dataclasses.replace(cfg, epochs=e))
    budgets, seeds = _distinct("budgets", budgets), _distinct("seeds", seeds)
    identity: dict[str, Any] = {
        "config": {**dataclasses.asdict(cfg), "method": "*", "epochs": 0},
        "budgets": budgets,
        "seeds": seeds,
    }
    if lams is not None:
        lams = validate_lams(lams)
        identity["config"]["lam"] = "*"
        identity["lams"] = list(lams)
    # (config, λ or None, directory) of every run, checked before anything is written
    runs: list[tuple[Config, float | None, Path]] = []
    for e in budgets:
        budget_cfg = make(e)
        for s in seeds:
            base_cfg = dataclasses.replace(budget_cfg, seed=s)
            runs.append((base_cfg, None, out / f"baseline-e{e}-seed{s}"))
            for lam in lams or (None,):
                name = f"tract-e{e}-seed{s}" if lam is None else f"tract-lam{lam:g}-e{e}-seed{s}"
                tract_lam = lam if lam else budget_cfg.lam
                tract_cfg = dataclasses.replace(budget_cfg, method="tract", seed=s, lam=tract_lam)
                runs.append((tract_cfg, lam, out / name))
    device = resolve_device(cfg.device)
    jobs = default_jobs(device, len(runs)) if jobs is None else jobs
    env = environment(device)
    with claim(out, "sweep", identity, mutable=RESUMABLE_CHANGES, env=env):
        return _sweep(cfg, runs, seeds, lams, out, identity, jobs, progress, log)


def _sweep(
    cfg: Config,
    runs: list[tuple[Config, float | None, Path]],
    seeds: list[int],
    lams: tuple[float, ...] | None,
    out: Path,
    identity: dict[str, Any],
    jobs: int,
    progress: bool,
    log: Callable[[str], None],
) -> list[dict[str, Any]]:
    data = load_data(cfg, progress)
    finals_path = out / "sweep.jsonl"
    finals, done = [], set()
    left = TimeLeft([run_cfg.epochs for run_cfg, _, _ in runs], jobs)
    for run_cfg, lam, run_dir in runs:
        record = _final_record(run_dir)
        if record is not None:
            finals.append(_with_lam(record, lam))
            done.add(run_dir)
            left.skip(run_cfg.epochs)
    write_jsonl(finals_path, finals)
    lam_of, started = {}, {}
    to_train = []
    for k, (run_cfg, lam, run_dir) in enumerate(runs, 1):
        if run_dir in done:
            log(f"run {k} of {len(runs)}: skip {run_dir.name}: finished")
        else:
            to_train.append(Run(k, run_cfg, run_dir))
            lam_of[k] = lam

    def start(run: Run) -> None:
        log(f"run {run.number} of {len(runs)}: {run.out.name} ({left.text()})")
        started[run.number] = time.perf_counter()

    def end(run: Run, records: list[dict[str, Any]]) -> None:
        record = {**_with_lam(records[-1], lam_of[run.number]), "code": code_identity()}
        append_jsonl(finals_path, record)
        finals.append(record)
        log(
            f"{run.out.name}: test accuracy {100 * record['test_acc']:.2f} % "
            f"({_duration(time.perf_counter() - started[run.number])})"
        )

    train_runs(
        to_train, data, jobs=jobs, progress=progress, on_start=start, on_epoch=left.add, on_end=end
    )
    title = figure_title(cfg.model, cfg.dataset, len(seeds))
    plot_budgets(finals, out / "budgets.png", title)
    if lams is not None:
        plot_lams(finals, out / "lams.png", title)
    rows = sweep_evidence(finals)
    summary = {"config": identity, "code": code_identity(), "title": title, "budgets": rows}
    write_json(out / "summary.json", summary)
    log(
        f"\n{'budget':>6}  {'variant':>14}  {'baseline':>16}  {'TrAct':>16}  "
        f"{'TrAct - baseline [95% CI]':>26}  verdict"
    )
    for row in rows:
        for prefix, label in (("", "top-1"), ("top5_", "top-5")):
            if f"{prefix}difference" not in row:
                continue
            b, t = row[f"{prefix}baseline"], row[f"{prefix}tract"]
            name = row["variant"] if not prefix else f"{label}"
            log(
                f"{row['epochs'] if not prefix else '':>6}  {name:>14}  "
                f"{100 * b['mean']:6.2f} ± {100 * b['std']:5.2f} %  "
                f"{100 * t['mean']:6.2f} ± {100 * t['std']:5.2f} %  "
                f"{Difference(**row[f'{prefix}difference']).text():>26}  {row[f'{prefix}verdict']}"
            )
    return finals


def validate_lams(lams: Sequence[float]) -> tuple[float, ...]:
    """The λ values of a sweep: at least one, each positive and finite, none repeated."""
    if not lams:
        raise ValueError("lams must name at least one λ")
    bad = [lam for lam in lams if not (_is_number(lam) and math.isfinite(lam) and lam > 0)]
    if bad:
        raise ValueError(f"each λ must be a positive finite number, got {bad}")
    lams = tuple(float(lam) for lam in lams)
    repeated = sorted({lam for lam in lams if lams.count(lam) > 1})
    if repeated:
        raise ValueError(f"λ values repeated: {repeated}; each would be trained once")
    return lams


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _with_lam(record: dict[str, Any], lam: float | None) -> dict[str, Any]:
    return record if lam is None else {**record, "lam": lam}


def _final_record(run_dir: Path) -> dict[str, Any] | None:
    """The last epoch of a run that reached its budget; None if it has not."""
    if (run_dir / "results.jsonl").exists():
        records = read_jsonl(run_dir / "results.jsonl")
        if records and records[-1]["epoch"] == records[-1]["epochs"]:
            return records[-1]
    return None
