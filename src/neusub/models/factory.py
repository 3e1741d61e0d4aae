"""LayerFactory: builds the layers of a model for one recipe × connectivity.

Models stay thin: they ask the factory for a re-parameterized conv, a plain conv,
an activation, an add, ... with the stream count of the tensor at that point,
and read back ``out_streams``. Stream counts are therefore static and known
before any forward.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..activations import activation
from ..layers import CONNECTIVITIES, RepConv2d, RepLinear
from ..recipes import Recipe, as_recipe
from ..streams import (
    GuidedActivation,
    StreamAdd,
    StreamDropPath,
    StreamGate,
    StreamMerge,
    check_probability,
)


@dataclass(frozen=True)
class LayerFactory:
    """The layer options of one model; their defaults and meaning are ``create_model``'s."""

    recipe: str | Recipe
    connectivity: str
    stochastic: float
    neural_drop: float
    act: str
    guided: bool  # False: the paper's ablation, activations per stream (not exact)

    def __post_init__(self) -> None:
        as_recipe(self.recipe)
        if self.connectivity not in CONNECTIVITIES:
            raise ValueError(
                f"unknown connectivity {self.connectivity!r}; choose one of {', '.join(CONNECTIVITIES)}"
            )
        activation(self.act)
        check_probability(self.stochastic, "stochastic")
        check_probability(self.neural_drop, "neural_drop")

    def rep_conv(
        self,
        in_ch: int,
        out_ch: int,
        k: int,
        stride: int = 1,
        groups: int = 1,
        streams: int = 1,
        recipe: str | Recipe | None = None,
    ) -> RepConv2d:
        """A re-parameterized conv of the model's recipe and connectivity."""
        return RepConv2d(
            in_ch,
            out_ch,
            k,
            stride,
            groups=groups,
            recipe=recipe or self.recipe,
            connectivity=self.connectivity,
            in_streams=streams,
            stochastic=self.stochastic,
            neural_drop=self.neural_drop,
        )

    def plain_conv(
        self, in_ch: int, out_ch: int, k: int, stride: int = 1, groups: int = 1, streams: int = 1
    ) -> RepConv2d:
        """A plain conv-BN. Under branch-level connectivity it maps each stream on its own
        (``naive`` with one branch: S streams in, S out, BN statistics over all of them)."""
        connectivity = "naive" if streams > 1 else "block"
        return RepConv2d(
            in_ch,
            out_ch,
            k,
            stride,
            groups=groups,
            recipe="plain",
            connectivity=connectivity,
            in_streams=streams,
        )

    def rep_linear(self, in_f: int, out_f: int, streams: int = 1) -> RepLinear:
        return RepLinear(
            in_f,
            out_f,
            recipe=self.recipe,
            connectivity=self.connectivity,
            in_streams=streams,
            stochastic=self.stochastic,
            neural_drop=self.neural_drop,
        )

    def activation(self, streams: int) -> GuidedActivation:
        return GuidedActivation(self.act, in_streams=streams, guided=self.guided)

    def gate(self, gate: nn.Module, streams: int) -> StreamGate:
        return StreamGate(gate, in_streams=streams)

    def drop_path(self, p: float, streams: int) -> StreamDropPath:
        return StreamDropPath(p, in_streams=streams, plain_dim=4)

    def residual(self, streams: int, shortcut_streams: int) -> tuple[nn.Module, StreamAdd]:
        """``(shortcut adapter, add)`` for a residual of ``streams`` plus a shortcut.

        A shortcut whose stream count is neither 1 nor ``streams`` is merged to one
        stream first (exact: the add is linear)."""
        if shortcut_streams in (1, streams):
            return nn.Identity(), StreamAdd(streams, shortcut_streams)
        return StreamMerge(shortcut_streams, plain_dim=4), StreamAdd(streams, 1)

    def merge(self, streams: int) -> StreamMerge:
        return StreamMerge(streams, plain_dim=4)
