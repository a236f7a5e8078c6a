"""TrAct with Lightning: ``TrActCallback`` on a LightningModule, with accumulation and clipping.

    pip install "trainact[lightning]"
    python examples/lightning_train.py                                # 8 epochs
    python examples/lightning_train.py --tiny                         # seconds
    python examples/lightning_train.py --devices 2 --strategy ddp     # 2 processes

The callback enables TrAct when ``fit`` starts (on the first layer, found by a forward run on
``example_input_array``), preconditions in ``on_before_optimizer_step`` (after the step's last
backward, before clipping) and removes TrAct when ``fit`` ends. With gradient accumulation the
micro-batches of a step train exactly like one batch. The data is a synthetic 4-class task:
replace ``quadrant_images`` with your own dataset.
"""

from __future__ import annotations

import argparse
import logging

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from trainact.lightning import TrActCallback


def quadrant_images(n: int, seed: int) -> TensorDataset:
    """(n, 3, 16, 16) noise, one quadrant brighter by 0.5; the label says which one."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(4, (n,), generator=g)
    masks = torch.zeros(4, 1, 16, 16)
    for q in range(4):
        masks[q, :, (q // 2) * 8 : (q // 2) * 8 + 8, (q % 2) * 8 : (q % 2) * 8 + 8] = 1.0
    return TensorDataset(torch.randn(n, 3, 16, 16, generator=g) + 0.5 * masks[labels], labels)


class Classifier(L.LightningModule):
    def __init__(self, lr: float) -> None:
        super().__init__()
        self.lr = lr
        self.net = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # the layer TrAct trains
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
            nn.Flatten(), nn.Linear(128, 4),
        )  # fmt: skip
        self.example_input_array = torch.zeros(1, 3, 16, 16)  # how TrActCallback finds net.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        accuracy = (self(x).argmax(1) == y).float().mean()
        self.log("val_acc", accuracy, prog_bar=True, sync_dist=True)  # averaged over processes

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=32, help="per micro-batch")
    parser.add_argument("--accumulate", type=int, default=2, help="micro-batches per step")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--lam", type=float, default=0.1, help="TrAct's lambda")
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--strategy", default="auto")
    parser.add_argument("--tiny", action="store_true", help="2 epochs on 1,024 images")
    args = parser.parse_args()
    logging.basicConfig(format="%(name)s: %(message)s")
    logging.getLogger("trainact").setLevel(logging.INFO)  # names the layer TrAct is enabled on

    L.seed_everything(0)
    train_size, epochs = (1024, 2) if args.tiny else (4096, args.epochs)
    train = DataLoader(quadrant_images(train_size, seed=1), args.batch_size, shuffle=True)
    val = DataLoader(quadrant_images(512, seed=2), batch_size=256)

    trainer = L.Trainer(
        max_epochs=epochs,
        accumulate_grad_batches=args.accumulate,
        gradient_clip_val=1.0,  # clips the preconditioned gradient
        callbacks=[TrActCallback(lam=args.lam)],
        devices=args.devices,
        strategy=args.strategy,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=not args.tiny,
    )
    trainer.fit(Classifier(args.lr), train, val)
    if trainer.is_global_zero:
        print(f"val accuracy {trainer.callback_metrics['val_acc']:.4f}")


if __name__ == "__main__":
    main()
