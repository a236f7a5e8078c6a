"""The suite's ``--device`` option (tests/conftest.py): a device that is not there is a usage
error that says why, before any test runs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_an_absent_device_is_a_usage_error():
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--device", "cuda"]
        + [str(HERE / "test_testing.py::test_float64_device")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == pytest.ExitCode.USAGE_ERROR, run.stdout + run.stderr
    assert "--device cuda: CUDA is not available here" in run.stderr
