"""Training configuration: the paper's Appendix B presets, config files and flags.

Precedence: preset < config file < command-line flags. The effective config is
saved as ``config.json`` in the run folder.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from .errors import CLIError

# Appendix B, Table 7 (batch sizes are the paper's; override with --batch-size on small machines).
PRESETS: dict[str, dict[str, Any]] = {
    "cifar100": dict(
        epochs=100, batch_size=2048, opt="lamb", weight_decay=1e-2, lr=3.5e-3, warmup_epochs=5,
        warmup_lr=1e-5, min_lr=1e-6, img_size=32, label_smoothing=0.1, auto_augment="cifar10",
        rand_augment=None, mixup=0.0, cutmix=0.0, bce=None, color_jitter=0.0, drop_path=0.15,
        interpolation="bicubic", crop_pct=1.0, dataset="cifar100", stem="cifar",
    ),
    "imagenet": dict(
        epochs=100, batch_size=1024, opt="lamb", weight_decay=1e-2, lr=3.5e-3, warmup_epochs=3,
        warmup_lr=1e-4, min_lr=1e-6, img_size=224, label_smoothing=0.0, auto_augment=None,
        rand_augment="rand-m7-mstd0.5", mixup=0.1, cutmix=1.0, bce=0.2, color_jitter=0.4, drop_path=0.05,
        interpolation="random", crop_pct=0.95, dataset="imagefolder", stem="imagenet",
    ),
    "vlm": dict(
        epochs=30, batch_size=256, opt="adamw", weight_decay=1e-2, lr=3.5e-3, warmup_epochs=5,
        warmup_lr=1e-5, min_lr=1e-5, img_size=224, label_smoothing=0.0, auto_augment=None,
        rand_augment=None, mixup=0.0, cutmix=0.0, bce=None, color_jitter=0.0, drop_path=0.0,
        interpolation="bicubic", crop_pct=1.0, dataset="features", model="mlp_adapter",
    ),
}  # fmt: skip


@dataclass
class TrainConfig:
    model: str = "resnet18"
    recipe: str | None = None
    connectivity: str = "ns"
    stochastic: float = 0.0
    neural_drop: float = 0.0
    act: str = "relu"
    guided: bool = True
    width_mult: float = 1.0
    stem: str = "cifar"
    preset: str = "cifar100"
    dataset: str = "cifar100"
    data: str | None = None
    train_samples: int = 0  # 0: all; else a fixed subset (the same for every seed)
    val_samples: int = 0
    download: bool = False
    epochs: int = 100
    batch_size: int = 128
    lr: float = 3.5e-3
    opt: str = "lamb"
    weight_decay: float = 1e-2
    warmup_epochs: int = 5
    warmup_lr: float = 1e-5
    min_lr: float = 1e-6
    img_size: int = 32
    label_smoothing: float = 0.0
    auto_augment: str | None = None
    rand_augment: str | None = None
    mixup: float = 0.0
    cutmix: float = 0.0
    bce: float | None = None
    color_jitter: float = 0.0
    drop_path: float = 0.0
    interpolation: str = "bicubic"
    crop_pct: float = 1.0
    ema: float = 0.0
    seed: int = 0
    amp: bool = False
    channels_last: bool = False
    compile: bool = False
    sync_bn: bool = False
    workers: int = 0
    ckpt_steps: int = 100
    out: str = "runs/train"
    resume: bool = False

    def check(self) -> TrainConfig:
        positive = {"epochs": self.epochs, "batch_size": self.batch_size, "ckpt_steps": self.ckpt_steps}
        for name, value in positive.items():
            if not isinstance(value, int) or value < 1:
                raise CLIError(f"--{name.replace('_', '-')}={value} is out of range; use an integer >= 1")
        if not self.lr > 0 or self.width_mult <= 0:
            raise CLIError(f"--lr={self.lr} and --width-mult={self.width_mult} must be > 0")
        for name in ("stochastic", "neural_drop", "drop_path", "mixup", "label_smoothing", "ema"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise CLIError(f"--{name.replace('_', '-')}={value} is out of range; use a value in [0, 1]")
        for name in ("workers", "train_samples", "val_samples"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise CLIError(f"--{name.replace('_', '-')}={value} is out of range; use an integer >= 0")
        return self


FIELDS = {f.name for f in fields(TrainConfig)}


def load_toml(file: Path) -> dict[str, Any]:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    try:
        return tomllib.loads(file.read_text())
    except tomllib.TOMLDecodeError as err:
        raise CLIError(f"{file} is not valid TOML ({err})") from None


def read_config_file(path: str) -> dict[str, Any]:
    file = Path(path)
    if not file.is_file():
        raise CLIError(f"config file {path} does not exist")
    try:
        if file.suffix == ".toml":
            values = load_toml(file)
        else:
            values = json.loads(file.read_text())
    except Exception as err:
        raise CLIError(f"config file {path} cannot be parsed ({err}); use JSON or TOML") from None
    unknown = sorted(set(values) - FIELDS)
    if unknown:
        raise CLIError(f"config file {path}: unknown keys {unknown}; valid keys: {', '.join(sorted(FIELDS))}")
    return {key.replace("-", "_"): value for key, value in values.items()}


def build_config(preset: str | None, file_values: dict[str, Any], flag_values: dict[str, Any]) -> TrainConfig:
    """preset < config file < flags (flags given as ``None`` are not set)."""
    name = flag_values.get("preset") or file_values.get("preset") or "cifar100"
    if name not in PRESETS:
        raise CLIError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    values: dict[str, Any] = {"preset": name, **PRESETS[name], **file_values}
    values.update({k: v for k, v in flag_values.items() if v is not None})
    return TrainConfig(**{k: v for k, v in values.items() if k in FIELDS}).check()


def config_dict(config: TrainConfig) -> dict[str, Any]:
    return asdict(config)
