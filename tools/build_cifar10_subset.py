"""Build trainact's embedded ``cifar10-subset`` asset from the CIFAR-10 JPEG archive.

The asset holds a stratified subset of 10,000 train and 2,000 test images (1,000 and 200 per
class), chosen by ``stratified_subset`` with a fixed seed, as the archive's original JPEG bytes.
The bytes that every selected file begins with (the JPEG headers, about 620 of each file's ~920)
are stored once as ``prefix``; each image keeps only the rest, which roughly triples the density.
The images are stored in a seeded random order so that any prefix of a split is mixed.

Usage (from the project root)::

    python tools/build_cifar10_subset.py [../shared/data/cifar10-jpeg.tar.gz]
"""

from __future__ import annotations

import argparse
import hashlib
import os
from pathlib import Path

import numpy as np
import torch

from trainact.experiments.data import _archive_members, load_dataset, stratified_subset

SHA256 = "d34c68f61cca57aa9144c8f25bda427abb9921bd642d5857a2fc1a6b4416f965"
SIZES = {"train": 10_000, "test": 2_000}
SEED = 0
ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SOURCE = ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"
DEFAULT_OUTPUT = ROOT / "src" / "trainact" / "experiments" / "assets" / "cifar10_subset.npz"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("source", nargs="?", type=Path, default=DEFAULT_SOURCE)
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    args = parser.parse_args()

    digest = hashlib.sha256(args.source.read_bytes()).hexdigest()
    if digest != SHA256:
        raise SystemExit(f"{args.source}: sha256 {digest}, expected {SHA256}")

    files: dict[str, dict[str, bytes]] = {"train": {}, "test": {}}
    for name, data in _archive_members(args.source):
        split, _cls, _file = name.split("/")
        files[split][name] = data
    classes = sorted({name.split("/")[1] for name in files["train"]})

    arrays: dict[str, np.ndarray] = {"classes": np.array(classes, dtype=np.str_)}
    chosen: dict[str, list[bytes]] = {}
    for i, (split, size) in enumerate(SIZES.items()):
        names = sorted(files[split])
        labels = torch.tensor([classes.index(n.split("/")[1]) for n in names])
        index = stratified_subset(labels, size, SEED)
        order = index[torch.randperm(size, generator=torch.Generator().manual_seed(SEED + i))]
        chosen[split] = [files[split][names[j]] for j in order.tolist()]
        arrays[f"{split}_labels"] = labels[order].numpy().astype(np.uint8)

    prefix = os.path.commonprefix([b for blobs in chosen.values() for b in blobs])
    arrays["prefix"] = np.frombuffer(prefix, dtype=np.uint8)
    for split, blobs in chosen.items():
        rests = [b[len(prefix) :] for b in blobs]
        arrays[f"{split}_bytes"] = np.frombuffer(b"".join(rests), dtype=np.uint8)
        arrays[f"{split}_offsets"] = np.cumsum([0] + [len(r) for r in rests], dtype=np.int64)

    args.output.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.output, **arrays)
    size_mib = args.output.stat().st_size / 2**20
    print(f"wrote {args.output}: {size_mib:.2f} MiB, shared prefix {len(prefix)} bytes")

    data = load_dataset("cifar10-subset", progress=False)
    print(f"check: {len(data.train_labels)} train, {len(data.test_labels)} test, mean {data.mean}")


if __name__ == "__main__":
    main()
