"""The GPU check's dry run (benchmarks/gpu_check.py): every part runs and passes, at tiny sizes.

The dry run is the same code as the GPU run at tiny sizes on the CPU, so a part that breaks here
would break the one prepared GPU run. Allowed besides a pass: skips of what needs CUDA, of a
package that is absent (timm and torchvision do not import with the CPU torch), and of the
compiled cost of the big models, which the dry run leaves out.
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

ROOT = Path(__file__).resolve().parents[2]
PARTS = {
    1: "Correctness against a float64 reference",
    2: "Real model zoos",
    3: "Cost next to a real training step",
    4: "A first GPU point on the paper's model",
}


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
    data = json.loads(out.with_suffix(".json").read_text())
    return run.returncode, out.read_text(), data, run.stdout + run.stderr


def test_every_part_runs_and_passes(dry_run: tuple[int, str, dict, str]) -> None:
    returncode, markdown, data, log = dry_run
    checks = data["checks"]
    assert data["dry_run"] is True
    for part, title in PARTS.items():
        assert f"## {part}. {title}" in markdown
        ran = [c for c in checks if c["part"] == part and c["status"] != "skip"]
        assert ran, f"part {part} ran no check:\n{log[-3000:]}"
    unexpected = [
        f"[{c['part']}] {c['name']}: {c['status']} {c['skip_kind']} {c['measured']} {c['note']}"
        for c in checks
        if not (
            c["status"] == "pass"
            or (c["status"] == "skip" and c["skip_kind"] in ("cuda", "package", "dry-run"))
        )
    ]
    assert not unexpected, "\n".join(unexpected)
    failed = [c for c in checks if c["status"] == "fail"]
    assert returncode == (1 if failed else 0), log[-3000:]


def test_report_has_the_environment_and_each_check(dry_run: tuple[int, str, dict, str]) -> None:
    _, markdown, data, _ = dry_run
    for key in ("device", "torch", "CUDA", "trainact"):
        assert f"- **{key}**:" in markdown
    for check in data["checks"]:
        assert f"| {check['name']} |" in markdown
    names = " ".join(c["name"] for c in data["checks"])
    for expected in (
        "Conv3d",
        "channels_last",
        "GradScaler",
        "reduce-overhead",
        "checkpoint",
        "host synchronization",
        "over-exposed",
        "statistics_dtype=float64",
        "HF WhisperForAudioClassification",
        "timm vit_base_patch16_224",
        "ViT-B/16",
        "torch_tract",
        "trainact compare",
    ):
        assert expected in names
