"""What differs between torch versions (trainact/nn/compat.py)."""

from __future__ import annotations

import torch

from trainact.nn import compat


def test_while_tracing_sets_the_mark_of_torch_s_assume_constant_result():
    """``while_tracing`` sets dynamo's constant-result mark without importing dynamo: the same
    mark ``torch.compiler.assume_constant_result`` sets, on this torch."""

    def ours() -> bool:
        return True

    def torchs() -> bool:
        return True

    compat.while_tracing(ours)
    torch.compiler.assume_constant_result(torchs)
    assert vars(torchs) and vars(ours) == vars(torchs)


def test_torch_version_is_this_torch_s():
    major, minor = compat.torch_version()
    assert torch.__version__.startswith(f"{major}.{minor}")
