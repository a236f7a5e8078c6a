"""pytest marks the tests share."""

from __future__ import annotations

import pytest

from trainact.nn import compat

#: Marks a test that compiles a TrAct layer: torch.compile of one needs a newer torch than the
#: core (below it, TrAct refuses it), so the test skips there.
needs_compile = pytest.mark.skipif(
    compat.torch_version() < compat.MINIMUM_TORCH["torch.compile"][0],
    reason="torch.compile of a TrAct layer needs torch>=2.8",
)
