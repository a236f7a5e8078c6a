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
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import trainact
from trainact.experiments import augment, rundir
from trainact.experiments.config import Config
from trainact.experiments.data import ImageDataset, load_dataset
from trainact.experiments.models import FIRST_LAYER, build_model
from trainact.experiments.provenance import code_identity

if TYPE_CHECKING:
    from tqdm import tqdm


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
    """Where and by which code a run is computed: the code's identity, versions, device and CPU
    threads (recorded in ``job.json``)."""
    env = {
        "code": code_identity(),
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
    """uint8 pixels as the model's float input in ``input_range`` (see
    :data:`trainact.experiments.config.INPUT_RANGES`)."""
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
