"""The test suite's device option: the correctness tests run on any torch device.

    pytest                           # every test, on the CPU (what CI runs)
    pytest --device cuda             # the device tests on the GPU; the CPU-only ones skip
    pytest --device cuda:1 tests/nn/test_layer.py

A test that takes the ``device`` fixture (or ``device64``, for tests in float64) runs on the
device given with ``--device`` (default ``cpu``); with any other device than the CPU every test
that does not take it is skipped, with the reason. On CUDA the session runs with strict float32
matmuls and convolutions (TF32 off) and deterministic cuDNN, so that a plain copy's gradient
and a TrAct layer's come from the same kernels; the tests of TF32 turn it on themselves.

The tests are laid out like the package: ``tests/test_api.py`` and ``tests/test_testing.py``
for ``trainact/api.py`` and ``trainact/testing.py``, ``tests/maths/test_<module>.py`` and
``tests/nn/test_<module>.py`` for the modules of ``trainact/maths`` and ``trainact/nn`` (with
``tests/nn/test_training_machinery.py`` for autocast, GradScaler, torch.compile and
checkpointing, ``test_never_silent.py`` for probes of ordinary training code and
``test_reference_impl.py`` against ``torch_tract``), ``tests/distributed`` for
``trainact/distributed.py`` (DDP, FSDP2), ``tests/integrations`` for ``trainact/lightning.py``,
``trainact/huggingface.py`` and accelerate, ``tests/experiments`` for ``trainact/experiments``,
``tests/examples`` for ``examples/`` and ``tests/benchmarks`` for ``benchmarks/``.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from trainact.testing import float64_device

DEVICE = pytest.StashKey[torch.device]()


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--device",
        default="cpu",
        help="torch device of the tests that take the `device` fixture: cpu (default), cuda, "
        "cuda:1, mps, ...; with any other than cpu, the tests that do not take it are skipped",
    )


def _available(name: str) -> torch.device:
    """The device ``--device name`` asks for, or a usage error saying why it cannot be used."""
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise pytest.UsageError(f"--device {name}: not a torch device ({err})") from None
    if device.type == "cpu":
        return device
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise pytest.UsageError(
                f"--device {name}: CUDA is not available here (torch {torch.__version__}, "
                f"built for CUDA {torch.version.cuda})"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise pytest.UsageError(
                f"--device {name}: there are {torch.cuda.device_count()} CUDA devices"
            )
        return device
    backend = getattr(torch.backends, device.type, None) or getattr(torch, device.type, None)
    is_available = getattr(backend, "is_available", None)
    if is_available is None or not is_available():
        raise pytest.UsageError(f"--device {name}: {device.type} is not available here")
    return device


def pytest_configure(config: pytest.Config) -> None:
    config.stash[DEVICE] = _available(config.getoption("device"))
    config.addinivalue_line(
        "markers", "cpu_only(reason): runs on the CPU only, skipped with --device of another"
    )


def pytest_report_header(config: pytest.Config) -> str:
    return f"trainact tests on device: {config.stash[DEVICE]}"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    device = config.stash[DEVICE]
    if device.type == "cpu":
        return
    for item in items:
        marker = item.get_closest_marker("cpu_only")
        if marker is not None:
            reason = marker.args[0] if marker.args else marker.kwargs.get("reason", "")
            item.add_marker(pytest.mark.skip(reason=f"runs on the CPU only: {reason}"))
        elif "device" not in getattr(item, "fixturenames", ()):
            item.add_marker(
                pytest.mark.skip(reason=f"a CPU test (it takes no `device`): not run on {device}")
            )


@pytest.fixture(scope="session")
def device(pytestconfig: pytest.Config) -> Iterator[torch.device]:
    """The device of ``--device``; on CUDA with strict float32 and deterministic cuDNN."""
    device = pytestconfig.stash[DEVICE]
    if device.type != "cuda":
        yield device
        return
    torch.cuda.set_device(device)
    saved = (
        torch.get_float32_matmul_precision(),
        torch.backends.cudnn.allow_tf32,
        torch.backends.cudnn.deterministic,
        torch.backends.cudnn.benchmark,
    )
    torch.set_float32_matmul_precision("highest")
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    try:
        yield device
    finally:
        torch.set_float32_matmul_precision(saved[0])
        (
            torch.backends.cudnn.allow_tf32,
            torch.backends.cudnn.deterministic,
            torch.backends.cudnn.benchmark,
        ) = saved[1:]


@pytest.fixture(scope="session")
def device64(device: torch.device) -> torch.device:
    """The device, for a test in float64: skipped on a device without float64 (MPS)."""
    if float64_device(device) != device:
        pytest.skip(f"{device.type} has no float64")
    return device
