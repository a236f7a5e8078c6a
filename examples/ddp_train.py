"""TrAct under DistributedDataParallel, with optional gradient accumulation.

    torchrun --nproc-per-node 2 examples/ddp_train.py                   # 2 processes (gloo on CPU)
    torchrun --nproc-per-node 2 examples/ddp_train.py --accumulate 4    # 4 micro-batches per step
    python examples/ddp_train.py                                        # one process

Each step uses the statistics of the global batch (all processes, all micro-batches), so the
training is the same whatever the number of processes and the accumulation factor.
"""

from __future__ import annotations

import argparse
import os
from contextlib import nullcontext

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import trainact


def synthetic_batch(step: int, micro: int, rank: int, size: int) -> tuple[torch.Tensor, ...]:
    """A fixed 4-class problem: which quadrant of the image is brightest; new data per rank."""
    gen = torch.Generator().manual_seed(1 + rank + 1000 * (micro + 1000 * step))
    x = torch.randn(size, 3, 16, 16, generator=gen)
    y = torch.randint(4, (size,), generator=gen)
    rows, cols = (y // 2) * 8, (y % 2) * 8
    for i in range(size):
        x[i, :, rows[i] : rows[i] + 8, cols[i] : cols[i] + 8] += 1.0
    return x, y


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=32, help="per process, per step")
    parser.add_argument("--accumulate", type=int, default=1, help="micro-batches per step")
    args = parser.parse_args()

    distributed = "WORLD_SIZE" in os.environ  # set by torchrun
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    if not torch.cuda.is_available():
        device = torch.device("cpu")
    if distributed:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    train(args, device, distributed)
    if distributed:  # after train() returned: DDP's buffers and pending work are freed by now
        dist.destroy_process_group()


def train(args: argparse.Namespace, device: torch.device, distributed: bool) -> None:
    rank = dist.get_rank() if distributed else 0
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
        nn.Flatten(), nn.Linear(128, 4),
    ).to(device)  # fmt: skip
    # Enable TrAct before wrapping. process_group="auto" (the default) sums XᵀX and n over
    # all processes; defer=True sums them over the micro-batches of a step as well.
    deferred = args.accumulate > 1
    trainact.apply(model, lam=0.1, defer=deferred)
    module = DDP(model) if distributed else model
    optimizer = torch.optim.SGD(module.parameters(), lr=0.05, momentum=0.9)
    if deferred:
        trainact.precondition_on_step(optimizer, module)  # precondition_ before every step

    micro_size = args.batch_size // args.accumulate
    for step in range(args.steps):
        optimizer.zero_grad()
        for micro in range(args.accumulate):
            last = micro == args.accumulate - 1
            x, y = (t.to(device) for t in synthetic_batch(step, micro, rank, micro_size))
            with nullcontext() if last or not distributed else module.no_sync():
                loss = F.cross_entropy(module(x), y) / args.accumulate
                loss.backward()
        optimizer.step()
        if rank == 0 and (step % 5 == 0 or step == args.steps - 1):
            print(f"step {step:3d}  loss {loss.item() * args.accumulate:.4f}", flush=True)


if __name__ == "__main__":
    main()
