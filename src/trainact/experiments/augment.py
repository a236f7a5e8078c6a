"""Train-time augmentation of whole uint8 batches, as the recipes the paper names do it.

- :func:`crop_flip`: random crop with 4-pixel zero padding and horizontal flip (torchvision's
  ``RandomCrop(32, padding=4)`` and ``RandomHorizontalFlip()``), on the device, for every recipe.
- :func:`rotate`: torchvision's ``RandomRotation(15)`` on PIL images (weiaicunzai's CIFAR-100
  recipe): an angle uniform in [-15°, 15°] per image, nearest neighbour, zero fill, computed on
  the device with Pillow's own fixed-point arithmetic, so that it gives Pillow's pixels.
- :func:`autoaugment`: the CIFAR-10 AutoAugment policy of ViT-CIFAR's ``autoaugment.py`` and
  ``ops.py`` (from github.com/DeepVoltaire/AutoAugment), one of its 25 sub-policies per image,
  in Pillow on the CPU.

Every random choice comes from the epoch's generator (torch, or a Python ``random.Random``
seeded from it), so a resumed run augments exactly as an uninterrupted one.
"""

from __future__ import annotations

import math
import random
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

if TYPE_CHECKING:
    from PIL.Image import Image as PILImage


def crop_flip(images: Tensor, gen: torch.Generator) -> Tensor:
    """Random crop with 4-pixel zero padding and horizontal flip, for a whole uint8 batch."""
    b, _, h, w = images.shape
    padded = F.pad(images, (4, 4, 4, 4))
    dy = torch.randint(0, 9, (b, 1, 1), generator=gen, device=images.device)
    dx = torch.randint(0, 9, (b, 1, 1), generator=gen, device=images.device)
    rows = (dy + torch.arange(h, device=images.device).view(1, h, 1)).expand(b, h, w)
    cols = (dx + torch.arange(w, device=images.device).view(1, 1, w)).expand(b, h, w)
    batch = torch.arange(b, device=images.device).view(b, 1, 1).expand(b, h, w)
    crops = padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2)
    flip = torch.rand(b, generator=gen, device=images.device) < 0.5
    return torch.where(flip.view(b, 1, 1, 1), crops.flip(3), crops)


# ---------------------------------------------------------------------------------------------
# Rotation


def _fix(v: float) -> int:
    """Pillow's 16.16 fixed-point conversion (``FIX`` in libImaging/Geometry.c)."""
    return math.floor(v * 65536.0 + 0.5)


def _rotation_coefficients(angle: float, w: int, h: int) -> list[int]:
    """The fixed-point inverse affine map of ``Image.rotate(angle)`` about the centre, as
    Pillow computes it: source x = (a2 + x·a0 + y·a1) >> 16, source y = (a5 + x·a3 + y·a4) >> 16."""
    rad = -math.radians(angle % 360.0)
    a, b = round(math.cos(rad), 15), round(math.sin(rad), 15)
    d, e = round(-math.sin(rad), 15), round(math.cos(rad), 15)
    cx, cy = w / 2, h / 2
    c = a * -cx + b * -cy + cx
    f = d * -cx + e * -cy + cy
    return [
        *(_fix(a), _fix(b), _fix(c + a * 0.5 + b * 0.5)),
        *(_fix(d), _fix(e), _fix(f + d * 0.5 + e * 0.5)),
    ]


def rotate_by(images: Tensor, angles: list[float]) -> Tensor:
    """Each image of a uint8 batch rotated counter-clockwise by its angle (degrees) about its
    centre: nearest neighbour, zero outside, pixel for pixel as Pillow's ``Image.rotate``."""
    b, c, h, w = images.shape
    dev = images.device
    coef = torch.tensor([_rotation_coefficients(a, w, h) for a in angles], device=dev)
    coef = coef.view(b, 6, 1, 1)
    ys = torch.arange(h, device=dev, dtype=torch.int64).view(1, h, 1)
    xs = torch.arange(w, device=dev, dtype=torch.int64).view(1, 1, w)
    src_x = (coef[:, 2] + xs * coef[:, 0] + ys * coef[:, 1]) >> 16  # (B, H, W)
    src_y = (coef[:, 5] + xs * coef[:, 3] + ys * coef[:, 4]) >> 16
    inside = (src_x >= 0) & (src_x < w) & (src_y >= 0) & (src_y < h)
    flat = (src_y.clamp(0, h - 1) * w + src_x.clamp(0, w - 1)).view(b, 1, h * w).expand(b, c, -1)
    out = images.reshape(b, c, h * w).gather(2, flat).view(b, c, h, w)
    return out * inside.unsqueeze(1).to(images.dtype)


def rotate(images: Tensor, degrees: float, gen: torch.Generator) -> Tensor:
    """torchvision's ``RandomRotation(degrees)``: an angle uniform in [-degrees, degrees] per
    image (drawn from ``gen``), then :func:`rotate_by`."""
    u = torch.rand(len(images), generator=gen, device=images.device, dtype=torch.float64)
    return rotate_by(images, ((2 * u - 1) * degrees).tolist())


# ---------------------------------------------------------------------------------------------
# AutoAugment: ViT-CIFAR's CIFAR10Policy, on Pillow images

# (probability, operation, magnitude index) twice per sub-policy, as in ViT-CIFAR's list
CIFAR10_POLICY = (
    (0.1, "invert", 7, 0.2, "contrast", 6),
    (0.7, "rotate", 2, 0.3, "translateX", 9),
    (0.8, "sharpness", 1, 0.9, "sharpness", 3),
    (0.5, "shearY", 8, 0.7, "translateY", 9),
    (0.5, "autocontrast", 8, 0.9, "equalize", 2),
    (0.2, "shearY", 7, 0.3, "posterize", 7),
    (0.4, "color", 3, 0.6, "brightness", 7),
    (0.3, "sharpness", 9, 0.7, "brightness", 9),
    (0.6, "equalize", 5, 0.5, "equalize", 1),
    (0.6, "contrast", 7, 0.6, "sharpness", 5),
    (0.7, "color", 7, 0.5, "translateX", 8),
    (0.3, "equalize", 7, 0.4, "autocontrast", 8),
    (0.4, "translateY", 3, 0.2, "sharpness", 6),
    (0.9, "brightness", 6, 0.2, "color", 8),
    (0.5, "solarize", 2, 0.0, "invert", 3),
    (0.2, "equalize", 0, 0.6, "autocontrast", 0),
    (0.2, "equalize", 8, 0.6, "equalize", 4),
    (0.9, "color", 9, 0.6, "equalize", 6),
    (0.8, "autocontrast", 4, 0.2, "solarize", 8),
    (0.1, "brightness", 3, 0.7, "color", 0),
    (0.4, "solarize", 5, 0.9, "autocontrast", 3),
    (0.9, "translateY", 9, 0.7, "translateY", 9),
    (0.9, "autocontrast", 2, 0.8, "solarize", 3),
    (0.8, "equalize", 8, 0.1, "invert", 3),
    (0.7, "translateY", 9, 0.9, "autocontrast", 1),
)
_RANGES = {
    "shearX": np.linspace(0, 0.3, 10),
    "shearY": np.linspace(0, 0.3, 10),
    "translateX": np.linspace(0, 150 / 331, 10),
    "translateY": np.linspace(0, 150 / 331, 10),
    "rotate": np.linspace(0, 30, 10),
    "color": np.linspace(0.0, 0.9, 10),
    "posterize": np.round(np.linspace(8, 4, 10), 0).astype(int),
    "solarize": np.linspace(256, 0, 10),
    "contrast": np.linspace(0.0, 0.9, 10),
    "sharpness": np.linspace(0.0, 0.9, 10),
    "brightness": np.linspace(0.0, 0.9, 10),
}
_GRAY = (128, 128, 128)  # ViT-CIFAR's fill colour


def _operation(img: PILImage, name: str, magnitude: float, rng: random.Random) -> PILImage:
    """One AutoAugment operation on a Pillow image, as ViT-CIFAR's ``ops.py`` does it."""
    from PIL import Image, ImageEnhance, ImageOps

    def sign() -> int:
        return rng.choice([-1, 1])

    if name in ("shearX", "shearY"):
        shear = magnitude * sign()
        matrix: tuple[float, ...]
        matrix = (1, shear, 0, 0, 1, 0) if name == "shearX" else (1, 0, 0, shear, 1, 0)
        return img.transform(
            img.size, Image.Transform.AFFINE, matrix, Image.Resampling.BICUBIC, fillcolor=_GRAY
        )
    if name in ("translateX", "translateY"):
        if name == "translateX":
            matrix = (1, 0, magnitude * img.size[0] * sign(), 0, 1, 0)
        else:
            matrix = (1, 0, 0, 0, 1, magnitude * img.size[1] * sign())
        return img.transform(img.size, Image.Transform.AFFINE, matrix, fillcolor=_GRAY)
    if name == "rotate":
        rot = img.convert("RGBA").rotate(magnitude)
        return Image.composite(rot, Image.new("RGBA", rot.size, (128,) * 4), rot).convert(img.mode)
    if name in ("color", "contrast", "sharpness", "brightness"):
        enhancer = {
            "color": ImageEnhance.Color,
            "contrast": ImageEnhance.Contrast,
            "sharpness": ImageEnhance.Sharpness,
            "brightness": ImageEnhance.Brightness,
        }[name]
        return enhancer(img).enhance(1 + magnitude * sign())
    if name == "posterize":
        return ImageOps.posterize(img, int(magnitude))
    if name == "solarize":
        # a float threshold, as ViT-CIFAR passes it (int() would move it)
        return ImageOps.solarize(img, magnitude)  # type: ignore[arg-type]
    if name == "autocontrast":
        return ImageOps.autocontrast(img)
    if name == "equalize":
        return ImageOps.equalize(img)
    if name == "invert":
        return ImageOps.invert(img)
    raise ValueError(f"unknown AutoAugment operation {name!r}")


def autoaugment_image(img: PILImage, rng: random.Random) -> PILImage:
    """One random sub-policy of :data:`CIFAR10_POLICY` applied to a Pillow image."""
    p1, op1, m1, p2, op2, m2 = CIFAR10_POLICY[rng.randint(0, len(CIFAR10_POLICY) - 1)]
    if rng.random() < p1:
        img = _operation(img, op1, _RANGES.get(op1, [0] * 10)[m1], rng)
    if rng.random() < p2:
        img = _operation(img, op2, _RANGES.get(op2, [0] * 10)[m2], rng)
    return img


def autoaugment(images: Tensor, rng: random.Random) -> Tensor:
    """:func:`autoaugment_image` for each image of a uint8 batch (in Pillow on the CPU; the
    result goes back to the batch's device)."""
    from PIL import Image

    host = images.permute(0, 2, 3, 1).cpu().numpy()
    out = np.stack([np.asarray(autoaugment_image(Image.fromarray(im), rng)) for im in host])
    return torch.from_numpy(out).permute(0, 3, 1, 2).to(images.device)
