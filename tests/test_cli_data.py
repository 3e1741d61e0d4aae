"""Every CLI dataset on tiny data it makes itself: features (vlm preset), ImageFolder (imagenet
preset through a config file), Fashion-MNIST in the Debian package's .gz layout."""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from neusub.cli import main

SMALL = ["--epochs", "1", "--quiet", "--workers", "0"]


@pytest.fixture(autouse=True)
def _own_cache(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def train(tmp_path: Path, *args: str) -> dict:
    """``neusub train ARGS`` in this process; its JSON result."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["train", *args])
    assert code == 0, err.getvalue()[-3000:]
    return json.loads(out.getvalue())


def test_features_with_vlm_preset(tmp_path: Path):
    data = tmp_path / "feats"
    data.mkdir()
    gen = torch.Generator().manual_seed(0)
    for split, n in (("train", 48), ("val", 24)):
        labels = torch.arange(n) % 3
        features = torch.randn(n, 4, 16, generator=gen) + labels[:, None, None].float()  # (N, T, D)
        torch.save({"features": features, "labels": labels}, data / f"{split}.pt")
    out = tmp_path / "vlm"
    record = train(
        tmp_path,
        "--preset",
        "vlm",
        "--dataset",
        "features",
        "--data",
        str(data),
        "--batch-size",
        "16",
        "--out",
        str(out),
        *SMALL,
    )
    config = json.loads((out / "config.json").read_text())
    assert config["model"] == "mlp_adapter" and config["opt"] == "adamw" and config["epochs"] == 1
    assert record["equivalence_error"] < 1e-5 and (out / "deployed.pt").is_file()


def test_imagefolder_with_imagenet_preset_and_config_file(tmp_path: Path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, count in (("train", 8), ("val", 4)):
        for label in ("cat", "dog"):
            folder = tmp_path / "images" / split / label
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    config = tmp_path / "run.json"
    config.write_text(
        json.dumps(
            {
                "preset": "imagenet",
                "img_size": 16,
                "model": "resnet18",
                "width_mult": 0.125,
                "stem": "cifar",
                "batch_size": 4,
            }
        )
    )
    out = tmp_path / "in"
    train(
        tmp_path,
        "--config",
        str(config),
        "--dataset",
        "imagefolder",
        "--data",
        str(tmp_path / "images"),
        "--batch-size",
        "8",
        "--out",
        str(out),
        *SMALL,
    )
    saved = json.loads((out / "config.json").read_text())
    # preset < config file < flags
    assert (
        saved["img_size"] == 16
        and saved["batch_size"] == 8
        and saved["bce"] == 0.2
        and saved["cutmix"] == 1.0
    )
    assert saved["opt"] == "lamb" and saved["rand_augment"] == "rand-m7-mstd0.5"


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = struct.pack(">I", 0x0800 | array.ndim) + b"".join(struct.pack(">I", d) for d in array.shape)
    with gzip.open(path, "wb") as handle:
        handle.write(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_from_debian_gz_layout(tmp_path: Path):
    data = tmp_path / "fashion-mnist"
    data.mkdir()
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 40), ("t10k", 20)):
        _write_idx(data / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 255, (n, 28, 28)))
        _write_idx(data / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    out = tmp_path / "fm"
    record = train(
        tmp_path,
        "--dataset",
        "fashion-mnist",
        "--data",
        str(data),
        "--model",
        "resnet18",
        "--width-mult",
        "0.125",
        "--batch-size",
        "20",
        "--out",
        str(out),
        *SMALL,
    )
    assert record["epoch"] == 1 and 0.0 <= record["val_acc"] <= 1.0
    assert (
        tmp_path / "cache" / "neusub" / "fashion-mnist" / "FashionMNIST" / "raw" / "t10k-images-idx3-ubyte"
    ).is_file()


def test_amp_and_channels_last_on_cpu(tmp_path: Path):
    out = tmp_path / "amp"
    record = train(
        tmp_path,
        "--dataset",
        "digits",
        "--model",
        "resnet18",
        "--width-mult",
        "0.125",
        "--recipe",
        "dbb",
        "--batch-size",
        "128",
        "--amp",
        "--channels-last",
        "--out",
        str(out),
        *SMALL,
    )
    assert json.loads((out / "config.json").read_text())["amp"] is True
    assert record["equivalence_error"] < 1e-5  # bf16 training, deployed fp32: still the same function
