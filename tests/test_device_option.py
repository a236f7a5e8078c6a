"""The suite's ``--device`` option (tests/conftest.py): a device that is not there is a usage
error that says why, before any test runs."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

spec = importlib.util.spec_from_file_location(
    "suite_conftest", Path(__file__).with_name("conftest.py")
)
assert spec is not None and spec.loader is not None
conftest = importlib.util.module_from_spec(spec)
spec.loader.exec_module(conftest)


def test_the_cpu_is_always_there():
    assert conftest._available("cpu") == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_an_absent_device_is_a_usage_error():
    with pytest.raises(pytest.UsageError, match="--device cuda: CUDA is not available here"):
        conftest._available("cuda")
    if not torch.backends.mps.is_available():
        with pytest.raises(pytest.UsageError, match="--device mps: mps is not available here"):
            conftest._available("mps")


def test_a_name_that_is_no_device_is_a_usage_error():
    with pytest.raises(pytest.UsageError, match="--device gpu0: not a torch device"):
        conftest._available("gpu0")
