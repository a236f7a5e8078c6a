"""Markers for the experiments tests."""

from __future__ import annotations

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "slow: loads a full real dataset (opt in with TRAINACT_SLOW=1)"
    )
