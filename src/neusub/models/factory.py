"""LayerFactory: the options of one model's re-parameterized layers (recipe × connectivity, ...).

A model builder writes its network as a plain ``nn.Module`` and hands it to
:meth:`LayerFactory.convert` with the layers to re-parameterize; :func:`neusub.convert`
fixes every stream count before any forward.
"""

from __future__ import annotations

from dataclasses import dataclass

from timm.models import FeatureInfo
from torch import nn

from ..activations import activation
from ..convert import LayerSpec, convert
from ..layers import CONNECTIVITIES
from ..recipes import Recipe, as_recipe
from ..streams import check_probability
from .staged import FeatureNet, Indices


@dataclass(frozen=True)
class LayerFactory:
    """The layer options of one model; their defaults and meaning are ``create_model``'s."""

    recipe: str | Recipe
    connectivity: str
    stochastic: float
    neural_drop: float
    act: str
    guided: bool  # False: the paper's ablation, activations per stream (not exact)
    features_only: bool = False  # timm's features_only: the model returns its feature maps
    out_indices: Indices = None  # which of them (timm's convention, see staged.take_indices)

    def __post_init__(self) -> None:
        as_recipe(self.recipe)
        if self.connectivity not in CONNECTIVITIES:
            raise ValueError(
                f"unknown connectivity {self.connectivity!r}; choose one of {', '.join(CONNECTIVITIES)}"
            )
        activation(self.act)
        check_probability(self.stochastic, "stochastic")
        check_probability(self.neural_drop, "neural_drop")

    def features(self, model: nn.Module) -> nn.Module:
        """``model`` as the model asked for: with ``features_only``, its :class:`FeatureNet`
        (unless it is one already, as timm's ``features_only`` models are)."""
        if self.features_only and not isinstance(getattr(model, "feature_info", None), FeatureInfo):
            return FeatureNet(model, self.out_indices)
        return model

    def convert(self, model: nn.Module, layers: LayerSpec, example_input: tuple[int, ...]) -> nn.Module:
        """The training structure of the plain ``model`` (as :meth:`features` gives it): the
        layers that ``layers`` selects (a :func:`neusub.convert` policy) re-parameterized with
        these options, freshly initialised; ``example_input``: the probe's input shape."""
        return convert(
            self.features(model),
            recipe=self.recipe,
            connectivity=self.connectivity,
            stochastic=self.stochastic,
            neural_drop=self.neural_drop,
            layers=layers,
            guided=self.guided,
            init="fresh",
            example_input=example_input,
            on_merge="ignore",
        )
