"""MobileNetV1 (Howard et al., 2017) with re-parameterized depthwise and pointwise convs.

Layout: a plain 3×3/2 conv-BN (32 channels) + act, then 13 depthwise-separable blocks
(depthwise 3×3, ``groups = C``, + act; pointwise 1×1 + act) with output channels
64, 128, 128, 256, 256, 512 ×6, 1024, 1024 and stride 2 at the blocks to 128, 256,
512 and the first 1024; global average pool and a linear classifier.

Re-parameterized (as in the paper's Table 1): both the depthwise 3×3 and the pointwise
1×1 layer of every block, with the model's recipe and connectivity. Plain: the stem.
The head sums the streams. There are no residuals, so ``drop_path_rate`` is accepted
and has nothing to act on.

``stem="cifar"`` (32×32 inputs): the stem has stride 1 and the first stride-2 block
(64 → 128) keeps stride 1, so the network downsamples ×8 (32×32 → 4×4 before the
pool) instead of ×32. ``width_mult`` scales every channel count (stem included),
rounded to the nearest integer, at least 1.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import Tensor, nn

from .factory import LayerFactory

# (output channels, stride) of the 13 depthwise-separable blocks
MOBILENET_V1_BLOCKS: list[tuple[int, int]] = [
    (64, 1),
    (128, 2),
    (128, 1),
    (256, 2),
    (256, 1),
    (512, 2),
    (512, 1),
    (512, 1),
    (512, 1),
    (512, 1),
    (512, 1),
    (1024, 2),
    (1024, 1),
]


def scaled(channels: float, width_mult: float) -> int:
    """``channels × width_mult`` rounded, at least 1."""
    return max(1, int(round(channels * width_mult)))


def check_args(stem: str, width_mult: float) -> None:
    if stem not in ("imagenet", "cifar"):
        raise ValueError(f"unknown stem {stem!r}; choose 'imagenet' or 'cifar'")
    if not width_mult > 0:
        raise ValueError(f"width_mult={width_mult!r} must be > 0")


@contextmanager
def layer_context(model: str, where: str) -> Iterator[None]:
    """Re-raise a layer's construction ``ValueError`` with the model and layer it belongs to."""
    try:
        yield
    except ValueError as err:
        raise ValueError(f"{model}: cannot build {where}: {err}") from err


class DepthwiseSeparable(nn.Module):
    """Depthwise 3×3 (stride) + act, pointwise 1×1 + act; both re-parameterized."""

    def __init__(self, f: LayerFactory, in_ch: int, out_ch: int, stride: int, streams: int, name: str):
        super().__init__()
        with layer_context("mobilenet_v1", f"{name}.dw (depthwise 3×3, {in_ch} channels, stride {stride})"):
            self.dw = f.rep_conv(in_ch, in_ch, 3, stride, groups=in_ch, streams=streams)
        self.act_dw = f.activation(self.dw.out_streams)
        with layer_context("mobilenet_v1", f"{name}.pw (pointwise 1×1, {in_ch} → {out_ch} channels)"):
            self.pw = f.rep_conv(in_ch, out_ch, 1, streams=self.dw.out_streams)
        self.act_pw = f.activation(self.pw.out_streams)
        self.out_streams = self.pw.out_streams

    def forward(self, x: Tensor) -> Tensor:
        return self.act_pw(self.pw(self.act_dw(self.dw(x))))


class MobileNetV1(nn.Module):
    """``(B, C, H, W) → (B, num_classes)``; ``stem="imagenet"`` (3×3/2) or ``"cifar"`` (see module doc)."""

    def __init__(
        self,
        f: LayerFactory,
        num_classes: int = 1000,
        stem: str = "imagenet",
        drop_path_rate: float = 0.0,
        width_mult: float = 1.0,
        in_chans: int = 3,
    ):
        super().__init__()
        check_args(stem, width_mult)
        cifar = stem == "cifar"
        stem_ch = scaled(32, width_mult)
        self.conv_stem = f.plain_conv(in_chans, stem_ch, 3, 1 if cifar else 2)
        self.act_stem = f.activation(1)
        streams, in_ch = 1, stem_ch
        blocks = []
        first_downsample = True
        for i, (out_ch, stride) in enumerate(MOBILENET_V1_BLOCKS):
            if stride == 2 and first_downsample:
                first_downsample = False
                stride = 1 if cifar else 2
            out_ch = scaled(out_ch, width_mult)
            blk = DepthwiseSeparable(f, in_ch, out_ch, stride, streams, f"features.{i}")
            blocks.append(blk)
            streams, in_ch = blk.out_streams, out_ch
        self.features = nn.Sequential(*blocks)
        self.merge = f.merge(streams)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_ch, num_classes)
        self.num_features, self.out_streams = in_ch, streams

    def forward_features(self, x: Tensor) -> Tensor:
        x = self.features(self.act_stem(self.conv_stem(x)))
        return self.merge(x)

    def forward_head(self, x: Tensor) -> Tensor:
        return self.fc(self.avgpool(x).flatten(1))

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


def build_mobilenet_v1(f: LayerFactory, **kwargs) -> MobileNetV1:
    return MobileNetV1(f, **kwargs)
