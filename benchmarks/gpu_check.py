"""One prepared GPU check: is TrAct correct and cheap where users train? Writes a Markdown report.

    python benchmarks/gpu_check.py --dataset .gpu/cifar10-jpeg.tar.gz   # CUDA: at most 8 minutes
    python benchmarks/gpu_check.py --dry-run                            # every part, tiny

On a machine without CUDA the dry run is automatic (tiny sizes, under a minute on a CPU);
``tests/benchmarks/test_gpu_check.py`` runs it in CI. ``benchmarks/gpu_run.sh`` prepares the
folder that travels to a lent GPU machine and holds the exact device command.

1. Correctness against a float64 reference (patches extracted explicitly, trainact.testing):
   every layer family and the options that take other CUDA kernels; the accuracy targets of the
   statistics issue on real photos, with float32 matmuls strict and with TF32 allowed (matmul
   precision "high", cuDNN TF32 on), for the device's policy and for both the float32 (split)
   and the float64 paths; bf16 and fp16 autocast (fp16 with a
   GradScaler over several steps, skipped steps included); fp16 and bf16 parameters;
   torch.compile (fullgraph, inductor and mode="reduce-overhead"); checkpointing; and no host
   synchronization added by TrAct to a training step.
2. Model zoos (timm, torchvision, Hugging Face): ``trainact.apply`` finds the stated first layer,
   and one training step's first-layer gradient matches the float64 reference.
3. Cost next to a real step (ResNet-50, ViT-B/16, CIFAR ResNet-18; both models' steps
   alternating in one process, medians), the stem alone against ``torch_tract``, and the stem's
   extra time with the float32 and the float64 path side by side (with the device's compute
   capability and the precision policy in the report's header: the policy table's check).
4. ``trainact compare --preset resnet18-cifar10-sgd`` at the longest epoch budget that fits
   about 3 minutes for both methods (estimated from a timed first epoch).

``--parts`` runs a subset (a rerun within the device time left). Each part has a time budget
(on a GPU: 130, 70 and 50 s for parts 1-3, the rest for part 4); a check that would start after
it is skipped with a note, and one that raises is recorded as failed with its error, so the
report always has every part. The report (``--out``, default gpu_report.md) has a JSON twin
(same name, ``.json``); both are also copied to ``$OUT`` when that variable is set. Exit status
1 when any check failed.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import importlib
import importlib.metadata
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

import trainact
from trainact.maths import precision
from trainact.testing import (
    ACCURACY_CASES,
    AccuracyCase,
    case_error,
    case_target,
    conv_stem,
    reference_tract_grad,
    relative_error,
    smooth,
)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import overhead  # noqa: E402  (benchmarks/overhead.py: the stem worker and the step timer)

LAM = 0.1
COMPARE_SECONDS = 180  # part 4: training time for both methods together
PART_SECONDS = {1: 130, 2: 70, 3: 50}  # budgets of parts 1-3 on a GPU; part 4 gets the rest
PART4_RESERVE = COMPARE_SECONDS + 40  # kept for part 4 (its timing epoch, process starts)
PARTS = {
    1: "Correctness against a float64 reference",
    2: "Real model zoos",
    3: "Cost next to a real training step",
    4: "A first GPU point on the paper's model",
}
PART_HOW = {
    1: "Each figure is ‖G_TrAct − G·(XᵀX/n + λI)⁻¹‖_F / ‖G·(XᵀX/n + λI)⁻¹‖_F with λ = 0.1: "
    "G is the weight gradient of a plain copy of the layer (or model) on the same input and "
    "upstream gradient, under the same settings, so the figure measures TrAct's statistics and "
    "solve alone; X is extracted explicitly in float64 (`trainact.testing`). The accuracy rows "
    "are benchmarks/accuracy.py's cases (real photos of the embedded CIFAR-10 subset: "
    "standardized, [0, 1], raw [0, 255], *smooth* = bilinearly upsampled to 128 px in "
    "[0, 255], *over-exposed* = smooth mapped into [200, 255]) plus larger inputs whose "
    "statistics take many chunks. 'fp32' runs with "
    "`torch.set_float32_matmul_precision('highest')` and cuDNN TF32 off, 'TF32 on' with "
    "`'high'` and `torch.backends.cudnn.allow_tf32 = True`; cuDNN deterministic.",
    2: "Each model is built without downloads (Hugging Face from small configs), in train mode. "
    "`trainact.apply(model)` is tried first; where it raises, "
    "`trainact.apply(model, example_inputs=...)`. A silently wrong layer fails. Then one step "
    "(the same seed for both, loss = output · a fixed random tensor) of the model and of a plain "
    "copy; the first layer's input is captured by a forward pre-hook on the copy, and the "
    "TrAct gradient is compared with G·(XᵀX/n + λI)⁻¹ in float64. Inputs: CIFAR-10 photos "
    "upsampled and standardized (vision), random normal features (audio). All-zero weight "
    "matrices (torchvision ViT's head) are first given N(0, 0.02²) values, else no gradient "
    "would reach the first layer.",
    3: "Forward, cross-entropy, backward and SGD (momentum 0.9) step of the model with and "
    "without TrAct (on its first layer, named with `layer=`), the two models' steps alternating "
    "in one process (benchmarks/overhead.py `alternate_steps`), each step timed between "
    "`torch.cuda.synchronize()` calls; `torch.backends.cudnn.benchmark = True`, three warm-up "
    "steps dropped, medians reported. 'halves' is the "
    "plain model's median over the first half of its steps over that of the second half, a "
    "measure of the noise. The stem rows run `benchmarks/overhead.py`'s stem worker in-process "
    "(Conv2d 3→64, 7×7/2, 224², forward + backward of the layer alone): median over rounds of "
    "each method's best time, and CUDA's peak allocation over the plain layer's.",
    4: "The dataset is decoded and cached by a background CPU process while parts 1-3 run. "
    "`trainact train --method tract --epochs 1` first times one epoch; then `trainact compare` "
    "runs at the largest epoch budget whose two runs fit the time left (at most 3 minutes of "
    "epochs), one seed, bf16 autocast on a GPU. Accuracy is on the full test split.",
}


# ---------------------------------------------------------------------------------------------
# Sizes: the GPU run and the dry run differ only here


@dataclass(frozen=True)
class Sizes:
    """Problem sizes of one run: the full GPU check or the tiny dry run."""

    chunked_photos: tuple[int, int]  # photos of the many-chunk accuracy cases (32, 128 px)
    layer_batch: int  # layer-family checks
    model_batch: int  # small-CNN checks (autocast, scaler, compile, checkpoint, sync)
    model_hw: int
    zoo_batch: int
    zoo_hw: int  # timm / torchvision image size
    hf_hw: int  # Hugging Face image size
    cost: dict[str, tuple[int, int]]  # model -> (batch, image size)
    cifar_model: str  # the "CIFAR ResNet-18" of part 3 (the dry run's is smaller to compile)
    cost_steps: int  # timed steps per model
    stem_batch: int
    stem_repeats: int
    stem_rounds: int
    compare_subset: int | None  # part 4 train subset
    compare_model: str | None  # part 4 model override (None: the preset's ResNet-18)
    compare_max_epochs: int


GPU = Sizes(
    chunked_photos=(1024, 256),  # 154 and 616 MB of float32 patches: 32 MiB chunks on a GPU
    layer_batch=64,
    model_batch=64,
    model_hw=32,
    zoo_batch=4,
    zoo_hw=224,
    hf_hw=224,
    cost={"resnet50": (128, 224), "vit_b_16": (128, 224), "cifar_resnet18": (512, 32)},
    cifar_model="resnet18",
    cost_steps=20,
    stem_batch=128,
    stem_repeats=10,
    stem_rounds=3,
    compare_subset=None,
    compare_model=None,
    compare_max_epochs=200,
)
DRY = Sizes(
    chunked_photos=(64, 8),  # 9.6 and 19 MB: 4 MiB chunks on a CPU
    layer_batch=4,
    model_batch=8,
    model_hw=16,
    zoo_batch=2,
    zoo_hw=64,
    hf_hw=32,
    cost={"resnet50": (2, 64), "vit_b_16": (2, 64), "cifar_resnet18": (4, 32)},
    cifar_model="resnet-narrow",
    cost_steps=2,
    stem_batch=1,
    stem_repeats=1,
    stem_rounds=1,
    compare_subset=200,
    compare_model="resnet-tiny",
    compare_max_epochs=1,
)


# ---------------------------------------------------------------------------------------------
# Checks and the report


class Skip(Exception):
    """A check that cannot run here: ``kind`` is "cuda", "package", "time" or "dry-run"."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


class Outcome(NamedTuple):
    measured: str
    ok: bool
    note: str = ""


@dataclass
class Check:
    part: int
    name: str
    target: str
    status: str = "pass"  # pass | fail | skip
    measured: str = ""
    note: str = ""
    skip_kind: str = ""
    seconds: float = 0.0


@dataclass
class Context:
    """What every part needs: device, sizes, deadlines, photos, options."""

    device: torch.device
    sizes: Sizes
    dry_run: bool
    end: float  # monotonic deadline of the whole run
    args: argparse.Namespace
    part_end: float = math.inf
    checks: list[Check] = field(default_factory=list)
    extra: dict[int, list[str]] = field(default_factory=dict)  # Markdown blocks per part
    keep: list[tuple[Path, str]] = field(default_factory=list)  # files to copy to $OUT
    decoding: tuple[subprocess.Popen, IO[str]] | None = None  # part 4's data, decoding
    _photos: Tensor | None = None

    def remaining(self) -> float:
        return min(self.part_end, self.end) - time.monotonic()

    def photos(self) -> Tensor:
        """The embedded CIFAR-10 subset's test photos, uint8 (2000, 3, 32, 32) on the device."""
        if self._photos is None:
            from trainact.experiments.data import load_dataset

            data = load_dataset("cifar10-subset", progress=False)
            self._photos = data.test_images.to(self.device)
            self.mean = torch.tensor(data.mean, device=self.device).view(1, 3, 1, 1)
            self.std = torch.tensor(data.std, device=self.device).view(1, 3, 1, 1)
        return self._photos

    def standardized(self, n: int, hw: int) -> Tensor:
        """``n`` photos upsampled to ``hw`` pixels, standardized per channel."""
        x = self.photos()[:n].float() / 255
        if hw != x.shape[-1]:
            x = F.interpolate(x, size=hw, mode="bilinear", align_corners=False)
        return (x - self.mean) / self.std

    def check(self, part: int, name: str, fn: Callable[[], Outcome], *, target: str) -> Check:
        """Run one check within the part's time, recording a pass, fail or skip; after a check
        of parts 2 and 3 (whole models) CUDA memory is collected, TrAct layers being in cycles."""
        check = Check(part, name, target)
        start = time.monotonic()
        try:
            if self.remaining() <= 0:
                raise Skip("time", "the part's time budget was spent before this check")
            check.measured, ok, check.note = fn()
            check.status = "pass" if ok else "fail"
        except Skip as skip:
            check.status, check.skip_kind, check.note = "skip", skip.kind, str(skip)
        except Exception as err:  # a broken check is a finding, never the end of the run
            check.status, check.note = "fail", _describe(err)
        finally:
            if self.device.type == "cuda":
                try:
                    torch.cuda.synchronize()
                except Exception as err:  # an asynchronous CUDA error surfaces here
                    check.status, check.note = "fail", _describe(err)
            if part in (2, 3) and self.device.type == "cuda":
                gc.collect()
                torch.cuda.empty_cache()
        check.seconds = time.monotonic() - start
        self.checks.append(check)
        print(
            f"[{part}] {check.status:<4} {name}: {check.measured} {check.note} "
            f"({check.seconds:.1f} s)",
            flush=True,
        )
        return check


def _describe(err: BaseException, limit: int = 300) -> str:
    """``Type: first line of the message (at file:line)``, the innermost frame of ours."""
    message = (str(err).strip().splitlines() or [""])[0]
    message = message if len(message) <= limit else message[: limit - 1] + "…"
    frames = [f for f in traceback.extract_tb(err.__traceback__) if "site-packages" not in f[0]]
    where = f" (at {Path(frames[-1].filename).name}:{frames[-1].lineno})" if frames else ""
    return f"{type(err).__name__}: {message}{where}"


def _fmt(x: float) -> str:
    return f"{x:.1e}" if math.isfinite(x) else str(x)


# ---------------------------------------------------------------------------------------------
# Part 1: correctness


@contextmanager
def float32_precision(mode: str) -> Iterator[None]:
    """'fp32': strict float32 matmuls and convolutions; 'tf32': what Lightning users often set."""
    saved = (torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32)
    saved_det = torch.backends.cudnn.deterministic
    torch.set_float32_matmul_precision("high" if mode == "tf32" else "highest")
    torch.backends.cudnn.allow_tf32 = mode == "tf32"
    torch.backends.cudnn.deterministic = True  # the plain copy's G equals the TrAct layer's
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(saved[0])
        torch.backends.cudnn.allow_tf32 = saved[1]
        torch.backends.cudnn.deterministic = saved_det


MODE_LABELS = {"fp32": "fp32", "tf32": "TF32 on"}


def layer_error(
    make_layer: Callable[[], nn.Module],
    x: Tensor,
    *,
    statistics_dtype: torch.dtype | None = None,
) -> float:
    """Relative error of one TrAct layer's weight gradient on ``x`` (a random upstream gradient)."""
    torch.manual_seed(0)
    layer = make_layer().to(x.device)
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        layer = layer.to(memory_format=torch.channels_last)
    plain = copy.deepcopy(layer)
    options = {} if statistics_dtype is None else {"statistics_dtype": statistics_dtype}
    tract = trainact.TrAct(layer, l=LAM, **options)
    out = plain(x)
    gen = torch.Generator(device=x.device).manual_seed(1)
    upstream = torch.randn(out.shape, generator=gen, device=x.device).to(out.dtype)
    out.backward(upstream)
    tract(x).backward(upstream)
    expected = reference_tract_grad(tract, x, plain.weight.grad, LAM)
    return relative_error(tract.weight.grad, expected)


def _conv(c_in: int, c_out: int, k: int, stride: int = 1, pad: int = 0, **kw: Any):
    return lambda: nn.Conv2d(c_in, c_out, k, stride=stride, padding=pad, **kw)


def layer_family_cases(ctx: Context) -> list[tuple[str, Callable[[], nn.Module], Tensor]]:
    b, dev = ctx.sizes.layer_batch, ctx.device

    def r(*shape: int) -> Tensor:
        return torch.randn(*shape, device=dev)

    return [
        ("Linear 64→32 on (B, 50, 64)", lambda: nn.Linear(64, 32), r(b, 50, 64)),
        (
            "Conv1d 8→16, k5/2, pad 2",
            lambda: nn.Conv1d(8, 16, 5, stride=2, padding=2),
            r(b, 8, 256),
        ),
        ("Conv2d 3→16, k3/1, pad 1", _conv(3, 16, 3, 1, 1), r(b, 3, 32, 32)),
        (
            "Conv3d 3→8, k3, stride (1, 2, 2), pad 1",
            lambda: nn.Conv3d(3, 8, 3, stride=(1, 2, 2), padding=1),
            r(max(b // 8, 1), 3, 8, 32, 32),
        ),
        ("Conv2d groups 2 (4→8, k3)", _conv(4, 8, 3, groups=2), r(b, 4, 32, 32)),
        (
            "Conv2d depthwise (8→8, groups 8, k3, pad 1)",
            _conv(8, 8, 3, 1, 1, groups=8),
            r(b, 8, 32, 32),
        ),
        ("Conv2d dilation 2 (3→8, k3, pad 2)", _conv(3, 8, 3, 1, 2, dilation=2), r(b, 3, 32, 32)),
        (
            "Conv2d channels_last (3→16, k3/2, pad 1)",
            _conv(3, 16, 3, 2, 1),
            r(b, 3, 32, 32).to(memory_format=torch.channels_last),
        ),
    ]


def accuracy_cases(ctx: Context) -> list[AccuracyCase]:
    """benchmarks/accuracy.py's cases, and two inputs large enough for many statistics chunks."""
    n32, n128 = ctx.sizes.chunked_photos
    return [
        *ACCURACY_CASES,
        AccuracyCase(
            f"[0, 255], 7x7/2 pad 3, {n32} photos (many chunks)",
            conv_stem(7, 2, 3, out=64),
            lambda x: x[:n32],
            2e-3,
        ),
        AccuracyCase(
            f"smooth 128 px [0, 255], 7x7/2 pad 3, {n128} photos (many chunks)",
            conv_stem(7, 2, 3, out=64),
            lambda x: smooth(x[:n128]),
            1e-2,
        ),
    ]


def small_cnn() -> nn.Sequential:
    """A stem and a little network behind it, for the training-machinery checks."""
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 10),
    )


def _batch(ctx: Context, seed: int) -> tuple[Tensor, Tensor]:
    gen = torch.Generator(device=ctx.device).manual_seed(seed)
    b, hw = ctx.sizes.model_batch, ctx.sizes.model_hw
    x = torch.randn(b, 3, hw, hw, generator=gen, device=ctx.device)
    return x, torch.randint(0, 10, (b,), generator=gen, device=ctx.device)


def _tract_cnn(ctx: Context) -> nn.Sequential:
    torch.manual_seed(0)
    model = small_cnn().to(ctx.device)
    trainact.apply(model, LAM)
    return model


def step_error(
    model: nn.Sequential,
    x: Tensor,
    y: Tensor,
    *,
    amp: torch.dtype | None = None,
    forward: Callable[[Tensor], Tensor] | None = None,
    scaler: torch.amp.GradScaler | None = None,
    plain: nn.Sequential | None = None,
) -> float:
    """One step of ``model`` (TrAct on ``model[0]``) against a plain copy's G preconditioned in
    float64; gradients stay on both models' parameters (the loss scaled by ``scaler``). NaN where
    the plain model's gradients are not finite."""
    plain = plain if plain is not None else trainact.remove(copy.deepcopy(model))
    for m, f in ((plain, plain), (model, forward or model)):
        m.zero_grad(set_to_none=True)
        with torch.autocast(x.device.type, dtype=amp or torch.float32, enabled=amp is not None):
            out = f(x)
        loss = F.cross_entropy(out.float(), y)
        (scaler.scale(loss) if scaler is not None else loss).backward()
    if not all(bool(torch.isfinite(p.grad).all()) for p in plain.parameters()):
        return math.nan  # a step a GradScaler skips: there is no reference
    expected = reference_tract_grad(model[0], x.detach(), plain[0].weight.grad, LAM)
    return relative_error(model[0].weight.grad, expected)


def scaler_steps(ctx: Context, steps: int = 8, inject: int = 3) -> Outcome:
    """fp16 autocast + GradScaler (scale growing every step, so that fp16 overflows) over
    ``steps`` steps, an inf pixel injected at step ``inject``: every applied step's TrAct gradient
    is exact, TrAct skips exactly the steps the plain model would, a non-finite plain gradient
    stays non-finite with TrAct, and a skip leaves the weight."""
    model = _tract_cnn(ctx)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    scaler = torch.amp.GradScaler(ctx.device.type, init_scale=2.0**16, growth_interval=1)
    errors, skipped, problems = [], [], []
    for step in range(steps):
        x, y = _batch(ctx, 100 + step)
        if step == inject:
            x[0, 0, 0, 0] = math.inf
        plain = trainact.remove(copy.deepcopy(model))
        err = step_error(model, x, y, amp=torch.float16, scaler=scaler, plain=plain)
        plain_skips = math.isnan(err)
        plain_first, tract_first = plain[0].weight.grad, model[0].weight.grad
        if not plain_first.isfinite().all() and tract_first.isfinite().all():
            problems.append(f"step {step}: TrAct made a non-finite gradient finite")
        scale = scaler.get_scale()
        before = model[0].weight.detach().clone()
        scaler.step(opt)
        scaler.update()
        tract_skipped = scaler.get_scale() < scale
        if tract_skipped != plain_skips:
            problems.append(f"step {step}: TrAct skipped={tract_skipped}, plain={plain_skips}")
        if tract_skipped:
            skipped.append(step)
            if not torch.equal(model[0].weight, before):
                problems.append(f"step {step} was skipped but the weight changed")
        else:
            errors.append(err)
        opt.zero_grad(set_to_none=True)
    if inject not in skipped:
        problems.append(f"the injected inf at step {inject} was not skipped")
    if not all(bool(torch.isfinite(p).all()) for p in model.parameters()):
        problems.append("weights are not finite after training")
    worst = max(errors, default=math.nan)
    ok = not problems and len(errors) >= 2 and worst <= 1e-4
    measured = (
        f"max {_fmt(worst)} over {len(errors)} applied steps; skipped steps {skipped} "
        f"(inf injected at {inject}, the others fp16 overflow); final scale {scaler.get_scale():g}"
    )
    return Outcome(measured, ok, "; ".join(problems))


def compiled_steps(ctx: Context, mode: str | None, steps: int) -> Outcome:
    """``steps`` SGD steps through ``torch.compile(fullgraph=True)``; each step's TrAct gradient
    against the plain eager copy's G preconditioned in float64 (CUDA graph replays included)."""
    torch._dynamo.reset()
    model = _tract_cnn(ctx)
    backend = "inductor" if ctx.device.type == "cuda" else "aot_eager"
    options = {"mode": mode} if backend == "inductor" and mode else {}
    compiled = torch.compile(model, fullgraph=True, backend=backend, **options)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    errors = []
    for step in range(steps):
        if mode == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()
        x, y = _batch(ctx, 200 + step)
        errors.append(step_error(model, x, y, forward=compiled))
        opt.step()
        opt.zero_grad(set_to_none=True)
    note = (
        "" if backend == "inductor" else "dry run: backend aot_eager (no inductor, no CUDA graphs)"
    )
    worst = max(errors)
    return Outcome(f"max {_fmt(worst)} over {steps} steps", worst <= 1e-4, note)


def sync_check(ctx: Context) -> Outcome:
    """Synchronizing CUDA calls in one training step of a CIFAR ResNet-18, with and without
    TrAct: counted under set_sync_debug_mode("warn"), then the TrAct step under "error"."""
    if ctx.device.type != "cuda":
        raise Skip("cuda", "torch.cuda.set_sync_debug_mode needs CUDA")
    from trainact.experiments.models import build_model

    torch.manual_seed(0)
    plain = build_model("resnet18", 10).to(ctx.device)
    tract = copy.deepcopy(plain)
    trainact.apply(tract, LAM)
    x, y = _batch(ctx, 300)
    steps = {}
    for name, model in (("plain", plain), ("TrAct", tract)):
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

        def step(model: nn.Module = model, opt: torch.optim.Optimizer = opt) -> None:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = F.cross_entropy(model(x).float(), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        steps[name] = step
        step()  # warm-up: handles, workspaces and optimizer state are created here
        step()
    counts = {}
    for name, step in steps.items():
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                step()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        counts[name] = sum("synchroniz" in str(w.message) for w in caught)
    note = ""
    if counts["plain"] == 0:
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            steps["TrAct"]()
        except RuntimeError as err:
            note = f'"error" mode: {_describe(err)}'
        finally:
            torch.cuda.set_sync_debug_mode("default")
    measured = f"synchronizing calls: plain {counts['plain']}, TrAct {counts['TrAct']}"
    return Outcome(measured, counts["TrAct"] <= counts["plain"] and not note, note)


def part_correctness(ctx: Context) -> None:
    for name, make_layer, x in layer_family_cases(ctx):

        def family(make_layer=make_layer, x=x) -> Outcome:
            with float32_precision("fp32"):
                err = layer_error(make_layer, x)
            return Outcome(_fmt(err), err <= 3e-5)

        ctx.check(1, f"layer family: {name}, fp32", family, target="≤ 3e-5")

    photos = ctx.photos()[: max(256, *ctx.sizes.chunked_photos)].float()
    modes = ("fp32", "tf32") if ctx.device.type == "cuda" else ("fp32",)  # no TF32 on a CPU
    for case in accuracy_cases(ctx):

        def default(case=case) -> Outcome:
            errs = {}
            for mode in modes:
                with float32_precision(mode):
                    errs[mode] = case_error(case, photos)
            measured = " · ".join(f"{MODE_LABELS[m]} {_fmt(e)}" for m, e in errs.items())
            return Outcome(measured, max(errs.values()) <= case.target)

        ctx.check(1, f"accuracy: {case.name}", default, target=f"≤ {case.target:g}")

        for dtype in (torch.float32, torch.float64):
            limit = case_target(case, dtype)

            def path(case=case, dtype=dtype, limit=limit) -> Outcome:
                with float32_precision("tf32"):
                    err = case_error(case, photos, dtype)
                return Outcome(_fmt(err), err <= limit)

            label = str(dtype).removeprefix("torch.")
            name = f"accuracy, statistics_dtype={label}, TF32 on: {case.name}"
            ctx.check(1, name, path, target=f"≤ {limit:g}")

    for dtype, target in ((torch.bfloat16, 1e-2), (torch.float16, 1e-3)):
        for kind, make_layer, shape in (
            ("Conv2d 3→16, k3, pad 1", _conv(3, 16, 3, 1, 1), (ctx.sizes.layer_batch, 3, 32, 32)),
            ("Linear 64→32", lambda: nn.Linear(64, 32), (ctx.sizes.layer_batch, 50, 64)),
        ):

            def params(make_layer=make_layer, shape=shape, dtype=dtype, target=target) -> Outcome:
                x = torch.randn(*shape, device=ctx.device).to(dtype)
                with float32_precision("fp32"):
                    err = layer_error(lambda: make_layer().to(dtype), x)
                return Outcome(_fmt(err), err <= target)

            label = str(dtype).removeprefix("torch.")
            ctx.check(1, f"{label} parameters: {kind}", params, target=f"≤ {target:g}")

    def bf16_autocast() -> Outcome:
        with float32_precision("fp32"):
            err = step_error(_tract_cnn(ctx), *_batch(ctx, 1), amp=torch.bfloat16)
        return Outcome(_fmt(err), err <= 1e-4)

    ctx.check(1, "bf16 autocast, small CNN step", bf16_autocast, target="≤ 1e-4")

    def fp16_scaler() -> Outcome:
        with float32_precision("fp32"):
            return scaler_steps(ctx)

    ctx.check(1, "fp16 autocast + GradScaler, 8 steps", fp16_scaler, target="each ≤ 1e-4")

    for reentrant in (False, True):

        def checkpointed(reentrant=reentrant) -> Outcome:
            model = _tract_cnn(ctx)

            def forward(t: Tensor) -> Tensor:
                h = checkpoint(lambda u: model[1](model[0](u)), t, use_reentrant=reentrant)
                return model[2:](h)

            x, y = _batch(ctx, 2)
            with float32_precision("fp32"):
                err = step_error(model, x.requires_grad_(reentrant), y, forward=forward)
            return Outcome(_fmt(err), err <= 1e-4)

        ctx.check(1, f"checkpoint (use_reentrant={reentrant})", checkpointed, target="≤ 1e-4")

    ctx.check(
        1, "host synchronization in a training step", lambda: sync_check(ctx), target="none added"
    )

    def compiled(mode: str | None) -> Outcome:
        with float32_precision("fp32"):
            return compiled_steps(ctx, mode, steps=3 if mode else 2)

    ctx.check(1, "torch.compile(fullgraph=True), inductor", lambda: compiled(None), target="≤ 1e-4")
    ctx.check(
        1,
        'torch.compile(fullgraph=True, mode="reduce-overhead")',
        lambda: compiled("reduce-overhead"),
        target="≤ 1e-4",
    )


# ---------------------------------------------------------------------------------------------
# Part 2: model zoos


@dataclass(frozen=True)
class ZooModel:
    label: str
    package: str
    expected: str  # the first layer's qualified name
    build: Callable[[Sizes], nn.Module]
    inputs: Callable[[Context], tuple[tuple, dict]]  # positional and keyword arguments


def _images(hw: Callable[[Sizes], int], key: str | None = None):
    def make(ctx: Context) -> tuple[tuple, dict]:
        x = ctx.standardized(ctx.sizes.zoo_batch, hw(ctx.sizes))
        return ((), {key: x}) if key else ((x,), {})

    return make


def _tv(name: str, **kw: Any) -> Callable[[Sizes], nn.Module]:
    def build(s: Sizes) -> nn.Module:
        import torchvision.models as tvm

        extra = {"image_size": s.zoo_hw} if name.startswith("vit") else {}
        return getattr(tvm, name)(**extra, **kw)

    return build


def _timm(name: str) -> Callable[[Sizes], nn.Module]:
    def build(s: Sizes) -> nn.Module:
        import timm

        extra = {"img_size": s.zoo_hw} if name.startswith(("vit", "deit")) else {}
        return timm.create_model(name, pretrained=False, **extra)

    return build


def _hf(config: str, model: str, **kw: Any) -> Callable[[Sizes], nn.Module]:
    def build(s: Sizes) -> nn.Module:
        import transformers

        vision = {"image_size": s.hf_hw} if "image_size" in kw else {}
        options = {k: v(s) if callable(v) else v for k, v in kw.items() if k != "image_size"}
        cfg = getattr(transformers, config)(**vision, **options)
        return getattr(transformers, model)(cfg)

    return build


def _audio(key: str, shape: Callable[[Sizes], tuple[int, ...]]):
    def make(ctx: Context) -> tuple[tuple, dict]:
        gen = torch.Generator(device=ctx.device).manual_seed(5)
        return (), {key: torch.randn(*shape(ctx.sizes), generator=gen, device=ctx.device)}

    return make


_VISION_ZOO = [  # (package, model, first layer)
    ("torchvision", "resnet50", "conv1"),
    ("torchvision", "convnext_tiny", "features.0.0"),
    ("torchvision", "efficientnet_b0", "features.0.0"),
    ("torchvision", "vit_b_16", "conv_proj"),
    ("torchvision", "swin_t", "features.0.0"),
    ("torchvision", "regnet_y_400mf", "stem.0"),
    ("torchvision", "mobilenet_v3_small", "features.0.0"),
    ("timm", "resnet50", "conv1"),
    ("timm", "convnext_tiny", "stem.0"),
    ("timm", "efficientnet_b0", "conv_stem"),
    ("timm", "vit_base_patch16_224", "patch_embed.proj"),
    ("timm", "deit_small_patch16_224", "patch_embed.proj"),
    ("timm", "swin_tiny_patch4_window7_224", "patch_embed.proj"),
    ("timm", "regnety_002", "stem.conv"),
    ("timm", "mobilenetv3_small_100", "conv_stem"),
]
_HF_VIT = {
    "image_size": True,
    "patch_size": lambda s: 16 if s.hf_hw >= 224 else 8,
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 128,
    "num_labels": 10,
}
_HF_CNN = {"hidden_sizes": [16, 32, 64, 128], "depths": [1, 1, 1, 1], "num_labels": 10}
_HF_SWIN = {
    "image_size": True,
    "patch_size": 4,
    "embed_dim": 32,
    "depths": [1, 1],
    "num_heads": [2, 2],
    "window_size": lambda s: 7 if s.hf_hw >= 224 else 4,
    "num_labels": 10,
}
_HF_WAV2VEC2 = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 128,
    "conv_dim": (32, 32),
    "conv_stride": (5, 2),
    "conv_kernel": (10, 3),
    "num_conv_pos_embeddings": 16,
    "num_conv_pos_embedding_groups": 2,
    "mask_time_prob": 0.0,  # SpecAugment masks with numpy's global generator
    "layerdrop": 0.0,
}
_HF_WHISPER = {
    "num_mel_bins": 80,
    "d_model": 64,
    "encoder_layers": 2,
    "encoder_attention_heads": 2,
    "decoder_layers": 1,
    "decoder_attention_heads": 2,
    "encoder_ffn_dim": 128,
    "decoder_ffn_dim": 128,
    "max_source_positions": 64,  # 128 input frames
    "num_labels": 10,
}
_HF_PIXELS = _images(lambda s: s.hf_hw, "pixel_values")
ZOO = [
    ZooModel(
        f"{package} {name}",
        package,
        first,
        (_tv if package == "torchvision" else _timm)(name),
        _images(lambda s, swin="swin" in name: 224 if swin else s.zoo_hw),
    )
    for package, name, first in _VISION_ZOO
] + [
    ZooModel(
        "HF ViTForImageClassification",
        "transformers",
        "vit.embeddings.patch_embeddings.projection",
        _hf("ViTConfig", "ViTForImageClassification", **_HF_VIT),
        _HF_PIXELS,
    ),
    ZooModel(
        "HF DeiTForImageClassification",
        "transformers",
        "deit.embeddings.patch_embeddings.projection",
        _hf("DeiTConfig", "DeiTForImageClassification", **_HF_VIT),
        _HF_PIXELS,
    ),
    ZooModel(
        "HF ConvNextForImageClassification",
        "transformers",
        "convnext.embeddings.patch_embeddings",
        _hf("ConvNextConfig", "ConvNextForImageClassification", **_HF_CNN),
        _HF_PIXELS,
    ),
    ZooModel(
        "HF ResNetForImageClassification",
        "transformers",
        "resnet.embedder.embedder.convolution",
        _hf("ResNetConfig", "ResNetForImageClassification", embedding_size=16, **_HF_CNN),
        _HF_PIXELS,
    ),
    ZooModel(
        "HF SwinForImageClassification",
        "transformers",
        "swin.embeddings.patch_embeddings.projection",
        _hf("SwinConfig", "SwinForImageClassification", **_HF_SWIN),
        _HF_PIXELS,
    ),
    ZooModel(
        "HF Wav2Vec2Model",
        "transformers",
        "feature_extractor.conv_layers.0.conv",
        _hf("Wav2Vec2Config", "Wav2Vec2Model", **_HF_WAV2VEC2),
        _audio("input_values", lambda s: (s.zoo_batch, 1600 if s.hf_hw >= 224 else 400)),
    ),
    ZooModel(
        "HF WhisperForAudioClassification (encoder)",
        "transformers",
        "encoder.conv1",
        _hf("WhisperConfig", "WhisperForAudioClassification", **_HF_WHISPER),
        _audio("input_features", lambda s: (s.zoo_batch, 80, 128)),
    ),
]


def _main_output(out: Any) -> Tensor:
    if isinstance(out, Tensor):
        return out
    for key in ("logits", "last_hidden_state"):
        if getattr(out, key, None) is not None:
            return getattr(out, key)
    return out[0]


def zoo_check(ctx: Context, entry: ZooModel) -> Outcome:
    """Discovery of ``entry``'s first layer and its TrAct gradient after one step."""
    try:
        importlib.import_module(entry.package)
    except Exception as err:  # timm and torchvision do not import with every torch build
        raise Skip("package", f"{entry.package} does not import here: {err}") from None
    torch.manual_seed(0)
    with torch.device(ctx.device):
        model = entry.build(ctx.sizes).train()
    with torch.no_grad():  # torchvision's ViT head starts at zero: no gradient would reach the stem
        for p in model.parameters():
            if p.dim() >= 2 and not p.any():
                p.normal_(0, 0.02)
    args, kwargs = entry.inputs(ctx)
    plain = copy.deepcopy(model)
    found, route, problem = _discover(model, args, kwargs)
    if found != entry.expected:  # still check the gradient, on the stated layer
        problem = problem or f"{route} found {found!r}: a wrong layer, silently"
        trainact.apply(trainact.remove(model), LAM, layer=entry.expected)
        route = f"layer={entry.expected!r} given"
    captured: dict[str, Tensor] = {}
    layer = plain.get_submodule(entry.expected)
    hook = layer.register_forward_pre_hook(lambda m, a: captured.setdefault("x", a[0].detach()))
    projection = None
    for m in (plain, model):
        torch.manual_seed(1)  # the same dropout / drop-path draws in both
        out = _main_output(m(*args, **kwargs)).float()
        if projection is None:
            gen = torch.Generator(device=ctx.device).manual_seed(2)
            projection = torch.randn(out.shape, generator=gen, device=ctx.device)
        (out * projection).sum().backward()
    hook.remove()
    tract_layer = model.get_submodule(entry.expected)
    expected = reference_tract_grad(tract_layer, captured["x"], layer.weight.grad, LAM)
    err = relative_error(tract_layer.weight.grad, expected)
    measured = f"{route} → {entry.expected}; gradient {_fmt(err)}"
    return Outcome(measured, err <= 1e-4 and not problem, problem)


def _discover(model: nn.Module, args: tuple, kwargs: dict) -> tuple[str | None, str, str]:
    """``apply(model)``, or where it raises ``apply(model, example_inputs=...)``: the layer
    found (None if both raised), the route taken, and what went wrong."""
    try:
        return trainact.apply(model, LAM), "apply(model)", ""
    except Exception as err:
        first = _describe(err, 160)
    example = kwargs or (args[0] if len(args) == 1 else args)
    try:
        found = trainact.apply(model, LAM, example_inputs=example)
    except Exception as err:
        problem = f"apply(model): {first}; apply(model, example_inputs=...): {_describe(err)}"
        return None, "", problem
    return found, "apply(model) raised; apply(model, example_inputs=...)", ""


def part_zoo(ctx: Context) -> None:
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
    except ImportError:
        pass
    for entry in ZOO:
        ctx.check(
            2,
            entry.label,
            lambda entry=entry: zoo_check(ctx, entry),
            target=f"{entry.expected}; ≤ 1e-4",
        )


# ---------------------------------------------------------------------------------------------
# Part 3: cost


def _cost_model(ctx: Context, name: str, hw: int) -> tuple[Callable[[], nn.Module], str, str]:
    """(builder, first layer, source) of a cost model; timm for the ViT, torchvision else."""
    if name == "cifar_resnet18":
        from trainact.experiments.models import build_model

        model = ctx.sizes.cifar_model
        return lambda: build_model(model, 10), "conv1", f"trainact.experiments.models {model}"
    try:
        if name == "vit_b_16":
            import timm

            return (
                lambda: timm.create_model("vit_base_patch16_224", img_size=hw, num_classes=1000),
                "patch_embed.proj",
                "timm vit_base_patch16_224",
            )
        import torchvision.models as tvm

        return tvm.resnet50, "conv1", "torchvision resnet50"
    except Exception as err:
        raise Skip("package", f"the model's package does not import here: {err}") from None


def cost_check(ctx: Context, name: str, target: float, compiled: bool) -> Outcome:
    batch, hw = ctx.sizes.cost[name]
    build, first, source = _cost_model(ctx, name, hw)
    channels_last = name != "vit_b_16"
    torch.manual_seed(0)
    with torch.device(ctx.device):
        plain = build()
    tract = copy.deepcopy(plain)
    trainact.apply(tract, LAM, layer=first)
    classes = 10 if name == "cifar_resnet18" else 1000
    x = torch.randn(batch, 3, hw, hw, device=ctx.device)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    y = torch.randint(0, classes, (batch,), device=ctx.device)
    if compiled:
        torch._dynamo.reset()
    steps = {}
    for method, model in (("plain", plain), ("trainact", tract)):
        if channels_last:
            model.to(memory_format=torch.channels_last)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        backend = "inductor" if ctx.device.type == "cuda" else "aot_eager"  # no C++ build on CI
        forward = torch.compile(model, backend=backend) if compiled else model

        def step(forward=forward, opt=opt) -> None:
            with torch.autocast(ctx.device.type, dtype=torch.bfloat16):
                out = forward(x)
            F.cross_entropy(out.float(), y).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        steps[method] = step
    saved, torch.backends.cudnn.benchmark = torch.backends.cudnn.benchmark, True
    try:  # three warm-up steps: compilation, cuDNN's algorithm search, allocator growth
        times = overhead.alternate_steps(steps, ctx.sizes.cost_steps, ctx.device.type, warmup=3)
    finally:
        torch.backends.cudnn.benchmark = saved
    med = {m: statistics.median(t) for m, t in times.items()}
    half = len(times["plain"]) // 2
    halves = (
        statistics.median(times["plain"][:half]) / statistics.median(times["plain"][half:])
        if half
        else math.nan
    )
    ratio = med["trainact"] / med["plain"]
    measured = (
        f"plain {1000 * med['plain']:.2f} ms, TrAct {1000 * med['trainact']:.2f} ms: "
        f"**{ratio:.3f}×** (halves {halves:.3f}; {ctx.sizes.cost_steps} steps each)"
    )
    return Outcome(measured, ratio <= target or ctx.dry_run, f"{source}{_UNJUDGED[ctx.dry_run]}")


def stem_checks(ctx: Context) -> None:
    """trainact's and torch_tract's extra time and memory on the ImageNet stem."""
    s = ctx.sizes
    runs: dict[str, list[dict[str, float]]] = {}

    def measure() -> dict[str, dict[str, float]]:
        if not runs:
            try:
                import torch_tract  # noqa: F401
            except ImportError as err:
                raise Skip("package", f"torch_tract is not installed ({err})") from None
            for _ in range(s.stem_rounds):
                for method in overhead.STEM_METHODS:
                    result = overhead.stem_worker(
                        method, s.stem_batch, s.stem_repeats, ctx.device.type
                    )
                    runs.setdefault(method, []).append(result)
        return {
            m: {k: statistics.median(r[k] for r in rs) for k in ("ms", "peak_mib")}
            for m, rs in runs.items()
        }

    def stem_time() -> Outcome:
        med = measure()
        extra = {m: med[m]["ms"] - med["plain"]["ms"] for m in med}
        ratio = extra["trainact"] / extra["torch_tract"]
        measured = (
            f"plain {med['plain']['ms']:.2f} ms; extra: trainact {extra['trainact']:.2f} ms, "
            f"torch_tract {extra['torch_tract']:.2f} ms: **{ratio:.3f}**"
        )
        return Outcome(measured, ratio <= 0.5 or ctx.dry_run, _UNJUDGED[ctx.dry_run][2:])

    def stem_memory() -> Outcome:
        if ctx.device.type != "cuda":
            raise Skip("cuda", "in-process peak memory per method is CUDA's peak allocation")
        med = measure()
        extra = {m: med[m]["peak_mib"] - med["plain"]["peak_mib"] for m in med}
        ratio = extra["trainact"] / extra["torch_tract"]
        measured = (
            f"extra peak: trainact {extra['trainact']:.1f} MiB, torch_tract "
            f"{extra['torch_tract']:.1f} MiB: **{ratio:.3f}**"
        )
        return Outcome(measured, ratio <= 0.25 or ctx.dry_run, _UNJUDGED[ctx.dry_run][2:])

    label = (
        f"ImageNet stem, batch {s.stem_batch}, {s.stem_rounds} rounds × {s.stem_repeats} repeats"
    )
    ctx.check(3, f"{label}: extra time trainact / torch_tract", stem_time, target="≤ 0.5")
    ctx.check(3, f"{label}: extra peak memory trainact / torch_tract", stem_memory, target="≤ 0.25")

    def paths() -> Outcome:
        """The float32 (split) and float64 products side by side: which the policy should pick."""
        extra = {}
        for dtype in ("float32", "float64"):
            times = [
                overhead.stem_worker(
                    "trainact", s.stem_batch, s.stem_repeats, ctx.device.type, dtype
                )
                for _ in range(s.stem_rounds)
            ]
            extra[dtype] = statistics.median(t["ms"] for t in times) - measure()["plain"]["ms"]
        policy = precision.precision_for(ctx.device, None, torch.float32)
        measured = (
            f"extra time: statistics_dtype float32 {extra['float32']:.2f} ms, float64 "
            f"{extra['float64']:.2f} ms (ratio {extra['float32'] / extra['float64']:.2f}); "
            f"the policy here: {policy.product}"
        )
        return Outcome(measured, True, _UNJUDGED[ctx.dry_run][2:])

    ctx.check(3, f"{label}: float32 path against float64 path", paths, target="measured")


_UNJUDGED = {True: "; dry run: tiny sizes, the target is not judged", False: ""}
COST_TARGETS = {"resnet50": 1.02, "vit_b_16": 1.005, "cifar_resnet18": 1.03}
COST_LABELS = {
    "resnet50": "ImageNet ResNet-50, channels_last",
    "vit_b_16": "ViT-B/16",
    "cifar_resnet18": "CIFAR ResNet-18, channels_last",
}
COMPILE_SECONDS = {"cifar_resnet18": 90, "resnet50": 150, "vit_b_16": 150}  # rough estimates


def part_cost(ctx: Context) -> None:
    for name, target in COST_TARGETS.items():
        batch, hw = ctx.sizes.cost[name]
        ctx.check(
            3,
            f"{COST_LABELS[name]}, batch {batch}, {hw}², bf16: step time TrAct / plain",
            lambda name=name, target=target: cost_check(ctx, name, target, compiled=False),
            target=f"≤ {target}",
        )
    stem_checks(ctx)
    ctx.part_end = ctx.end - PART4_RESERVE if not ctx.dry_run else ctx.part_end
    for name, target in COST_TARGETS.items():
        batch, hw = ctx.sizes.cost[name]

        def compiled(name=name, target=target) -> Outcome:
            if not ctx.dry_run and ctx.remaining() < COMPILE_SECONDS[name]:
                raise Skip("time", f"~{COMPILE_SECONDS[name]} s of compilation would not fit")
            if ctx.dry_run and name != "cifar_resnet18":
                raise Skip("dry-run", "the dry run compiles the CIFAR ResNet-18 only")
            return cost_check(ctx, name, target, compiled=True)

        ctx.check(
            3,
            f"compiled: {COST_LABELS[name]}, batch {batch}, {hw}², bf16: step time TrAct / plain",
            compiled,
            target=f"≤ {target}",
        )


# ---------------------------------------------------------------------------------------------
# Part 4: trainact compare


def _env() -> dict[str, str]:
    """The environment of a child process that imports the trainact this script imports."""
    env = dict(os.environ)
    src = str(Path(trainact.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
    return env


def _trainact_cli(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "trainact", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=timeout)


def start_decoding(dataset: str) -> tuple[subprocess.Popen, IO[str]]:
    """Decode and cache part 4's dataset in a background CPU process while parts 1-3 run
    (decoding CIFAR-10's 60,000 JPEGs takes 15 s or more on one core)."""
    code = "import sys; from trainact.experiments import data; data.load_dataset(sys.argv[1])"
    errors = tempfile.TemporaryFile("w+")  # read only at the end: a pipe could fill and block
    child = subprocess.Popen(
        [sys.executable, "-c", code, dataset], env=_env(), stdout=errors, stderr=errors, text=True
    )
    return child, errors


def _last_line(text: str) -> str:
    """The last line of a child's error output: the exception or the CLI's error message."""
    return (text.strip().splitlines() or ["(no output)"])[-1][:500]


def _records(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def compare_check(ctx: Context, work: Path) -> Outcome:
    s = ctx.sizes
    dataset = ctx.args.dataset or "cifar10-subset"
    if ctx.decoding is not None:  # the cache must be complete before the runs read it
        child, errors = ctx.decoding
        try:
            child.wait(timeout=max(ctx.remaining() - 30, 1))
        except subprocess.TimeoutExpired:
            child.kill()
            raise Skip("time", "decoding the dataset did not finish in time") from None
        if child.returncode != 0:
            errors.seek(0)
            raise RuntimeError(f"decoding the dataset failed: {_last_line(errors.read())}")
    common = ["--preset", "resnet18-cifar10-sgd", "--dataset", dataset, "--no-progress"]
    common += ["--device", ctx.device.type]
    if ctx.device.type == "cuda":
        common += ["--amp", "bf16"]
    if s.compare_model:
        common += ["--model", s.compare_model, "--eval-batch-size", "500"]
    if s.compare_subset:
        common += ["--train-subset", str(s.compare_subset)]
    probe_dir = work / "probe"
    started = time.monotonic()
    probe = _trainact_cli(
        ["train", *common, "--method", "tract", "--epochs", "1", "--out", str(probe_dir)],
        timeout=max(ctx.remaining() - 5, 1),
    )
    if probe.returncode != 0:
        raise RuntimeError(f"the timing run failed: {_last_line(probe.stderr)}")
    epoch_s = _records(probe_dir / "results.jsonl")[0]["seconds"]
    setup_s = time.monotonic() - started - epoch_s  # process start, cached data, model
    budget = min(COMPARE_SECONDS, ctx.remaining() - setup_s - 10)
    epochs = min(s.compare_max_epochs, math.floor(budget / (2 * 1.1 * epoch_s)))
    if epochs < 1:
        raise Skip("time", f"one epoch takes {epoch_s:.1f} s; {budget:.0f} s were left")
    out = work / "compare"
    cmd = ["compare", *common, "--epochs", str(epochs), "--seeds", "0", "--out", str(out)]
    shown = " ".join(["trainact", *cmd]).replace(str(work), "<tmp>")
    try:
        run = _trainact_cli(cmd, timeout=max(ctx.remaining() - 2, 1))
        failure = "" if run.returncode == 0 else _last_line(run.stderr)
    except subprocess.TimeoutExpired:
        failure = "stopped at the time limit"
    records = _records(out / "results.jsonl")
    ctx.extra.setdefault(4, []).append(_compare_table(records, shown, epoch_s, setup_s, epochs))
    ctx.keep += [(out / "results.jsonl", "compare_results.jsonl")]
    ctx.keep += [(out / "accuracy.png", "compare_accuracy.png")]
    done = {m: sum(r["method"] == m for r in records) for m in ("baseline", "tract")}
    final = {
        m: max((r for r in records if r["method"] == m), key=lambda r: r["epoch"])["test_acc"]
        for m in done
        if done[m]
    }
    measured = f"{epochs} epochs (one epoch {epoch_s:.1f} s)" + "".join(
        f"; {m} final test acc {100 * a:.2f} %" for m, a in final.items()
    )
    ok = not failure and all(n == epochs for n in done.values())
    return Outcome(measured, ok, failure)


def _compare_table(
    records: list[dict], command: str, epoch_s: float, setup_s: float, epochs: int
) -> str:
    lines = [
        f"Timing run: one TrAct epoch {epoch_s:.1f} s (plus {setup_s:.1f} s of process start, "
        f"cached data and model); budget chosen: {epochs} epochs per method.",
        "",
        f"    {command}",
        "",
        "| epoch | baseline test acc | TrAct test acc | baseline s | TrAct s |",
        "|---:|---:|---:|---:|---:|",
    ]
    by = {(r["method"], r["epoch"]): r for r in records}
    for e in range(1, epochs + 1):
        cells = []
        for key in ("test_acc", "seconds"):
            for m in ("baseline", "tract"):
                r = by.get((m, e))
                cells.append(
                    "–"
                    if r is None
                    else (f"{100 * r[key]:.2f} %" if key == "test_acc" else f"{r[key]:.1f}")
                )
        lines.append(f"| {e} | {cells[0]} | {cells[1]} | {cells[2]} | {cells[3]} |")
    return "\n".join(lines)


def part_compare(ctx: Context) -> None:
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        ctx.check(
            4,
            "trainact compare --preset resnet18-cifar10-sgd, seed 0",
            lambda: compare_check(ctx, Path(tmp)),
            target="completes",
        )
        out_dir = os.environ.get("OUT")
        for src, name in ctx.keep:
            if out_dir and src.exists():
                shutil.copy(src, Path(out_dir) / name)


# ---------------------------------------------------------------------------------------------
# The report


def environment(ctx: Context) -> dict[str, str]:
    if ctx.device.type == "cuda":
        props = torch.cuda.get_device_properties(ctx.device)
        device = (
            f"{props.name} ({props.total_memory / 2**30:.0f} GiB, sm_{props.major}{props.minor})"
        )
    else:
        device = f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    versions = {}
    for package in ("numpy", "transformers", "timm", "torchvision", "torch_tract"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = "absent"
    try:
        commit = subprocess.run(
            ["git", "-C", str(ROOT), "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return {
        "device": device,
        "run": "dry run (tiny sizes)" if ctx.dry_run else "full check",
        "sizes": ", ".join(
            f"{f.name} {getattr(ctx.sizes, f.name)}" for f in dataclasses.fields(Sizes)
        ),
        "torch": torch.__version__,
        "CUDA": str(torch.version.cuda),
        "cuDNN": str(torch.backends.cudnn.version()) if ctx.device.type == "cuda" else "–",
        "python": platform.python_version(),
        "trainact": f"{trainact.__version__} ({commit or 'commit unknown'})",
        "precision policy": precision.precision_for(ctx.device, None, torch.float32).describe(),
        "packages": ", ".join(f"{k} {v}" for k, v in versions.items()),
    }


def render(
    ctx: Context, env: dict[str, str], seconds: float, command: str, parts: list[int]
) -> str:
    counts = {s: sum(c.status == s for c in ctx.checks) for s in ("pass", "fail", "skip")}
    lines = [
        "# TrAct GPU check",
        "",
        f"    {command}",
        "",
        *(f"- **{k}**: {v}" for k, v in env.items()),
        f"- **date**: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
        f"wall time {seconds:.0f} s",
        f"- **result**: {counts['pass']} passed, {counts['fail']} failed, {counts['skip']} skipped",
        "",
    ]
    for part, title in PARTS.items():
        lines += [f"## {part}. {title}", ""]
        if part not in parts:
            lines += ["Not run (`--parts`).", ""]
            continue
        lines += [PART_HOW[part], ""]
        lines += ["| check | measured | target | result |", "|---|---|---|---|"]
        for c in (c for c in ctx.checks if c.part == part):
            result = c.status.upper() if c.status != "pass" else "pass"
            if c.status == "skip":
                result += f" ({c.skip_kind})"
            note = f" — {c.note}" if c.note else ""
            cell = f"{c.measured}{note}".replace("|", "\\|") or "–"
            lines.append(f"| {c.name} | {cell} | {c.target} | {result} |")
        lines.append("")
        for block in ctx.extra.get(part, []):
            lines += [block, ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("gpu_report.md"), help="Markdown report")
    parser.add_argument("--dry-run", action="store_true", help="every part at tiny sizes")
    parser.add_argument(
        "--dataset",
        help="part 4's CIFAR-10 (e.g. .gpu/cifar10-jpeg.tar.gz); default the embedded subset",
    )
    parser.add_argument("--budget", type=float, default=480, help="seconds for the whole run")
    parser.add_argument("--device", choices=["cuda", "cpu"], help="default: cuda if available")
    parser.add_argument(
        "--parts",
        type=int,
        nargs="+",
        choices=sorted(PARTS),
        default=sorted(PARTS),
        help="run only these parts (a rerun that fits the device time left)",
    )
    args = parser.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dry = args.dry_run or device.type != "cuda"
    start = time.monotonic()
    ctx = Context(device, DRY if dry else GPU, dry, start + args.budget, args)
    if device.type == "cpu":
        torch.set_num_threads(min(torch.get_num_threads(), 2))
    command = " ".join(
        ["python", "benchmarks/gpu_check.py", *(argv if argv is not None else sys.argv[1:])]
    )
    print(f"gpu_check: {'dry run' if dry else 'full check'} on {device}", flush=True)
    if 4 in args.parts:
        ctx.decoding = start_decoding(args.dataset or "cifar10-subset")
    parts = {1: part_correctness, 2: part_zoo, 3: part_cost, 4: part_compare}
    for part in args.parts:
        run = parts[part]
        allowance = math.inf if dry else PART_SECONDS.get(part, math.inf)
        reserve = PART4_RESERVE if part < 4 and 4 in args.parts and not dry else 0
        ctx.part_end = min(time.monotonic() + allowance, ctx.end - reserve)
        try:
            run(ctx)
        except Exception as err:  # a part that breaks outside its checks is still reported
            broken = Check(part, "the part itself", "runs", status="fail", note=_describe(err))
            ctx.checks.append(broken)
            print(f"[{part}] fail the part itself: {broken.note}", flush=True)
    if ctx.decoding is not None and ctx.decoding[0].poll() is None:
        ctx.decoding[0].kill()  # part 4 never waited for it
    env = environment(ctx)
    report = render(ctx, env, time.monotonic() - start, command, args.parts)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report)
    data = {
        "environment": env,
        "dry_run": dry,
        "checks": [dataclasses.asdict(c) for c in ctx.checks],
    }
    args.out.with_suffix(".json").write_text(json.dumps(data, indent=1))
    if os.environ.get("OUT"):
        for path in (args.out, args.out.with_suffix(".json")):
            shutil.copy(path, Path(os.environ["OUT"]) / path.name)
    failed = [c for c in ctx.checks if c.status == "fail"]
    print(f"\nwrote {args.out}: {len(failed)} of {len(ctx.checks)} checks failed")
    for c in failed:
        print(f"  FAIL [{c.part}] {c.name}: {c.measured} {c.note}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
