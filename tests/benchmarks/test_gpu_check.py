"""The GPU check's dry run (benchmarks/gpu_check.py): every part runs and passes, at tiny sizes.

The dry run is the GPU run's code at tiny sizes on the CPU (``--device cpu``): the same driver
runs pytest with ``--device`` and reads its JUnit report, runs benchmarks/overhead.py and
benchmarks/accuracy.py and reads their JSON, runs ``trainact train`` and ``trainact compare``,
and writes the report; a part that breaks here would break the one prepared GPU run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import trainact

pytest.importorskip("numpy")
pytest.importorskip("PIL")
pytest.importorskip("matplotlib")
pytest.importorskip("torch_tract")  # the overhead part compares against it

ROOT = Path(__file__).resolve().parents[2]
TITLES = ("1. Device tests", "2. Cost", "3. Accuracy", "4. A first GPU point")


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[int, str, dict, str]:
    tmp = tmp_path_factory.mktemp("gpu-check")
    env = dict(os.environ, TRAINACT_CACHE=str(tmp / "cache"), OMP_NUM_THREADS="1")
    src = str(Path(trainact.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
    env.pop("OUT", None)
    out = tmp / "report.md"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--dry-run"]
    cmd += ["--device", "cpu", "--out", str(out)]
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    log = run.stdout + run.stderr
    assert out.exists(), log[-3000:]
    return run.returncode, out.read_text(), json.loads(out.with_suffix(".json").read_text()), log


def test_every_part_runs_and_passes(dry_run: tuple[int, str, dict, str]) -> None:
    returncode, _, data, log = dry_run
    assert data["dry_run"] is True
    statuses = {p["name"]: (p["status"], p["problems"]) for p in data["parts"]}
    assert statuses == {n: ("pass", []) for n in ("tests", "overhead", "accuracy", "compare")}
    assert returncode == 0, log[-3000:]


def test_each_part_reports_what_it_measured(dry_run: tuple[int, str, dict, str]) -> None:
    _, _, data, _ = dry_run
    parts = {p["name"]: p for p in data["parts"]}
    tests = parts["tests"]["data"]
    assert tests["counts"]["passed"] >= 3 and not tests["stopped"]
    skipped = {c["message"] for c in tests["cases"] if c["status"] == "skipped"}
    assert any("needs CUDA" in reason for reason in skipped)  # a device test's own reason
    figures = {f["figure"]: f for f in parts["overhead"]["data"]["figures"]}
    for dtype in ("default", "float32", "float64"):
        assert f"stem extra time / torch_tract's ({dtype})" in figures
    errors = [f for name, f in figures.items() if name.startswith("first-layer error")]
    assert errors and all(f["result"] == "met" for f in errors)
    tables = parts["accuracy"]["data"]["result"]["tables"]
    assert [t["tf32"] for t in tables] == [False, True] and all(t["over"] == 0 for t in tables)
    assert any("many chunks" in row["case"] for row in tables[0]["rows"])
    records = parts["compare"]["data"]["records"]
    assert {r["method"] for r in records} == {"baseline", "tract"}


def test_report_has_the_environment_commands_and_figures(
    dry_run: tuple[int, str, dict, str],
) -> None:
    _, markdown, data, _ = dry_run
    for key in ("device", "precision policy", "torch", "CUDA", "trainact", "date", "result"):
        assert f"- **{key}**:" in markdown
    for title in TITLES:
        assert f"## {title}" in markdown
    for command in (
        "python -m pytest --device cpu",
        "python benchmarks/overhead.py --device cpu",
        "python benchmarks/accuracy.py --device cpu --matmuls strict tf32",
        "python -m trainact compare --preset resnet18-cifar10-sgd",
    ):
        assert command in markdown
    assert "| trainact | float64 |" in markdown  # the stem table, both paths side by side
    assert "| [0, 255], 3x3/1 pad 1 |" in markdown  # the accuracy table
    assert data["environment"]["precision policy"].startswith("cpu:")
