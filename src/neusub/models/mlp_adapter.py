"""MLP adapter over frozen features (the paper's Table 6: an NS MLP on CLIP ViT-B/32 features).

Input: pre-extracted features, pooled ``(B, D)`` or tokens ``(B, T, D)``. Body: ``depth``
re-parameterized linear layers (RepLinear, BatchNorm1d per branch, statistics over batch
and tokens) ``D → hidden → … → hidden``, each followed by a guided activation, so an
activation separates every two linear maps, the classifier included. The head sums the
streams, mean-pools the tokens (token input) and applies a linear classifier.

Deployed: ``Linear, act, …, Linear, act`` then mean over tokens and the classifier: a plain
MLP. ``depth=0`` is the linear classifier on the features alone (the paper's "FC" row; its
``recipe`` and ``connectivity`` change nothing). ``width_mult`` scales ``hidden``; ``stem`` and
``drop_path_rate`` (passed to every builder by ``create_model``) do not apply and are ignored.
"""

from __future__ import annotations

from torch import Tensor, nn

from ..streams import StreamMerge, StreamModule
from .factory import LayerFactory
from .mobilenet import layer_context, scaled


class ToBundle(StreamModule):
    """A plain tensor ``(B, ...)`` → a one-stream bundle ``(1, B, ...)``; deployed: identity.

    Lets token inputs ``(B, T, D)`` enter branch-level layers unambiguously (a RepLinear
    with ``in_streams == 1`` takes only 2-D input as plain)."""

    def forward_streams(self, x: Tensor) -> Tensor:
        return x.unsqueeze(0)

    def fuse(self) -> nn.Module:
        return nn.Identity()


class MLPAdapter(nn.Module):
    """``(B, D)`` or ``(B, T, D)`` → ``(B, num_classes)``."""

    def __init__(
        self,
        f: LayerFactory,
        in_features: int = 512,
        hidden: int = 512,
        depth: int = 2,
        num_classes: int = 1000,
        width_mult: float = 1.0,
        stem: str | None = None,
        drop_path_rate: float = 0.0,
    ):
        super().__init__()
        sizes = [("in_features", in_features, 1), ("hidden", hidden, 1), ("depth", depth, 0)]
        for label, value, least in sizes:
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                raise ValueError(f"mlp_adapter: {label}={value!r} must be an integer >= {least}")
        if not width_mult > 0:
            raise ValueError(f"mlp_adapter: width_mult={width_mult!r} must be > 0")
        hidden = scaled(hidden, width_mult)
        # Always a bundle inside: block-connectivity RepLinear maps (..., D), so the leading
        # stream axis rides along as a batch axis there.
        self.to_bundle = ToBundle()
        layers: list[nn.Module] = []
        streams, width = 1, in_features
        for i in range(depth):
            with layer_context("mlp_adapter", f"layers.{2 * i} (linear {width} → {hidden})"):
                linear = f.rep_linear(width, hidden, streams=streams)
            streams, width = linear.out_streams, hidden
            layers += [linear, f.activation(streams)]
        self.layers = nn.Sequential(*layers)
        self.merge = StreamMerge(streams)  # input is always a bundle: no plain_dim
        self.fc = nn.Linear(width, num_classes)
        self.num_features, self.out_streams = width, streams

    def forward_features(self, x: Tensor) -> Tensor:
        """``(B, [T,] D)`` → the stream sum ``(B, [T,] hidden)``."""
        if x.dim() not in (2, 3):
            raise ValueError(f"mlp_adapter expects (B, D) or (B, T, D) features, got shape {tuple(x.shape)}")
        return self.merge(self.layers(self.to_bundle(x)))

    def forward_head(self, x: Tensor) -> Tensor:
        return self.fc(x.mean(1) if x.dim() == 3 else x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


def build_mlp_adapter(f: LayerFactory, **kwargs) -> MLPAdapter:
    return MLPAdapter(f, **kwargs)


def build_linear_adapter(f: LayerFactory, **kwargs) -> MLPAdapter:
    """The linear probe: ``mlp_adapter`` with ``depth=0``, ``(B, [T,] D) → (B, num_classes)``."""
    return MLPAdapter(f, depth=0, **kwargs)
