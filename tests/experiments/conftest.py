"""Fixtures of the experiment tests: one torch thread, and tiny real data decoded once."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from trainact.experiments.data import ImageDataset, load_dataset


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: the CPU models are tiny, and the test machine is shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def subset_cache(tmp_path_factory) -> Path:
    """A data dir holding the decoded embedded CIFAR-10 subset (for --data-dir)."""
    cache = tmp_path_factory.mktemp("cache")
    load_dataset("cifar10-subset", cache, progress=False)
    return cache


@pytest.fixture(scope="module")
def tiny(subset_cache) -> ImageDataset:
    """300 train / 100 test images of the embedded CIFAR-10 subset."""
    full = load_dataset("cifar10-subset", subset_cache, train_subset=300, progress=False)
    return dataclasses.replace(
        full, test_images=full.test_images[:100], test_labels=full.test_labels[:100]
    )
