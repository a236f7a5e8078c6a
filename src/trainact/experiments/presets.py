"""The paper's CIFAR setups (Petersen et al. 2024, Section 4.1), as overrides of a Config.

A preset's learning rate may depend on the epoch budget, as in the paper; every field can
still be overridden on the command line.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

CIFAR10_NORMALIZATION = {
    "mean": (0.4914, 0.4822, 0.4465),
    "std": (0.2023, 0.1994, 0.2010),
}


def _resnet18_cifar10_sgd(epochs: int) -> dict[str, Any]:
    return {
        "dataset": "cifar10",
        "model": "resnet18",
        "epochs": epochs,
        "optimizer": "sgd",
        "lr": 0.08,
        "momentum": 0.9,
        "weight_decay": 0.0,
        "schedule": "cosine",
        "batch_size": 128,
        "augment": True,
        "lam": 0.1,
        **CIFAR10_NORMALIZATION,
    }


def _resnet18_cifar10_adam(epochs: int) -> dict[str, Any]:
    return {
        **_resnet18_cifar10_sgd(epochs),
        "optimizer": "adam",
        "lr": 1e-2 if epochs <= 200 else 1e-3,
    }


def _vit_cifar10(epochs: int) -> dict[str, Any]:
    # AutoAugment of ViT-CIFAR is off: it needs torchvision, which trainact never requires.
    lr_exponent = -3.0 if epochs <= 100 else -3.2 if epochs <= 200 else -3.5
    return {
        "dataset": "cifar10",
        "model": "vit",
        "epochs": epochs,
        "optimizer": "adam",
        "lr": 10**lr_exponent,
        "weight_decay": 5e-5,
        "schedule": "cosine",
        "final_lr_fraction": 0.01,
        "warmup_epochs": 5.0,
        "label_smoothing": 0.1,
        "batch_size": 128,
        "augment": True,
        "lam": 0.1,
        **CIFAR10_NORMALIZATION,
    }


def _resnet18_cifar100(epochs: int) -> dict[str, Any]:
    scale = epochs / 200
    return {
        "dataset": "cifar100",
        "model": "resnet18",
        "epochs": epochs,
        "optimizer": "sgd",
        "lr": 0.1,
        "momentum": 0.9,
        "weight_decay": 5e-4,
        "schedule": "step",
        "milestones": tuple(round(m * scale) for m in (60, 120, 160)),
        "gamma": 0.2,
        "warmup_epochs": 1.0,
        "batch_size": 128,
        "augment": True,
        "lam": 0.1,
    }


@dataclass(frozen=True)
class Preset:
    """A paper setup: its Config fields for an epoch budget, and the paper's budgets."""

    make: Callable[[int], dict[str, Any]]
    budgets: tuple[int, ...]  # epochs; the first is the default of train and compare
    summary: str


PRESETS: dict[str, Preset] = {
    "resnet18-cifar10-sgd": Preset(
        _resnet18_cifar10_sgd,
        (100, 200, 400, 800),
        "ResNet-18, CIFAR-10, SGD lr 0.08, cosine, batch 128",
    ),
    "resnet18-cifar10-adam": Preset(
        _resnet18_cifar10_adam,
        (100, 200, 400, 800),
        "ResNet-18, CIFAR-10, Adam lr 1e-2 (<=200 ep.) / 1e-3",
    ),
    "vit-cifar10": Preset(
        _vit_cifar10,
        (100, 200, 400, 800),
        "ViT-CIFAR, Adam lr 10^-3/-3.2/-3.5 by budget, AutoAugment off",
    ),
    "resnet18-cifar100": Preset(
        _resnet18_cifar100,
        (200,),
        "ResNet-18, CIFAR-100, SGD lr 0.1, x0.2 at 60/120/160 of 200",
    ),
}
PRESET_NAMES = tuple(PRESETS)


def get_preset(name: str) -> Preset:
    """The preset called ``name``; ValueError listing the valid names otherwise."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; valid presets: {', '.join(PRESET_NAMES)}")
    return PRESETS[name]


def preset_overrides(name: str, epochs: int | None = None) -> dict[str, Any]:
    """The Config fields of preset ``name`` for an epoch budget (its first budget when None)."""
    preset = get_preset(name)
    return preset.make(epochs or preset.budgets[0])
