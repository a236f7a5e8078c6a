"""The figures: test accuracy against epoch and against wall-clock time (compare), and final
accuracy against epoch budget (sweep, like the paper's Figure 3), each as the mean over seeds
with a shaded band of ± one sample standard deviation; top-1 accuracy, or top-5 where asked."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from statistics import mean
from typing import TYPE_CHECKING, Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from trainact.experiments.evidence import (  # noqa: E402
    METRICS,
    Difference,
    compare_evidence,
    mean_std_by,
    variant,
)
from trainact.experiments.rundir import read_json, read_jsonl, write_atomic  # noqa: E402

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

#: variant -> [(x, mean, std)]: one curve of a figure
Points = dict[str, list[tuple[float, float, float]]]

COLORS = {"baseline": "tab:blue", "tract": "tab:red"}
LABELS = {"baseline": "baseline", "tract": "TrAct"}
X_AXES = ("epoch", "time")
METRIC_LABELS = {"top1": "test accuracy (%)", "top5": "top-5 test accuracy (%)"}


def _field(metric: str) -> str:
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {', '.join(METRICS)}, got {metric!r}")
    return METRICS[metric]


def curve_points(records: list[dict[str, Any]], x: str, metric: str = "top1") -> Points:
    """variant -> [(x, mean, std) of test accuracy] per epoch; x is the epoch or, for "time",
    the wall-clock seconds of training up to the end of that epoch, averaged over seeds."""
    if x not in X_AXES:
        raise ValueError(f"x must be one of {', '.join(X_AXES)}, got {x!r}")
    elapsed: dict[tuple[str, int], dict[int, float]] = defaultdict(dict)
    for r in sorted(records, key=lambda r: r["epoch"]):
        run = elapsed[variant(r), r["seed"]]
        run[r["epoch"]] = run.get(r["epoch"] - 1, 0.0) + r["seconds"]
    points = {}
    for name, by in _require(mean_std_by(records, "epoch", _field(metric)), metric).items():
        points[name] = [
            (
                epoch
                if x == "epoch"
                else mean(t[epoch] for (v, _), t in elapsed.items() if v == name and epoch in t),
                mu,
                sd,
            )
            for epoch, (mu, sd, _) in by.items()
        ]
    return points


def _require(points: dict[str, Any], metric: str) -> dict[str, Any]:
    if not points:
        raise ValueError(
            f"the records hold no {metric} accuracy (it is recorded for more than 5 classes)"
        )
    return points


def _seeds(records: list[dict[str, Any]]) -> int:
    return len({r["seed"] for r in records})


def _draw_panel(ax: Axes, points: Points, xlabel: str, ylabel: str, title: str, seeds: int) -> None:
    names = sorted(points, key=lambda n: (n != "baseline", float(n.partition("=")[2] or 0), n))
    shades = plt.get_cmap("autumn")
    for i, name in enumerate(names):
        xs = [p[0] for p in points[name]]
        mu = [100 * p[1] for p in points[name]]
        sd = [100 * p[2] for p in points[name]]
        color = COLORS.get(name) or shades(i / max(1, len(names) - 1) * 0.8)
        label = LABELS.get(name) or name.replace("tract", "TrAct")
        ax.plot(xs, mu, marker="o", ms=3, color=color, label=label)
        ax.fill_between(
            xs,
            [a - b for a, b in zip(mu, sd, strict=True)],
            [a + b for a, b in zip(mu, sd, strict=True)],
            color=color,
            alpha=0.2,
        )
    band = Patch(color="gray", alpha=0.3, label=f"shaded: ± 1 std over {seeds} seeds")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(handles=[*ax.get_legend_handles_labels()[0], band])


def _save(fig: Figure, path: Path) -> Path:
    fig.tight_layout()
    write_atomic(path, lambda f: fig.savefig(f, format="png"))
    plt.close(fig)
    return path


def plot_curves(
    records: list[dict[str, Any]],
    path: Path,
    title: str = "",
    x: tuple[str, ...] = X_AXES,
    metric: str = "top1",
) -> Path:
    """Test accuracy, mean ± std band over seeds, against each of ``x``: one panel per axis,
    "epoch" and "time" (wall-clock seconds of training, see :func:`curve_points`)."""
    fig, axes = plt.subplots(1, len(x), figsize=(6 * len(x), 4), dpi=120, squeeze=False)
    xlabels = {"epoch": "epoch", "time": "training time (s, mean over seeds)"}
    for ax, axis in zip(axes[0], x, strict=True):
        points = curve_points(records, axis, metric)
        _draw_panel(ax, points, xlabels[axis], METRIC_LABELS[metric], title, _seeds(records))
        if axis == "epoch":
            ax.xaxis.get_major_locator().set_params(integer=True)
    return _save(fig, path)


def plot_budgets(
    records: list[dict[str, Any]], path: Path, title: str = "", metric: str = "top1"
) -> Path:
    """Final test accuracy against epoch budget (a log axis labelled 1 2 4 8 ...), mean ± std
    over seeds."""
    points = {
        name: [(k, mu, sd) for k, (mu, sd, _) in by.items()]
        for name, by in _require(mean_std_by(records, "epochs", _field(metric)), metric).items()
    }
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    _draw_panel(ax, points, "epoch budget", METRIC_LABELS[metric], title, _seeds(records))
    budgets = sorted({r["epochs"] for r in records})
    ax.set_xscale("log", base=2)
    ax.set_xticks(budgets, [str(b) for b in budgets])
    ax.minorticks_off()
    return _save(fig, path)


def plot_lams(
    records: list[dict[str, Any]], path: Path, title: str = "", metric: str = "top1"
) -> Path:
    """A λ sweep: TrAct's final accuracy against λ, one line per budget, mean ± std over seeds
    (error bars); the baseline of each budget as a dashed line with its ± std band."""
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    stats = _require(mean_std_by(records, "epochs", _field(metric)), metric)
    budgets = sorted({r["epochs"] for r in records})
    shades = plt.get_cmap("viridis")
    for i, budget in enumerate(budgets):
        color = shades(i / max(1, len(budgets) - 1) * 0.85)
        lam_of = {variant(r): r["lam"] for r in records if r.get("lam") is not None}
        rows = sorted(
            (lam, *stats[name][budget][:2])
            for name, lam in lam_of.items()
            if budget in stats.get(name, {})
        )
        lams = [lam for lam, _, _ in rows]
        mu, sd = [100 * m for _, m, _ in rows], [100 * d for _, _, d in rows]
        ax.errorbar(
            lams, mu, sd, marker="o", ms=4, capsize=3, color=color, label=f"TrAct, {budget} ep."
        )
        if budget in stats.get("baseline", {}):
            b_mu, b_sd = (100 * v for v in stats["baseline"][budget][:2])
            ax.axhline(b_mu, ls="--", color=color, label=f"baseline, {budget} ep.")
            ax.axhspan(b_mu - b_sd, b_mu + b_sd, color=color, alpha=0.12)
    band = Patch(
        color="gray", alpha=0.3, label=f"bars, shaded: ± 1 std over {_seeds(records)} seeds"
    )
    ax.set_xscale("log")
    ax.set_xlabel("λ")
    ax.set_ylabel(METRIC_LABELS[metric])
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(handles=[*ax.get_legend_handles_labels()[0], band])
    return _save(fig, path)


def plot_finals(directories: list[Path], path: Path, title: str = "", metric: str = "top1") -> Path:
    """Final test accuracy of several compare directories side by side (mean ± std over seeds),
    each labelled with its directory name and the paired TrAct − baseline difference [95% CI]."""
    field = _field(metric)
    fig, ax = plt.subplots(figsize=(max(6, 2.2 * len(directories)), 4), dpi=120)
    labels = []
    for i, directory in enumerate(directories):
        results = directory / "results.jsonl"
        records = read_jsonl(results) if results.is_file() else []
        if not records:
            raise FileNotFoundError(f"{directory} holds no compare results.jsonl")
        epochs = max(r["epochs"] for r in records)
        final = [r for r in records if r["epoch"] == epochs]
        if not any(r.get(field) is not None for r in final):
            raise ValueError(f"{results} records no {metric} accuracy")
        for j, (name, (mu, sd, _)) in enumerate(
            (name, by[epochs]) for name, by in sorted(mean_std_by(final, "epoch", field).items())
        ):
            ax.errorbar(
                i + 0.12 * (2 * j - 1),
                100 * mu,
                100 * sd,
                marker="o",
                capsize=4,
                color=COLORS.get(name),
                label=LABELS.get(name, name) if i == 0 else None,
            )
        evidence = compare_evidence(records, epochs)
        key = "final_difference" if metric == "top1" else "final_top5_difference"
        labels.append(f"{directory.name}\n{Difference(**evidence[key]).text()}")
    ax.set_xticks(range(len(directories)), labels)
    ax.set_xlim(-0.6, len(directories) - 0.4)
    ax.set_ylabel(f"final {METRIC_LABELS[metric]}")
    ax.set_title(title or "final accuracy, bars ± 1 std over seeds")
    ax.set_xlabel("below each: TrAct − baseline, paired [95% CI], points")
    ax.grid(alpha=0.3, axis="y")
    ax.legend()
    return _save(fig, path)


def saved_title(directory: Path) -> str:
    """The title a compare or sweep gave its figure (``summary.json``), else one made from its
    ``job.json`` (model, dataset and seeds), else none; a file that does not parse gives none
    (the figure is drawn from the results, which are checked)."""
    for name in ("summary.json", "job.json"):
        path = directory / name
        if not path.is_file():
            continue
        try:
            saved = read_json(path)
        except ValueError:
            continue
        if not isinstance(saved, dict):
            continue
        title = saved.get("title")
        if isinstance(title, str):
            return title
        job = saved.get("config", {})
        job = job if "config" in job else saved  # a sweep's summary nests its job identity
        if not isinstance(job, dict):
            continue
        config = job.get("config", {})
        if isinstance(config, dict) and "model" in config and "dataset" in config:
            return figure_title(config["model"], config["dataset"], len(job.get("seeds", [])))
    return ""


def figure_title(model: str, dataset: str, seeds: int) -> str:
    """``resnet-tiny on cifar10-subset, 3 seeds``: the title of a compare's or sweep's figure."""
    name = Path(dataset).name
    for suffix in (".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".tar"):
        name = name.removesuffix(suffix)
    return f"{model} on {name}" + (f", {seeds} seeds" if seeds else "")


def plot_dir(directory: Path, x: tuple[str, ...] = X_AXES, metric: str = "top1") -> Path:
    """Redraw the figure of a compare or sweep output directory, with its title; ``x``: a
    compare's axes."""
    title = saved_title(directory)
    if (directory / "sweep.jsonl").exists():
        finals = read_jsonl(directory / "sweep.jsonl")
        if any(r.get("lam") is not None for r in finals):
            plot_lams(finals, directory / "lams.png", title, metric)
        return plot_budgets(finals, directory / "budgets.png", title, metric)
    if (directory / "results.jsonl").exists():
        records = read_jsonl(directory / "results.jsonl")
        return plot_curves(records, directory / "accuracy.png", title, x, metric)
    raise FileNotFoundError(f"{directory} holds neither sweep.jsonl nor results.jsonl")
