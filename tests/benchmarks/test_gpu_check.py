"""The GPU check's dry run (benchmarks/gpu_check.py): every part runs and passes, at tiny sizes;
a missing file fails the pre-flight in seconds; the report is written after every part.

The dry run is the GPU run's code at tiny sizes on the CPU (``--device cpu``): the same driver
runs benchmarks/op_count.py, benchmarks/overhead.py and benchmarks/accuracy.py and reads their
JSON, runs pytest with ``--device`` and reads its JUnit reports, runs ``trainact train`` and
``trainact compare``, and writes the report; a part that breaks here would break the one
prepared GPU run. It needs neither torchvision nor timm (the GPU's models have CIFAR stand-ins).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import trainact

pytest.importorskip("numpy")
pytest.importorskip("PIL")
pytest.importorskip("matplotlib")
pytest.importorskip("torch_tract")  # the cost part compares against it

ROOT = Path(__file__).resolve().parents[2]
PART_NAMES = ("cost", "accuracy", "tests", "compile", "compare")
TITLES = ("1. Cost", "2. Accuracy", "3. Device tests", "4. The long tests", "5. A first GPU point")


def _env(tmp: Path) -> dict[str, str]:
    env = dict(os.environ, TRAINACT_CACHE=str(tmp / "cache"), OMP_NUM_THREADS="1")
    src = str(Path(trainact.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
    env.pop("OUT", None)
    return env


def _command(out: Path, *args: str) -> list[str]:
    cmd = [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--dry-run"]
    return [*cmd, "--device", "cpu", "--out", str(out), *args]


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[int, str, dict, str]:
    tmp = tmp_path_factory.mktemp("gpu-check")
    out = tmp / "report.md"
    run = subprocess.run(_command(out), capture_output=True, text=True, env=_env(tmp), timeout=600)
    log = run.stdout + run.stderr
    assert out.exists(), log[-3000:]
    return run.returncode, out.read_text(), json.loads(out.with_suffix(".json").read_text()), log


def test_every_part_runs_and_passes(dry_run: tuple[int, str, dict, str]) -> None:
    returncode, _, data, log = dry_run
    assert data["dry_run"] is True and data["preflight"] == []
    statuses = {p["name"]: (p["status"], p["problems"]) for p in data["parts"]}
    assert statuses == {n: ("pass", []) for n in PART_NAMES}
    assert [p["name"] for p in data["parts"]] == list(PART_NAMES)  # cost first, compare last
    assert returncode == 0, log[-3000:]


def test_each_part_reports_what_it_measured(dry_run: tuple[int, str, dict, str]) -> None:
    _, _, data, _ = dry_run
    parts = {p["name"]: p for p in data["parts"]}
    cost = parts["cost"]["data"]
    figures = {f["figure"]: f for f in cost["figures"]}
    for dtype in ("default", "float32", "float64"):
        assert f"stem extra time / torch_tract's ({dtype})" in figures
    steps = {s["model"] for s in cost["result"]["step"]}
    assert steps == {"resnet-tiny", "vit-tiny"}  # the CIFAR stand-ins of ResNet-50, ViT-B/16
    counted = {
        (r["layer"].split(" (")[0], r["policy"].split(" (")[0]) for r in cost["counts"]["rows"]
    }
    assert ("ResNet-50 stem", "RTX 4090") in counted and (
        "ViT-B/16 patch embedding",
        "H100",
    ) in counted
    tables = parts["accuracy"]["data"]["result"]["tables"]
    assert [t["tf32"] for t in tables] == [False, True] and all(t["over"] == 0 for t in tables)
    assert any("many chunks" in row["case"] for row in tables[0]["rows"])
    for name in ("tests", "compile"):
        assert parts[name]["data"]["counts"]["passed"] >= 2 and not parts[name]["data"]["stopped"]
    skipped = {c["message"] for c in parts["compile"]["data"]["cases"] if c["status"] == "skipped"}
    assert any("needs CUDA" in reason for reason in skipped)  # a device test's own reason
    records = parts["compare"]["data"]["records"]
    assert {r["method"] for r in records} == {"baseline", "tract"}


def test_report_has_the_environment_commands_and_figures(
    dry_run: tuple[int, str, dict, str],
) -> None:
    _, markdown, data, _ = dry_run
    for key in ("device", "precision policy", "torch", "CUDA", "trainact", "pre-flight", "date"):
        assert f"- **{key}**:" in markdown
    for title in TITLES:
        assert f"## {title}" in markdown
    for command in (
        "python benchmarks/op_count.py --batch 8",
        "python benchmarks/overhead.py --device cpu",
        "python benchmarks/accuracy.py --device cpu --matmuls strict tf32",
        "python -m pytest --device cpu",
        "python -m trainact compare --preset resnet18-cifar10-sgd",
    ):
        assert command in markdown
    assert "| trainact | float64 |" in markdown  # the stem table, the paths side by side
    assert "| operations | traffic | counted extra peak |" in markdown  # counts beside times
    assert "| ResNet-50 stem (3→64, 7×7/2) | RTX 4090 (24 GB) | split-float32 |" in markdown
    assert "| [0, 255], 3x3/1 pad 1 |" in markdown  # the accuracy table
    assert data["environment"]["precision policy"].startswith("cpu:")


def test_preflight_fails_in_seconds_before_any_part(tmp_path: Path) -> None:
    """A dataset file that is not there: exit 2 before any part ran, with a report that names
    it (the device machine's run would otherwise spend its budget and then fail)."""
    out = tmp_path / "report.md"
    cmd = _command(out, "--dataset", str(tmp_path / "missing.tar.gz"))
    started = time.monotonic()
    run = subprocess.run(cmd, capture_output=True, text=True, env=_env(tmp_path), timeout=120)
    assert run.returncode == 2, run.stdout + run.stderr
    assert time.monotonic() - started < 60
    data = json.loads(out.with_suffix(".json").read_text())
    assert data["parts"] == [] and "missing.tar.gz: no such file" in data["preflight"][0]
    assert "- **pre-flight**: **failed**" in out.read_text()


def test_report_is_written_after_every_part(tmp_path: Path) -> None:
    """Killed while its second part runs, the check has already written the first's results."""
    out = tmp_path / "report.md"
    cmd = _command(out, "--parts", "accuracy", "compare")
    with subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env(tmp_path)
    ) as child:
        assert child.stdout is not None
        for line in child.stdout:
            if line.startswith("== compare ("):
                break
        child.kill()
    data = json.loads(out.with_suffix(".json").read_text())
    assert [p["name"] for p in data["parts"]] == ["accuracy"]
    assert data["parts"][0]["status"] == "pass"
    assert "## 2. Accuracy" in out.read_text() and "36 of 36 cells" in out.read_text()
