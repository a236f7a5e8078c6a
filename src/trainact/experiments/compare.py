"""Baseline against TrAct, same initialization, data order and hyperparameters, over seeds;
and the sweep over epoch budgets (and λ). Both resume: finished epochs and runs are never redone,
and both state the difference with its uncertainty (:mod:`trainact.experiments.evidence`)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from pathlib import Path

from trainact.experiments.data import ImageDataset
from trainact.experiments.evidence import (
    Difference,
    compare_evidence,
    compare_verdict,
    sweep_evidence,
)
from trainact.experiments.plot import mean_std_by, plot_budgets, plot_curves, plot_lams
from trainact.experiments.rundir import append_jsonl, claim, read_jsonl, write_json, write_jsonl
from trainact.experiments.train import METHODS, RESUMABLE_CHANGES, Config, load_data, train


def _distinct(name: str, values: Sequence[int]) -> list[int]:
    """``values`` as a list; ValueError when one repeats (it would count one run twice)."""
    repeated = sorted({v for v in values if list(values).count(v) > 1})
    if repeated or not values:
        raise ValueError(
            f"--{name} must list distinct values, got {list(values)}"
            + (f" ({', '.join(map(str, repeated))} repeated)" if repeated else "")
        )
    return list(values)


def _rebuild(path: Path, run_dirs: Sequence[Path], name: str = "results.jsonl") -> list[dict]:
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
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict:
    """Train baseline and TrAct for each seed; write results.jsonl, summary.json (the numbers of
    :func:`~trainact.experiments.evidence.compare_evidence` and the verdict in words) and
    accuracy.png (against epochs and against training time).

    ``data`` replaces the dataset ``cfg`` names (already loaded, for tests and notebooks).
    ``out_dir`` is claimed for this comparison; rerun with the same values it resumes.
    """
    out = Path(out_dir)
    seeds = _distinct("seeds", seeds)
    for seed in seeds:
        dataclasses.replace(cfg, seed=seed).validate()
    identity = {
        "config": dataclasses.asdict(dataclasses.replace(cfg, method="*")),
        "seeds": seeds,
    }
    with claim(out, "compare", identity, mutable=RESUMABLE_CHANGES) as resuming:
        if resuming:
            log(f"resuming the comparison in {out}")
        return _compare(cfg, seeds, out, identity, data, progress, log)


def _compare(
    cfg: Config,
    seeds: list[int],
    out: Path,
    identity: dict,
    data: ImageDataset | None,
    progress: bool,
    log: Callable[[str], None],
) -> dict:
    if data is None:
        data = load_data(cfg, progress)
    log(
        f"{data.name}: {len(data.train_labels)} train / {len(data.test_labels)} test images; "
        f"model {cfg.model}, {cfg.epochs} epochs, batch {cfg.batch_size}, {cfg.optimizer} "
        f"lr {cfg.lr:g}, seeds {list(seeds)}"
    )
    runs = [(m, s, out / f"{m}-seed{s}") for s in seeds for m in METHODS]
    combined = out / "results.jsonl"
    _rebuild(combined, [d for _, _, d in runs])

    def append(record: dict) -> None:
        append_jsonl(combined, record)
        log(
            f"{record['method']:>8} seed {record['seed']} epoch {record['epoch']}/{cfg.epochs}: "
            f"train loss {record['train_loss']:.3f}, test acc {100 * record['test_acc']:.2f} %, "
            f"{record['seconds']:.1f} s"
        )

    for method, seed, run_dir in runs:
        run_cfg = dataclasses.replace(cfg, method=method, seed=seed)
        train(run_cfg, run_dir, resume=True, data=data, on_epoch=append, progress=progress)
    records = _rebuild(combined, [d for _, _, d in runs])

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
    summary = {
        "config": identity["config"],
        "seeds": list(seeds),
        "final": {
            m: {"mean": stats[m][cfg.epochs][0], "std": stats[m][cfg.epochs][1]} for m in METHODS
        },
        **evidence,
    }
    summary["verdict"] = compare_verdict(evidence, cfg.epochs)
    write_json(out / "summary.json", summary)
    plot_curves(records, out / "accuracy.png", f"{cfg.model} on {data.name}, {len(seeds)} seeds")
    final = summary["final"]
    log(
        f"\nfinal test accuracy over {len(seeds)} seeds: "
        f"baseline {100 * final['baseline']['mean']:.2f} ± {100 * final['baseline']['std']:.2f} %,"
        f" TrAct {100 * final['tract']['mean']:.2f} ± {100 * final['tract']['std']:.2f} %"
    )
    for line in summary["verdict"]:
        log(line)
    log(f"wrote {combined}, {out / 'summary.json'}, {out / 'accuracy.png'}")
    return summary


def sweep(
    cfg: Config,
    budgets: Sequence[int],
    seeds: Sequence[int],
    out_dir: str | Path,
    *,
    lams: Sequence[float] | None = None,
    config_for_budget: Callable[[int], Config] | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> list[dict]:
    """Every (budget, method, seed) run to its end; finished runs are skipped on a rerun.

    ``lams`` sweeps TrAct's λ: each budget and seed then has one baseline run and one TrAct run
    per λ (the baseline does not depend on λ, so it is trained once), and TrAct's records carry
    their ``lam``. Without it TrAct runs with ``cfg.lam``.
    """
    out = Path(out_dir)
    make = config_for_budget or (lambda e: dataclasses.replace(cfg, epochs=e))
    budgets, seeds = _distinct("budgets", budgets), _distinct("seeds", seeds)
    configs = {e: make(e) for e in budgets}
    for run_cfg in configs.values():
        for seed in seeds:
            dataclasses.replace(run_cfg, seed=seed).validate()
    identity: dict = {
        "config": dataclasses.asdict(dataclasses.replace(cfg, method="*", epochs=0)),
        "budgets": budgets,
        "seeds": seeds,
    }
    if lams is not None:
        lams = validate_lams(lams)
        identity["config"]["lam"] = "*"
        identity["lams"] = list(lams)
    with claim(out, "sweep", identity, mutable=RESUMABLE_CHANGES):
        return _sweep(cfg, configs, seeds, lams, out, identity, progress, log)


def _sweep(
    cfg: Config,
    configs: dict[int, Config],
    seeds: list[int],
    lams: tuple[float, ...] | None,
    out: Path,
    identity: dict,
    progress: bool,
    log: Callable[[str], None],
) -> list[dict]:
    budgets = list(configs)
    data = load_data(cfg, progress)
    runs = [
        (e, s, "baseline", None, out / f"baseline-e{e}-seed{s}") for e in budgets for s in seeds
    ]
    for e in budgets:
        for s in seeds:
            for lam in lams or (None,):
                name = f"tract-e{e}-seed{s}" if lam is None else f"tract-lam{lam:g}-e{e}-seed{s}"
                runs.append((e, s, "tract", lam, out / name))
    runs.sort(key=lambda run: (run[0], run[1]))  # by budget, then seed: baseline first
    finals_path = out / "sweep.jsonl"
    finals, done = [], set()
    for *_, lam, run_dir in runs:
        record = _final_record(run_dir)
        if record is not None:
            finals.append(_with_lam(record, lam))
            done.add(run_dir)
    write_jsonl(finals_path, finals)
    for epochs, seed, method, lam, run_dir in runs:
        if run_dir in done:
            log(f"skip {run_dir.name}: finished")
            continue
        run_cfg = dataclasses.replace(configs[epochs], method=method, seed=seed)
        if lam is not None:
            run_cfg = dataclasses.replace(run_cfg, lam=lam)
        record = train(run_cfg, run_dir, resume=True, data=data, progress=progress)[-1]
        record = _with_lam(record, lam)
        append_jsonl(finals_path, record)
        finals.append(record)
        log(f"{run_dir.name}: test accuracy {100 * record['test_acc']:.2f} %")
    title = f"{cfg.model} on {data.name}"
    plot_budgets(finals, out / "budgets.png", title)
    if lams is not None:
        plot_lams(finals, out / "lams.png", title)
    rows = sweep_evidence(finals)
    write_json(out / "summary.json", {"config": identity, "budgets": rows})
    log(
        f"\n{'budget':>6}  {'variant':>14}  {'baseline':>16}  {'TrAct':>16}  "
        f"{'TrAct - baseline [95% CI]':>26}  verdict"
    )
    for row in rows:
        b, t = row["baseline"], row["tract"]
        log(
            f"{row['epochs']:>6}  {row['variant']:>14}  "
            f"{100 * b['mean']:6.2f} ± {100 * b['std']:5.2f} %  "
            f"{100 * t['mean']:6.2f} ± {100 * t['std']:5.2f} %  "
            f"{Difference(**row['difference']).text():>26}  {row['verdict']}"
        )
    return finals


def validate_lams(lams: Sequence[float]) -> tuple[float, ...]:
    """The λ values of a sweep: at least one, each positive and finite, none repeated."""
    lams = tuple(float(lam) for lam in lams)
    if not lams:
        raise ValueError("lams must name at least one λ")
    bad = [lam for lam in lams if not (lam > 0 and math.isfinite(lam))]
    if bad:
        raise ValueError(f"every λ must be a positive number, got {bad}")
    repeated = sorted({lam for lam in lams if lams.count(lam) > 1})
    if repeated:
        raise ValueError(f"λ values repeated: {repeated}; each would be trained once")
    return lams


def _with_lam(record: dict, lam: float | None) -> dict:
    return record if lam is None else {**record, "lam": lam}


def _final_record(run_dir: Path) -> dict | None:
    """The last epoch of a run that reached its budget; None if it has not."""
    if (run_dir / "results.jsonl").exists():
        records = read_jsonl(run_dir / "results.jsonl")
        if records and records[-1]["epoch"] == records[-1]["epochs"]:
            return records[-1]
    return None
