"""TrAct with the Hugging Face Trainer: ``TrActTrainer`` trains a small ViT built from a config.

    pip install "trainact[huggingface]"
    python examples/huggingface_train.py          # 3 epochs
    python examples/huggingface_train.py --tiny   # seconds

``TrActTrainer`` is ``transformers.Trainer`` plus ``tract_lam`` / ``tract_layer``: it enables
TrAct on the patch embedding, sums the statistics over the micro-batches of a step
(``gradient_accumulation_steps``) and preconditions after the last one's backward, before
``max_grad_norm`` clipping. The model is built from a ``ViTConfig`` (no download); the data is
a synthetic 4-class task: replace ``QuadrantImages`` with your own dataset.
"""

from __future__ import annotations

import argparse
import logging
import tempfile

import numpy as np
import torch
from transformers import EvalPrediction, TrainingArguments, ViTConfig, ViTForImageClassification

from trainact.huggingface import TrActTrainer


class QuadrantImages(torch.utils.data.Dataset):
    """(3, 16, 16) noise, one quadrant brighter by 0.5; the label says which one."""

    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.labels = torch.randint(4, (n,), generator=g)
        masks = torch.zeros(4, 1, 16, 16)
        for q in range(4):
            masks[q, :, (q // 2) * 8 : (q // 2) * 8 + 8, (q % 2) * 8 : (q % 2) * 8 + 8] = 1.0
        self.images = torch.randn(n, 3, 16, 16, generator=g) + 0.5 * masks[self.labels]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"pixel_values": self.images[i], "labels": self.labels[i]}


def accuracy(prediction: EvalPrediction) -> dict[str, float]:
    predicted = np.argmax(prediction.predictions, axis=1)
    return {"accuracy": float((predicted == prediction.label_ids).mean())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=float, default=3)
    parser.add_argument("--batch-size", type=int, default=32, help="per device, per micro-batch")
    parser.add_argument("--accumulate", type=int, default=2, help="gradient_accumulation_steps")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--lam", type=float, default=0.1, help="TrAct's lambda")
    parser.add_argument("--out", help="the Trainer's output_dir (default: a temporary directory)")
    parser.add_argument("--tiny", action="store_true", help="4 epochs on 1,024 images")
    args = parser.parse_args()
    logging.basicConfig(format="%(name)s: %(message)s")
    logging.getLogger("trainact").setLevel(logging.INFO)  # names the layer TrAct is enabled on

    torch.manual_seed(0)
    train_size, epochs = (1024, 4) if args.tiny else (8192, args.epochs)
    config = ViTConfig(
        image_size=16, patch_size=4, num_channels=3, num_labels=4,
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
    )  # fmt: skip
    model = ViTForImageClassification(config)

    with tempfile.TemporaryDirectory() as scratch:
        training = TrainingArguments(
            output_dir=args.out or scratch,
            num_train_epochs=epochs,
            per_device_train_batch_size=args.batch_size,
            gradient_accumulation_steps=args.accumulate,
            learning_rate=args.lr,
            max_grad_norm=1.0,  # clips the preconditioned gradient
            eval_strategy="epoch",
            logging_strategy="epoch",
            save_strategy="no",
            report_to="none",
            disable_tqdm=args.tiny,
            dataloader_pin_memory=torch.cuda.is_available(),
            seed=0,
        )
        trainer = TrActTrainer(
            model=model,
            args=training,
            train_dataset=QuadrantImages(train_size, seed=1),
            eval_dataset=QuadrantImages(512, seed=2),
            compute_metrics=accuracy,
            tract_lam=args.lam,
            tract_layer="vit.embeddings.patch_embeddings.projection",  # the patch embedding
        )
        trainer.train()
        print(f"eval accuracy {trainer.evaluate()['eval_accuracy']:.4f}")


if __name__ == "__main__":
    main()
