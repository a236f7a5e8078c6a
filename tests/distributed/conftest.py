"""One group of two gloo processes on 127.0.0.1 runs every scenario once per test session."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import scenarios
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD_SIZE = 2
DEADLINE_S = 240


@pytest.fixture(scope="session")
def results(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """Per rank, ``{scenario: measurements}`` from one spawn of ``scenarios.run``."""
    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch.distributed with the gloo backend is not available")
    out = tmp_path_factory.mktemp("distributed")
    context = mp.start_processes(
        scenarios.run,
        args=(WORLD_SIZE, scenarios.free_port(), str(out)),
        nprocs=WORLD_SIZE,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + DEADLINE_S
    try:
        while not context.join(timeout=1):
            if time.monotonic() > deadline:
                raise TimeoutError(f"distributed scenarios still running after {DEADLINE_S} s")
    except Exception as error:  # the per-scenario tests report what ran, and this
        for process in context.processes:
            if process.is_alive():
                process.kill()
        failure = f"{type(error).__name__}: {error}"
    else:
        failure = ""
    per_rank = []
    for rank in range(WORLD_SIZE):
        path = Path(out, f"rank{rank}.json")
        per_rank.append(json.loads(path.read_text()) if path.exists() else {})
    for ranked in per_rank:
        ranked["_failure"] = failure
    return per_rank


@pytest.fixture
def scenario(results: list[dict[str, Any]]) -> Callable[[str], list[dict[str, Any]]]:
    """``scenario(name)``: that scenario's measurements on every rank, or the failure."""

    def get(name: str) -> list[dict[str, Any]]:
        ranks = [ranked.get(name) for ranked in results]
        for rank, measured in enumerate(ranks):
            if measured is None:
                pytest.fail(
                    f"scenario {name!r} did not run on rank {rank}: {results[rank]['_failure']}"
                )
            if "error" in measured:
                pytest.fail(f"scenario {name!r} failed on rank {rank}:\n{measured['error']}")
        return ranks

    return get
