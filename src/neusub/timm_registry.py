"""neusub's models in timm's registry as ``neusub_<name>``, without importing timm early.

``import neusub`` imports neither torch nor timm (the CLI starts in well under a second), yet
``timm.create_model("neusub_resnet18")`` must work after it. So every model is registered when
:mod:`neusub.models` adds it (the models need timm anyway), and :func:`watch` makes sure that
module is loaded as soon as timm is: right away if timm is already imported, else right after
timm's own import finishes (an import hook that removes itself).
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from collections.abc import Callable
from typing import Any

_OWN_ARGS = ("pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")


def _entrypoint(name: str, build: Callable[..., Any]):
    def entry(pretrained: bool = False, **kwargs):
        if pretrained:
            raise ValueError(f"neusub_{name} has no pretrained weights; use pretrained=False")
        for key in _OWN_ARGS:
            kwargs.pop(key, None)
        return build(**kwargs)

    entry.__name__ = entry.__qualname__ = f"neusub_{name}"
    entry.__module__ = __name__
    return entry


def register_with_timm(name: str, build: Callable[..., Any]) -> None:
    """Make ``timm.create_model(f"neusub_{name}", **kwargs)`` return ``build(**kwargs)``."""
    try:
        from timm.models import register_model
    except ImportError:  # timm is optional for the layers
        return
    fn = _entrypoint(name, build)
    setattr(sys.modules[__name__], fn.__name__, fn)
    register_model(fn)


def _load(module: str) -> None:
    if module not in sys.modules:  # else it is loading now and registers as it goes
        importlib.import_module(module)


class _AfterTimm(importlib.abc.MetaPathFinder):
    """Finds timm the usual way and imports ``models`` once timm's module has executed."""

    def __init__(self, models: str) -> None:
        self.models = models

    def find_spec(self, fullname, path, target=None):
        if fullname != "timm":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec("timm")
        if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
            run = spec.loader.exec_module

            def exec_module(module, run=run, models=self.models):
                run(module)
                _load(models)

            spec.loader.exec_module = exec_module
        return spec


def watch(models: str) -> None:
    """Import the module ``models`` (which registers the models) now if timm is loaded, else as
    soon as it is. The package names it: this module sits below the models."""
    if "timm" in sys.modules:
        _load(models)
    elif not any(isinstance(finder, _AfterTimm) for finder in sys.meta_path):
        sys.meta_path.insert(0, _AfterTimm(models))
