"""MobileNetV1 (Howard et al., 2017): a plain network, converted with :func:`neusub.convert`.

Layout: a 3×3/2 conv-BN-act stem (32 channels), then 13 depthwise-separable blocks
(depthwise 3×3 conv-BN-act, ``groups = C``; pointwise 1×1 conv-BN-act) with output channels
64, 128, 128, 256, 256, 512 ×6, 1024, 1024, in five stages that each start with a stride-2
block (the first, to 64 channels, has stride 1); global average pool and a linear classifier.
No residuals, so ``drop_path_rate`` is accepted and has nothing to act on.

Re-parameterized (as in the paper's Table 1): both the depthwise 3×3 and the pointwise 1×1
conv of every block, with the model's recipe and connectivity. Plain: the stem. Deployed: a
:class:`MobileNetV1` (conv + BN; ``neusub.deploy(..., fold_norms=True)`` folds the BNs).

``stem="cifar"`` (32×32 inputs): the stem has stride 1 and so does the first block of the
second stage (64 → 128), so the network downsamples ×8 (32×32 → 4×4 before the pool) instead
of ×32. ``width_mult`` scales every channel count (stem included), rounded to the nearest
integer, at least 1.
"""

from __future__ import annotations

from torch import Tensor, nn

from ..streams import Gate, SqueezeExcite
from .factory import LayerFactory
from .staged import StagedClassifier, act_layer, conv_norm_act, image_cfg

# (output channels, stride) of the blocks of each stage
MOBILENET_V1_STAGES: list[list[tuple[int, int]]] = [
    [(64, 1)],
    [(128, 2), (128, 1)],
    [(256, 2), (256, 1)],
    [(512, 2)] + [(512, 1)] * 5,
    [(1024, 2), (1024, 1)],
]


def scaled(channels: float, width_mult: float) -> int:
    """``channels × width_mult`` rounded, at least 1."""
    return max(1, int(round(channels * width_mult)))


def check_args(stem: str, width_mult: float) -> None:
    if stem not in ("imagenet", "cifar"):
        raise ValueError(f"unknown stem {stem!r}; choose 'imagenet' or 'cifar'")
    if not width_mult > 0:
        raise ValueError(f"width_mult={width_mult!r} must be > 0")


class DepthwiseSeparable(nn.Module):
    """Depthwise 3×3 conv-BN-[SE]-act (stride), pointwise 1×1 conv-BN-[SE]-act; no residual.

    ``se_ratio``: a squeeze-excite gate (reduction ``se_ratio``) after each BN, before the act."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, act: str, se_ratio: float | None = None):
        super().__init__()
        self.conv_dw = nn.Conv2d(in_ch, in_ch, 3, stride, 1, groups=in_ch, bias=False)
        self.bn_dw = nn.BatchNorm2d(in_ch)
        self.se_dw = Gate(SqueezeExcite(in_ch, se_ratio)) if se_ratio else nn.Identity()
        self.act_dw = act_layer(act)
        self.conv_pw = nn.Conv2d(in_ch, out_ch, 1, bias=False)
        self.bn_pw = nn.BatchNorm2d(out_ch)
        self.se_pw = Gate(SqueezeExcite(out_ch, se_ratio)) if se_ratio else nn.Identity()
        self.act_pw = act_layer(act)

    def forward(self, x: Tensor) -> Tensor:
        x = self.act_dw(self.se_dw(self.bn_dw(self.conv_dw(x))))
        return self.act_pw(self.se_pw(self.bn_pw(self.conv_pw(x))))


class MobileNetV1(StagedClassifier):
    """``(B, C, H, W) → (B, num_classes)``; ``stem="imagenet"`` (3×3/2) or ``"cifar"`` (see module doc)."""

    def __init__(
        self,
        num_classes: int = 1000,
        stem: str = "imagenet",
        width_mult: float = 1.0,
        in_chans: int = 3,
        act: str = "relu",
        drop_rate: float = 0.0,
        global_pool: str = "avg",
        drop_path_rate: float = 0.0,
    ):
        super().__init__()
        check_args(stem, width_mult)
        cifar = stem == "cifar"
        in_ch = scaled(32, width_mult)
        self.stem = conv_norm_act(in_chans, in_ch, 3, 1 if cifar else 2, act)
        reduction, stages, self.feature_info = 1 if cifar else 2, [], []
        for s, layout in enumerate(MOBILENET_V1_STAGES):
            blocks = []
            for i, (channels, stride) in enumerate(layout):
                stride = 1 if cifar and (s, i) == (1, 0) else stride
                out_ch, reduction = scaled(channels, width_mult), reduction * stride
                blocks.append(DepthwiseSeparable(in_ch, out_ch, stride, act))
                in_ch = out_ch
            stages.append(nn.Sequential(*blocks))
            self.feature_info.append({"num_chs": in_ch, "reduction": reduction, "module": f"stages.{s}"})
        self.stages = nn.Sequential(*stages)
        self.init_head(in_ch, num_classes, global_pool, drop_rate)
        self.pretrained_cfg = image_cfg(in_chans, stem, reduction)


def separable_convs(model: nn.Module) -> set[int]:
    """Ids of the depthwise and pointwise convs of every :class:`DepthwiseSeparable` block."""
    blocks = [m for m in model.modules() if isinstance(m, DepthwiseSeparable)]
    return {id(conv) for block in blocks for conv in (block.conv_dw, block.conv_pw)}


def build_mobilenet_v1(f: LayerFactory, **kwargs) -> nn.Module:
    plain = MobileNetV1(act=f.act, **kwargs)
    chosen = separable_convs(plain)
    example = (1, plain.stem.conv.in_channels, 64, 64)
    return f.convert(plain, lambda path, module: id(module) in chosen, example)
