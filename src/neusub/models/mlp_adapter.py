"""MLP adapter over frozen features (the paper's Table 6: an NS MLP on CLIP ViT-B/32 features).

A plain network, converted with :func:`neusub.convert`. Input: pre-extracted features, pooled
``(B, D)`` or tokens ``(B, T, D)``. Body: ``depth`` blocks ``Linear → act``
(``D → hidden → … → hidden``), so an activation separates every two linear maps, the
classifier included; every block's linear layer is re-parameterized (RepLinear, BatchNorm1d
per branch, statistics over batch and tokens). Head: mean over the tokens (``global_pool="avg"``;
``""`` keeps them), dropout, a linear classifier. Deployed: the plain :class:`MLPAdapter`.

timm's conventions for a network without spatial stages (as its MLP-Mixer and ViTs):
``forward_features`` keeps the token axis, ``forward_head(pre_logits=True)`` pools it,
``feature_info`` lists each block (``reduction`` 1), ``forward_intermediates`` returns the
blocks' outputs (``output_fmt="NLC"``) and ``features_only=True`` gives them; the
pretrained_cfg's ``input_size`` is ``(in_features,)``, fixed.

``depth=0`` is the linear classifier on the features alone (the paper's "FC" row; nothing is
re-parameterized, so its ``recipe`` and ``connectivity`` change nothing). ``width_mult`` scales
``hidden``; ``stem`` and ``drop_path_rate`` (passed to every builder by ``create_model``) do not
apply and are ignored.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.fx
from torch import Tensor, nn

from .factory import LayerFactory
from .mobilenet import scaled
from .staged import TrunkAndHead, act_layer

POOLS = ("avg", "")


def check_features(x: Tensor, in_features: int) -> Tensor:
    """``x`` if it is ``(B, in_features)`` or ``(B, T, in_features)``, else a ``ValueError``
    (not checked while ``torch.jit.trace`` records sizes as tensors: ONNX export)."""
    if not torch.jit.is_tracing() and (x.dim() not in (2, 3) or x.shape[-1] != in_features):
        raise ValueError(
            f"mlp_adapter expects (B, {in_features}) or (B, T, {in_features}) features, "
            f"got shape {tuple(x.shape)}"
        )
    return x


def pool_tokens(x: Tensor, pool: str) -> Tensor:
    """``(B, T, D) → (B, D)`` by the mean over tokens with ``pool="avg"``; anything else as it is."""
    return x.mean(1) if pool == "avg" and x.dim() == 3 else x


# Leaves of a torch.fx graph: they branch on the input's shape, which tracing does not know.
torch.fx.wrap("check_features")
torch.fx.wrap("pool_tokens")


class MLPAdapter(TrunkAndHead):
    """``(B, [T,] in_features)`` → ``(B, num_classes)`` (see the module doc)."""

    feature_fmt = "NLC"  # of the feature points: tokens (or pooled features), features last

    def __init__(
        self,
        in_features: int = 512,
        hidden: int = 512,
        depth: int = 2,
        num_classes: int = 1000,
        width_mult: float = 1.0,
        act: str = "relu",
        global_pool: str = "avg",
        drop_rate: float = 0.0,
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
        self._check_pool(global_pool)
        hidden = scaled(hidden, width_mult)
        widths = [in_features] + [hidden] * depth
        self.blocks = nn.Sequential(
            *(nn.Sequential(nn.Linear(a, b), act_layer(act)) for a, b in zip(widths, widths[1:]))
        )
        self.feature_info = [
            {"num_chs": hidden, "reduction": 1, "module": f"blocks.{i}"} for i in range(depth)
        ]
        self.in_features, self.global_pool = in_features, global_pool
        self.num_features = self.head_hidden_size = widths[-1]
        self.num_classes = num_classes
        self.head_drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(widths[-1], num_classes) if num_classes else nn.Identity()
        first = "blocks.0.0" if depth else "fc"
        self.pretrained_cfg = {"input_size": (in_features,), "fixed_input_size": True, "first_conv": first}

    @staticmethod
    def _check_pool(pool: str) -> None:
        if pool not in POOLS:
            raise ValueError(
                f"mlp_adapter: global_pool={pool!r} is invalid; use 'avg' (mean of tokens) or ''"
            )

    def _trunk(self) -> Iterator[tuple[str, nn.Module]]:
        for i, block in enumerate(self.blocks):
            yield f"blocks.{i}", block

    def _cut(self, last: str) -> None:
        self.blocks = self.blocks[: int(last.split(".")[1]) + 1]

    def _check_input(self, x: Tensor) -> Tensor:
        return check_features(x, self.in_features)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """Pooled (and dropped-out) features with ``pre_logits``, else logits ``(B, num_classes)``."""
        x = self.head_drop(pool_tokens(x, self.global_pool))
        return x if pre_logits else self.fc(x)

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A new classifier for ``num_classes`` (0: none); ``global_pool``: ``"avg"`` or ``""``."""
        if global_pool is not None:
            self._check_pool(global_pool)
            self.global_pool = global_pool
        like = next(self.parameters(), None)  # none in a linear probe without classifier
        self.num_classes = num_classes
        place = {} if like is None else {"device": like.device, "dtype": like.dtype}
        self.fc = nn.Linear(self.num_features, num_classes, **place) if num_classes else nn.Identity()

    def group_matcher(self, coarse: bool = False) -> dict:
        """Parameter groups for timm's layer-wise learning-rate decay: one per block."""
        return {"blocks": r"^blocks\.(\d+)"}


def build_mlp_adapter(f: LayerFactory, **kwargs) -> nn.Module:
    plain = MLPAdapter(act=f.act, **kwargs)
    hidden = {id(block[0]) for block in plain.blocks}
    if not hidden:  # the linear probe: nothing to re-parameterize
        return f.features(plain)
    return f.convert(plain, lambda path, module: id(module) in hidden, (2, plain.in_features))


def build_linear_adapter(f: LayerFactory, **kwargs) -> nn.Module:
    """The linear probe: ``mlp_adapter`` with ``depth=0``, ``(B, [T,] D) → (B, num_classes)``."""
    return build_mlp_adapter(f, depth=0, **kwargs)
