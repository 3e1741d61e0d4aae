"""timm's model API for neusub's own plain networks, and ``features_only`` for them.

neusub's own backbones are written as *plain* networks (conv-BN-act, linear-act) that
:func:`neusub.convert` turns into training structures, as timm's ResNets are; the converted
and the deployed network keep the class, and with it the API of timm's models
(``forward_features``, ``forward_head(pre_logits=)``, ``get_classifier``,
``reset_classifier``, ``forward_intermediates``, ``prune_intermediate_layers``,
``set_grad_checkpointing``, ``group_matcher``, ``feature_info``). :class:`TrunkAndHead`
implements it once for a trunk of modules followed by a head; :class:`StagedClassifier` for
``stem → stages → global pool → classifier`` image networks;
:class:`FeatureNet` is ``features_only=True`` for any model with ``forward_intermediates``.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator, Sequence

import torch
from timm.layers import create_classifier, get_act_layer
from timm.models import FeatureInfo
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ..activations import timm_act_layer

Indices = int | Sequence[int] | None


def take_indices(count: int, indices: Indices) -> tuple[list[int], int]:
    """timm's convention for which of ``count`` feature points to return: ``None`` all, an
    int ``n`` the last ``n``, a sequence those (negative ones count from the end). Returns
    ``(absolute indices, the largest)``."""
    if indices is None:
        indices = count
    if isinstance(indices, int):
        if not 0 < indices <= count:
            raise ValueError(f"indices={indices} asks for the last {indices} of {count} feature points")
        taken = list(range(count - indices, count))
    else:
        taken = [i + count if i < 0 else i for i in indices]
        if not taken or not all(0 <= i < count for i in taken):
            raise ValueError(f"indices={tuple(indices)} is out of range for {count} feature points")
    return taken, max(taken)


def act_layer(act: str) -> nn.Module:
    """The plain module of activation ``act``, in place where it can be (as timm's blocks make
    theirs: the deployed network then writes no extra tensor per activation)."""
    return get_act_layer(timm_act_layer(act))(inplace=True)


def conv_norm_act(in_ch: int, out_ch: int, kernel: int, stride: int, act: str) -> nn.Sequential:
    """``conv → BatchNorm → act`` with "same" padding (``conv``, ``bn``, ``act``)."""
    conv = nn.Conv2d(in_ch, out_ch, kernel, stride, kernel // 2, bias=False)
    return nn.Sequential(OrderedDict(conv=conv, bn=nn.BatchNorm2d(out_ch), act=act_layer(act)))


def image_cfg(in_chans: int, stem: str, reduction: int) -> dict:
    """The input part of a pretrained_cfg: 224² (``stem="imagenet"``) or 32² (``"cifar"``)
    images, and the feature map that size gives at the network's total ``reduction``."""
    side = 32 if stem == "cifar" else 224
    return {"input_size": (in_chans, side, side), "pool_size": (side // reduction,) * 2}


class TrunkAndHead(nn.Module):
    """timm's model API for a network ``trunk → head``: the trunk a sequence of named modules
    (:meth:`_trunk`), the outputs of those named in ``self.feature_info``
    (``{"num_chs", "reduction", "module"}``) its feature points; the head (``forward_head``)
    pools and classifies with ``self.fc``. Subclasses give the trunk, the head and
    ``reset_classifier``; ``feature_fmt`` is the layout of the feature points (the one
    ``output_fmt`` of ``forward_intermediates``; not timm's ``output_fmt`` attribute, which
    timm's tests read as a spatial layout)."""

    feature_info: list[dict]
    fc: nn.Module
    feature_fmt = "NCHW"
    grad_checkpointing = False

    def _trunk(self) -> Iterator[tuple[str, nn.Module]]:
        raise NotImplementedError

    def _cut(self, last: str) -> None:
        """Remove the trunk modules after the one named ``last``."""
        raise NotImplementedError

    def _check_input(self, x: Tensor) -> Tensor:
        return x

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        raise NotImplementedError

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        raise NotImplementedError

    def _run(self, module: nn.Module, x: Tensor) -> Tensor:
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint(module, x, use_reentrant=False)
        return module(x)

    def forward_features(self, x: Tensor) -> Tensor:
        """The input through the trunk: the last feature point, unpooled."""
        x = self._check_input(x)
        for _, module in self._trunk():
            x = self._run(module, x)
        return x

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        return self.fc

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each trunk module in backward instead of keeping its activations (the
        stochastic partitions are drawn again from the restored RNG state: the same ones)."""
        self.grad_checkpointing = enable

    def forward_intermediates(
        self,
        x: Tensor,
        indices: Indices = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str | None = None,
        intermediates_only: bool = False,
    ) -> list[Tensor] | tuple[Tensor, list[Tensor]]:
        """timm's feature API: the outputs at ``indices`` of ``feature_info`` (see
        :func:`take_indices`), with the last feature map unless ``intermediates_only``;
        ``stop_early`` stops after the last one asked for. There is no final norm (``norm``)."""
        if output_fmt not in (None, self.feature_fmt):
            name = type(self).__name__
            raise ValueError(f"{name}.forward_intermediates: output_fmt must be {self.feature_fmt!r}")
        points = [info["module"] for info in self.feature_info]
        taken, last = take_indices(len(points), indices)
        wanted = {points[i] for i in taken}
        x, intermediates = self._check_input(x), []
        for name, module in self._trunk():
            x = self._run(module, x)
            if name in wanted:
                intermediates.append(x)
            if stop_early and name == points[last]:
                break
        return intermediates if intermediates_only else (x, intermediates)

    def prune_intermediate_layers(
        self, indices: Indices = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """Drop the trunk after the last feature point of ``indices`` (and the head); returns
        the absolute indices."""
        points = [info["module"] for info in self.feature_info]
        taken, last = take_indices(len(points), indices)
        self._cut(points[last])
        if prune_head:
            self.reset_classifier(0, "")
        return taken


class StagedClassifier(TrunkAndHead):
    """A plain image classifier ``stem → stages → global pool → [dropout] → fc`` with timm's API.

    A subclass builds ``self.stem`` and ``self.stages`` (an ``nn.Sequential`` of stages), lists
    its feature points in ``self.feature_info`` (module ``"stem"`` or ``"stages.<i>"``) and
    calls :meth:`init_head`. Input ``(B, C, H, W)``.
    """

    stem: nn.Module
    stages: nn.Sequential

    def init_head(self, num_features: int, num_classes: int, global_pool: str, drop_rate: float) -> None:
        """Global pooling (timm's ``SelectAdaptivePool2d``: ``"avg"``, ``"max"``, ``""`` none, ...),
        dropout and a linear classifier (none when ``num_classes == 0``)."""
        self.num_features = self.head_hidden_size = num_features
        self.num_classes = num_classes
        self.head_drop = nn.Dropout(drop_rate)
        self.global_pool, self.fc = create_classifier(num_features, num_classes, pool_type=global_pool)

    def _trunk(self) -> Iterator[tuple[str, nn.Module]]:
        yield "stem", self.stem
        for i, stage in enumerate(self.stages):
            yield f"stages.{i}", stage

    def _cut(self, last: str) -> None:
        self.stages = self.stages[: 0 if last == "stem" else int(last.split(".")[1]) + 1]

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """Pooled (and dropped-out) features ``(B, num_features)`` with ``pre_logits``, else logits."""
        x = self.head_drop(self.global_pool(x))
        return x if pre_logits else self.fc(x)

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A new classifier for ``num_classes`` (0: none, ``forward`` returns pooled features);
        ``global_pool`` changes the pooling too (``""``: none)."""
        pool = self.global_pool.pool_type if global_pool is None else global_pool
        like = next(self.stem.parameters())
        self.num_classes = num_classes
        self.global_pool, self.fc = create_classifier(self.num_features, num_classes, pool_type=pool)
        self.fc.to(device=like.device, dtype=like.dtype)

    def group_matcher(self, coarse: bool = False) -> dict:
        """Parameter groups for timm's layer-wise learning-rate decay: the stem, then each stage
        (``coarse``) or each block."""
        return {"stem": r"^stem", "blocks": r"^stages\.(\d+)" if coarse else r"^stages\.(\d+)\.(\d+)"}


class FeatureNet(nn.Module):
    """``features_only=True``: ``x`` → the list of feature maps at ``out_indices`` (see
    :func:`take_indices`) of a model with ``forward_intermediates``; the layers after the last
    one and the head are pruned. ``feature_info`` is timm's ``FeatureInfo`` of those points."""

    def __init__(self, model: nn.Module, out_indices: Indices = None):
        super().__init__()
        if not getattr(model, "feature_info", None):
            raise ValueError(
                f"features_only: {type(model).__name__} has no feature points (no stages or blocks); "
                "use the model itself"
            )
        self.out_indices = tuple(model.prune_intermediate_layers(out_indices, prune_head=True))
        self.model = model
        self.feature_info = FeatureInfo(model.feature_info, self.out_indices)

    def forward(self, x: Tensor) -> list[Tensor]:
        return self.model.forward_intermediates(x, indices=self.out_indices, intermediates_only=True)


__all__ = [
    "FeatureNet",
    "StagedClassifier",
    "TrunkAndHead",
    "act_layer",
    "conv_norm_act",
    "image_cfg",
    "take_indices",
]
