"""The figures: test accuracy against epoch (compare) and final accuracy against epoch budget
(sweep, like the paper's Figure 3), each as mean ± std over seeds."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from statistics import mean, stdev

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from trainact.experiments.rundir import read_jsonl  # noqa: E402

COLORS = {"baseline": "tab:blue", "tract": "tab:red"}
LABELS = {"baseline": "baseline", "tract": "TrAct"}


def mean_std_by(records: list[dict], key: str) -> dict[str, dict[int, tuple[float, float, int]]]:
    """method -> key value -> (mean, sample std (0 for one seed), count) of test accuracy."""
    groups: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        groups[r["method"]][r[key]].append(r["test_acc"])
    return {
        m: {k: (mean(v), stdev(v) if len(v) > 1 else 0.0, len(v)) for k, v in sorted(by.items())}
        for m, by in groups.items()
    }


def _draw(stats, path: Path, xlabel: str, title: str, log_x: bool) -> Path:
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for method, by in sorted(stats.items()):
        xs = list(by)
        mu = [100 * by[x][0] for x in xs]
        sd = [100 * by[x][1] for x in xs]
        color = COLORS.get(method)
        ax.plot(xs, mu, marker="o", ms=3, color=color, label=LABELS.get(method, method))
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
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)
    return path


def plot_curves(records: list[dict], path: Path, title: str = "") -> Path:
    """Test accuracy against epoch, mean ± std band over seeds."""
    return _draw(mean_std_by(records, "epoch"), path, "epoch", title, log_x=False)


def plot_budgets(records: list[dict], path: Path, title: str = "") -> Path:
    """Final test accuracy against epoch budget, mean ± std over seeds."""
    return _draw(mean_std_by(records, "epochs"), path, "epoch budget", title, log_x=True)


def plot_dir(directory: Path) -> Path:
    """Redraw the figure of a compare or sweep output directory."""
    if (directory / "sweep.jsonl").exists():
        return plot_budgets(read_jsonl(directory / "sweep.jsonl"), directory / "budgets.png")
    if (directory / "results.jsonl").exists():
        return plot_curves(read_jsonl(directory / "results.jsonl"), directory / "accuracy.png")
    raise FileNotFoundError(f"{directory} holds neither sweep.jsonl nor results.jsonl")
