"""Real photos at every input scale, with the accuracy targets TrAct meets:
``benchmarks/accuracy.py`` prints them, ``tests/nn/test_accuracy.py`` asserts them. The photos
come from the package's embedded CIFAR-10 subset (needs the ``[experiments]`` extra: numpy).
"""

from __future__ import annotations

import functools
import tempfile
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from testing.harness import tract_error


@functools.cache
def _embedded_test_photos() -> Tensor:
    """The embedded CIFAR-10 subset's 2000 test photos, uint8, decoded once per process."""
    from trainact.experiments.data import load_dataset

    with tempfile.TemporaryDirectory() as tmp:
        data = load_dataset("cifar10-subset", tmp, progress=False)
    images: Tensor = data.test_images
    return images


def photos(count: int = 256, *, device: torch.device | str | None = None) -> Tensor:
    """``count`` real CIFAR-10 test photos (the package's embedded subset, 2000 photos) as float32
    pixels in [0, 255], ``(count, 3, 32, 32)``, a new tensor. Needs the ``[experiments]`` extra
    (numpy)."""
    images = _embedded_test_photos()
    if count > images.shape[0]:
        raise ValueError(f"the embedded subset has {images.shape[0]} test photos, not {count}")
    selected = images[:count].float()  # a copy: the decoded photos stay as they are
    return selected if device is None else selected.to(device)


def standardized(x: Tensor) -> Tensor:
    """Each channel shifted and scaled to mean 0 and standard deviation 1 over the batch."""
    mean = x.mean((0, 2, 3), keepdim=True)
    return (x - mean) / x.std((0, 2, 3), keepdim=True)


def smooth(x: Tensor, size: int = 128) -> Tensor:
    """Upsampled like a high-resolution photo: neighbouring pixels nearly equal."""
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False).clamp(0, 255)


def over_exposed(x: Tensor, size: int = 128) -> Tensor:
    """Smooth (:func:`smooth` to ``size`` pixels) and bright: every pixel in [200, 255]."""
    return 200 + smooth(x, size) * (55 / 255)


def tokens(x: Tensor, patch: int = 8) -> Tensor:
    """Non-overlapping patches as token rows ``(B, tokens, 3·patch²)``, as a ViT embeds them."""
    b = x.shape[0]
    return F.unfold(x, patch, stride=patch).transpose(1, 2).reshape(b, -1, 3 * patch * patch)


def conv_stem(k: int, s: int, p: int = 0, out: int = 16) -> Callable[[], nn.Module]:
    """A factory of ``Conv2d(3, out, k, stride=s, padding=p)``."""
    return lambda: nn.Conv2d(3, out, k, stride=s, padding=p)


@dataclass(frozen=True)
class AccuracyCase:
    """One stem on one input made from the photos; ``target`` is the largest relative error
    allowed by default and for ``statistics_dtype=torch.float32``."""

    name: str
    layer: Callable[[], nn.Module]
    input: Callable[[Tensor], Tensor]
    target: float
    #: With ``statistics_dtype=torch.float64``. For n < d (the n×n form) the float32 layer's own
    #: kernel computes the weight gradient from the transformed output gradient, which bounds
    #: its accuracy whatever the statistics' dtype.
    exact_target: float = 1e-6


ACCURACY_CASES: list[AccuracyCase] = [
    AccuracyCase(
        "standardized, 3x3/1 pad 1", conv_stem(3, 1, 1), lambda x: standardized(x[:64]), 3e-5
    ),
    AccuracyCase(
        "standardized, 7x7/2 pad 3", conv_stem(7, 2, 3), lambda x: standardized(x[:64]), 3e-5
    ),
    AccuracyCase("[0, 1], 3x3/1 pad 1", conv_stem(3, 1, 1), lambda x: x[:64] / 255, 3e-5),
    AccuracyCase("[0, 1], 8x8/8", conv_stem(8, 8), lambda x: x[:64] / 255, 3e-5),
    AccuracyCase("[0, 255], 3x3/1 pad 1", conv_stem(3, 1, 1), lambda x: x[:64], 2e-3),
    AccuracyCase("[0, 255], 7x7/2 pad 3", conv_stem(7, 2, 3), lambda x: x[:64], 2e-3),
    AccuracyCase("[0, 255], 4x4/4", conv_stem(4, 4), lambda x: x[:64], 2e-3),
    AccuracyCase("[0, 255], 8x8/8", conv_stem(8, 8), lambda x: x[:128], 2e-3),
    AccuracyCase("[0, 255], 16x16/16", conv_stem(16, 16), lambda x: x[:256], 2e-3),
    AccuracyCase(
        "[0, 255], Linear on 8x8 tokens", lambda: nn.Linear(192, 32), lambda x: tokens(x[:64]), 2e-3
    ),
    AccuracyCase(
        "smooth 128 px [0, 255], 7x7/2 pad 3", conv_stem(7, 2, 3), lambda x: smooth(x[:16]), 1e-2
    ),
    AccuracyCase("smooth 128 px [0, 255], 8x8/8", conv_stem(8, 8), lambda x: smooth(x[:32]), 1e-2),
    AccuracyCase(
        "smooth 128 px [0, 255], 16x16/16", conv_stem(16, 16), lambda x: smooth(x[:64]), 1e-2
    ),
    AccuracyCase(
        "over-exposed [200, 255], 7x7/2 pad 3",
        conv_stem(7, 2, 3),
        lambda x: over_exposed(x[:16]),
        5e-2,
    ),
    AccuracyCase(
        "over-exposed [200, 255], 8x8/8", conv_stem(8, 8), lambda x: over_exposed(x[:32]), 5e-2
    ),
    AccuracyCase(
        "over-exposed [200, 255], 16x16/16",
        conv_stem(16, 16),
        lambda x: over_exposed(x[:64]),
        5e-2,
    ),
    AccuracyCase(
        "n < d: Linear(300) on 16 rows [0, 255]",
        lambda: nn.Linear(300, 8),
        lambda x: x[:16].reshape(16, -1)[:, :300],
        1e-5,
        1e-5,
    ),
    AccuracyCase(
        "n < d: 7x7 on one 9x9 image [0, 255]",
        conv_stem(7, 1),
        lambda x: x[:1, :, :9, :9],
        1e-5,
        1e-5,
    ),
]


def many_chunk_cases(photos_32: int, photos_128: int) -> list[AccuracyCase]:
    """Two raw-pixel cases whose statistics take many chunks: a 7×7/2 stem (64 channels) on
    ``photos_32`` photos, and on ``photos_128`` photos upsampled to 128 px."""
    return [
        AccuracyCase(
            f"[0, 255], 7x7/2 pad 3, {photos_32} photos (many chunks)",
            conv_stem(7, 2, 3, out=64),
            lambda x: x[:photos_32],
            2e-3,
        ),
        AccuracyCase(
            f"smooth 128 px [0, 255], 7x7/2 pad 3, {photos_128} photos (many chunks)",
            conv_stem(7, 2, 3, out=64),
            lambda x: smooth(x[:photos_128]),
            1e-2,
        ),
    ]


#: The ``statistics_dtype`` of each column of the accuracy table, by name.
STATISTICS_DTYPES: dict[str, torch.dtype | None] = {
    "default": None,
    "float32": torch.float32,
    "float64": torch.float64,
}


def case_target(case: AccuracyCase, statistics_dtype: torch.dtype | None) -> float:
    """The largest relative error allowed for ``case`` with ``statistics_dtype``."""
    return case.exact_target if statistics_dtype is torch.float64 else case.target


def case_error(
    case: AccuracyCase,
    images: Tensor,
    statistics_dtype: torch.dtype | None = None,
    *,
    seed: int = 0,
) -> float:
    """Relative error of TrAct's weight gradient on ``case`` (its layer on ``images``' device, a
    random output gradient) against the float64 reference (:func:`tract_error`)."""
    torch.manual_seed(seed)
    layer = case.layer().to(images.device)
    return tract_error(layer, case.input(images), statistics_dtype=statistics_dtype)
