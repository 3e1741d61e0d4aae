"""Model registry: ``create_model(name, recipe=..., connectivity=...)`` and ``list_models()``.

Each entry is ``name -> (builder, default recipe)``; a builder takes a
:class:`LayerFactory` and the remaining keyword arguments. Every model, including one a user
adds with :func:`register_model`, is registered with timm as ``neusub_<name>``.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from ..layers import set_recompute
from ..timm_registry import register_with_timm
from .factory import LayerFactory
from .mlp_adapter import build_linear_adapter, build_mlp_adapter
from .mobilenet import build_mobilenet_v1
from .mobileone import MOBILEONES, build_mobileone
from .resnet import RESNETS, build_resnet

Builder = Callable[..., nn.Module]

_MODELS: dict[str, tuple[Builder, str]] = {}


def register_model(name: str, builder: Builder, default_recipe: str = "nsnet") -> None:
    """Add a model: ``builder(factory, **kwargs) -> nn.Module``; timm builds it as ``neusub_<name>``."""
    _MODELS[name] = (builder, default_recipe)
    register_with_timm(name, lambda **kwargs: create_model(name, **kwargs))


for _name in RESNETS:
    register_model(_name, lambda f, _name=_name, **kw: build_resnet(_name, f, **kw), "nsnet")

register_model("mobilenet_v1", build_mobilenet_v1, "nsnet")
for _name in MOBILEONES:
    register_model(_name, lambda f, _name=_name, **kw: build_mobileone(_name, f, **kw), "mobileone")
register_model("mlp_adapter", build_mlp_adapter, "nsnet")
register_model("linear_adapter", build_linear_adapter, "plain")


def default_stochastic(connectivity: str) -> float:
    """The paper's choice: NS always with stochastic substitution (1.0); nothing to draw otherwise."""
    return 1.0 if connectivity == "ns" else 0.0


def default_recipe(name: str) -> str:
    """The recipe ``create_model(name)`` uses when none is given."""
    return _MODELS[name][1]


def list_models() -> list[str]:
    return sorted(_MODELS)


def create_model(
    name: str,
    recipe: str | None = None,
    connectivity: str = "ns",
    stochastic: float | None = None,
    neural_drop: float = 0.0,
    num_classes: int = 1000,
    stem: str = "imagenet",
    act: str = "relu",
    drop_path_rate: float = 0.0,
    width_mult: float = 1.0,
    recompute: bool = False,
    guided: bool = True,
    **kwargs,
) -> nn.Module:
    """Build model ``name`` with every re-parameterizable layer of ``recipe`` × ``connectivity``.

    ``recompute=True`` trades one more conv per layer in backward for memory (see
    :func:`neusub.layers.set_recompute`). ``guided=False`` activates every stream on its
    own (the paper's ablation; the deployed network is then *not* equivalent). ``stochastic``
    defaults to 1.0 under ``connectivity="ns"`` (the paper's code always re-draws the partition:
    its NS results are NS with stochastic substitution), else 0."""
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(list_models())}")
    builder, fallback = _MODELS[name]
    stochastic = default_stochastic(connectivity) if stochastic is None else stochastic
    factory = LayerFactory(recipe or fallback, connectivity, stochastic, neural_drop, act, guided)
    try:
        model = builder(
            factory,
            num_classes=num_classes,
            stem=stem,
            drop_path_rate=drop_path_rate,
            width_mult=width_mult,
            **kwargs,
        )
    except TypeError as err:
        if "unexpected keyword" not in str(err):
            raise
        raise ValueError(f"model {name!r}: {err}") from None
    set_recompute(model, recompute)
    return model


__all__ = ["LayerFactory", "create_model", "list_models", "register_model"]
