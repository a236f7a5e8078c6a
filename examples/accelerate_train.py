"""TrAct with accelerate: ``defer=True`` and ``precondition_`` on the step's last micro-batch.

    pip install "trainact[accelerate]"
    python examples/accelerate_train.py           # 8 epochs
    python examples/accelerate_train.py --tiny    # seconds

``trainact.apply(model, defer=True)`` before ``accelerator.prepare`` sums XᵀX and n over the
micro-batches of a step (and over the processes of a distributed run);
``trainact.precondition_(model)`` applies TrAct once when ``accelerator.sync_gradients`` says
the step's gradient is complete, before clipping. The data is a synthetic 4-class task:
replace ``quadrant_images`` with your own.
"""

from __future__ import annotations

import argparse
import logging

import torch
import torch.nn.functional as F
from accelerate import Accelerator
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
    logging.getLogger("trainact").setLevel(logging.INFO)  # names the layer TrAct is enabled on

    accelerator = Accelerator(gradient_accumulation_steps=args.accumulate)
    torch.manual_seed(0)
    train_size, epochs = (1024, 2) if args.tiny else (4096, args.epochs)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # the layer TrAct trains
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
        nn.Flatten(), nn.Linear(128, 4),
    )  # fmt: skip
    trainact.apply(model, lam=args.lam, defer=True)  # before prepare (which may wrap it in DDP)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    train = DataLoader(quadrant_images(train_size, seed=1), args.batch_size, shuffle=True)
    val = DataLoader(quadrant_images(512, seed=2), batch_size=256)
    model, optimizer, train, val = accelerator.prepare(model, optimizer, train, val)

    for epoch in range(epochs):
        model.train()
        for x, y in train:
            with accelerator.accumulate(model):
                loss = F.cross_entropy(model(x), y)
                accelerator.backward(loss)
                if accelerator.sync_gradients:  # the step's last micro-batch
                    trainact.precondition_(model)  # TrAct from the summed statistics
                    accelerator.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()  # accelerate skips the steps of the other micro-batches
                optimizer.zero_grad()
        model.eval()
        correct = total = 0
        with torch.no_grad():
            for x, y in val:  # every process's predictions, without the padding of the last batch
                predicted, labels = accelerator.gather_for_metrics((model(x).argmax(1), y))
                correct += (predicted == labels).sum().item()
                total += labels.numel()
        accuracy = correct / total
        accelerator.print(f"epoch {epoch + 1}  loss {loss.item():.4f}  val accuracy {accuracy:.4f}")


if __name__ == "__main__":
    main()
