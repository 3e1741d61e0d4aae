"""Fashion-MNIST as a ``features`` dataset for the MLP experiment (experiments/mlp.toml):
every image's 784 normalised pixels projected on the 64 leading principal components of the
training images (a fixed linear feature extractor, fitted once on the training set, whitened).
Writes ``OUT/{train,val}.pt`` (60,000 and 10,000 rows of 64 features).

    python experiments/fashion_mnist_features.py runs/fashion_mnist_features
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torchvision import datasets

from neusub.cli.data import _fashion_root

COMPONENTS = 64


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    root = _fashion_root(None)
    splits = {
        split: datasets.FashionMNIST(str(root), train=train, download=False)
        for split, train in (("train", True), ("val", False))
    }
    pixels = {split: d.data.reshape(len(d.data), -1).double() / 255.0 for split, d in splits.items()}
    mean = pixels["train"].mean(0)
    _, singular, basis = torch.linalg.svd(pixels["train"] - mean, full_matrices=False)
    scale = singular[:COMPONENTS] / (len(pixels["train"]) - 1) ** 0.5  # whiten: unit variance
    for split, x in pixels.items():
        features = ((x - mean) @ basis[:COMPONENTS].T / scale).float()
        torch.save({"features": features, "labels": splits[split].targets.clone()}, out / f"{split}.pt")
        print(f"{out / split}.pt: {tuple(features.shape)}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
