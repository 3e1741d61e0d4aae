"""Training configuration: every option declared once, with its type, range and help.

Precedence: preset < config file < command-line flags. The preset is ``--preset`` or, when
none is named, the dataset's own (:data:`DATASET_PRESETS`: the paper's Appendix B recipe for
its datasets, none for the small ones, whose defaults here fit a short CPU run). Every source
is checked against the declarations here (type, then range), so a bad value is a one-line error naming the
option and what is allowed, wherever it comes from. The effective config is saved as
``config.json`` in the run folder.
"""

from __future__ import annotations

import json
import math
import types
import typing
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from ..files import read_regular_file
from . import names
from .errors import CLIError
from .names import did_you_mean, unknown_name

# Appendix B, Table 7 (batch sizes are the paper's; override with --batch-size on small machines).
PRESETS: dict[str, dict[str, Any]] = {
    "cifar100": dict(
        epochs=100,
        batch_size=2048,
        opt="lamb",
        weight_decay=1e-2,
        lr=3.5e-3,
        warmup_epochs=5,
        warmup_lr=1e-5,
        min_lr=1e-6,
        img_size=32,
        label_smoothing=0.1,
        auto_augment="cifar10",
        rand_augment=None,
        mixup=0.0,
        cutmix=0.0,
        bce=None,
        color_jitter=0.0,
        drop_path=0.15,
        interpolation="bicubic",
        crop_pct=1.0,
        dataset="cifar100",
        stem="cifar",
    ),
    "imagenet": dict(
        epochs=100,
        batch_size=1024,
        opt="lamb",
        weight_decay=1e-2,
        lr=3.5e-3,
        warmup_epochs=3,
        warmup_lr=1e-4,
        min_lr=1e-6,
        img_size=224,
        label_smoothing=0.0,
        auto_augment=None,
        rand_augment="rand-m7-mstd0.5",
        mixup=0.1,
        cutmix=1.0,
        bce=0.2,
        color_jitter=0.4,
        drop_path=0.05,
        interpolation="random",
        crop_pct=0.95,
        dataset="imagefolder",
        stem="imagenet",
    ),
    "vlm": dict(
        epochs=30,
        batch_size=256,
        opt="adamw",
        weight_decay=1e-2,
        lr=3.5e-3,
        warmup_epochs=5,
        warmup_lr=1e-5,
        min_lr=1e-5,
        img_size=224,
        label_smoothing=0.0,
        auto_augment=None,
        rand_augment=None,
        mixup=0.0,
        cutmix=0.0,
        bce=None,
        color_jitter=0.0,
        drop_path=0.0,
        interpolation="bicubic",
        crop_pct=1.0,
        dataset="features",
        model="mlp_adapter",
    ),
}
# The preset a run gets when none is named: the paper's recipe for the paper's datasets only.
DATASET_PRESETS: dict[str, str] = {"cifar100": "cifar100", "imagefolder": "imagenet", "features": "vlm"}
MIN_STEPS = 50  # fewer optimizer steps than this train next to nothing: warn

# ---------------------------------------------------------------------- range checks
# A check gets the option's label (``--lr`` or ``'lr'``) and value; it returns None when the
# value is allowed, else the error message.
Check = Callable[[str, Any], "str | None"]


def between(low: float, high: float, *, open_low: bool = False, open_high: bool = False) -> Check:
    def check(label: str, value: Any) -> str | None:
        above = value > low if open_low else value >= low
        below = value < high if open_high else value <= high
        if above and below:
            return None
        interval = f"{'(' if open_low else '['}{low:g}, {high:g}{')' if open_high else ']'}"
        return f"{label}={value!r} is out of range; use a value in {interval}"

    return check


def at_least(low: float) -> Check:
    return lambda label, value: None if value >= low else f"{label}={value!r} is out of range; use >= {low:g}"


def above(low: float) -> Check:
    return lambda label, value: None if value > low else f"{label}={value!r} is out of range; use > {low:g}"


def one_of(choices: Sequence[str] | Callable[[], Sequence[str]]) -> Check:
    def check(label: str, value: Any) -> str | None:
        allowed = choices() if callable(choices) else choices
        if value in allowed:
            return None
        return unknown_name(label.strip("-'").replace("-", " ").replace("_", " "), value, allowed)

    return check


def _optimizers() -> list[str]:
    from timm.optim import list_optimizers

    return list_optimizers()


def _augment_spec(label: str, value: str) -> str | None:
    """A spec timm's ``create_transform`` takes (it dispatches on the prefix the same way)."""
    from timm.data import auto_augment

    if value.startswith("rand"):
        make = auto_augment.rand_augment_transform
    elif value.startswith("augmix"):
        make = auto_augment.augment_and_mix_transform
    else:
        make = auto_augment.auto_augment_transform
    try:
        make(value, {"translate_const": 100, "img_mean": (124, 116, 104)})
    except Exception as err:  # timm asserts (AssertionError) or fails to parse a number (ValueError)
        reason = f" ({err})" if str(err) else ""
        return (
            f"{label}={value!r} is not an augmentation timm knows{reason}; use a RandAugment spec such as "
            "rand-m9-mstd0.5 (or augmix-m5, or an AutoAugment policy: v0, original)"
        )
    return None


def _non_empty(label: str, value: str) -> str | None:
    return None if value.strip() else f"{label} is empty; give a folder path"


def option(default: Any, help: str, check: Check | None = None, *, needs_torch: bool = False) -> Any:
    """A config field: its default, its ``--help`` text and the range check of its values
    (``needs_torch``: the check imports torch, so the command line runs it only once torch is
    loaded; every other one runs before)."""
    return field(default=default, metadata={"help": help, "check": check, "needs_torch": needs_torch})


SEED_MAX = 2**32 - 1  # numpy's seed range; torch and Python accept it too


@dataclass
class TrainConfig:
    model: str = option("resnet18", "model name (neusub.list_models())", one_of(names.models))
    recipe: str | None = option(
        None, "recipe (neusub.list_recipes()); default: the model's", one_of(names.recipes)
    )
    connectivity: str = option("ns", "block | ns | naive", one_of(names.connectivities))
    stochastic: float | None = option(
        None,
        "probability of re-drawing the NS partition per step (default: 1.0 under ns, as the paper)",
        between(0, 1),
    )
    neural_drop: float = option(
        0.0, "probability of dropping a (stream, branch) pair", between(0, 1, open_high=True)
    )
    act: str = option("relu", "activation (guided under ns)", one_of(names.activations))
    guided: bool = option(True, "guided activation: on | off (off: the paper's ablation, deploy not exact)")
    width_mult: float = option(1.0, "channel width multiplier", between(0, 8, open_low=True))
    stem: str = option("cifar", "cifar | imagenet", one_of(("cifar", "imagenet")))
    preset: str | None = option(
        None,
        "the paper's Appendix B hyper-parameters: cifar100 | imagenet | vlm (default: the dataset's)",
        one_of(tuple(PRESETS)),
    )
    dataset: str = option("cifar100", "dataset name", one_of(names.DATASETS))
    data: str | None = option(None, "dataset path")
    train_samples: int = option(0, "train on a fixed subset of this many samples (0: all)", at_least(0))
    val_samples: int = option(0, "validate on a fixed subset of this many samples (0: all)", at_least(0))
    download: bool = option(False, "download CIFAR")
    epochs: int = option(10, "training epochs", between(1, 100_000))
    batch_size: int = option(128, "batch size per process (BatchNorm needs >= 2)", between(2, 1_000_000))
    lr: float = option(3e-3, "peak learning rate", above(0))
    opt: str = option(
        "adamw", "timm optimizer name (adamw, lamb, sgd, ...)", one_of(_optimizers), needs_torch=True
    )
    weight_decay: float = option(5e-2, "weight decay", at_least(0))
    warmup_epochs: int = option(0, "linear warm-up epochs", at_least(0))
    warmup_lr: float = option(1e-5, "learning rate at the start of the warm-up", at_least(0))
    min_lr: float = option(1e-5, "learning rate at the end of the cosine schedule", at_least(0))
    img_size: int = option(32, "image size (imagefolder)", between(1, 4096))
    label_smoothing: float = option(0.0, "label smoothing", between(0, 1, open_high=True))
    auto_augment: str | None = option(None, "AutoAugment policy for CIFAR", one_of(("cifar10",)))
    rand_augment: str | None = option(
        None, "timm RandAugment spec for imagefolder (e.g. rand-m7-mstd0.5)", _augment_spec, needs_torch=True
    )
    mixup: float = option(0.0, "mixup alpha", at_least(0))
    cutmix: float = option(0.0, "cutmix alpha", at_least(0))
    bce: float | None = option(None, "binary cross-entropy target threshold", between(0, 1))
    color_jitter: float = option(0.0, "colour jitter (imagefolder)", at_least(0))
    drop_path: float = option(0.0, "stochastic depth rate", between(0, 1, open_high=True))
    recompute: bool = option(False, "recompute each stacked conv in backward (less memory, ~1 more conv)")
    interpolation: str = option(
        "bicubic", "train resize interpolation (imagefolder)", one_of(("bilinear", "bicubic", "random"))
    )
    crop_pct: float = option(1.0, "centre crop fraction (imagefolder)", between(0, 1, open_low=True))
    ema: float = option(0.0, "EMA decay (0 = off)", between(0, 1, open_high=True))
    seed: int = option(0, "random seed", between(0, SEED_MAX))
    amp: bool = option(False, "mixed precision")
    channels_last: bool = option(False, "channels_last memory format")
    compile: bool = option(False, "torch.compile the model")
    sync_bn: bool = option(False, "SyncBatchNorm under DDP")
    workers: int = option(0, "data loader workers", between(0, 256))
    ckpt_steps: int = option(100, "checkpoint every N steps (and every epoch)", at_least(1))
    out: str = option("runs/train", "run folder", _non_empty)
    resume: bool = option(False, "continue the run in --out")


FIELDS = {f.name for f in fields(TrainConfig)}
# Settings a resume may change: where the data is and how the run is checkpointed, which change
# nothing that is computed (a resumed run ends bit-identical to an uninterrupted one), and the
# peak learning rate, so that a run that diverged continues from its last (finite) checkpoint.
RESUME_CHANGES = ("data", "workers", "ckpt_steps", "download", "lr")


def _types() -> dict[str, tuple[type, bool]]:
    """``{field: (base type, None allowed)}`` from the annotations."""
    out = {}
    for name, hint in typing.get_type_hints(TrainConfig).items():
        args = typing.get_args(hint)
        if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
            base = next(a for a in args if a is not type(None))
            out[name] = (base, type(None) in args)
        else:
            out[name] = (hint, False)
    return out


FIELD_TYPES = _types()
_KIND = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def _describe(value: Any) -> str:
    kind = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", type(None): "null"}
    return kind.get(type(value), f"a {type(value).__name__}")


_ON_OFF = {"on": True, "true": True, "1": True, "off": False, "false": False, "0": False}
_WRITTEN_AS = {bool: "on or off", int: "an integer (like 10)", float: "a number (like 0.003 or 3e-3)"}


def parse_flag(name: str, text: str) -> Any:
    """The value of ``--<name> TEXT`` in its option's type; a ``CLIError`` naming the flag when
    TEXT is not one (argparse would print its usage and ``invalid float value``)."""
    base, _ = FIELD_TYPES[name]
    try:
        return _ON_OFF[text.lower()] if base is bool else base(text)
    except (KeyError, ValueError):
        raise CLIError(f"--{name.replace('_', '-')} {text!r} is not {_WRITTEN_AS[base]}") from None


def refuse_unknown_settings(names: Iterable[str], where: str) -> None:
    """``CLIError`` naming the settings that are no option, with the closest one's name."""
    unknown = sorted(set(names) - FIELDS)
    if not unknown:
        return
    hint = next(filter(None, (did_you_mean(key, sorted(FIELDS)) for key in unknown)), "")
    fix = hint or f" valid: {', '.join(sorted(FIELDS))}"
    raise CLIError(f"{where}{': ' if where else ''}unknown settings {unknown};{fix}")


def check_value(name: str, value: Any, style: str = "flag", *, before_torch: bool = False) -> Any:
    """``value`` for option ``name`` (ints accepted for floats), or a ``CLIError`` naming it.
    ``before_torch``: leave out the checks that import torch (the command line runs them later)."""
    label = f"--{name.replace('_', '-')}" if style == "flag" else repr(name)
    refuse_unknown_settings([name], "")
    base, nullable = FIELD_TYPES[name]
    if value is None and nullable:
        return None
    valid_type = (
        isinstance(value, base) and not (base is int and isinstance(value, bool))
        if base is not float
        else isinstance(value, (int, float)) and not isinstance(value, bool)
    )
    if not valid_type:
        null = " or null" if nullable else ""
        raise CLIError(f"{label}={value!r} is {_describe(value)}; it must be {_KIND[base]}{null}")
    if base is float:
        value = float(value)
        if not math.isfinite(value):
            raise CLIError(f"{label}={value!r} is not a finite number")
    metadata = next(f for f in fields(TrainConfig) if f.name == name).metadata
    check = None if before_torch and metadata["needs_torch"] else metadata["check"]
    problem = check(label, value) if check else None
    if problem:
        raise CLIError(problem)
    return value


def check_values(
    values: dict[str, Any], where: str, style: str = "key", *, before_torch: bool = False
) -> dict[str, Any]:
    """Every key known and every value valid; ``where`` names the source in errors
    (``before_torch``: see :func:`check_value`)."""
    if not isinstance(values, dict):
        raise CLIError(
            f"{where} must hold a table of settings (a JSON object or TOML table), not {_describe(values)}"
        )
    values = {str(key).replace("-", "_"): value for key, value in values.items()}
    refuse_unknown_settings(values, where)
    checked = {}
    for key, value in values.items():
        try:
            checked[key] = check_value(key, value, style, before_torch=before_torch)
        except CLIError as err:
            raise CLIError(f"{where}: {err}") from None
    return checked


def config_from_dict(values: dict[str, Any], where: str) -> TrainConfig:
    """A ``TrainConfig`` from saved values (config.json, a checkpoint), every value checked."""
    return TrainConfig(**check_values(values, where))


CONFIG_FILE_LIMIT = 2**24  # bytes: settings fit in far less; a larger "config" is not one


def read_settings_text(file: Path) -> str:
    """The text of a settings file (config, grid), read only if it is a regular file of at
    most :data:`CONFIG_FILE_LIMIT` bytes (a FIFO or ``/dev/zero`` would hang or fill memory)."""
    try:
        return read_regular_file(file, CONFIG_FILE_LIMIT, "settings").decode()
    except (OSError, UnicodeDecodeError) as err:
        raise CLIError(f"{file} cannot be read ({err})") from None
    except ValueError as err:  # not a regular file, or too large: the message names it
        raise CLIError(str(err)) from None


def load_toml(file: Path) -> dict[str, Any]:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    try:
        return tomllib.loads(read_settings_text(file))
    except tomllib.TOMLDecodeError as err:
        raise CLIError(f"{file} is not valid TOML ({err})") from None


def read_config_file(path: str, *, before_torch: bool = False) -> dict[str, Any]:
    """The settings of a JSON or TOML file, checked (``before_torch``: see :func:`check_value`)."""
    file = Path(path)
    if not file.exists():
        raise CLIError(f"config file {path} does not exist")
    if file.suffix == ".toml":
        values = load_toml(file)
    else:
        try:
            values = json.loads(read_settings_text(file))
        except ValueError as err:
            raise CLIError(f"config file {path} cannot be parsed ({err}); use JSON or TOML") from None
    return check_values(values, f"config file {path}", before_torch=before_torch)


def build_config(file_values: dict[str, Any], flag_values: dict[str, Any]) -> TrainConfig:
    """preset < config file < flags (flags given as ``None`` are not set); every value checked.
    The preset is the one named, else the dataset's (:data:`DATASET_PRESETS`), else none."""
    flag_values = {k: v for k, v in flag_values.items() if v is not None}
    named = flag_values.get("preset") or file_values.get("preset")
    if named is not None:
        check_value("preset", named)
    given = {**file_values, **flag_values}
    dataset = given.get("dataset") or (PRESETS[named]["dataset"] if named else TrainConfig.dataset)
    name = named or DATASET_PRESETS.get(dataset)
    values: dict[str, Any] = {**(PRESETS[name] if name else {}), **given, "preset": name}
    cfg = TrainConfig(**{key: check_value(key, value) for key, value in values.items()})
    if cfg.stochastic is None:  # recorded as what runs
        from ..models import default_stochastic

        cfg.stochastic = default_stochastic(cfg.connectivity)
    return cfg


def short_run_warnings(cfg: TrainConfig, steps_per_epoch: int) -> list[str]:
    """What makes a run train next to nothing: a warm-up as long as the run, too few steps."""
    problems = []
    if cfg.warmup_epochs >= cfg.epochs and cfg.warmup_epochs > 0:
        problems.append(
            f"the warm-up ({cfg.warmup_epochs} epochs) is as long as the run ({cfg.epochs}): the learning "
            f"rate never reaches --lr={cfg.lr:g}; pass --warmup-epochs below --epochs"
        )
    steps = steps_per_epoch * cfg.epochs
    if steps < MIN_STEPS:
        problems.append(
            f"only {steps} optimizer steps ({steps_per_epoch} per epoch × {cfg.epochs} epochs at "
            f"--batch-size={cfg.batch_size}): too few to learn much; lower --batch-size or raise --epochs"
        )
    return problems


def config_dict(config: TrainConfig) -> dict[str, Any]:
    return asdict(config)
