"""The figures: test accuracy against epoch and against wall-clock time (compare), and final
accuracy against epoch budget (sweep, like the paper's Figure 3), each as mean ± std over seeds."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from statistics import mean, stdev

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from trainact.experiments.evidence import Difference, compare_evidence, variant  # noqa: E402
from trainact.experiments.rundir import read_jsonl  # noqa: E402

COLORS = {"baseline": "tab:blue", "tract": "tab:red"}
LABELS = {"baseline": "baseline", "tract": "TrAct"}
X_AXES = ("epoch", "time")


def mean_std_by(records: list[dict], key: str) -> dict[str, dict[int, tuple[float, float, int]]]:
    """variant -> key value -> (mean, sample std (0 for one seed), count) of test accuracy."""
    groups: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        groups[variant(r)][r[key]].append(r["test_acc"])
    return {
        m: {k: (mean(v), stdev(v) if len(v) > 1 else 0.0, len(v)) for k, v in sorted(by.items())}
        for m, by in groups.items()
    }


def curve_points(records: list[dict], x: str) -> dict[str, list[tuple[float, float, float]]]:
    """variant -> [(x, mean, std) of test accuracy] per epoch; x is the epoch or, for "time",
    the wall-clock seconds of training up to the end of that epoch, averaged over seeds."""
    if x not in X_AXES:
        raise ValueError(f"x must be one of {', '.join(X_AXES)}, got {x!r}")
    elapsed: dict[tuple[str, int], dict[int, float]] = defaultdict(dict)
    for r in sorted(records, key=lambda r: r["epoch"]):
        run = elapsed[variant(r), r["seed"]]
        run[r["epoch"]] = run.get(r["epoch"] - 1, 0.0) + r["seconds"]
    points = {}
    for name, by in mean_std_by(records, "epoch").items():
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


def _draw_panel(ax, points, xlabel: str, title: str, log_x: bool) -> None:
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
    if log_x:
        ax.set_xscale("log", base=2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)
    return path


def plot_curves(
    records: list[dict], path: Path, title: str = "", x: tuple[str, ...] = X_AXES
) -> Path:
    """Test accuracy, mean ± std band over seeds, against each of ``x``: one panel per axis,
    "epoch" and "time" (wall-clock seconds of training, see :func:`curve_points`)."""
    fig, axes = plt.subplots(1, len(x), figsize=(6 * len(x), 4), dpi=120, squeeze=False)
    xlabels = {"epoch": "epoch", "time": "training time (s, mean over seeds)"}
    for ax, axis in zip(axes[0], x, strict=True):
        _draw_panel(ax, curve_points(records, axis), xlabels[axis], title, log_x=False)
        if axis == "epoch":
            ax.xaxis.get_major_locator().set_params(integer=True)
    return _save(fig, path)


def plot_budgets(records: list[dict], path: Path, title: str = "") -> Path:
    """Final test accuracy against epoch budget, mean ± std over seeds."""
    points = {
        name: [(k, mu, sd) for k, (mu, sd, _) in by.items()]
        for name, by in mean_std_by(records, "epochs").items()
    }
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    _draw_panel(ax, points, "epoch budget", title, log_x=True)
    return _save(fig, path)


def plot_lams(records: list[dict], path: Path, title: str = "") -> Path:
    """A λ sweep: TrAct's final accuracy against λ, one line per budget, mean ± std over seeds;
    the baseline of each budget as a dashed line with its band."""
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    stats = mean_std_by(records, "epochs")
    budgets = sorted({r["epochs"] for r in records})
    shades = plt.get_cmap("viridis")
    for i, budget in enumerate(budgets):
        color = shades(i / max(1, len(budgets) - 1) * 0.85)
        lam_of = {variant(r): r["lam"] for r in records if r.get("lam") is not None}
        rows = sorted(
            (lam, *stats[name][budget][:2]) for name, lam in lam_of.items() if budget in stats[name]
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
    ax.set_xscale("log")
    ax.set_xlabel("λ")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def plot_finals(directories: list[Path], path: Path, title: str = "") -> Path:
    """Final test accuracy of several compare directories side by side (mean ± std over seeds),
    each labelled with its directory name and the paired TrAct − baseline difference [95% CI]."""
    fig, ax = plt.subplots(figsize=(max(6, 2.2 * len(directories)), 4), dpi=120)
    labels = []
    for i, directory in enumerate(directories):
        results = directory / "results.jsonl"
        records = read_jsonl(results) if results.is_file() else []
        if not records:
            raise FileNotFoundError(f"{directory} holds no compare results.jsonl")
        epochs = max(r["epochs"] for r in records)
        final = [r for r in records if r["epoch"] == epochs]
        for j, (name, (mu, sd, _)) in enumerate(
            (name, by[epochs]) for name, by in sorted(mean_std_by(final, "epoch").items())
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
        diff = Difference(**compare_evidence(records, epochs)["final_difference"])
        labels.append(f"{directory.name}\n{diff.text()}")
    ax.set_xticks(range(len(directories)), labels)
    ax.set_xlim(-0.6, len(directories) - 0.4)
    ax.set_ylabel("final test accuracy (%)")
    ax.set_title(title or "final accuracy; below: TrAct − baseline [95% CI], points")
    ax.grid(alpha=0.3, axis="y")
    ax.legend()
    return _save(fig, path)


def plot_dir(directory: Path, x: tuple[str, ...] = X_AXES) -> Path:
    """Redraw the figure of a compare or sweep output directory; ``x``: a compare's axes."""
    if (directory / "sweep.jsonl").exists():
        finals = read_jsonl(directory / "sweep.jsonl")
        if any(r.get("lam") is not None for r in finals):
            plot_lams(finals, directory / "lams.png")
        return plot_budgets(finals, directory / "budgets.png")
    if (directory / "results.jsonl").exists():
        records = read_jsonl(directory / "results.jsonl")
        return plot_curves(records, directory / "accuracy.png", x=x)
    raise FileNotFoundError(f"{directory} holds neither sweep.jsonl nor results.jsonl")
