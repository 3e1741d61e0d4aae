"""The names the command line accepts, known without importing torch, and "did you mean".

The registries of models, activations and connectivities live in modules that import torch
(several seconds). A name registered at run time (``neusub.register_model``) is in a registry
that is therefore already imported; while it is not, only the built-in names below exist. So
a check consults the registry when its module is loaded and this list otherwise, and a bad
name is refused before torch loads. ``tests/test_newcomer_second_hour.py`` keeps the lists
equal to the registries.
"""

from __future__ import annotations

import difflib
import sys
from collections.abc import Sequence

from ..recipes import list_recipes

MODELS = (
    "linear_adapter",
    "mlp_adapter",
    "mobilenet_v1",
    "mobileone_s0",
    "mobileone_s1",
    "mobileone_s2",
    "mobileone_s3",
    "mobileone_s4",
    "resnet101",
    "resnet18",
    "resnet34",
    "resnet50",
    "resnext50_32x4d",
)
ACTIVATIONS = ("relu", "leaky_relu", "silu", "gelu", "gelu_tanh", "hardswish", "mish", "relu6")
CONNECTIVITIES = ("block", "ns", "naive")
DATASETS = ("cifar10", "cifar100", "imagefolder", "fashion-mnist", "digits", "features")
EXPORT_FORMATS = ("onnx", "torchvision", "torchscript")
ANALYSES = ("similarity", "kernels", "block-drop", "topology", "statistics")


def _registered(module: str, function: str, builtin: Sequence[str]) -> list[str]:
    """``module.function()`` when ``module`` is imported (it may hold names added at run
    time), else the built-in names."""
    loaded = sys.modules.get(f"neusub.{module}")
    return list(getattr(loaded, function)()) if loaded is not None else list(builtin)


def models() -> list[str]:
    return _registered("models", "list_models", MODELS)


def activations() -> list[str]:
    return _registered("activations", "list_activations", ACTIVATIONS)


def connectivities() -> list[str]:
    return list(CONNECTIVITIES)


def recipes() -> list[str]:
    return list_recipes()  # recipes.py imports no torch: its registry is always the authority


def did_you_mean(word: str, choices: Sequence[str]) -> str:
    """`` did you mean 'x'?`` for the closest of ``choices`` (case ignored), else ``""``."""
    lowered = {choice.lower(): choice for choice in choices}
    close = difflib.get_close_matches(str(word).lower(), list(lowered), n=1, cutoff=0.6)
    return f" did you mean {lowered[close[0]]!r}?" if close else ""


def unknown_name(what: str, value: object, choices: Sequence[str]) -> str:
    """``unknown <what> 'x'; did you mean 'y'? choose one of ...``: the one-line refusal."""
    hint = did_you_mean(str(value), choices)
    return f"unknown {what} {value!r};{hint} choose one of {', '.join(choices)}"
