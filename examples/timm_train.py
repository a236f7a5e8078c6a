"""TrAct on a timm model: any ``timm.create_model`` network on the CIFAR-10 subset of trainact.

    pip install timm "trainact[experiments]"
    python examples/timm_train.py                          # ResNet-18, 5 epochs on 10,000 images
    python examples/timm_train.py --model convnext_atto    # any timm model that takes 32x32
    python examples/timm_train.py --tiny                   # seconds: 1 epoch on 1,000 images

``trainact.apply(model, example_inputs=images)`` finds the first layer by one forward run on a
batch (``conv1`` of a ResNet, ``stem.0`` of a ConvNeXt, ``patch_embed.proj`` of a ViT); random
weights, no download.
"""

from __future__ import annotations

import argparse
import logging

import timm
import torch
import torch.nn.functional as F

import trainact
from trainact.experiments.data import load_dataset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18", help="a timm model name")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3, help="AdamW, cosine to zero")
    parser.add_argument("--lam", type=float, default=0.1, help="TrAct's lambda")
    parser.add_argument("--tiny", action="store_true", help="1 epoch on 1,000 images")
    args = parser.parse_args()
    if args.tiny:
        args.epochs = 1
    logging.basicConfig(format="%(name)s: %(message)s")
    logging.getLogger("trainact").setLevel(logging.INFO)  # names the layer TrAct is enabled on

    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    data = load_dataset("cifar10-subset", train_subset=1000 if args.tiny else None, progress=False)
    mean = torch.tensor(data.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(data.std, device=device).view(1, 3, 1, 1)
    train_x = (data.train_images.to(device).float() / 255 - mean) / std
    test_x = (data.test_images.to(device).float() / 255 - mean) / std
    train_y, test_y = data.train_labels.to(device), data.test_labels.to(device)

    model = timm.create_model(args.model, pretrained=False, num_classes=len(data.classes))
    model = model.to(device)
    trainact.apply(model, lam=args.lam, example_inputs=train_x[:2])
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05)
    steps = args.epochs * (len(train_x) // args.batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)

    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(len(train_x), device=device)
        for batch in order.split(args.batch_size)[: len(train_x) // args.batch_size]:
            loss = F.cross_entropy(model(train_x[batch]), train_y[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
        model.eval()
        with torch.no_grad():
            predicted = torch.cat([model(x).argmax(1) for x in test_x.split(500)])
        test = (predicted == test_y).float().mean().item()
        print(f"epoch {epoch + 1}  loss {loss.item():.4f}  test accuracy {test:.4f}")


if __name__ == "__main__":
    main()
