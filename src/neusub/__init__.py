"""neusub: branch-level structural re-parameterization with Neural Substitution.

Names are loaded on first use (``neusub.convert`` imports torch then), so ``import neusub``
and the command line start fast; timm learns neusub's models as soon as timm is imported.
"""

from __future__ import annotations

import importlib
import sys
import types

from . import timm_registry

__version__ = "0.1.0"

# public name -> the module that defines it
_NAMES = {
    "convert": "convert",
    "check_equivalence": "deploy",
    "deploy": "deploy",
    "CONNECTIVITIES": "layers",
    "RepConv2d": "layers",
    "RepLinear": "layers",
    "set_recompute": "layers",
    "create_model": "models",
    "list_models": "models",
    "register_model": "models",
    "list_activations": "activations",
    "register_activation": "activations",
    "register_branch_kind": "branches",
    "Recipe": "recipes",
    "list_recipes": "recipes",
    "register_recipe": "recipes",
    "load": "saved",
    "training_cost": "cost",
    "TrainingCost": "cost",
    **{
        name: "streams"
        for name in (
            "Add",
            "Gate",
            "GuidedActivation",
            "GuidedMaxPool2d",
            "PerStream",
            "SqueezeExcite",
            "StreamAdd",
            "StreamBatchNorm2d",
            "StreamDropout",
            "StreamDropPath",
            "StreamGate",
            "StreamMerge",
            "StreamModule",
            "StreamSequential",
        )
    },
}
_SUBMODULES = ("export",)

__all__ = sorted([*_NAMES, *_SUBMODULES, "__version__"])


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    if name not in _NAMES:
        raise AttributeError(f"module 'neusub' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_NAMES[name]}", __name__), name)
    setattr(sys.modules[__name__], name, value)
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


class _Package(types.ModuleType):
    """Keeps ``neusub.deploy`` / ``neusub.convert`` the functions: importing the submodule of the
    same name would otherwise replace the package attribute with the module."""

    def __setattr__(self, name: str, value) -> None:
        if isinstance(value, types.ModuleType) and _NAMES.get(name) == name:
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
timm_registry.watch(f"{__name__}.models")
