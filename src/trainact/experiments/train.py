"""One training run, read top to bottom: config, data on the device, model, loop, evaluation.

    trainact train --model resnet-tiny --method tract --epochs 6
    trainact train --preset resnet18-cifar10-sgd --method tract --epochs 100 --device cuda

Baseline and TrAct runs of one seed share the initialization, the data order and the
augmentation (each drawn from its own generator seeded by the seed and the epoch), so they
differ by TrAct alone. Every epoch appends a line to ``results.jsonl`` and then saves a
checkpoint atomically; ``resume`` checks the results against the checkpoint, continues from it
and ends exactly where an uninterrupted run would. The run directory is claimed and locked for
the run (:mod:`trainact.experiments.rundir`).
"""

from __future__ import annotations

import dataclasses
import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import trainact
from trainact.experiments import augment, rundir
from trainact.experiments.data import ImageDataset, load_dataset
from trainact.experiments.models import FIRST_LAYER, MODEL_NAMES, build_model

if TYPE_CHECKING:
    from tqdm import tqdm

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


def _reject(field: str, requirement: str, value: object) -> None:
    raise ValueError(f"--{field.replace('_', '-')} must be {requirement}, got {value!r}")


def _interval(low: float, low_ok: bool, high: float, high_ok: bool) -> str:
    if high == math.inf:
        return f"{'at least' if low_ok else 'greater than'} {low} (and finite)"
    return f"in {'[' if low_ok else '('}{low}, {high}{']' if high_ok else ')'}"


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or infinite; the results so far are kept."""


def load_data(cfg: Config, progress: bool = True) -> ImageDataset:
    """The dataset ``cfg`` names, with its stratified train subset (drawn with ``cfg.seed``) and
    test subset (always the same images)."""
    return load_dataset(
        cfg.dataset,
        cfg.data_dir,
        train_subset=cfg.train_subset,
        test_subset=cfg.test_subset,
        seed=cfg.seed,
        progress=progress,
    )


def resolve_device(name: str) -> torch.device:
    return torch.device(
        "cuda"
        if name == "auto" and torch.cuda.is_available()
        else "cpu"
        if name == "auto"
        else name
    )


def environment(device: torch.device) -> dict[str, Any]:
    """Where a run is computed: versions, device and CPU threads (recorded in ``job.json``)."""
    env = {
        "trainact": trainact.__version__,
        "torch": torch.__version__,
        "device": str(device),
        "threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        env["device_name"] = torch.cuda.get_device_name(device)
    return env


# ---------------------------------------------------------------------------------------------
# Data: uint8 on the device, batches sliced from a permutation, augmentation on whole batches.


def epoch_generator(seed: int, epoch: int, device: torch.device) -> torch.Generator:
    """The generator for one epoch's order and augmentation: resuming needs no saved state."""
    return torch.Generator(device=device).manual_seed(1_000_003 * seed + epoch)


def augment_batch(cfg: Config, images: Tensor, gen: torch.Generator, rng: random.Random) -> Tensor:
    """The recipe's train-time augmentation of a uint8 batch (see :mod:`.augment`)."""
    images = augment.crop_flip(images, gen)
    if cfg.rotation:
        images = augment.rotate(images, cfg.rotation, gen)
    if cfg.autoaugment:
        images = augment.autoaugment(images, rng)
    return images


def normalize(images: Tensor, input_range: str, mean: Tensor, std: Tensor) -> Tensor:
    """uint8 pixels as the model's float input in ``input_range`` (see :data:`INPUT_RANGES`)."""
    if input_range == "raw":
        return images.float()
    if input_range == "unit":
        return images.float() / 255
    return (images.float() / 255 - mean) / std


# ---------------------------------------------------------------------------------------------
# Optimization: the optimizers (one, or the first layer's and the rest's) and a learning-rate
# schedule as a factor of each one's peak rate.


def make_optimizers(cfg: Config, model: nn.Module, first_layer: str) -> list[torch.optim.Optimizer]:
    """The optimizer of the whole model, or with ``cfg.first_layer_optimizer`` one for the
    layer ``first_layer`` and one for the rest; each group keeps its peak rate as ``peak_lr``."""

    def make(kind: str, params: list[nn.Parameter], lr: float) -> torch.optim.Optimizer:
        opt: torch.optim.Optimizer
        if kind == "sgd":
            opt = torch.optim.SGD(
                params, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
            )
        else:
            cls = torch.optim.Adam if kind == "adam" else torch.optim.AdamW
            opt = cls(params, lr=lr, weight_decay=cfg.weight_decay)
        for group in opt.param_groups:
            group["peak_lr"] = lr
        return opt

    if cfg.first_layer_optimizer is None:
        return [make(cfg.optimizer, list(model.parameters()), cfg.lr)]
    first = list(model.get_submodule(first_layer).parameters())
    ids = {id(p) for p in first}
    rest = [p for p in model.parameters() if id(p) not in ids]
    first_lr = cfg.first_layer_lr if cfg.first_layer_lr is not None else cfg.lr
    return [make(cfg.first_layer_optimizer, first, first_lr), make(cfg.optimizer, rest, cfg.lr)]


def lr_factor(cfg: Config, step: int, steps_per_epoch: int) -> float:
    """The learning rate at ``step`` (0-based) over the peak rate.

    cosine, step, constant: a linear warm-up from 0 over ``warmup_epochs`` (per step), then
    per step a cosine to ``final_lr_fraction`` over the remaining steps, ×``gamma`` from each
    of ``milestones`` (0-based epochs) on, or constant. vit-cifar, per epoch e (0-based) as
    ViT-CIFAR's GradualWarmupScheduler and CosineAnnealingLR(T_max=epochs) step it: e / W up to
    the W warm-up epochs, then the cosine from 1 to ``final_lr_fraction`` over ``epochs``
    starting one epoch later (epoch W + 1 is at the peak).
    """
    low = cfg.final_lr_fraction
    if cfg.schedule == "vit-cifar":
        e, warm = step // steps_per_epoch, int(cfg.warmup_epochs)
        if warm and e <= warm:
            return e / warm
        k = e - warm - 1 if warm else e
        return low + (1 - low) * 0.5 * (1 + math.cos(math.pi * k / cfg.epochs))
    total = cfg.epochs * steps_per_epoch
    warmup = cfg.warmup_epochs * steps_per_epoch
    if step < warmup:
        return step / warmup
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "step":
        return cfg.gamma ** sum(step / steps_per_epoch >= m for m in cfg.milestones)
    progress = (step - warmup) / max(1, total - warmup)
    return low + (1 - low) * 0.5 * (1 + math.cos(math.pi * progress))


def lr_at(cfg: Config, step: int, steps_per_epoch: int) -> float:
    """The learning rate of the whole model (the rest, with a first-layer optimizer) at ``step``."""
    return cfg.lr * lr_factor(cfg, step, steps_per_epoch)


def steps_in_epoch(cfg: Config, train_size: int) -> int:
    """Optimizer steps per epoch: every batch, or only the full ones with ``drop_last``."""
    return train_size // cfg.batch_size if cfg.drop_last else math.ceil(train_size / cfg.batch_size)


# ---------------------------------------------------------------------------------------------
# Evaluation: a plain function.

TOP_K = 5  # top-5 accuracy beside top-1, for datasets with more classes than this


@torch.no_grad()
def evaluate(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    cfg: Config,
    mean: Tensor,
    std: Tensor,
    amp: Callable[[], torch.autocast],
    num_classes: int,
) -> tuple[float, float, float | None]:
    """(mean loss, top-1 accuracy, top-5 accuracy or None for 5 classes or fewer) over a whole
    split, in eval mode."""
    model.eval()
    loss_sum, correct, correct_k = 0.0, 0, 0
    for start in range(0, len(images), cfg.eval_batch_size):
        x = normalize(images[start : start + cfg.eval_batch_size], cfg.input_range, mean, std)
        y = labels[start : start + cfg.eval_batch_size]
        with amp():
            logits = model(x).float()
        loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
        correct += (logits.argmax(1) == y).sum().item()
        if num_classes > TOP_K:
            top = logits.topk(TOP_K, dim=1).indices
            correct_k += (top == y[:, None]).any(1).sum().item()
    model.train()
    n = len(images)
    return loss_sum / n, correct / n, correct_k / n if num_classes > TOP_K else None


# ---------------------------------------------------------------------------------------------
# Checkpoints and results: results appended per epoch, checkpoints saved atomically; a resume
# checks one against the other.


def _restore(
    path: Path,
    device: torch.device,
    model: nn.Module,
    optimizers: list[torch.optim.Optimizer],
    scaler: torch.amp.GradScaler,
) -> int:
    """Load model, optimizer and scaler state from the checkpoint; the epochs it has finished."""
    try:
        state = torch.load(path, map_location=device, weights_only=False)
        model.load_state_dict(state["model"])
        if len(state["optimizers"]) != len(optimizers):
            raise ValueError(f"{len(state['optimizers'])} optimizers saved, {len(optimizers)} made")
        for opt, saved in zip(optimizers, state["optimizers"], strict=True):
            opt.load_state_dict(saved)
        scaler.load_state_dict(state["scaler"])
        return int(state["epoch"])
    except Exception as err:  # a corrupt pickle raises nearly anything
        raise ValueError(
            f"{path} is not a readable checkpoint of this run ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else 'no detail'}); "
            "delete it to restart the run from its first epoch"
        ) from err


def _finished_results(path: Path, checkpoint: Path, done: int) -> list[dict[str, Any]]:
    """The records of the ``done`` epochs the checkpoint has finished, with ``path`` rewritten
    atomically to hold exactly those (lines past the checkpoint are epochs to redo)."""
    records = rundir.read_jsonl(path) if path.exists() else []
    kept = [r for r in records if not (isinstance(r.get("epoch"), int) and r["epoch"] > done)]
    epochs = [r.get("epoch") for r in kept]
    if epochs != list(range(1, done + 1)):
        missing = sorted(set(range(1, done + 1)) - set(epochs))
        problem = (
            f"lack epochs {_few(missing)}"
            if missing
            else f"hold epochs {_few(epochs)}, not each of 1 to {done} once in order"
        )
        raise ValueError(
            f"{path} does not match {checkpoint}: the checkpoint has finished {done} epochs but "
            f"the results {problem}; the lost results cannot be rebuilt, start the run afresh "
            "in another --out"
        )
    rundir.write_jsonl(path, kept)
    return kept


def _few(values: list[Any]) -> str:
    """A list shown with at most 8 items."""
    return "[" + ", ".join(map(str, values[:8])) + (", ...]" if len(values) > 8 else "]")


# Knobs that change where a run is computed, not what it computes: a resume may change them.
RESUMABLE_CHANGES = ("data_dir", "device", "compile", "eval_batch_size")


# ---------------------------------------------------------------------------------------------
# The run.


def train(
    cfg: Config,
    out_dir: str | os.PathLike[str],
    *,
    resume: bool = False,
    data: ImageDataset | None = None,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Train one model; returns one record per epoch (also in ``out_dir/results.jsonl``).

    ``out_dir`` is claimed for this run (see :mod:`trainact.experiments.rundir`); with
    ``resume`` a run already there continues from its checkpoint (only the fields in
    :data:`RESUMABLE_CHANGES` may differ), and an empty or new directory starts afresh.
    ``progress`` shows a bar per epoch where stderr is a terminal.

    Raises:
        FileExistsError: ``out_dir`` holds a run and ``resume`` is False, belongs to another
            job, or is in use by another process.
        ValueError: resuming a run of another configuration (each field named); results or
            checkpoint that are corrupt or disagree (the file named); a train split smaller
            than one batch with ``drop_last``.
        OSError: a file cannot be written (the path named).
        NonFiniteLoss: the loss became NaN or infinite (results so far are kept).
    """
    out = Path(out_dir)
    identity = {"config": dataclasses.asdict(cfg)}
    device = resolve_device(cfg.device)
    with rundir.claim(
        out, "train", identity, resume=resume, mutable=RESUMABLE_CHANGES, env=environment(device)
    ):
        return _run(cfg, out, device, data, on_epoch, progress)


def _run(
    cfg: Config,
    out: Path,
    device: torch.device,
    data: ImageDataset | None,
    on_epoch: Callable[[dict[str, Any]], None] | None,
    progress: bool,
) -> list[dict[str, Any]]:
    """The run in a claimed directory: set up, restore the checkpoint if any, train."""
    results_path, ckpt_path = out / "results.jsonl", out / "checkpoint.pt"

    # data, held on the device as uint8
    if data is None:
        data = load_data(cfg, progress)
    train_x, train_y = data.train_images.to(device), data.train_labels.to(device)
    test_x, test_y = data.test_images.to(device), data.test_labels.to(device)
    mean = torch.tensor(cfg.mean or data.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(cfg.std or data.std, device=device).view(1, 3, 1, 1)
    steps_per_epoch = steps_in_epoch(cfg, len(train_x))
    if steps_per_epoch == 0:
        raise ValueError(
            f"--drop-last with --batch-size {cfg.batch_size} leaves no step: the train split "
            f"has {len(train_x)} images"
        )
    images_per_epoch = min(len(train_x), steps_per_epoch * cfg.batch_size)

    # model: the same initialization for both methods of a seed
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, len(data.classes), train_x.shape[-1]).to(device)
    first_layer = FIRST_LAYER[cfg.model]
    if cfg.method == "tract":
        trainact.apply(model, cfg.lam, layer=first_layer)
    optimizers = make_optimizers(cfg, model, first_layer)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16")
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.amp)

    def amp() -> torch.autocast:
        return torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None)

    # torch.compile wraps a module in an OptimizedModule, itself a module
    forward = cast(nn.Module, torch.compile(model)) if cfg.compile else model

    start_epoch = 0
    if ckpt_path.exists():
        start_epoch = _restore(ckpt_path, device, model, optimizers, scaler)
    records = _finished_results(results_path, ckpt_path, start_epoch)

    for epoch in range(start_epoch + 1, cfg.epochs + 1):
        started = time.perf_counter()
        gen = epoch_generator(cfg.seed, epoch, device)
        rng = random.Random(1_000_003 * cfg.seed + epoch)  # AutoAugment's choices
        order = torch.randperm(len(train_x), generator=gen, device=device)
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device, dtype=torch.long)
        bar = _progress(steps_per_epoch, f"{cfg.method} seed {cfg.seed} epoch {epoch}", progress)
        for i in range(steps_per_epoch):
            factor = lr_factor(cfg, (epoch - 1) * steps_per_epoch + i, steps_per_epoch)
            for opt in optimizers:
                for group in opt.param_groups:
                    group["lr"] = group["peak_lr"] * factor
            idx = order[i * cfg.batch_size : (i + 1) * cfg.batch_size]
            images = train_x[idx]
            if cfg.augment:
                images = augment_batch(cfg, images, gen, rng)
            x, y = normalize(images, cfg.input_range, mean, std), train_y[idx]
            with amp():
                logits = forward(x)
            loss = F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing)
            if not torch.isfinite(loss):
                raise NonFiniteLoss(
                    f"loss is {loss.item()} at epoch {epoch}, step {i + 1} of {steps_per_epoch}; "
                    f"results of the {len(records)} finished epochs are kept in {results_path}"
                )
            scaler.scale(loss).backward()
            for opt in optimizers:
                scaler.step(opt)
            scaler.update()
            for opt in optimizers:
                opt.zero_grad(set_to_none=True)
            loss_sum += loss.detach() * len(idx)
            correct += (logits.argmax(1) == y).sum()
            bar.update()
        bar.close()
        test_loss, test_acc, test_top5 = evaluate(
            forward, test_x, test_y, cfg, mean, std, amp, len(data.classes)
        )
        record = {
            "method": cfg.method,
            "seed": cfg.seed,
            "epoch": epoch,
            "epochs": cfg.epochs,
            "train_loss": loss_sum.item() / images_per_epoch,
            "train_acc": correct.item() / images_per_epoch,
            "test_loss": test_loss,
            "test_acc": test_acc,
            **({"test_top5": test_top5} if test_top5 is not None else {}),
            "lr": cfg.lr * factor,
            "seconds": time.perf_counter() - started,
        }
        records.append(record)
        rundir.append_jsonl(results_path, record)
        checkpoint = {
            "model": model.state_dict(),
            "optimizers": [opt.state_dict() for opt in optimizers],
            "scaler": scaler.state_dict(),
            "epoch": epoch,
            "config": dataclasses.asdict(cfg),
        }

        def save(f: BinaryIO, obj: dict[str, Any] = checkpoint) -> None:
            torch.save(obj, f)

        rundir.write_atomic(ckpt_path, save)
        if on_epoch is not None:
            on_epoch(record)
    return records


def _progress(total: int, desc: str, enabled: bool) -> tqdm[Any]:
    """A progress bar on stderr, shown only where stderr is a terminal (tqdm's ``disable=None``)."""
    from tqdm.auto import tqdm

    return tqdm(
        total=total, desc=desc, leave=False, disable=None if enabled else True, dynamic_ncols=True
    )
