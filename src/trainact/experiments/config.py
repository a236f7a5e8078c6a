"""A run's configuration and the choices it offers: light enough for the command line to list
its options (``trainact --help``) without importing the training stack.

:class:`Config` is every knob of one run (:mod:`trainact.experiments.train` runs it), checked
when it is made; the tuples below are the valid values of the fields with a fixed set of them,
offered by the command line as its choices.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from trainact.experiments.models import MODEL_NAMES

__all__ = [
    "AMP_MODES",
    "CHOICES",
    "DATASET_NAMES",
    "DEVICES",
    "INPUT_RANGES",
    "MAX_SEED",
    "METHODS",
    "MODEL_NAMES",
    "OPTIMIZERS",
    "SCHEDULES",
    "Config",
]

#: The datasets known by name (:func:`trainact.experiments.data.load_dataset`); any other
#: ``dataset`` is the path of an image folder or archive.
DATASET_NAMES: tuple[str, ...] = ("cifar10-subset", "cifar10", "cifar100")

METHODS = ("baseline", "tract")
OPTIMIZERS = ("sgd", "adam", "adamw")
# cosine and step are applied per step; vit-cifar is ViT-CIFAR's per-epoch warm-up and cosine
SCHEDULES = ("cosine", "step", "constant", "vit-cifar")
DEVICES = ("auto", "cpu", "cuda")
AMP_MODES = ("none", "bf16", "fp16")
# What the model sees: standardized pixels, pixels in [0, 1], or raw pixel values in [0, 255].
INPUT_RANGES = ("standardized", "unit", "raw")
# The valid values of each field with a fixed set of them (the command line offers the same).
CHOICES = {
    "method": METHODS,
    "optimizer": OPTIMIZERS,
    "schedule": SCHEDULES,
    "device": DEVICES,
    "amp": AMP_MODES,
    "input_range": INPUT_RANGES,
}


@dataclass(frozen=True)
class Config:
    """Every knob of a run, checked when it is made. Units in comments; ``None`` means "from
    the dataset" (or "as the rest", for the first layer's optimizer).

    The defaults are the main job, ``trainact compare`` (about 3 minutes on one CPU core for its
    5 seeds), with the paper's CIFAR-10 SGD recipe (lr 0.08, momentum 0.9, cosine per step,
    batch 128); ``docs/experiments.md`` says why 3 epochs and 5 seeds.
    """

    dataset: str = "cifar10-subset"  # a name or the path of an image folder / archive
    data_dir: str | None = None  # where named datasets and caches live
    train_subset: int | None = None  # stratified subset of the train split (images)
    test_subset: int | None = None  # stratified subset of the test split (images)
    model: str = "resnet-tiny"
    method: str = "baseline"  # baseline | tract
    lam: float = 0.1  # TrAct's λ
    epochs: int = 3
    batch_size: int = 128  # images per step
    drop_last: bool = False  # skip an epoch's last, partial batch
    optimizer: str = "sgd"  # sgd | adam | adamw
    lr: float = 0.08  # peak learning rate
    momentum: float = 0.9  # SGD momentum (Adam's β1 stays 0.9)
    weight_decay: float = 0.0  # L2 for sgd and adam (added to the gradient), decoupled for adamw
    first_layer_optimizer: str | None = None  # the first layer's own optimizer (paper, Fig. 9)
    first_layer_lr: float | None = None  # its peak learning rate; None: lr
    schedule: str = "cosine"  # cosine | step | constant | vit-cifar (see lr_factor)
    final_lr_fraction: float = 0.0  # cosine and vit-cifar end at lr × this
    milestones: tuple[int, ...] = ()  # step schedule: 0-based epochs from which lr × gamma more
    gamma: float = 0.2
    warmup_epochs: float = 0.0  # linear warm-up from 0 (epochs; fractional for cosine and step)
    label_smoothing: float = 0.0
    augment: bool = True  # train-time augmentation: random crop (4-pixel zero padding) and flip,
    rotation: float = 0.0  # then a random rotation in [-rotation, rotation] degrees, and
    autoaugment: bool = False  # ViT-CIFAR's AutoAugment CIFAR-10 policy
    input_range: str = "standardized"  # standardized (x - mean) / std | unit [0, 1] | raw [0, 255]
    mean: tuple[float, float, float] | None = None  # standardization; None: the train split's
    std: tuple[float, float, float] | None = None
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    amp: str = "none"  # none | bf16 | fp16 (fp16 with a GradScaler)
    compile: bool = False
    eval_batch_size: int = 250  # images per evaluation batch (on a CPU, 1000 runs slower)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Reject values that would fail late, train with a negative or NaN learning rate, or
        silently train something else; the message names the option and the bad value."""
        for field, valid in {**CHOICES, "first_layer_optimizer": (None, *OPTIMIZERS)}.items():
            if getattr(self, field) not in valid:
                shown = ", ".join(v for v in valid if v is not None)
                _reject(field, f"one of {shown}", getattr(self, field))
        for field in ("epochs", "batch_size", "eval_batch_size"):
            if getattr(self, field) < 1:
                _reject(field, "at least 1", getattr(self, field))
        if self.model not in MODEL_NAMES:
            raise ValueError(
                f"unknown model {self.model!r}; valid models: {', '.join(MODEL_NAMES)}"
            )
        ranges = {  # field: (lowest, lowest allowed, highest, highest allowed)
            "lr": (0, False, math.inf, False),
            "lam": (0, False, math.inf, False),
            "gamma": (0, False, math.inf, False),
            "momentum": (0, True, 1, False),
            "final_lr_fraction": (0, True, 1, True),
            "label_smoothing": (0, True, 1, True),
            "weight_decay": (0, True, math.inf, False),
            "rotation": (0, True, 180, True),
        }
        if self.first_layer_lr is not None:
            ranges["first_layer_lr"] = (0, False, math.inf, False)
            if self.first_layer_optimizer is None:
                raise ValueError(
                    "--first-layer-lr is the learning rate of --first-layer-optimizer: "
                    "give that too (or set --lr for the whole model)"
                )
        for field, (low, low_ok, high, high_ok) in ranges.items():
            value = getattr(self, field)
            if not (
                (value > low or (low_ok and value == low))
                and (value < high or (high_ok and value == high))
            ):
                _reject(field, _interval(low, low_ok, high, high_ok), value)
        for field in ("lr", "first_layer_lr", "weight_decay"):
            # the optimizers multiply float32 weights and gradients by these: past float32's
            # largest the step fails, and a positive value that rounds to 0 trains nothing
            value = getattr(self, field)
            if value is not None and value > FLOAT32_MAX:
                _reject(field, f"at most {FLOAT32_MAX:.8g} (float32's largest)", value)
            if value is not None and value > 0 and float(torch.tensor(value)) == 0:
                zero = "0 or " if field == "weight_decay" else ""
                _reject(field, f"{zero}at least {FLOAT32_TINY:.8g} (float32's smallest)", value)
        if not 0 <= self.warmup_epochs < self.epochs:
            below = f"at least 0 and below --epochs ({self.epochs})"
            _reject("warmup_epochs", below, self.warmup_epochs)
        if self.schedule == "vit-cifar" and self.warmup_epochs != int(self.warmup_epochs):
            _reject("warmup_epochs", "a whole number of epochs for --schedule vit-cifar",
                    self.warmup_epochs)  # fmt: skip
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            _reject("seed", "an integer", self.seed)
        if not 0 <= self.seed <= MAX_SEED:
            _reject("seed", f"in [0, {MAX_SEED}]", self.seed)
        for field in ("mean", "std"):
            value = getattr(self, field)
            if value is not None and (len(value) != 3 or not all(math.isfinite(v) for v in value)):
                _reject(field, "three finite numbers", value)
        if self.std is not None and not all(v > 0 for v in self.std):
            _reject("std", "positive", self.std)
        if self.input_range != "standardized" and (self.mean is not None or self.std is not None):
            raise ValueError(
                f"--mean and --std standardize the inputs: they do not apply to --input-range "
                f"{self.input_range!r}"
            )
        for field in ("train_subset", "test_subset"):
            if getattr(self, field) is not None and getattr(self, field) < 1:
                _reject(field, "at least 1", getattr(self, field))
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("device cuda was asked for, but torch sees no CUDA device")


MAX_SEED = 2**32 - 1
FLOAT32_MAX = torch.finfo(torch.float32).max
FLOAT32_TINY = torch.finfo(torch.float32).smallest_normal


def _reject(field: str, requirement: str, value: object) -> None:
    raise ValueError(f"--{field.replace('_', '-')} must be {requirement}, got {value!r}")


def _interval(low: float, low_ok: bool, high: float, high_ok: bool) -> str:
    if high == math.inf:
        return f"{'at least' if low_ok else 'greater than'} {low} (and finite)"
    return f"in {'[' if low_ok else '('}{low}, {high}{']' if high_ok else ')'}"
