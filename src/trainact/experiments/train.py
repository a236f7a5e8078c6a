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

import contextlib
import dataclasses
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import trainact
from trainact.experiments import rundir
from trainact.experiments.data import ImageDataset, load_dataset
from trainact.experiments.models import MODEL_NAMES, build_model

METHODS = ("baseline", "tract")
# What the model sees: standardized pixels, pixels in [0, 1], or raw pixel values in [0, 255].
INPUT_RANGES = ("standardized", "unit", "raw")


@dataclass
class Config:
    """Every knob of a run. Units in comments; ``None`` means "from the dataset".

    The defaults are the CPU demonstration of ``trainact compare`` (minutes on two cores) with
    the paper's CIFAR-10 SGD recipe (lr 0.08, momentum 0.9, cosine per step, batch 128).
    """

    dataset: str = "cifar10-subset"  # a name or the path of an image folder / archive
    data_dir: str | None = None  # where named datasets and caches live
    train_subset: int | None = None  # stratified subset of the train split (images)
    model: str = "resnet-tiny"
    method: str = "baseline"  # baseline | tract
    lam: float = 0.1  # TrAct's λ
    epochs: int = 6
    batch_size: int = 128  # images per step
    optimizer: str = "sgd"  # sgd | adam | adamw
    lr: float = 0.08  # peak learning rate
    momentum: float = 0.9  # SGD momentum (Adam's β1 stays 0.9)
    weight_decay: float = 0.0
    schedule: str = "cosine"  # cosine | step | constant, applied per step
    final_lr_fraction: float = 0.0  # cosine ends at lr × this
    milestones: tuple[int, ...] = ()  # step schedule: epochs where lr is multiplied by gamma
    gamma: float = 0.2
    warmup_epochs: float = 0.0  # linear warm-up from 0 (epochs, may be fractional)
    label_smoothing: float = 0.0
    augment: bool = True  # random crop (4-pixel zero padding) and horizontal flip
    input_range: str = "standardized"  # standardized (x - mean) / std | unit [0, 1] | raw [0, 255]
    mean: tuple[float, float, float] | None = None  # standardization; None: the train split's
    std: tuple[float, float, float] | None = None
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    amp: str = "none"  # none | bf16 | fp16
    compile: bool = False
    eval_batch_size: int = 1000

    def validate(self) -> None:
        """Reject values that would fail late, train with a negative or NaN learning rate, or
        silently train something else; the message names the option and the bad value."""
        choices = {
            "method": METHODS,
            "optimizer": ("sgd", "adam", "adamw"),
            "schedule": ("cosine", "step", "constant"),
            "device": ("auto", "cpu", "cuda"),
            "amp": ("none", "bf16", "fp16"),
            "input_range": INPUT_RANGES,
        }
        for field, valid in choices.items():
            if getattr(self, field) not in valid:
                _reject(field, f"one of {', '.join(valid)}", getattr(self, field))
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
        }
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
        if self.train_subset is not None and self.train_subset < 1:
            _reject("train_subset", "at least 1", self.train_subset)
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
    """The dataset ``cfg`` names, with its stratified train subset (drawn with ``cfg.seed``)."""
    return load_dataset(
        cfg.dataset, cfg.data_dir, train_subset=cfg.train_subset, seed=cfg.seed, progress=progress
    )


def resolve_device(name: str) -> torch.device:
    return torch.device(
        "cuda"
        if name == "auto" and torch.cuda.is_available()
        else "cpu"
        if name == "auto"
        else name
    )


# ---------------------------------------------------------------------------------------------
# Data: uint8 on the device, batches sliced from a permutation, augmentation on whole batches.


def epoch_generator(seed: int, epoch: int, device: torch.device) -> torch.Generator:
    """The generator for one epoch's order and augmentation: resuming needs no saved state."""
    return torch.Generator(device=device).manual_seed(1_000_003 * seed + epoch)


def augment(images: Tensor, gen: torch.Generator) -> Tensor:
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


def normalize(images: Tensor, input_range: str, mean: Tensor, std: Tensor) -> Tensor:
    """uint8 pixels as the model's float input in ``input_range`` (see :data:`INPUT_RANGES`)."""
    if input_range == "raw":
        return images.float()
    if input_range == "unit":
        return images.float() / 255
    return (images.float() / 255 - mean) / std


# ---------------------------------------------------------------------------------------------
# Optimization: optimizer and a per-step learning-rate schedule.


def make_optimizer(cfg: Config, model: nn.Module) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )
    kind = torch.optim.Adam if cfg.optimizer == "adam" else torch.optim.AdamW
    return kind(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)


def lr_at(cfg: Config, step: int, steps_per_epoch: int) -> float:
    """Learning rate at ``step`` (0-based): linear warm-up, then the schedule."""
    epoch = step / steps_per_epoch
    total = cfg.epochs * steps_per_epoch
    warmup = cfg.warmup_epochs * steps_per_epoch
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "step":
        return cfg.lr * cfg.gamma ** sum(epoch >= m for m in cfg.milestones)
    progress = (step - warmup) / max(1, total - warmup)
    low = cfg.lr * cfg.final_lr_fraction
    return low + (cfg.lr - low) * 0.5 * (1 + math.cos(math.pi * progress))


# ---------------------------------------------------------------------------------------------
# Evaluation: a plain function.


@torch.no_grad()
def evaluate(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    cfg: Config,
    mean: Tensor,
    std: Tensor,
    amp: Callable[[], torch.autocast],
) -> tuple[float, float]:
    """(mean loss, accuracy) over a whole split, in eval mode."""
    model.eval()
    loss_sum, correct = 0.0, 0
    for start in range(0, len(images), cfg.eval_batch_size):
        x = normalize(images[start : start + cfg.eval_batch_size], cfg.input_range, mean, std)
        y = labels[start : start + cfg.eval_batch_size]
        with amp():
            logits = model(x).float()
        loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
        correct += (logits.argmax(1) == y).sum().item()
    model.train()
    return loss_sum / len(images), correct / len(images)


# ---------------------------------------------------------------------------------------------
# Checkpoints and results: results appended per epoch, checkpoints saved atomically; a resume
# checks one against the other.


def _atomic_save(obj: object, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as err:  # torch reports a full disk as a RuntimeError
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        if isinstance(err, OSError):
            raise rundir.named(err, path) from err
        raise OSError(f"cannot write {path}: {str(err).splitlines()[0]}") from err


def _restore(
    path: Path,
    device: torch.device,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
) -> int:
    """Load model, optimizer and scaler state from the checkpoint; the epochs it has finished."""
    try:
        state = torch.load(path, map_location=device, weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        return int(state["epoch"])
    except Exception as err:  # a corrupt pickle raises nearly anything
        raise ValueError(
            f"{path} is not a readable checkpoint of this run ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else 'no detail'}); "
            "delete it to restart the run from its first epoch"
        ) from err


def _finished_results(path: Path, checkpoint: Path, done: int) -> list[dict]:
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


def _few(values: list) -> str:
    """A list shown with at most 8 items."""
    return "[" + ", ".join(map(str, values[:8])) + (", ...]" if len(values) > 8 else "]")


# Knobs that change where a run is computed, not what it computes: a resume may change them.
RESUMABLE_CHANGES = ("data_dir", "device", "compile", "eval_batch_size")


# ---------------------------------------------------------------------------------------------
# The run.


def train(
    cfg: Config,
    out_dir: str | os.PathLike,
    *,
    resume: bool = False,
    data: ImageDataset | None = None,
    on_epoch: Callable[[dict], None] | None = None,
    progress: bool = True,
) -> list[dict]:
    """Train one model; returns one record per epoch (also in ``out_dir/results.jsonl``).

    ``out_dir`` is claimed for this run (see :mod:`trainact.experiments.rundir`); with
    ``resume`` a run already there continues from its checkpoint (only the fields in
    :data:`RESUMABLE_CHANGES` may differ), and an empty or new directory starts afresh.

    Raises:
        FileExistsError: ``out_dir`` holds a run and ``resume`` is False, belongs to another
            job, or is in use by another process.
        ValueError: a bad knob; resuming a run of another configuration (each field named);
            results or checkpoint that are corrupt or disagree (the file named).
        OSError: a file cannot be written (the path named).
        NonFiniteLoss: the loss became NaN or infinite (results so far are kept).
    """
    cfg.validate()
    out = Path(out_dir)
    identity = {"config": dataclasses.asdict(cfg)}
    with rundir.claim(out, "train", identity, resume=resume, mutable=RESUMABLE_CHANGES):
        return _run(cfg, out, data, on_epoch, progress)


def _run(
    cfg: Config,
    out: Path,
    data: ImageDataset | None,
    on_epoch: Callable[[dict], None] | None,
    progress: bool,
) -> list[dict]:
    """The run in a claimed directory: set up, restore the checkpoint if any, train."""
    results_path, ckpt_path = out / "results.jsonl", out / "checkpoint.pt"
    device = resolve_device(cfg.device)

    # data, held on the device as uint8
    if data is None:
        data = load_data(cfg, progress)
    train_x, train_y = data.train_images.to(device), data.train_labels.to(device)
    test_x, test_y = data.test_images.to(device), data.test_labels.to(device)
    mean = torch.tensor(cfg.mean or data.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(cfg.std or data.std, device=device).view(1, 3, 1, 1)
    steps_per_epoch = math.ceil(len(train_x) / cfg.batch_size)

    # model: the same initialization for both methods of a seed
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, len(data.classes), train_x.shape[-1]).to(device)
    if cfg.method == "tract":
        trainact.apply(model, cfg.lam)
    optimizer = make_optimizer(cfg, model)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16")
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.amp)

    def amp():
        return torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None)

    forward = torch.compile(model) if cfg.compile else model

    start_epoch = 0
    if ckpt_path.exists():
        start_epoch = _restore(ckpt_path, device, model, optimizer, scaler)
    records = _finished_results(results_path, ckpt_path, start_epoch)

    for epoch in range(start_epoch + 1, cfg.epochs + 1):
        started = time.perf_counter()
        gen = epoch_generator(cfg.seed, epoch, device)
        order = torch.randperm(len(train_x), generator=gen, device=device)
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device, dtype=torch.long)
        bar = _progress(steps_per_epoch, f"{cfg.method} seed {cfg.seed} epoch {epoch}", progress)
        for i in range(steps_per_epoch):
            step = (epoch - 1) * steps_per_epoch + i
            for group in optimizer.param_groups:
                group["lr"] = lr_at(cfg, step, steps_per_epoch)
            idx = order[i * cfg.batch_size : (i + 1) * cfg.batch_size]
            images = train_x[idx]
            if cfg.augment:
                images = augment(images, gen)
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
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            loss_sum += loss.detach() * len(idx)
            correct += (logits.argmax(1) == y).sum()
            bar.update()
        bar.close()
        test_loss, test_acc = evaluate(forward, test_x, test_y, cfg, mean, std, amp)
        record = {
            "method": cfg.method,
            "seed": cfg.seed,
            "epoch": epoch,
            "epochs": cfg.epochs,
            "train_loss": loss_sum.item() / len(train_x),
            "train_acc": correct.item() / len(train_x),
            "test_loss": test_loss,
            "test_acc": test_acc,
            "lr": optimizer.param_groups[0]["lr"],
            "seconds": time.perf_counter() - started,
        }
        records.append(record)
        rundir.append_jsonl(results_path, record)
        _atomic_save(
            {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict(),
                "epoch": epoch,
                "config": dataclasses.asdict(cfg),
            },
            ckpt_path,
        )
        if on_epoch is not None:
            on_epoch(record)
    return records


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=False, disable=not enabled, dynamic_ncols=True)
