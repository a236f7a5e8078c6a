"""TrAct with Lightning Fabric: ``defer=True`` and ``precondition_`` after a step's last backward.

    pip install "trainact[lightning]"
    python examples/fabric_train.py           # 8 epochs
    python examples/fabric_train.py --tiny    # seconds

``trainact.apply(model, defer=True)`` before ``fabric.setup`` sums XᵀX and n over the
micro-batches of a step (and over the processes of a distributed run);
``trainact.precondition_(model)`` applies TrAct once after the step's last backward, before
``fabric.clip_gradients`` and ``optimizer.step()``. The data is a synthetic 4-class task:
replace ``quadrant_images`` with your own.
"""

from __future__ import annotations

import argparse
import logging

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import trainact


def quadrant_images(n: int, seed: int) -> TensorDataset:
    """(n, 3, 16, 16) noise, one quadrant brighter by 0.5; the label says which one."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(4, (n,), generator=g)
    masks = torch.zeros(4, 1, 16, 16)
    for q in range(4):
        masks[q, :, (q // 2) * 8 : (q // 2) * 8 + 8, (q % 2) * 8 : (q % 2) * 8 + 8] = 1.0
    return TensorDataset(torch.randn(n, 3, 16, 16, generator=g) + 0.5 * masks[labels], labels)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=32, help="per process, per micro-batch")
    parser.add_argument("--accumulate", type=int, default=4, help="micro-batches per step")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--lam", type=float, default=0.1, help="TrAct's lambda")
    parser.add_argument("--tiny", action="store_true", help="2 epochs on 1,024 images")
    args = parser.parse_args()
    logging.basicConfig(format="%(name)s: %(message)s")
    logging.getLogger("trainact").setLevel(logging.INFO)  # where TrAct runs, and how

    fabric = L.Fabric(accelerator="cpu", devices=1)  # or accelerator="auto", devices=N
    torch.manual_seed(0)
    train_size, epochs = (1024, 2) if args.tiny else (4096, args.epochs)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # the layer TrAct trains
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
        nn.Flatten(), nn.Linear(128, 4),
    )  # fmt: skip
    trainact.apply(model, lam=args.lam, defer=True)  # before fabric.setup (which may wrap it)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    model, optimizer = fabric.setup(model, optimizer)
    train = DataLoader(quadrant_images(train_size, seed=1), args.batch_size, shuffle=True)
    val = DataLoader(quadrant_images(512, seed=2), batch_size=256)
    train, val = fabric.setup_dataloaders(train, val)

    for epoch in range(epochs):
        model.train()
        for i, (x, y) in enumerate(train):
            last = (i + 1) % args.accumulate == 0 or i + 1 == len(train)  # ends a step
            with fabric.no_backward_sync(model, enabled=not last):
                loss = F.cross_entropy(model(x), y)
                fabric.backward(loss / args.accumulate)
            if last:
                trainact.precondition_(model)  # TrAct from the summed statistics
                fabric.clip_gradients(model, optimizer, max_norm=1.0)
                optimizer.step()
                optimizer.zero_grad()
        model.eval()
        correct = total = 0
        with torch.no_grad():
            for x, y in val:
                correct += (model(x).argmax(1) == y).sum().item()
                total += y.numel()
        fabric.print(
            f"epoch {epoch + 1}  loss {loss.item():.4f}  val accuracy {correct / total:.4f}"
        )


if __name__ == "__main__":
    main()
