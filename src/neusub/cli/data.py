"""Datasets for the CLI: cifar10/100, imagefolder, fashion-mnist, digits, features.

Every dataset comes back as ``(train, val, info)`` map-style datasets of
``(tensor, label)``. Augmentation is seeded per batch from ``(seed, epoch, batch)``
(:class:`SeededBatches`), so data order and augmentation are a pure function of
the step: a resumed run sees exactly the batches an uninterrupted one does.
"""

from __future__ import annotations

import gzip
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, DistributedSampler, Subset, TensorDataset

from ..files import first_line
from ..saved import DataInfo
from .checkpoint import atomic_write
from .errors import CLIError
from .names import DATASETS, unknown_name

FASHION_MNIST_DEBIAN = Path("/usr/share/datasets/fashion-mnist")
FASHION_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)

LAYOUTS = {
    "cifar10": "PATH/cifar-10-batches-py/{data_batch_1..5,test_batch} (torchvision's layout; or --download)",
    "cifar100": "PATH/cifar-100-python/{train,test,meta} (torchvision's layout; or pass --download)",
    "imagefolder": "PATH/train/<class>/<image> and PATH/val/<class>/<image>",
    "fashion-mnist": (
        "PATH/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz] (the Debian package dataset-fashion-mnist "
        f"installs them in {FASHION_MNIST_DEBIAN}), or torchvision's PATH/FashionMNIST/raw/"
    ),
    "digits": "no path: scikit-learn's bundled 8×8 digits",
    "features": "PATH/train.pt and PATH/val.pt (or .npy pairs PATH/{train,val}_{features,labels}.npy); "
    "each .pt a dict {'features': (N, [T,] D) float tensor, 'labels': (N,) int tensor}",
}


def _unusable(dataset: str, path: str, detail: str) -> CLIError:
    return CLIError(
        f"dataset {dataset!r} at {path} cannot be used ({detail}); expected layout: {LAYOUTS[dataset]}"
    )


def _missing(dataset: str, path: str | None, detail: str = "") -> CLIError:
    where = f" at {path}" if path else ""
    return CLIError(f"dataset {dataset!r} not found{where}{detail}; expected layout: {LAYOUTS[dataset]}")


def load_digits_split(val_fraction: float = 0.2, seed: int = 0) -> tuple[Dataset, Dataset, DataInfo]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = (x - 0.3) / 0.4  # roughly zero-mean, unit-variance pixels
    y = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    split = int(round(len(y) * (1 - val_fraction)))
    train, val = order[:split], order[split:]
    info = DataInfo(10, 1, (1, 8, 8), "image")
    return TensorDataset(x[train], y[train]), TensorDataset(x[val], y[val]), info


def _fashion_root(path: str | None) -> Path:
    """A torchvision root holding FashionMNIST/raw; Debian's .gz files are unpacked to a cache."""
    source = Path(path) if path else FASHION_MNIST_DEBIAN
    if (source / "FashionMNIST" / "raw").is_dir():
        return source
    if not source.is_dir():
        raise _missing("fashion-mnist", str(source), " (apt-get install dataset-fashion-mnist provides it)")
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "neusub" / "fashion-mnist"
    raw = cache / "FashionMNIST" / "raw"
    for name in FASHION_FILES:
        target = raw / name
        if target.is_file():
            continue
        plain, packed = source / name, source / f"{name}.gz"
        if not plain.is_file() and not packed.is_file():
            raise _missing("fashion-mnist", str(source), f" (missing {name}[.gz])")
        with gzip.open(packed) if packed.is_file() else open(plain, "rb") as src:
            atomic_write(target, lambda dst, src=src: shutil.copyfileobj(src, dst))
    return cache


def _image_transforms(dataset: str, preset: dict, train: bool):
    from torchvision import transforms as T

    if dataset == "fashion-mnist":
        steps = [T.RandomCrop(28, padding=2), T.RandomHorizontalFlip()] if train else []
        return T.Compose([*steps, T.ToTensor(), T.Normalize((0.286,), (0.353,))])
    if dataset in ("cifar10", "cifar100"):
        mean, std = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
        steps = [T.RandomCrop(32, padding=4), T.RandomHorizontalFlip()] if train else []
        if train and preset.get("auto_augment") == "cifar10":
            steps.append(T.AutoAugment(T.AutoAugmentPolicy.CIFAR10))
        return T.Compose([*steps, T.ToTensor(), T.Normalize(mean, std)])
    from timm.data import create_transform  # imagefolder: timm's ImageNet pipeline

    return create_transform(
        preset.get("img_size", 224),
        is_training=train,
        auto_augment=preset.get("rand_augment"),
        color_jitter=preset.get("color_jitter", 0.0),
        # Appendix B: train interpolation per preset ("random" for ImageNet), test bicubic
        interpolation=preset.get("interpolation", "bicubic") if train else "bicubic",
        crop_pct=preset.get("crop_pct", 1.0),
    )


def _load_split(root: Path, split: str, path: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(features, labels)`` of one split from ``split.pt`` or the ``.npy`` pair (no pickles)."""
    pt, feats, labels = root / f"{split}.pt", root / f"{split}_features.npy", root / f"{split}_labels.npy"
    try:
        if pt.is_file():
            obj = torch.load(pt, map_location="cpu", weights_only=True)
            x, y = torch.as_tensor(obj["features"]), torch.as_tensor(obj["labels"])
        elif feats.is_file() and labels.is_file():
            x = torch.from_numpy(np.load(feats, allow_pickle=False))
            y = torch.from_numpy(np.load(labels, allow_pickle=False))
        else:
            raise _missing("features", path)
    except CLIError:
        raise
    except Exception as err:  # unreadable, a pickle, missing keys, not numbers
        reason = first_line(err, 120)
        raise _unusable("features", path, f"{split}: {reason}") from None
    if not (x.is_floating_point() or x.dtype in _INT_DTYPES) or y.dtype not in _INT_DTYPES:
        raise _unusable("features", path, f"{split}: features must be numbers and labels integers")
    if len(x) == 0:
        raise _unusable("features", path, f"{split} holds no samples")
    if y.dim() != 1 or len(x) != len(y):
        raise _unusable("features", path, f"{split}: {len(x)} features but labels of shape {tuple(y.shape)}")
    if int(y.min()) < 0:
        raise _unusable("features", path, f"{split}: labels must be class indices >= 0, not {int(y.min())}")
    if not bool(torch.isfinite(x.float()).all()):
        raise _unusable("features", path, f"{split}: features hold NaN or inf")
    return x.float(), y.long()


_INT_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def _load_features(path: str | None) -> tuple[Dataset, Dataset, DataInfo]:
    if not path:
        raise _missing("features", None, " (pass --data)")
    root = Path(path)
    (xt, yt), (xv, yv) = (_load_split(root, split, path) for split in ("train", "val"))
    if xt.shape[1:] != xv.shape[1:] or xt.dim() not in (2, 3):
        raise _missing("features", path, f" (inconsistent shapes {tuple(xt.shape)}, {tuple(xv.shape)})")
    num_classes = int(max(yt.max(), yv.max())) + 1
    info = DataInfo(num_classes, xt.shape[-1], tuple(xt.shape[1:]), "features")
    return TensorDataset(xt, yt), TensorDataset(xv, yv), info


def read_image(path: str):
    """ImageFolder's loader, with the file named when an image cannot be read."""
    from PIL import Image

    try:
        with open(path, "rb") as handle:
            return Image.open(handle).convert("RGB")
    except (OSError, ValueError, SyntaxError) as err:  # PIL raises these for broken files
        raise CLIError(f"image {path} cannot be read ({err}); remove or replace it") from None


def load_dataset(
    dataset: str, path: str | None, preset: dict, download: bool = False, seed: int = 0, augment: bool = True
) -> tuple[Dataset, Dataset, DataInfo]:
    """``(train, val, info)`` for one of :data:`DATASETS`; ``augment=False``: the training split
    with the validation transforms (e.g. INT8 calibration)."""
    if dataset not in DATASETS:
        raise CLIError(unknown_name("dataset", dataset, DATASETS))
    if dataset == "digits":
        return load_digits_split(seed=seed)
    if dataset == "features":
        return _load_features(path)
    from torchvision import datasets

    if dataset == "fashion-mnist":
        root = _fashion_root(path)
        make = datasets.FashionMNIST
        info = DataInfo(10, 1, (1, 28, 28), "image")
        kwargs = lambda train: dict(root=root, train=train, download=False)  # noqa: E731
    elif dataset in ("cifar10", "cifar100"):
        if not path:
            raise _missing(dataset, None, " (pass --data PATH)")
        make = datasets.CIFAR10 if dataset == "cifar10" else datasets.CIFAR100
        info = DataInfo(10 if dataset == "cifar10" else 100, 3, (3, 32, 32), "image")
        kwargs = lambda train: dict(root=path, train=train, download=download)  # noqa: E731
    else:
        if not path or not (Path(path) / "train").is_dir() or not (Path(path) / "val").is_dir():
            raise _missing(dataset, path)
        try:
            train_set, val_set = (
                datasets.ImageFolder(
                    str(Path(path) / split), _image_transforms(dataset, preset, train), loader=read_image
                )
                for split, train in (("train", augment), ("val", False))
            )
        except (FileNotFoundError, OSError) as err:  # a class folder without images, unreadable folders
            raise _missing(dataset, path, f" ({str(err).splitlines()[0][:160]})") from None
        size = preset.get("img_size", 224)
        return train_set, val_set, DataInfo(len(train_set.classes), 3, (3, size, size), "image")
    try:
        train_set = make(**kwargs(True), transform=_image_transforms(dataset, preset, augment))
        val_set = make(**kwargs(False), transform=_image_transforms(dataset, preset, False))
    except RuntimeError as err:  # torchvision: "Dataset not found or corrupted"
        raise _missing(dataset, str(path), f" ({err})") from None
    except (OSError, ValueError) as err:  # --download without network (URLError is an OSError), bad files
        reason = first_line(err)
        action = "download failed" if download else "cannot be read"
        raise _missing(dataset, str(path), f" ({action}: {reason})") from None
    return train_set, val_set, info


def take_subset(dataset: Dataset, samples: int) -> Dataset:
    """A fixed random subset of ``samples`` items (0 or more than there are: all of them).

    The subset depends only on the dataset's length, not on the run's seed, so runs with
    different seeds are compared on the same data."""
    if samples <= 0 or samples >= len(dataset):
        return dataset
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0))
    return Subset(dataset, sorted(order[:samples].tolist()))


class SeededBatches(Dataset):
    """Index ``(epoch, batch)`` → a collated batch, augmented under RNGs seeded from the step.

    The per-epoch order comes from a ``DistributedSampler`` (one replica unless DDP),
    so ranks read disjoint shards and every epoch's order depends only on ``seed``.
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world: int = 1,
        shuffle: bool = True,
        drop_last: bool = True,
    ):
        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed
        self.sampler = DistributedSampler(
            dataset, num_replicas=world, rank=rank, shuffle=shuffle, seed=seed, drop_last=drop_last
        )
        self.drop_last = drop_last
        self.epoch_batches: list[list[int]] = []

    def set_epoch(self, epoch: int) -> int:
        """Fix the order of ``epoch``; returns its number of batches."""
        self.epoch = epoch
        self.sampler.set_epoch(epoch)
        order = list(self.sampler)
        batches = [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        if self.drop_last and batches and len(batches[-1]) < self.batch_size and len(batches) > 1:
            batches.pop()
        self.epoch_batches = batches
        return len(batches)

    def __len__(self) -> int:
        return len(self.epoch_batches)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        step_seed = (self.seed * 1_000_003 + self.epoch * 10_007 + index) % (2**31)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(step_seed)
            py_state = random.getstate()
            random.seed(step_seed)
            try:
                samples = [self.dataset[i] for i in self.epoch_batches[index]]
            finally:
                random.setstate(py_state)
        xs, ys = zip(*samples)
        return torch.stack(xs), torch.as_tensor(ys, dtype=torch.long)
