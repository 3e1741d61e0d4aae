"""Model registry: ``create_model(name, recipe=..., connectivity=...)`` and ``list_models()``.

Each entry is ``name -> (builder, default recipe)``; a builder takes a
:class:`LayerFactory` and the remaining keyword arguments. Every model, including one a user
adds with :func:`register_model`, is registered with timm as ``neusub_<name>`` (with its
pretrained_cfg, which says there are no weights) and has timm's model API: its class
provides it (a timm model or a :class:`StagedClassifier` converted by :func:`neusub.convert`),
``create_model`` checks it and gives each model its ``pretrained_cfg`` / ``default_cfg``.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from ..layers import set_recompute
from ..timm_registry import instance_cfg, register_with_timm
from .factory import LayerFactory
from .mlp_adapter import build_linear_adapter, build_mlp_adapter
from .mobilenet import build_mobilenet_v1
from .mobileone import MOBILEONES, build_mobileone
from .resnet import RESNETS, build_resnet
from .staged import FeatureNet, StagedClassifier

Builder = Callable[..., nn.Module]

_MODELS: dict[str, tuple[Builder, str]] = {}

# timm's model API: what every model has
_API = (
    "num_classes",
    "num_features",
    "forward_features",
    "forward_head",
    "get_classifier",
    "reset_classifier",
)


def register_model(
    name: str, builder: Builder, default_recipe: str = "nsnet", pretrained_cfg: dict | None = None
) -> None:
    """Add a model: ``builder(factory, **kwargs) -> nn.Module`` with timm's model API; timm builds
    it as ``neusub_<name>``. ``pretrained_cfg``: what differs from a 224² ImageNet classifier whose
    first conv is ``conv1`` and classifier ``fc`` (timm's keys: ``input_size``, ``mean``, ...)."""
    _MODELS[name] = (builder, default_recipe)
    register_with_timm(name, lambda **kwargs: create_model(name, **kwargs), pretrained_cfg or {})


for _name in RESNETS:
    register_model(_name, lambda f, _name=_name, **kw: build_resnet(_name, f, **kw), "nsnet")

_STEM = {"first_conv": "stem.conv"}
register_model("mobilenet_v1", build_mobilenet_v1, "nsnet", _STEM)
for _name in MOBILEONES:
    register_model(_name, lambda f, _name=_name, **kw: build_mobileone(_name, f, **kw), "mobileone", _STEM)
_TOKENS = {"input_size": (512,), "fixed_input_size": True, "pool_size": None}
register_model("mlp_adapter", build_mlp_adapter, "nsnet", {**_TOKENS, "first_conv": "blocks.0.0"})
register_model("linear_adapter", build_linear_adapter, "plain", {**_TOKENS, "first_conv": "fc"})


def _check_api(name: str, model: nn.Module, features: bool) -> None:
    """``ValueError`` when the model a builder made lacks timm's model API (or, asked for
    ``features_only``, is not a features model with timm's ``FeatureInfo``)."""
    from timm.models import FeatureInfo

    if features:
        missing = [] if isinstance(getattr(model, "feature_info", None), FeatureInfo) else ["FeatureInfo"]
    else:
        missing = [a for a in _API if not hasattr(model, a)]
    if missing:
        raise ValueError(
            f"model {name!r}: {type(model).__name__} lacks timm's model API ({', '.join(missing)}); write "
            "the builder's plain network as a neusub.models.StagedClassifier (or take a timm model) and "
            "convert it with LayerFactory.convert"
        )


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
    features = bool(kwargs.pop("features_only", False))  # timm's features_only and out_indices
    out_indices = kwargs.pop("out_indices", None)
    out_indices = tuple(out_indices) if isinstance(out_indices, list) else out_indices
    factory = LayerFactory(
        recipe or fallback, connectivity, stochastic, neural_drop, act, guided, features, out_indices
    )
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
    _check_api(name, model, features)
    set_recompute(model, recompute)
    model.pretrained_cfg = model.default_cfg = instance_cfg(name, model, features)
    return model


__all__ = ["FeatureNet", "LayerFactory", "StagedClassifier", "create_model", "list_models", "register_model"]
