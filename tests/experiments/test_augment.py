"""The recipes' augmentations: weiaicunzai's RandomRotation(15) pixel for pixel as Pillow rotates,
ViT-CIFAR's AutoAugment policy, and both wired into training reproducibly."""

from __future__ import annotations

import dataclasses
import random

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from trainact.experiments import augment, train


def pil_rotate(image: torch.Tensor, angle: float) -> np.ndarray:
    """torchvision's F.rotate on a PIL image: Image.rotate(angle, NEAREST, fillcolor=0)."""
    pil = Image.fromarray(image.permute(1, 2, 0).numpy())
    return np.asarray(pil.rotate(angle, Image.NEAREST, expand=False, fillcolor=0))


def test_rotation_gives_pillows_pixels():
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8, generator=gen)
    angles = [*(torch.rand(60, generator=gen, dtype=torch.float64) * 30 - 15).tolist()]
    angles += [0.0, 15.0, -15.0, 90.0]
    out = augment.rotate_by(images, angles)
    for image, angle, rotated in zip(images, angles, out, strict=True):
        assert np.array_equal(rotated.permute(1, 2, 0).numpy(), pil_rotate(image, angle)), angle
    odd = torch.randint(0, 256, (1, 3, 7, 9), dtype=torch.uint8, generator=gen)
    assert np.array_equal(
        augment.rotate_by(odd, [-11.3])[0].permute(1, 2, 0), pil_rotate(odd[0], -11.3)
    )


def test_random_rotation_draws_uniform_angles_within_the_range():
    images = torch.randint(0, 256, (400, 3, 8, 8), dtype=torch.uint8)
    rotated = augment.rotate(images, 15.0, torch.Generator().manual_seed(1))
    u = torch.rand(400, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    angles = (30 * u - 15).tolist()
    assert torch.equal(rotated, augment.rotate_by(images, angles))
    assert -15 <= min(angles) < -14 and 14 < max(angles) <= 15
    assert abs(sum(angles) / len(angles)) < 1.5  # centred on 0


def test_autoaugment_applies_vit_cifars_policy_reproducibly():
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (128, 3, 32, 32), dtype=torch.uint8, generator=gen)
    a = augment.autoaugment(images, random.Random(3))
    b = augment.autoaugment(images, random.Random(3))
    assert a.dtype == torch.uint8 and a.shape == images.shape and torch.equal(a, b)
    changed = (a != images).flatten(1).any(1).float().mean().item()
    assert 0.5 < changed < 1.0  # most images get an operation, some sub-policies skip both
    assert len(augment.CIFAR10_POLICY) == 25


@pytest.mark.parametrize(
    "name,magnitude,expected",
    [
        ("invert", 0, ImageOps.invert),
        ("equalize", 0, ImageOps.equalize),
        ("autocontrast", 0, ImageOps.autocontrast),
        ("posterize", 4, lambda im: ImageOps.posterize(im, 4)),
        ("solarize", 128.0, lambda im: ImageOps.solarize(im, 128.0)),
    ],
)
def test_autoaugment_operations_are_pillows(name, magnitude, expected):
    gen = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (32, 32, 3), dtype=torch.uint8, generator=gen).numpy()
    image = Image.fromarray(pixels)
    got = augment._operation(image, name, magnitude, random.Random(0))
    assert np.array_equal(np.asarray(got), np.asarray(expected(image)))


def test_translate_moves_by_the_fraction_of_the_size_with_gray_fill():
    pixels = np.zeros((32, 32, 3), np.uint8)
    pixels[:, 0] = 255
    shifted = np.asarray(
        augment._operation(Image.fromarray(pixels), "translateX", 0.25, FixedSign(-1))
    )
    # (1, 0, -8, ...) maps output x to input x - 8: the column moves right by 8, gray comes in
    assert shifted[0, 8, 0] == 255 and (shifted[:, :8] == 128).all()


class FixedSign(random.Random):
    def __init__(self, sign: int) -> None:
        super().__init__(0)
        self.sign = sign

    def choice(self, seq):
        return self.sign


def test_training_with_rotation_and_autoaugment_is_reproducible(tiny, tmp_path):
    cfg = train.Config(epochs=1, batch_size=100, eval_batch_size=100, rotation=15, autoaugment=True)
    a = train.train(cfg, tmp_path / "a", data=tiny, progress=False)
    b = train.train(cfg, tmp_path / "b", data=tiny, progress=False)
    plain = train.train(
        dataclasses.replace(cfg, rotation=0, autoaugment=False),
        tmp_path / "c",
        data=tiny,
        progress=False,
    )
    assert a[0]["train_loss"] == b[0]["train_loss"] != plain[0]["train_loss"]
