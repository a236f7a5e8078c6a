"""Verdicts with their uncertainty (t quantile, paired differences, the speed-up rule), the
accuracy-against-time figure, and the ablation options (input range, λ sweep)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from PIL import Image

from trainact.experiments import cli, compare, provenance, runner, train
from trainact.experiments.evidence import (
    compare_evidence,
    compare_verdict,
    paired_difference,
    sweep_evidence,
    t_cdf,
    t_quantile,
)
from trainact.experiments.plot import curve_points
from trainact.experiments.rundir import saved_job

# ---------------------------------------------------------------------------------------------
# Student's t and paired differences


@pytest.mark.parametrize(
    "p,df,expected",  # scipy.stats.t.ppf(p, df)
    [
        (0.975, 1, 12.706204736174703),
        (0.975, 2, 4.302652729749464),
        (0.975, 3, 3.182446305284263),
        (0.975, 4, 2.7764451051977987),
        (0.975, 10, 2.2281388519649385),
        (0.975, 30, 2.0422724563012373),
        (0.975, 1000, 1.9623390808264078),
        (0.95, 5, 2.015048372669157),
        (0.995, 1, 63.65674116287399),
        (0.025, 2, -4.302652729749464),
        (0.5, 7, 0.0),
    ],
)
def test_t_quantile_matches_known_values(p, df, expected):
    assert t_quantile(p, df) == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_t_cdf_and_bad_arguments():
    assert t_cdf(-1.0, 1) == pytest.approx(0.25)  # Cauchy
    assert t_cdf(2.0, 2) == pytest.approx(0.5 + 2 / (2 * math.sqrt(2 + 4)), rel=1e-12)
    for p in (0, 1, 1.5):
        with pytest.raises(ValueError, match="p must be"):
            t_quantile(p, 3)
    with pytest.raises(ValueError, match="degrees of freedom"):
        t_quantile(0.9, 0)


def test_paired_difference_pairs_seeds_and_uses_student_t():
    tract = {0: 0.50, 1: 0.60, 2: 0.70, 9: 0.99}  # seed 9 has no baseline: not paired
    base = {0: 0.40, 1: 0.45, 2: 0.65}
    d = paired_difference(tract, base)
    half = 4.302652729749464 * 0.05 / math.sqrt(3)  # t(0.975, 2) · std(d) / √n
    assert d.n == 3 and d.mean == pytest.approx(0.1) and d.std == pytest.approx(0.05)
    assert (d.low, d.high) == pytest.approx((0.1 - half, 0.1 + half))
    assert not d.measurable  # half = 0.124 > 0.1: the interval includes 0
    assert paired_difference({0: 0.5, 1: 0.62, 2: 0.58}, {0: 0.4, 1: 0.5, 2: 0.5}).measurable
    one = paired_difference({0: 0.5}, {0: 0.4})
    assert one.n == 1 and one.low is None and not one.measurable
    with pytest.raises(ValueError, match="no seed"):
        paired_difference({0: 0.5}, {1: 0.4})


# ---------------------------------------------------------------------------------------------
# The speed-up rule


def records(curves: dict[str, list[list[float]]], seconds: dict[str, float]) -> list[dict]:
    """method -> per seed, test accuracy per epoch -> the records compare writes."""
    return [
        {
            "method": method,
            "seed": seed,
            "epoch": e + 1,
            "epochs": len(accs),
            "test_acc": acc,
            "seconds": seconds[method] + 0.01 * e,
        }
        for method, per_seed in curves.items()
        for seed, accs in enumerate(per_seed)
        for e, acc in enumerate(accs)
    ]


def test_speedup_is_claimed_in_epochs_and_seconds_when_beyond_the_uncertainty():
    base = [[0.30, 0.40, 0.50, 0.60], [0.31, 0.41, 0.51, 0.61], [0.29, 0.39, 0.49, 0.59]]
    tract = [[0.40, 0.65, 0.66, 0.70], [0.41, 0.67, 0.68, 0.72], [0.39, 0.64, 0.66, 0.71]]
    ev = compare_evidence(
        records({"baseline": base, "tract": tract}, {"baseline": 10, "tract": 12}), 4
    )
    assert ev["tract_epochs_to_baseline_final"] == 2 and ev["speedup"] == 2.0
    assert ev["median_epoch_seconds"] == pytest.approx({"baseline": 10.015, "tract": 12.015})
    assert ev["seconds_to_baseline_final"] == pytest.approx(
        {"baseline": 4 * 10.015, "tract": 2 * 12.015}
    )
    assert ev["time_speedup"] == pytest.approx(40.06 / 24.03)
    assert ev["final_verdict"] == "TrAct higher" and ev["final_difference"]["n"] == 3
    text = "\n".join(compare_verdict(ev, 4))
    assert "TrAct ends higher" in text and "2.00x in epochs" in text and "1.67x" in text


def test_no_speedup_when_the_mean_passes_but_the_ci_includes_zero():
    # the case: TrAct's mean passes the baseline's final mean early, within the noise
    base = [[0.30, 0.44, 0.46], [0.30, 0.40, 0.43], [0.30, 0.42, 0.45]]
    tract = [[0.30, 0.47, 0.44], [0.30, 0.41, 0.47], [0.30, 0.44, 0.45]]
    ev = compare_evidence(
        records({"baseline": base, "tract": tract}, {"baseline": 1, "tract": 1}), 3
    )
    assert ev["tract_epochs_to_baseline_final"] is None and ev["speedup"] is None
    assert ev["time_speedup"] is None and ev["seconds_to_baseline_final"]["tract"] is None
    assert ev["final_verdict"] == "no measurable difference"
    text = "\n".join(compare_verdict(ev, 3))
    assert "no measurable difference" in text and "no measurable speed-up" in text
    assert "x in epochs" not in text


def test_speedup_counts_from_where_tract_stays_above():
    # measurably above at epoch 1, not at epoch 2, above again from epoch 3: e* = 3
    base = [[0.1, 0.2, 0.3, 0.40], [0.1, 0.2, 0.3, 0.41], [0.1, 0.2, 0.3, 0.42]]
    tract = [[0.6, 0.1, 0.6, 0.60], [0.6, 0.1, 0.61, 0.61], [0.6, 0.1, 0.62, 0.63]]
    ev = compare_evidence(
        records({"baseline": base, "tract": tract}, {"baseline": 1, "tract": 1}), 4
    )
    assert ev["tract_epochs_to_baseline_final"] == 3
    # only at the last epoch: wall-clock given, but no speed-up in epochs
    last = compare_evidence(
        records(
            {"baseline": base, "tract": [a[:3] + [0.6] for a in base]}, {"baseline": 2, "tract": 1}
        ),
        4,
    )
    assert last["speedup"] == 1.0 and last["time_speedup"] == pytest.approx(2.0, rel=0.01)
    assert "no speed-up in epochs" in "\n".join(compare_verdict(last, 4))


def test_one_seed_claims_nothing():
    ev = compare_evidence(
        records({"baseline": [[0.3, 0.4]], "tract": [[0.6, 0.7]]}, {"baseline": 1, "tract": 1}), 2
    )
    assert ev["speedup"] is None and ev["final_difference"]["low"] is None
    assert (
        ev["final_verdict"]
        == "uncertainty cannot be estimated (1 seed; an interval needs 3 or more)"
    )
    assert "cannot be estimated" in compare_verdict(ev, 2)[0]


def test_no_interval_from_two_seeds_or_from_zero_spread():
    two = paired_difference({0: 0.5, 1: 0.52}, {0: 0.47, 1: 0.49})  # both +3.00: tied
    assert two.n == 2 and two.low is None and not two.measurable
    assert two.text() == "+3.00 [no interval: 2 seeds]"
    tied = paired_difference({0: 0.5, 1: 0.52, 2: 0.6}, {0: 0.47, 1: 0.49, 2: 0.57})
    assert tied.n == 3 and tied.low is None and tied.text() == "+3.00 [no interval: no spread]"
    assert "all equal" in tied.why_no_interval
    ev = compare_evidence(
        records(
            {"baseline": [[0.3, 0.47], [0.3, 0.49]], "tract": [[0.3, 0.5], [0.3, 0.52]]},
            {"baseline": 1, "tract": 1},
        ),
        2,
    )
    assert ev["speedup"] is None and ev["final_difference"]["low"] is None
    text = "\n".join(compare_verdict(ev, 2))
    assert "cannot be estimated (2 seeds; an interval needs 3 or more)" in text
    assert "[-3.00" not in text and "[+3.00, +3.00]" not in text and "speed-up:" not in text


def test_sweep_evidence_per_budget_and_lambda():
    finals = [
        {
            "method": m,
            "lam": lam,
            "seed": s,
            "epochs": e,
            "test_acc": acc + 0.01 * s * (m != "baseline"),
        }
        for e, accs in ((1, (0.5, 0.6, 0.51)), (2, (0.6, 0.6, 0.61)))
        for m, lam, acc in zip(("baseline", "tract", "tract"), (None, 0.1, 10.0), accs, strict=True)
        for s in range(3)
    ]
    rows = {(r["epochs"], r["variant"]): r for r in sweep_evidence(finals)}
    assert set(rows) == {(e, f"tract λ={lam:g}") for e in (1, 2) for lam in (0.1, 10)}
    assert rows[1, "tract λ=0.1"]["verdict"] == "TrAct higher"
    assert rows[1, "tract λ=0.1"]["difference"]["mean"] == pytest.approx(0.11)
    assert rows[2, "tract λ=0.1"]["verdict"] == "no measurable difference"  # d = 0, .01, .02


# ---------------------------------------------------------------------------------------------
# Accuracy against time


def test_time_axis_is_cumulative_training_seconds_averaged_over_seeds(tmp_path, capsys):
    rs = records(
        {"baseline": [[0.3, 0.4]] * 2, "tract": [[0.35, 0.45]] * 2}, {"baseline": 10, "tract": 12}
    )
    rs[0]["seconds"] = 14.0  # baseline seed 0, epoch 1: 14 s instead of 10
    points = curve_points(rs, "time")
    assert [p[0] for p in points["baseline"]] == pytest.approx([12.0, 12.0 + 10.01])
    assert [p[0] for p in points["tract"]] == pytest.approx([12.0, 24.01])
    assert [p[0] for p in curve_points(rs, "epoch")["tract"]] == [1, 2]
    with pytest.raises(ValueError, match="x must be"):
        curve_points(rs, "steps")
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rs))
    widths = {}
    for x in ("time", "both"):
        assert cli.main(["plot", str(tmp_path), "--x", x]) == 0
        with Image.open(tmp_path / "accuracy.png") as png:
            widths[x] = png.size[0]
    assert widths["both"] == 2 * widths["time"]  # two panels: epochs and seconds


# ---------------------------------------------------------------------------------------------
# The ablation options


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """2 classes × (16 train + 4 test) random 8×8 images."""
    root = tmp_path_factory.mktemp("images")
    gen = torch.Generator().manual_seed(0)
    for split, count in (("train", 16), ("test", 4)):
        for cls in ("a", "b"):
            (root / split / cls).mkdir(parents=True)
            for i in range(count):
                pixels = torch.randint(0, 256, (8, 8, 3), dtype=torch.uint8, generator=gen)
                Image.fromarray(pixels.numpy()).save(root / split / cls / f"{i}.png")
    return root


def test_input_range_changes_what_the_model_sees(folder, tmp_path, monkeypatch):
    seen = {}
    real = train.build_model

    def recording(*args):
        def first_input(module, inputs):
            seen.setdefault(run, inputs[0])

        model = real(*args)
        model.register_forward_pre_hook(first_input)
        return model

    monkeypatch.setattr(train, "build_model", recording)
    for run in ("standardized", "unit", "raw"):
        assert cli.main(
            ["train", "--dataset", str(folder), "--data-dir", str(tmp_path / "cache"),
             "--epochs", "1", "--batch-size", "32", "--no-augment", "--input-range", run,
             "--out", str(tmp_path / run), "--no-progress"]
        ) == 0  # fmt: skip
        assert saved_job(tmp_path / run, "train")["config"]["input_range"] == run
    raw, unit, standardized = seen["raw"], seen["unit"], seen["standardized"]
    assert torch.equal(raw, raw.round()) and raw.max() > 200 and raw.min() >= 0
    assert torch.allclose(unit, raw / 255) and unit.max() <= 1
    # standardized with the train split's statistics: mean ~0 and std ~1 per channel
    assert standardized.mean((0, 2, 3)).abs().max() < 0.05
    assert (standardized.std((0, 2, 3)) - 1).abs().max() < 0.05


def test_input_range_is_validated(capsys):
    with pytest.raises(ValueError, match="input-range must be one of standardized, unit, raw"):
        train.Config(input_range="percent").validate()
    with pytest.raises(ValueError, match="do not apply to --input-range 'raw'"):
        train.Config(input_range="raw", mean=(0.5, 0.5, 0.5)).validate()
    parse = cli._parser().parse_args
    cfg = cli.build_config(parse(["train", "--preset", "vit-cifar10", "--input-range", "unit"]))
    assert cfg.input_range == "unit" and cfg.mean is None  # the preset's standardization dropped
    with pytest.raises(SystemExit):
        parse(["train", "--input-range", "percent"])
    assert cli.main(["train", "--input-range", "raw", "--mean", "0", "0", "0"]) == 1
    assert "do not apply" in capsys.readouterr().err


@pytest.mark.parametrize(
    "lams,message",
    [
        ([], "at least one"),
        ([0.1, -1], "positive"),
        ([float("nan")], "positive"),
        ([1, 1.0], "repeated"),
    ],
)
def test_lambda_list_is_validated(lams, message):
    with pytest.raises(ValueError, match=message):
        compare.validate_lams(lams)


def test_lambda_and_lambdas_together_are_refused(tmp_path, capsys):
    assert cli.main(["sweep", "--lam", "1", "--lams", "0.1", "1", "--out", str(tmp_path)]) == 1
    assert "--lams" in capsys.readouterr().err


def test_lambda_sweep_trains_the_baseline_once_per_budget_and_seed(folder, tmp_path, monkeypatch):
    runs = []
    real = runner.train

    def counting(cfg, run_dir, **kw):
        runs.append((cfg.epochs, cfg.seed, cfg.method, cfg.lam if cfg.method == "tract" else None))
        return real(cfg, run_dir, **kw)

    monkeypatch.setattr(runner, "train", counting)
    argv = ["sweep", "--dataset", str(folder), "--data-dir", str(tmp_path / "cache"),
            "--budgets", "1", "--seeds", "0", "1", "--lams", "0.1", "10", "--batch-size", "32",
            "--out", str(tmp_path / "sweep"), "--no-progress", "--jobs", "1"]  # fmt: skip
    assert cli.main(argv) == 0
    assert sorted(runs, key=str) == sorted(
        [(1, s, "baseline", None) for s in (0, 1)]
        + [(1, s, "tract", lam) for s in (0, 1) for lam in (0.1, 10.0)],
        key=str,
    )
    finals = [json.loads(line) for line in (tmp_path / "sweep" / "sweep.jsonl").open()]
    assert sorted(
        (r["method"], r.get("lam"), r["seed"]) for r in finals if r["method"] == "tract"
    ) == [("tract", lam, s) for lam in (0.1, 10.0) for s in (0, 1)]
    summary = json.loads((tmp_path / "sweep" / "summary.json").read_text())
    assert {r["variant"] for r in summary["budgets"]} == {"tract λ=0.1", "tract λ=10"}
    code = provenance.code_identity()  # every result names the code that produced it
    assert summary["code"] == code and all(r["code"] == code for r in finals)
    assert (tmp_path / "sweep" / "lams.png").exists()
    runs.clear()
    assert cli.main(argv) == 0 and runs == []  # everything finished: nothing retrained


def test_final_accuracies_of_several_compare_directories(tmp_path, capsys):
    for name, gain in (("unit", 0.05), ("raw", 0.2)):
        rs = records(
            {
                "baseline": [[0.3, 0.4]] * 3,
                "tract": [[0.3, 0.4 + gain + 0.01 * s] for s in range(3)],
            },
            {"baseline": 1, "tract": 1},
        )
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rs))
    dirs = [str(tmp_path / "unit"), str(tmp_path / "raw")]
    assert cli.main(["plot", *dirs]) == 1
    assert "--out" in capsys.readouterr().err
    assert cli.main(["plot", *dirs, "--out", str(tmp_path / "finals.png")]) == 0
    with Image.open(tmp_path / "finals.png") as png:
        assert png.size[0] > 100
    assert cli.main(["plot", *dirs, str(tmp_path), "--out", str(tmp_path / "x.png")]) == 1
    assert "holds no compare results.jsonl" in capsys.readouterr().err
