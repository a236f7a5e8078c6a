"""Baseline against TrAct, same initialization, data order and hyperparameters, over seeds;
and the sweep over epoch budgets. Both resume: finished epochs and runs are never redone."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path

from trainact.experiments.data import ImageDataset
from trainact.experiments.plot import mean_std_by, plot_budgets, plot_curves
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


def speedup(records: list[dict], epochs: int) -> dict:
    """Epochs TrAct needs (mean over seeds) to reach the baseline's final mean accuracy."""
    stats = mean_std_by(records, "epoch")
    target = stats["baseline"][epochs][0]
    reached = next((e for e, (m, _, _) in stats["tract"].items() if m >= target), None)
    return {
        "baseline_final_acc": target,
        "tract_epochs_to_baseline_final": reached,
        "speedup": epochs / reached if reached else None,
    }


def compare(
    cfg: Config,
    seeds: Sequence[int],
    out_dir: str | Path,
    *,
    data: ImageDataset | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict:
    """Train baseline and TrAct for each seed; write results.jsonl, summary.json, accuracy.png.

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
    log(f"\n{'epoch':>5}  {'baseline test acc':>18}  {'TrAct test acc':>18}")
    for epoch in range(1, cfg.epochs + 1):
        cells = [
            f"{100 * stats[m][epoch][0]:6.2f} ± {100 * stats[m][epoch][1]:5.2f} %" for m in METHODS
        ]
        log(f"{epoch:>5}  {cells[0]:>18}  {cells[1]:>18}")
    summary = {
        "config": identity["config"],
        "seeds": list(seeds),
        "final": {
            m: {"mean": stats[m][cfg.epochs][0], "std": stats[m][cfg.epochs][1]} for m in METHODS
        },
        **speedup(records, cfg.epochs),
    }
    write_json(out / "summary.json", summary)
    plot_curves(records, out / "accuracy.png", f"{cfg.model} on {data.name}, {len(seeds)} seeds")
    final = summary["final"]
    log(
        f"\nfinal test accuracy over {len(seeds)} seeds: "
        f"baseline {100 * final['baseline']['mean']:.2f} ± {100 * final['baseline']['std']:.2f} %,"
        f" TrAct {100 * final['tract']['mean']:.2f} ± {100 * final['tract']['std']:.2f} %"
    )
    reached = summary["tract_epochs_to_baseline_final"]
    log(
        f"TrAct reached the baseline's final accuracy after {reached} of {cfg.epochs} epochs "
        f"(speed-up {summary['speedup']:.2f}x)"
        if reached
        else "TrAct did not reach the baseline's final accuracy within the budget"
    )
    log(f"wrote {combined}, {out / 'summary.json'}, {out / 'accuracy.png'}")
    return summary


def sweep(
    cfg: Config,
    budgets: Sequence[int],
    seeds: Sequence[int],
    out_dir: str | Path,
    *,
    config_for_budget: Callable[[int], Config] | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> list[dict]:
    """Every (budget, method, seed) run to its end; finished runs are skipped on a rerun."""
    out = Path(out_dir)
    make = config_for_budget or (lambda e: dataclasses.replace(cfg, epochs=e))
    budgets, seeds = _distinct("budgets", budgets), _distinct("seeds", seeds)
    configs = {e: make(e) for e in budgets}
    for run_cfg in configs.values():
        for seed in seeds:
            dataclasses.replace(run_cfg, seed=seed).validate()
    identity = {
        "config": dataclasses.asdict(dataclasses.replace(cfg, method="*", epochs=0)),
        "budgets": budgets,
        "seeds": seeds,
    }
    with claim(out, "sweep", identity, mutable=RESUMABLE_CHANGES):
        return _sweep(cfg, configs, seeds, out, progress, log)


def _sweep(
    cfg: Config,
    configs: dict[int, Config],
    seeds: list[int],
    out: Path,
    progress: bool,
    log: Callable[[str], None],
) -> list[dict]:
    budgets = list(configs)
    data = load_data(cfg, progress)
    runs = [(e, m, s, out / f"{m}-e{e}-seed{s}") for e in budgets for s in seeds for m in METHODS]
    finals_path = out / "sweep.jsonl"
    finals = [r for r in _final_records(run_dirs=[d for *_, d in runs])]
    write_jsonl(finals_path, finals)
    done = {(r["epochs"], r["method"], r["seed"]) for r in finals}
    for epochs, method, seed, run_dir in runs:
        if (epochs, method, seed) in done:
            log(f"skip {run_dir.name}: finished")
            continue
        run_cfg = dataclasses.replace(configs[epochs], method=method, seed=seed)
        record = train(run_cfg, run_dir, resume=True, data=data, progress=progress)[-1]
        append_jsonl(finals_path, record)
        finals.append(record)
        log(f"{run_dir.name}: test accuracy {100 * record['test_acc']:.2f} %")
    plot_budgets(finals, out / "budgets.png", f"{cfg.model} on {data.name}")
    for budget, (m_b, s_b, _), (m_t, s_t, _) in _rows(finals):
        log(
            f"{budget:>5} epochs: baseline {100 * m_b:.2f} ± {100 * s_b:.2f} %, "
            f"TrAct {100 * m_t:.2f} ± {100 * s_t:.2f} %"
        )
    return finals


def _final_records(run_dirs: Sequence[Path]) -> list[dict]:
    """The last epoch of every run that reached its budget."""
    finals = []
    for d in run_dirs:
        if (d / "results.jsonl").exists():
            records = read_jsonl(d / "results.jsonl")
            if records and records[-1]["epoch"] == records[-1]["epochs"]:
                finals.append(records[-1])
    return finals


def _rows(finals: list[dict]):
    stats = mean_std_by(finals, "epochs")
    if set(stats) != set(METHODS):
        return []
    budgets = sorted(set(stats["baseline"]) & set(stats["tract"]))
    return [(b, stats["baseline"][b], stats["tract"][b]) for b in budgets]
