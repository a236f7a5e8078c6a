"""TrAct in a plain PyTorch loop: a small CNN on the CIFAR-10 subset that ships with trainact.

    pip install "trainact[experiments]"          # the subset's loader needs numpy and pillow
    python examples/pytorch_train.py             # TrAct, 10 epochs on 10,000 images
    python examples/pytorch_train.py --baseline  # the same run without TrAct
    python examples/pytorch_train.py --tiny      # seconds: 1 epoch on 1,000 images

TrAct is one line, ``trainact.apply(model)``; the rest is an ordinary training loop with the
data held on the device as tensors and batches sliced from a permutation.
"""

from __future__ import annotations

import argparse
import logging
import time

import torch
import torch.nn.functional as F
from torch import nn

import trainact
from trainact.experiments.data import load_dataset


def small_cnn(classes: int = 10) -> nn.Sequential:
    """Three conv blocks on 32x32 images; the first Conv2d is the layer TrAct trains."""

    def block(c_in: int, c_out: int) -> list[nn.Module]:
        return [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU()]

    return nn.Sequential(
        *block(3, 32), nn.MaxPool2d(2),  # (B, 32, 16, 16)
        *block(32, 64), nn.MaxPool2d(2),  # (B, 64, 8, 8)
        *block(64, 128), nn.AdaptiveMaxPool2d(1),  # (B, 128, 1, 1)
        nn.Flatten(), nn.Linear(128, classes),
    )  # fmt: skip


@torch.no_grad()
def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    model.eval()
    correct = sum(
        (model(x).argmax(1) == y).sum().item()
        for x, y in zip(images.split(500), labels.split(500), strict=True)
    )
    model.train()
    return correct / len(labels)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.05, help="peak of the one-cycle schedule")
    parser.add_argument("--lam", type=float, default=0.1, help="TrAct's lambda")
    parser.add_argument("--baseline", action="store_true", help="train without TrAct")
    parser.add_argument("--tiny", action="store_true", help="1 epoch on 1,000 images")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.tiny:
        args.epochs = 1
    logging.basicConfig(format="%(name)s: %(message)s")
    logging.getLogger("trainact").setLevel(logging.INFO)  # names the layer TrAct is enabled on

    torch.manual_seed(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    # Data: uint8 tensors decoded once (then cached), standardized on the device.
    data = load_dataset("cifar10-subset", train_subset=1000 if args.tiny else None, progress=False)
    mean = torch.tensor(data.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(data.std, device=device).view(1, 3, 1, 1)

    def standardize(images: torch.Tensor) -> torch.Tensor:
        return (images.to(device).float() / 255 - mean) / std

    train_x, train_y = standardize(data.train_images), data.train_labels.to(device)
    test_x, test_y = standardize(data.test_images), data.test_labels.to(device)

    model = small_cnn(len(data.classes)).to(device)
    if not args.baseline:
        trainact.apply(model, lam=args.lam)  # finds the first layer ('0') by tracing forward
    optimizer = torch.optim.SGD(
        model.parameters(), lr=args.lr, momentum=0.9, nesterov=True, weight_decay=5e-4
    )
    steps_per_epoch = len(train_x) // args.batch_size
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=args.lr, total_steps=args.epochs * steps_per_epoch
    )

    for epoch in range(args.epochs):
        start = time.perf_counter()
        order = torch.randperm(len(train_x), device=device)
        for step in range(steps_per_epoch):
            batch = order[step * args.batch_size : (step + 1) * args.batch_size]
            x, y = train_x[batch], train_y[batch]
            flip = torch.rand(len(x), 1, 1, 1, device=device) < 0.5  # random horizontal flips
            x = torch.where(flip, x.flip(-1), x)
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()  # the first layer's weight gradient comes out preconditioned
            optimizer.step()
            schedule.step()
        test, seconds = accuracy(model, test_x, test_y), time.perf_counter() - start
        print(
            f"epoch {epoch + 1}  loss {loss.item():.4f}  test accuracy {test:.4f}  {seconds:.0f}s"
        )


if __name__ == "__main__":
    main()
