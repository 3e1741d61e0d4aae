"""neusub's models in timm's registry as ``neusub_<name>``, without importing timm early.

Each name comes with its pretrained_cfg in timm's registry (``timm.models.get_pretrained_cfg``):
ImageNet-style input and normalisation, the first conv and the classifier, and no weights.

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

_OWN_ARGS = ("pretrained", "pretrained_cfg", "cache_dir")
# What a built model's own pretrained_cfg says about itself and overrides in the registered one:
# its input (a CIFAR stem, an adapter's feature width) and where its first conv and classifier are.
_MODEL_KEYS = ("input_size", "pool_size", "fixed_input_size", "first_conv", "classifier")
# timm's register_model reads the pretrained cfgs of a module's entry points from its default_cfgs
default_cfgs: dict[str, dict] = {}


def _entrypoint(name: str, build: Callable[..., Any]):
    def entry(pretrained: bool = False, pretrained_cfg_overlay: dict | None = None, **kwargs):
        if pretrained:
            raise ValueError(f"neusub_{name} has no pretrained weights; use pretrained=False")
        for key in _OWN_ARGS:
            kwargs.pop(key, None)
        model = build(**kwargs)
        if pretrained_cfg_overlay:
            model.pretrained_cfg = model.default_cfg = {**model.pretrained_cfg, **pretrained_cfg_overlay}
        return model

    entry.__name__ = entry.__qualname__ = f"neusub_{name}"
    entry.__module__ = __name__
    return entry


def default_cfg(**overrides) -> dict:
    """A neusub model's pretrained_cfg: no weights, a 224² ImageNet classifier unless ``overrides``."""
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    cfg = {
        "url": "",
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": (7, 7),
        "crop_pct": 0.875,
        "interpolation": "bilinear",
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "conv1",
        "classifier": "fc",
    }
    return {**cfg, **overrides}


def register_with_timm(name: str, build: Callable[..., Any], overrides: dict) -> None:
    """Make ``timm.create_model(f"neusub_{name}", **kwargs)`` return ``build(**kwargs)``, with the
    pretrained_cfg :func:`default_cfg` ``(**overrides)`` in timm's registry."""
    try:
        from timm.models import register_model
    except ImportError:  # timm is optional for the layers
        return
    fn = _entrypoint(name, build)
    setattr(sys.modules[__name__], fn.__name__, fn)
    default_cfgs[fn.__name__] = default_cfg(**overrides)
    register_model(fn)


def instance_cfg(name: str, model, features: bool) -> dict:
    """The ``pretrained_cfg`` of a built model ``name`` (timm's full dict): the registered one,
    with the keys of ``_MODEL_KEYS`` the model's own cfg gives, its first conv and classifier
    named as their weights are in the model's state dict (a re-parameterized layer keeps them in
    its branches), and for a ``features_only`` model no classifier (as timm's)."""
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(f"neusub_{name}").to_dict()
    own = getattr(getattr(model, "model", model), "pretrained_cfg", None) or {}
    cfg.update({key: own[key] for key in _MODEL_KEYS if key in own})
    if features:
        for key in ("num_classes", "classifier", "global_pool"):
            cfg.pop(key, None)
        return cfg
    for key in ("first_conv", "classifier"):
        if cfg.get(key):
            cfg[key] = _weight_paths(model, cfg[key])
    return cfg


def _weight_paths(model, paths: str | tuple[str, ...]) -> str | tuple[str, ...]:
    """``paths`` of modules with a ``weight``, a re-parameterized layer's replaced by its branches'."""
    from .layers import _RepLayer

    found: list[str] = []
    for path in (paths,) if isinstance(paths, str) else paths:
        try:
            module = model.get_submodule(path)
        except AttributeError:  # not in this model: the cfg's word stands
            module = None
        if isinstance(module, _RepLayer):
            found += [f"{path}.branches.{n}" for n, b in module.branches.items() if hasattr(b, "weight")]
        else:
            found.append(path)
    return found[0] if len(found) == 1 else tuple(found)


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
