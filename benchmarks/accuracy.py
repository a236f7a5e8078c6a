"""How accurate is trainact's gradient at every input scale? Real photos, float64 reference.

    python benchmarks/accuracy.py          # the CPU's default, the float32 path and float64

For each case (a stem and an input scale, on real CIFAR-10 photos from the package's embedded
subset), one float32 layer's weight gradient with TrAct is compared with G·(XᵀX/n + λI)⁻¹ computed
in float64 from explicitly extracted patches (:mod:`trainact.testing`), λ = 0.1, with the same
plain gradient G; for n < d (the n×n form) with the float64 answer for the same input,
:func:`trainact.testing.exact_tract_grad`. Prints the relative Frobenius error of each case for
``statistics_dtype=None`` (this CPU's policy), ``torch.float32`` (the path of devices without
fast float64) and ``torch.float64``, next to its target. Needs the experiments extra (numpy,
pillow) to decode the photos.
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import trainact
from trainact.testing import exact_tract_grad, reference_tract_grad, relative_error

LAM = 0.1


def photos(count: int = 256, cache_dir: str | None = None) -> Tensor:
    """``count`` real CIFAR-10 test photos as float32 pixels in [0, 255], ``(count, 3, 32, 32)``."""
    from trainact.experiments.data import load_dataset

    with tempfile.TemporaryDirectory() as tmp:
        data = load_dataset("cifar10-subset", cache_dir or tmp, progress=False)
    return data.test_images[:count].float()


def standardized(x: Tensor) -> Tensor:
    mean = x.mean((0, 2, 3), keepdim=True)
    return (x - mean) / x.std((0, 2, 3), keepdim=True)


def smooth(x: Tensor, size: int = 128) -> Tensor:
    """Upsampled like a high-resolution photo: neighbouring pixels nearly equal."""
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False).clamp(0, 255)


def over_exposed(x: Tensor) -> Tensor:
    """Smooth and bright: every pixel in [200, 255]."""
    return 200 + smooth(x) * (55 / 255)


def tokens(x: Tensor, patch: int = 8) -> Tensor:
    """Non-overlapping patches as token rows ``(B, tokens, 3·patch²)``, as a ViT embeds them."""
    b = x.shape[0]
    return F.unfold(x, patch, stride=patch).transpose(1, 2).reshape(b, -1, 3 * patch * patch)


@dataclass(frozen=True)
class Case:
    """One stem on one input; ``target`` is the largest relative error allowed by default."""

    name: str
    layer: Callable[[], nn.Module]
    input: Callable[[Tensor], Tensor]
    target: float
    #: With ``statistics_dtype=torch.float64``. For n < d (the n×n form) the float32 layer's own
    #: kernel computes the weight gradient from the transformed output gradient, which bounds
    #: its accuracy whatever the statistics' dtype.
    exact_target: float = 1e-6


def conv(k: int, s: int, p: int = 0, out: int = 16) -> Callable[[], nn.Module]:
    return lambda: nn.Conv2d(3, out, k, stride=s, padding=p)


CASES = [
    Case("standardized, 3x3/1 pad 1", conv(3, 1, 1), lambda x: standardized(x[:64]), 3e-5),
    Case("standardized, 7x7/2 pad 3", conv(7, 2, 3), lambda x: standardized(x[:64]), 3e-5),
    Case("[0, 1], 3x3/1 pad 1", conv(3, 1, 1), lambda x: x[:64] / 255, 3e-5),
    Case("[0, 1], 8x8/8", conv(8, 8), lambda x: x[:64] / 255, 3e-5),
    Case("[0, 255], 3x3/1 pad 1", conv(3, 1, 1), lambda x: x[:64], 2e-3),
    Case("[0, 255], 7x7/2 pad 3", conv(7, 2, 3), lambda x: x[:64], 2e-3),
    Case("[0, 255], 4x4/4", conv(4, 4), lambda x: x[:64], 2e-3),
    Case("[0, 255], 8x8/8", conv(8, 8), lambda x: x[:128], 2e-3),
    Case("[0, 255], 16x16/16", conv(16, 16), lambda x: x[:256], 2e-3),
    Case(
        "[0, 255], Linear on 8x8 tokens", lambda: nn.Linear(192, 32), lambda x: tokens(x[:64]), 2e-3
    ),
    Case("smooth 128 px [0, 255], 7x7/2 pad 3", conv(7, 2, 3), lambda x: smooth(x[:16]), 1e-2),
    Case("smooth 128 px [0, 255], 8x8/8", conv(8, 8), lambda x: smooth(x[:32]), 1e-2),
    Case("smooth 128 px [0, 255], 16x16/16", conv(16, 16), lambda x: smooth(x[:64]), 1e-2),
    Case(
        "over-exposed [200, 255], 7x7/2 pad 3", conv(7, 2, 3), lambda x: over_exposed(x[:16]), 5e-2
    ),
    Case("over-exposed [200, 255], 8x8/8", conv(8, 8), lambda x: over_exposed(x[:32]), 5e-2),
    Case("over-exposed [200, 255], 16x16/16", conv(16, 16), lambda x: over_exposed(x[:64]), 5e-2),
    Case(
        "n < d: Linear(300) on 16 rows [0, 255]",
        lambda: nn.Linear(300, 8),
        lambda x: x[:16].reshape(16, -1)[:, :300],
        1e-5,
        1e-5,
    ),
    Case(
        "n < d: 7x7 on one 9x9 image [0, 255]", conv(7, 1), lambda x: x[:1, :, :9, :9], 1e-5, 1e-5
    ),
]


def case_error(
    case: Case, images: Tensor, statistics_dtype: torch.dtype | None = None, seed: int = 0
) -> float:
    """Relative error of TrAct's weight gradient against the float64 reference on ``case``."""
    torch.manual_seed(seed)
    plain = case.layer().to(images.device)
    options = {} if statistics_dtype is None else {"statistics_dtype": statistics_dtype}
    tract = trainact.TrAct(case.layer().to(images.device), **options)  # (older trainact too)
    tract.load_state_dict(plain.state_dict())
    x = case.input(images)
    out = plain(x)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    tract(x).backward(grad_out)
    if _patches(tract, x) < _patch_dim(tract):
        expected = exact_tract_grad(plain, x, grad_out, LAM)
    else:
        expected = reference_tract_grad(tract, x, plain.weight.grad, LAM)
    return relative_error(tract.weight.grad, expected)


def _patches(layer: nn.Module, x: Tensor) -> int:
    with torch.no_grad():
        out = layer(x)
    return out.numel() // out.shape[-1 if isinstance(layer, nn.Linear) else 1]


def _patch_dim(layer: nn.Module) -> int:
    return layer.weight[0].numel()


#: The columns: the name of each ``statistics_dtype``.
COLUMNS = {"default": None, "float32": torch.float32, "float64": torch.float64}


def target(case: Case, statistics_dtype: torch.dtype | None) -> float:
    """The largest relative error allowed for ``case`` with ``statistics_dtype``."""
    return case.exact_target if statistics_dtype is torch.float64 else case.target


def main() -> None:
    argparse.ArgumentParser(description=__doc__.split("\n")[0]).parse_args()
    images = photos()
    print(f"lambda={LAM}, torch {torch.__version__}; relative error (target)")
    print("| case | " + " | ".join(COLUMNS) + " |\n|---|" + "---:|" * len(COLUMNS))
    over = 0
    for case in CASES:
        cells = []
        for dtype in COLUMNS.values():
            limit = target(case, dtype)
            error = case_error(case, images, dtype)
            over += not error <= limit
            cells.append(f"{error:.1e} ({limit:.0e}){'' if error <= limit else ' **over**'}")
        print(f"| {case.name} | " + " | ".join(cells) + " |")
    print("every case within its target" if not over else f"{over} cells over their target")


if __name__ == "__main__":
    main()
