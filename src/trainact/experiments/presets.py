"""The paper's CIFAR setups (Petersen et al. 2024, Section 4.1), as overrides of a Config.

Each follows the code the paper names where the paper is silent: the authors' CIFAR-10 example
(github.com/Felix-Petersen/tract, ``examples/train_cifar.py`` and ``resnet_cifar10.py``), the
ViT-CIFAR repository (github.com/omihub777/ViT-CIFAR, ``main.py`` with ``--patch 8
--label-smoothing --autoaugment``) and weiaicunzai's CIFAR-100 recipe
(github.com/weiaicunzai/pytorch-cifar100, ``train.py``). ``docs/experiments.md`` lists what still
differs from each and why. A preset's learning rate may depend on the epoch budget, as in the
paper; every field can still be overridden on the command line. compare and sweep run the
paper's 5 seeds by default, with a preset or without.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# examples/train_cifar.py (both CIFAR datasets there)
AUTHORS_NORMALIZATION = {"mean": (0.4914, 0.4822, 0.4465), "std": (0.2023, 0.1994, 0.2010)}
# ViT-CIFAR's utils.py, CIFAR-10
VIT_CIFAR10_NORMALIZATION = {"mean": (0.4914, 0.4822, 0.4465), "std": (0.2470, 0.2435, 0.2616)}
# weiaicunzai's conf/global_settings.py: the CIFAR-100 train split's statistics
CIFAR100_NORMALIZATION = {
    "mean": (0.5070751592371323, 0.48654887331495095, 0.4409178433670343),
    "std": (0.2673342858792401, 0.2564384629170883, 0.27615047132568404),
}


def _resnet18_cifar10_sgd(epochs: int) -> dict[str, Any]:
    # train_cifar.py --optim sgd_w_momentum_cosine --lr 0.08: CosineAnnealingLR stepped per
    # step to 0, no weight decay, DataLoader(drop_last=True): 390 steps of 128 an epoch
    return {
        "dataset": "cifar10",
        "model": "resnet18",
        "epochs": epochs,
        "optimizer": "sgd",
        "lr": 0.08,
        "momentum": 0.9,
        "weight_decay": 0.0,
        "schedule": "cosine",
        "final_lr_fraction": 0.0,
        "batch_size": 128,
        "drop_last": True,
        "augment": True,
        "lam": 0.1,
        **AUTHORS_NORMALIZATION,
    }


def _resnet18_cifar10_adam(epochs: int) -> dict[str, Any]:
    # train_cifar.py --optim adam_cosine: the README's lr 0.01 for 100 and 200 epochs, 0.001 beyond
    return {
        **_resnet18_cifar10_sgd(epochs),
        "optimizer": "adam",
        "lr": 1e-2 if epochs <= 200 else 1e-3,
    }


def _vit_cifar10(epochs: int) -> dict[str, Any]:
    # ViT-CIFAR main.py: Adam (L2 weight decay 5e-5), GradualWarmupScheduler over 5 epochs then
    # CosineAnnealingLR(T_max=epochs, eta_min=1e-5) stepped per epoch, 16-bit precision; its
    # label smoothing gives the target 1 - 0.1 and each other class 0.1 / 9, which is torch's
    # label_smoothing = 0.1 · 10 / 9. The paper's lr per budget: 10^-3, 10^-3.2, 10^-3.5.
    lr = 10 ** (-3.0 if epochs <= 100 else -3.2 if epochs <= 200 else -3.5)
    return {
        "dataset": "cifar10",
        "model": "vit",
        "epochs": epochs,
        "optimizer": "adam",
        "lr": lr,
        "weight_decay": 5e-5,
        "schedule": "vit-cifar",
        "final_lr_fraction": 1e-5 / lr,
        "warmup_epochs": 5.0,
        "label_smoothing": 0.1 * 10 / 9,
        "batch_size": 128,
        "augment": True,
        "autoaugment": True,
        "amp": "fp16",
        "eval_batch_size": 1024,
        "lam": 0.1,
        **VIT_CIFAR10_NORMALIZATION,
    }


def _resnet18_cifar100(epochs: int) -> dict[str, Any]:
    # weiaicunzai train.py: SGD lr 0.1, momentum 0.9, weight decay 5e-4; warm-up over the first
    # epoch's steps from 0; MultiStepLR(milestones=[60, 120, 160], gamma=0.2) stepped with the
    # 1-based epoch before it, i.e. ×0.2 from 0-based epochs 59, 119 and 159 (scaled with the
    # budget); crop, flip and RandomRotation(15)
    scale = epochs / 200
    return {
        "dataset": "cifar100",
        "model": "resnet18-nopool",
        "epochs": epochs,
        "optimizer": "sgd",
        "lr": 0.1,
        "momentum": 0.9,
        "weight_decay": 5e-4,
        "schedule": "step",
        "milestones": tuple(max(1, round(m * scale)) - 1 for m in (60, 120, 160)),
        "gamma": 0.2,
        "warmup_epochs": 1.0,
        "batch_size": 128,
        "augment": True,
        "rotation": 15.0,
        "lam": 0.1,
        **CIFAR100_NORMALIZATION,
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
        "the authors' ResNet-18 (max-pool), CIFAR-10, SGD lr 0.08, cosine per step, batch 128 "
        "(last partial batch dropped)",
    ),
    "resnet18-cifar10-adam": Preset(
        _resnet18_cifar10_adam,
        (100, 200, 400, 800),
        "the same with Adam lr 1e-2 (<= 200 epochs) / 1e-3",
    ),
    "vit-cifar10": Preset(
        _vit_cifar10,
        (100, 200, 400, 800),
        "ViT-CIFAR --patch 8 (4x4-pixel patches), Adam lr 10^-3/-3.2/-3.5 by budget, 5 warm-up "
        "epochs, cosine per epoch to 1e-5, label smoothing, AutoAugment, fp16",
    ),
    "resnet18-cifar100": Preset(
        _resnet18_cifar100,
        (200,),
        "weiaicunzai's ResNet-18 (no max-pool), CIFAR-100, SGD lr 0.1, x0.2 at 60/120/160 of "
        "200, rotation 15",
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
