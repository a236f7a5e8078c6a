"""What a comparison shows, with its uncertainty over seeds: paired differences, confidence
intervals and the speed-up rule behind the verdicts of ``trainact compare`` and ``sweep``.

Runs of one seed share the initialization and the data order, so TrAct and the baseline are
compared seed by seed: the difference ``d_s = TrAct_s - baseline_s`` of each seed, its mean over
the ``n`` seeds and the 95% confidence interval ``mean ± t(0.975, n - 1) · std(d) / √n``
(Student's t, no scipy needed). With fewer than 3 seeds, or differences that are all equal (no
spread), the interval cannot be estimated and nothing is claimed: a zero-width interval would
claim a certainty the seeds cannot give. Top-5 accuracy, where recorded, gets the same paired
difference beside top-1.

The speed-up rule: TrAct reaches the baseline's final accuracy at epoch ``e*``, the earliest
epoch from which on, at every later epoch ``e``, the paired difference between TrAct at ``e``
and the same seed's baseline at its last epoch has a confidence interval above 0. Only then is a
speed-up claimed: ``epochs / e*`` in epochs, and in wall-clock time the ratio of
``epochs × the baseline's median epoch time`` to ``e* × TrAct's median epoch time`` (medians,
so that a moment of load on a shared machine does not decide).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from statistics import mean, median, stdev
from typing import Any

CONFIDENCE = 0.95
MIN_SEEDS = 3  # the fewest paired seeds an interval is estimated from
METRICS = {"top1": "test_acc", "top5": "test_top5"}  # the accuracies compared, by record field


def variant(record: dict[str, Any]) -> str:
    """The group a record belongs to: its method, and TrAct's λ where a λ sweep set one."""
    if record["method"] == "tract" and record.get("lam") is not None:
        return f"tract λ={record['lam']:g}"
    method: str = record["method"]
    return method


# ---------------------------------------------------------------------------------------------
# Student's t distribution, from the regularized incomplete beta function.


def _beta_fraction(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz's method)."""
    tiny, c, d = 1e-300, 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 1000):
        for num in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1 + num * d
            d = 1 / (d if abs(d) > tiny else tiny)
            c = 1 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1) < 1e-15:
            break
    return h


def _regularized_beta(a: float, b: float, x: float) -> float:
    """I_x(a, b) for 0 <= x <= 1."""
    if x <= 0 or x >= 1:
        return float(x >= 1)
    log_front = (
        math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    )
    if x < (a + 1) / (a + b + 2):
        return math.exp(log_front) * _beta_fraction(a, b, x) / a
    return 1 - math.exp(log_front) * _beta_fraction(b, a, 1 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with ``df`` degrees of freedom."""
    tail = 0.5 * _regularized_beta(df / 2, 0.5, df / (df + t * t))
    return 1 - tail if t > 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The ``p`` quantile of Student's t with ``df`` degrees of freedom (bisection on the CDF)."""
    if not 0 < p < 1:
        raise ValueError(f"p must be in (0, 1), got {p}")
    if not df > 0:
        raise ValueError(f"degrees of freedom must be positive, got {df}")
    if p < 0.5:
        return -t_quantile(1 - p, df)
    low, high = 0.0, 1.0
    while t_cdf(high, df) < p:
        low, high = high, 2 * high
    for _ in range(200):
        mid = (low + high) / 2
        low, high = (mid, high) if t_cdf(mid, df) < p else (low, mid)
        if high - low <= 1e-13 * high:
            break
    return (low + high) / 2


# ---------------------------------------------------------------------------------------------
# Paired differences over seeds.


@dataclass(frozen=True)
class Difference:
    """Mean over seeds of a per-seed difference, with its confidence interval (None when it
    cannot be estimated: fewer than :data:`MIN_SEEDS` seeds, or no spread)."""

    mean: float
    std: float | None  # sample standard deviation of the per-seed differences (None for 1 seed)
    n: int  # seeds
    low: float | None
    high: float | None

    @property
    def measurable(self) -> bool:
        """True when the interval excludes 0."""
        return self.low is not None and self.high is not None and (self.low > 0 or self.high < 0)

    @property
    def why_no_interval(self) -> str | None:
        """Why there is no interval (None when there is one)."""
        if self.low is not None:
            return None
        if self.n < MIN_SEEDS:
            return f"{self.n} seed{'s' * (self.n > 1)}; an interval needs {MIN_SEEDS} or more"
        return f"the {self.n} seeds' differences are all equal"

    def text(self, scale: float = 100) -> str:
        """``+2.70 [+0.51, +4.89]`` (in points for accuracies), or ``+2.70 [no interval: 2
        seeds]``."""
        if self.low is None or self.high is None:
            short = f"{self.n} seed{'s' * (self.n > 1)}" if self.n < MIN_SEEDS else "no spread"
            return f"{scale * self.mean:+.2f} [no interval: {short}]"
        return f"{scale * self.mean:+.2f} [{scale * self.low:+.2f}, {scale * self.high:+.2f}]"


def paired_difference(a: Mapping[int, float], b: Mapping[int, float]) -> Difference:
    """``a - b`` over the seeds both have: mean, and the Student-t confidence interval."""
    seeds = sorted(set(a) & set(b))
    if not seeds:
        raise ValueError("no seed has both values: nothing to pair")
    d = [a[s] - b[s] for s in seeds]
    sd = stdev(d) if len(d) > 1 else None
    if len(d) < MIN_SEEDS or not sd:
        return Difference(mean(d), sd, len(d), None, None)
    half = t_quantile(0.5 + CONFIDENCE / 2, len(d) - 1) * sd / math.sqrt(len(d))
    return Difference(mean(d), sd, len(d), mean(d) - half, mean(d) + half)


def mean_std(values: Iterable[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value) of numbers."""
    values = list(values)
    return mean(values), stdev(values) if len(values) > 1 else 0.0


def mean_std_by(
    records: list[dict[str, Any]], key: str, field: str = "test_acc"
) -> dict[str, dict[int, tuple[float, float, int]]]:
    """variant -> ``key`` value (epoch or budget) -> (mean, std, count) of ``field`` over seeds;
    records without ``field`` are left out."""
    groups: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        if r.get(field) is not None:
            groups[variant(r)][r[key]].append(r[field])
    return {
        name: {k: (*mean_std(v), len(v)) for k, v in sorted(by.items())}
        for name, by in groups.items()
    }


def _by_seed(
    records: list[dict[str, Any]], key: str, field: str
) -> dict[str, dict[int, dict[int, float]]]:
    """variant -> ``key`` value (epoch or budget) -> seed -> ``field`` (where recorded)."""
    out: dict[str, dict[int, dict[int, float]]] = defaultdict(lambda: defaultdict(dict))
    for r in records:
        if r.get(field) is not None:
            out[variant(r)][r[key]][r["seed"]] = r[field]
    return out


def _verdict(diff: Difference) -> str:
    if diff.low is None:
        return f"uncertainty cannot be estimated ({diff.why_no_interval})"
    if not diff.measurable:
        return "no measurable difference"
    return "TrAct higher" if diff.low > 0 else "TrAct lower"


# ---------------------------------------------------------------------------------------------
# The verdicts.


def compare_evidence(records: list[dict[str, Any]], epochs: int) -> dict[str, Any]:
    """The numbers behind compare's verdict (see the module docstring for the rule).

    ``records``: one per method, seed and epoch (``test_acc``, ``seconds``). Accuracies are
    fractions, differences too.
    """
    acc = _by_seed(records, "epoch", "test_acc")
    seconds = defaultdict(list)
    for r in records:
        seconds[r["method"]].append(r["seconds"])
    base_final = acc["baseline"][epochs]
    final = paired_difference(acc["tract"][epochs], base_final)
    to_target = {e: paired_difference(acc["tract"][e], base_final) for e in range(1, epochs + 1)}
    reached = None
    if final.low is not None:
        for e in range(epochs, 0, -1):
            low = to_target[e].low
            if low is None or not low > 0:
                break
            reached = e
    median_s = {m: median(v) for m, v in seconds.items()}
    t_base = epochs * median_s["baseline"]
    t_tract = reached * median_s["tract"] if reached else None
    return {
        "confidence": CONFIDENCE,
        "seeds_paired": final.n,
        "final_difference": asdict(final),
        "final_verdict": _verdict(final),
        "per_epoch_difference": {
            e: asdict(paired_difference(acc["tract"][e], acc["baseline"][e]))
            for e in range(1, epochs + 1)
        },
        "baseline_final_acc": mean(base_final.values()),
        "difference_to_baseline_final": {e: asdict(d) for e, d in to_target.items()},
        "tract_epochs_to_baseline_final": reached,
        "speedup": epochs / reached if reached else None,
        "median_epoch_seconds": median_s,
        "seconds_to_baseline_final": {"baseline": t_base, "tract": t_tract},
        "time_speedup": t_base / t_tract if t_tract else None,
        **_top5_evidence(records, epochs),
    }


def _top5_evidence(records: list[dict[str, Any]], epochs: int) -> dict[str, Any]:
    """The paired final top-5 difference and its verdict, where the records have top-5."""
    top5 = _by_seed(records, "epoch", METRICS["top5"])
    if not (top5["tract"].get(epochs) and top5["baseline"].get(epochs)):
        return {}
    diff = paired_difference(top5["tract"][epochs], top5["baseline"][epochs])
    return {"final_top5_difference": asdict(diff), "final_top5_verdict": _verdict(diff)}


def compare_verdict(evidence: dict[str, Any], epochs: int) -> list[str]:
    """compare's verdict in words: the final difference, the speed-up (or none), epoch times."""
    final = Difference(**evidence["final_difference"])
    n = final.n
    lines = []
    if final.low is None:
        lines.append(
            f"TrAct - baseline at the end: {100 * final.mean:+.2f} points; the uncertainty "
            f"over seeds cannot be estimated ({final.why_no_interval}), so no difference or "
            "speed-up is claimed" + (f" (run {MIN_SEEDS} or more --seeds)" if n < MIN_SEEDS else "")
        )
    elif final.measurable:
        word = "higher" if final.low > 0 else "lower"
        lines.append(
            f"TrAct ends {word}: TrAct - baseline {final.text()} points "
            f"(mean and {CONFIDENCE:.0%} CI of the paired per-seed difference, {n} seeds)"
        )
    else:
        lines.append(
            f"no measurable difference at the end: TrAct - baseline {final.text()} points; the "
            f"{CONFIDENCE:.0%} CI of the paired per-seed difference ({n} seeds) includes 0"
        )
    med = evidence["median_epoch_seconds"]
    target = 100 * evidence["baseline_final_acc"]
    reached = evidence["tract_epochs_to_baseline_final"]
    if reached:
        t = evidence["seconds_to_baseline_final"]
        lines.append(
            (
                f"speed-up: from epoch {reached} on TrAct is above the baseline's final accuracy "
                f"({target:.2f} %) beyond the uncertainty: {epochs}/{reached} = "
                f"{evidence['speedup']:.2f}x in epochs"
                if reached < epochs
                else f"no speed-up in epochs: TrAct is above the baseline's final accuracy "
                f"({target:.2f} %) beyond the uncertainty only at the last epoch"
            )
            + f"; in wall-clock {t['tract']:.0f} s ({reached} x {med['tract']:.1f} s) against "
            f"the baseline's {t['baseline']:.0f} s ({epochs} x {med['baseline']:.1f} s) = "
            f"{evidence['time_speedup']:.2f}x"
        )
    elif final.low is not None:
        lines.append(
            f"no measurable speed-up: TrAct is not above the baseline's final accuracy "
            f"({target:.2f} %) beyond the uncertainty by the last epoch"
        )
    if "final_top5_difference" in evidence:
        top5 = Difference(**evidence["final_top5_difference"])
        lines.append(
            f"top-5 at the end: TrAct - baseline {top5.text()} points: "
            f"{evidence['final_top5_verdict']}"
        )
    lines.append(
        f"median epoch time: baseline {med['baseline']:.2f} s, TrAct {med['tract']:.2f} s "
        f"(x{med['tract'] / med['baseline']:.2f})"
    )
    return lines


def sweep_evidence(finals: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per budget and TrAct variant (λ): the paired difference to the baseline and its verdict,
    in top-1 and, where recorded, top-5 accuracy."""
    acc = {metric: _by_seed(finals, "epochs", field) for metric, field in METRICS.items()}
    rows = []
    for budget in sorted(acc["top1"].get("baseline", {})):
        for name in sorted(v for v in acc["top1"] if v != "baseline"):
            row: dict[str, Any] = {"epochs": budget, "variant": name}
            for metric, by in acc.items():
                base, tract = by["baseline"].get(budget, {}), by[name].get(budget, {})
                if not set(tract) & set(base):
                    continue
                diff = paired_difference(tract, base)
                prefix = "" if metric == "top1" else "top5_"
                for side, values in (("baseline", base), ("tract", tract)):
                    mu, sd = mean_std(values.values())
                    row[f"{prefix}{side}"] = {"mean": mu, "std": sd}
                row[f"{prefix}difference"] = asdict(diff)
                row[f"{prefix}verdict"] = _verdict(diff)
            if "difference" in row:
                rows.append(row)
    return rows
