"""The kernel and traffic counts of benchmarks/op_count.py (meta device, no GPU): one training
call of the ResNet-50 stem and the ViT-B/16 patch embedding at batch 256 launches a bounded
number of operations under the H100's and the RTX 4090's precision policies, with at most 10
passes of memory traffic over the stem's patch matrix and at most 2% of the device's memory
held extra."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import trainact

ROOT = Path(__file__).resolve().parents[2]
STEM, VIT = "ResNet-50 stem (3→64, 7×7/2)", "ViT-B/16 patch embedding (3→768, 16×16/16)"


@pytest.fixture(scope="module")
def rows(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], dict]:
    out = tmp_path_factory.mktemp("op-count") / "counts.json"
    env = dict(os.environ)
    src = str(Path(trainact.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
    cmd = [sys.executable, str(ROOT / "benchmarks" / "op_count.py"), "--json", str(out)]
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    data = json.loads(out.read_text())
    assert data["batch"] == 256
    return {(r["layer"], r["policy"].split(" (")[0]): r for r in data["rows"]}


@pytest.mark.parametrize("policy,product", [("H100", "float64"), ("RTX 4090", "split-float32")])
def test_few_large_kernels_per_call(rows, policy, product):
    stem, vit = rows[(STEM, policy)], rows[(VIT, policy)]
    assert stem["product"] == vit["product"] == product
    assert stem["plain_ops"] == vit["plain_ops"] == 4  # the counter sees the plain layer's 4
    assert stem["ops"] <= 200 and vit["ops"] <= 100, (stem["by_op"], vit["by_op"])


@pytest.mark.parametrize("policy", ["H100", "RTX 4090"])
def test_stem_traffic_and_extra_memory(rows, policy):
    stem = rows[(STEM, policy)]
    assert stem["passes"] <= 10, stem["by_op"]
    assert stem["memory"] == {"H100": 80, "RTX 4090": 24}[policy] * 10**9
    for layer in (STEM, VIT):
        assert 0 < rows[(layer, policy)]["extra_peak_fraction"] <= 0.02
