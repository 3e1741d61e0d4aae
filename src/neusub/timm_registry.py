"""Register every neusub model with timm as ``neusub_<name>``."""

from __future__ import annotations

import sys

from .models import create_model, list_models

_OWN_ARGS = ("pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")


def _entrypoint(name: str):
    def entry(pretrained: bool = False, **kwargs):
        if pretrained:
            raise ValueError(f"neusub_{name} has no pretrained weights; use pretrained=False")
        for key in _OWN_ARGS:
            kwargs.pop(key, None)
        return create_model(name, **kwargs)

    entry.__name__ = entry.__qualname__ = f"neusub_{name}"
    entry.__module__ = __name__
    return entry


def register_all() -> None:
    try:
        from timm.models import register_model
    except ImportError:  # timm is optional at import time
        return
    module = sys.modules[__name__]
    for name in list_models():
        fn = _entrypoint(name)
        setattr(module, fn.__name__, fn)
        register_model(fn)
