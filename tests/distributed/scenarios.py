"""Multi-process TrAct scenarios, run by every rank of one gloo group (see ``conftest.py``).

Every rank generates the same global data from a fixed seed, trains on its own share, and
compares its weights with a single-process reference trained on the whole batch (computed
locally with ``process_group=None``). Each scenario returns a dict of measured numbers that the
tests in ``test_ddp.py`` assert on; nothing is asserted here, so one rank never leaves the
group waiting in a collective.
"""

from __future__ import annotations

import json
import os
import socket
import traceback
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.checkpoint import checkpoint

import trainact
from trainact.nn import compat

LAM = 0.1
#: Float64 weights this close are "the same"; a change of statistics moves them by ~0.1.
EXACT = 1e-12
LR = 0.1
MOMENTUM = 0.9

#: Per step, per micro-batch, the local batch size of each rank: uneven and empty included.
EVEN = [[(3, 3)], [(3, 3)], [(3, 3)], [(3, 3)]]
UNEVEN = [[(5, 0)], [(1, 4)], [(0, 3)], [(2, 2)]]
MICRO = [[(2, 1), (0, 3), (3, 2)], [(1, 1), (2, 2), (1, 0)], [(2, 2), (2, 2), (2, 2)]]

Steps = Sequence[Sequence[Sequence[int]]]  # steps -> micro-batches -> per-rank batch sizes


class Checkpointed(nn.Module):
    """``inner`` run under non-reentrant activation checkpointing (recomputed in backward)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: Tensor) -> Tensor:
        return checkpoint(self.inner, x, use_reentrant=False)


def conv_model() -> nn.Sequential:
    """First layer a Conv2d with d = 27 and 16 patches per sample; 5 rows shard unevenly."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 5, 3), nn.Tanh(), nn.Flatten(), nn.Linear(80, 2)).double()


def linear_model() -> nn.Sequential:
    """First layer a Linear with d = 32 > n: the local solve takes the push-through path."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 8), nn.Tanh(), nn.Linear(8, 2)).double()


def checkpointed_model() -> nn.Sequential:
    """The conv model with its first two layers under activation checkpointing."""
    model = conv_model()
    return nn.Sequential(Checkpointed(model[:2]), *model[2:])


class TwoViews(nn.Module):
    """One encoder called on two views of the batch (x and 2x + 1), outputs summed."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: Tensor) -> Tensor:
        return self.inner(x) + self.inner(2 * x + 1)


def two_view_model() -> nn.Module:
    return TwoViews(conv_model())


class Tied(nn.Module):
    """A first Linear whose weight a decoder reuses transposed, then a head."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.encoder = nn.Linear(32, 8).double()
        self.head = nn.Linear(32, 2).double()

    def forward(self, x: Tensor) -> Tensor:
        decoded = nn.functional.linear(torch.tanh(self.encoder(x)), self.encoder.weight.T)
        return self.head(decoded)


FIRST_LAYER = {
    conv_model: "0",
    linear_model: "0",
    checkpointed_model: "0.inner.0",
    two_view_model: "inner.0",
    Tied: "encoder",
}


def global_data(model_fn: Callable[[], nn.Module], steps: Steps) -> list[list[list[Tensor]]]:
    """``data[step][micro][rank]`` = (x, y) shares of that micro-batch, identical on all ranks."""
    gen = torch.Generator().manual_seed(1)
    shape = (32,) if model_fn in (linear_model, Tied) else (3, 6, 6)
    data = []
    for micro_batches in steps:
        step = []
        for sizes in micro_batches:
            shares = []
            for size in sizes:
                x = torch.randn(size, *shape, generator=gen, dtype=torch.float64)
                shares.append((x, torch.randn(size, 2, generator=gen, dtype=torch.float64)))
            step.append(shares)
        data.append(step)
    return data


def loss_fn(out: Tensor, y: Tensor, scale: float) -> Tensor:
    """Sum of squares times ``scale``: 1/N for one process, W/N per rank under a mean-reduce."""
    return ((out - y) ** 2).sum() * scale


def sgd(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)


def step_size(micro_batches: Sequence[Sequence[int]]) -> int:
    return sum(sum(sizes) for sizes in micro_batches)


def reference(model_fn: Callable[[], nn.Module], steps: Steps, per_rank: bool) -> nn.Module:
    """One process, ``process_group=None``.

    ``per_rank=False``: one batch per step, all ranks' micro-batches concatenated (the issue's
    definition). ``per_rank=True``: one backward per rank's share, each preconditioned with its
    own statistics, summed (what DDP computes when every rank keeps its own statistics).
    """
    model = model_fn()
    trainact.apply(model, LAM, layer=FIRST_LAYER[model_fn], process_group=None)
    opt = sgd(model)
    for micro_batches, data in zip(steps, global_data(model_fn, steps), strict=True):
        opt.zero_grad()
        scale = 1.0 / step_size(micro_batches)
        shares = [share for micro in data for share in micro]
        if per_rank:
            for rank in range(len(micro_batches[0])):
                xs, ys = zip(*(micro[rank] for micro in data), strict=True)
                loss_fn(model(torch.cat(xs)), torch.cat(ys), scale).backward()
        else:
            xs, ys = zip(*shares, strict=True)
            loss_fn(model(torch.cat(xs)), torch.cat(ys), scale).backward()
        opt.step()
    return model


def full(tensor: Tensor) -> Tensor:
    """The whole parameter, gathered from its shards for an FSDP2 DTensor."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def max_diff(model: nn.Module, ref: nn.Module) -> float:
    """Largest absolute weight difference between a trained model and the reference."""
    return max(
        (full(p.detach()) - q.detach()).abs().max().item()
        for p, q in zip(model.parameters(), ref.parameters(), strict=True)
    )


def rank_spread(model: nn.Module) -> float:
    """Largest weight difference between this rank's replica and rank 0's."""
    flat = torch.cat([full(p.detach()).flatten() for p in model.parameters()])
    other = flat.clone()
    dist.broadcast(other, src=0)
    return (flat - other).abs().max().item()


class CollectiveLog:
    """Counts ``torch.distributed.all_reduce`` calls and delays async results until ``wait()``.

    An async all-reduce here sums into a private buffer and writes the result into the caller's
    tensor only when its work is waited on, the slowest completion the API allows: whoever reads
    the statistics before waiting on the right work reads this rank's own statistics.
    """

    def __init__(self) -> None:
        self.calls: list[bool] = []  # async_op of each call
        self.waits = 0

    @contextmanager
    def patched(self) -> Iterator[CollectiveLog]:
        original = dist.all_reduce
        log = self

        class LateWork:
            def __init__(self, work: dist.Work, result: Tensor, target: Tensor) -> None:
                self.work, self.result, self.target = work, result, target

            def wait(self, *args: Any) -> bool:
                log.waits += 1
                done = self.work.wait(*args)
                self.target.copy_(self.result)
                return done

        def counting(tensor: Tensor, *args: Any, **kwargs: Any) -> Any:
            is_async = bool(kwargs.get("async_op", False))
            log.calls.append(is_async)
            if not is_async:
                return original(tensor, *args, **kwargs)
            result = tensor.clone()
            return LateWork(original(result, *args, **kwargs), result, tensor)

        dist.all_reduce = counting
        try:
            yield self
        finally:
            dist.all_reduce = original


def train_distributed(
    model_fn: Callable[[], nn.Module],
    steps: Steps,
    *,
    process_group: trainact.distributed.ProcessGroupArg = "auto",
    defer: bool = False,
    on_step: bool = False,
    wrap: str = "ddp",
    extra_forward: bool = False,
    ddp_options: dict[str, Any] | None = None,
    sync_all: bool = False,
    discard: str = "",
    clip: float = 0.0,
) -> tuple[nn.Module, dict[str, Any]]:
    """Train on this rank's shares under DDP or FSDP2; returns the model and collective counts.

    Non-last micro-batches skip the gradient sync (``no_sync()`` / FSDP2's
    ``set_requires_gradient_sync(False)``) unless ``sync_all``. Deferred layers are finished by
    ``precondition_`` after the last backward, or by the optimizer pre-hook when ``on_step``.
    With ``extra_forward``, rank 0 alone also runs a training-mode forward through the unwrapped
    model before each step, whose backward never runs (a logging pass). With ``discard``, each
    step starts with a backward on other data whose gradient is then cleared (``"none"``:
    ``zero_grad()``, ``"zeros"``: ``zero_grad(set_to_none=False)``): it must leave nothing.
    ``ddp_options`` go to DistributedDataParallel. ``clip`` clips the gradients to that norm
    right before ``opt.step()`` (after ``precondition_``, or before it with ``on_step``).
    """
    rank, world = dist.get_rank(), dist.get_world_size()
    trainact.nn.deferred._warned_clipping = False  # each scenario may warn once
    model = model_fn()
    trainact.apply(
        model, LAM, layer=FIRST_LAYER[model_fn], process_group=process_group, defer=defer
    )
    if wrap == "ddp":
        module: nn.Module = DDP(model, **(ddp_options or {}))
    else:
        from torch.distributed.fsdp import fully_shard

        fully_shard(model[0])
        module = fully_shard(model)
    opt = sgd(module)
    if on_step:
        trainact.precondition_on_step(opt, module)
    log = CollectiveLog()
    unwaited_after_forward = 0
    with log.patched(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for micro_batches, data in zip(steps, global_data(model_fn, steps), strict=True):
            opt.zero_grad()
            scale = world / step_size(micro_batches)
            if discard:
                x, y = data[0][rank]
                loss_fn(module(5 * x + 1), y, scale).backward()  # a probe, then cleared
                opt.zero_grad(set_to_none=discard == "none")
            for j, micro in enumerate(data):
                last = j == len(data) - 1 or sync_all
                if wrap == "ddp":
                    sync = nullcontext() if last else module.no_sync()
                else:
                    module.set_requires_gradient_sync(last)
                    sync = nullcontext()
                x, y = micro[rank]
                if extra_forward and rank == 0:
                    model(x).sum().item()  # a logging pass: forward only, in training mode
                with sync:
                    out = module(x)
                    unwaited_after_forward += sum(log.calls) - log.waits
                    loss_fn(out, y, scale).backward()
            if defer and not on_step:
                trainact.precondition_(module)
            if clip:
                torch.nn.utils.clip_grad_norm_(module.parameters(), clip)
            opt.step()
    counts = {
        "async_calls": sum(log.calls),
        "blocking_calls": len(log.calls) - sum(log.calls),
        "waits": log.waits,
        "unwaited_after_forward": unwaited_after_forward,
        # the last collective's Work stays referenced (freed by gloo's thread, it hung exits)
        "latest_work_held": trainact.distributed._latest_work is not None,
        "forwards": sum(len(m) for m in steps),
        "steps": len(steps),
        "tract_warnings": [str(w.message) for w in caught if "TrAct" in str(w.message)],
    }
    return module, counts


def compare(
    model_fn: Callable[[], nn.Module], steps: Steps, per_rank: bool = False, **kwargs: Any
) -> dict[str, Any]:
    """Train distributed, then measure the distance to the reference and between ranks."""
    module, counts = train_distributed(model_fn, steps, **kwargs)
    model = module.module if isinstance(module, DDP) else module
    ref = reference(model_fn, steps, per_rank=per_rank)
    return {"diff": max_diff(model, ref), "spread": rank_spread(model), **counts}


def missed_precondition(wrap: str) -> dict[str, Any]:
    """Step without ``precondition_`` after a deferred backward: the step refuses."""
    module, _ = train_distributed(conv_model, [], defer=True, wrap=wrap)
    rank = dist.get_rank()
    x, y = global_data(conv_model, EVEN[:1])[0][0][rank]
    opt = sgd(module)
    loss_fn(module(x), y, 1.0).backward()
    before = [p.detach().clone() for p in module.parameters()]
    try:
        opt.step()
    except RuntimeError as error:
        unchanged = all(
            torch.equal(a, b.detach()) for a, b in zip(before, module.parameters(), strict=True)
        )
        trainact.precondition_(module)  # leaves the group consistent for the next scenario
        return {"raised": "precondition_" in str(error) and unchanged}
    return {"raised": False}


def refused(model_fn: Callable[[], nn.Module], steps: Steps, **kwargs: Any) -> dict[str, Any]:
    """Train as :func:`compare` does, expecting a RuntimeError on every rank: its message."""
    try:
        train_distributed(model_fn, steps, **kwargs)
    except RuntimeError as error:
        return {"raised": str(error)}
    return {"raised": ""}


def join(process_group: trainact.distributed.ProcessGroupArg) -> dict[str, Any]:
    """DDP's ``join()`` with uneven inputs (rank r has 2 + r batches): the error TrAct raises at
    the first step on every rank, or "" where training finished."""
    rank = dist.get_rank()
    model = conv_model()
    trainact.apply(model, LAM, layer="0", process_group=process_group)
    module = DDP(model)
    opt = sgd(module)
    gen = torch.Generator().manual_seed(rank)
    try:
        with module.join():
            for _ in range(2 + rank):
                opt.zero_grad()
                x = torch.randn(3, 3, 6, 6, generator=gen, dtype=torch.float64)
                loss_fn(module(x), torch.zeros(3, 2, dtype=torch.float64), 1.0).backward()
                opt.step()
    except RuntimeError as error:
        return {"raised": str(error)}
    return {"raised": ""}


BUCKET_VIEW = {"gradient_as_bucket_view": True}

SCENARIOS: dict[str, Callable[[], dict[str, Any]]] = {
    "ddp_conv": lambda: compare(conv_model, EVEN),
    "ddp_linear": lambda: compare(linear_model, EVEN),
    "ddp_uneven_empty": lambda: compare(conv_model, UNEVEN),
    "ddp_uneven_empty_linear": lambda: compare(linear_model, UNEVEN),
    "ddp_none": lambda: compare(conv_model, UNEVEN, process_group=None),
    "ddp_none_per_rank": lambda: compare(conv_model, UNEVEN, per_rank=True, process_group=None),
    "ddp_checkpoint": lambda: compare(checkpointed_model, UNEVEN),
    "ddp_extra_forward": lambda: compare(conv_model, EVEN, extra_forward=True),
    "ddp_two_views": lambda: compare(two_view_model, UNEVEN),
    "ddp_tied": lambda: compare(Tied, EVEN),
    "ddp_defer_no_sync": lambda: compare(conv_model, MICRO, defer=True),
    "ddp_defer_no_sync_linear": lambda: compare(linear_model, MICRO, defer=True),
    "ddp_defer_on_step": lambda: compare(conv_model, MICRO, defer=True, on_step=True),
    "ddp_missed_precondition": lambda: missed_precondition("ddp"),
    "ddp_defer_bucket_view_synced": lambda: compare(
        conv_model, MICRO, defer=True, ddp_options=BUCKET_VIEW, sync_all=True
    ),
    "ddp_defer_bucket_view_no_sync": lambda: compare(
        conv_model, MICRO, defer=True, ddp_options=BUCKET_VIEW
    ),
    "ddp_defer_bucket_view_static_graph": lambda: compare(
        conv_model,
        MICRO,
        defer=True,
        ddp_options={**BUCKET_VIEW, "static_graph": True},
        sync_all=True,
    ),
    "ddp_defer_bucket_view_discarded": lambda: compare(
        conv_model, MICRO, defer=True, ddp_options=BUCKET_VIEW, sync_all=True, discard="zeros"
    ),
    "ddp_defer_tied": lambda: refused(Tied, UNEVEN, defer=True),
    "ddp_defer_clipped_after": lambda: compare(conv_model, MICRO, defer=True, clip=1e-3),
    "ddp_defer_on_step_clipped": lambda: compare(
        conv_model, MICRO, defer=True, on_step=True, clip=1e-3
    ),
    "ddp_join": lambda: join("auto"),
    "ddp_join_per_process_statistics": lambda: join(None),
}
if compat.torch_version() >= compat.MINIMUM_TORCH["FSDP2"][0]:  # (test_ddp skips them below)
    SCENARIOS["fsdp"] = lambda: compare(conv_model, UNEVEN, wrap="fsdp")
    SCENARIOS["fsdp_defer"] = lambda: compare(conv_model, MICRO, defer=True, wrap="fsdp")
    SCENARIOS["fsdp_missed_precondition"] = lambda: missed_precondition("fsdp")
    SCENARIOS["fsdp_defer_discarded"] = lambda: compare(
        conv_model, MICRO, defer=True, wrap="fsdp", discard="none"
    )
    SCENARIOS["fsdp_defer_discarded_zeros"] = lambda: compare(
        conv_model, MICRO, defer=True, wrap="fsdp", discard="zeros"
    )


def free_port() -> int:
    """A free TCP port on the loopback interface."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(rank: int, world_size: int, port: int, out_dir: str) -> None:
    """Entry point of one spawned rank: every scenario in order, results written as it goes."""
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=60),
    )
    results: dict[str, Any] = {}
    path = os.path.join(out_dir, f"rank{rank}.json")
    try:
        for name, scenario in SCENARIOS.items():
            try:
                results[name] = scenario()
            except Exception:
                results[name] = {"error": traceback.format_exc()}
                raise  # the other rank may be inside a collective: stop the whole group
            finally:
                with open(path, "w") as f:
                    json.dump(results, f)
    finally:
        dist.destroy_process_group()
