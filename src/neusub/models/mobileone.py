"""MobileOne S0–S4 (Vasu et al., 2023), written from the paper's description.

Layout: a stem block (3×3/2 conv, ``3 → min(64, 64·w0)`` channels) + act, then four
stages of [2, 8, 10, 1] blocks with ``64·w1, 128·w2, 256·w3, 512·w4`` channels; each
block is a depthwise 3×3 conv (stride 2 on the first block of a stage) + act and a
pointwise 1×1 conv + act; global average pool and a linear classifier. Every conv,
the stem's included, is re-parameterized; the head sums the streams.

Width multipliers ``(w1, w2, w3, w4)`` and ``k`` (``num_conv_branches``):

    s0 (0.75, 1, 1, 2) k=4    s1 (1.5, 1.5, 2, 2.5) k=1    s2 (1.5, 2, 2.5, 4) k=1
    s3 (2, 2.5, 3, 4) k=1     s4 (3, 3.5, 3.5, 4) k=1 + squeeze-excite

with ``w0 = w1``. With ``recipe="mobileone"`` (a name or a ``Recipe`` without options) the
blocks get ``Recipe("mobileone", {"num_conv_branches": k})`` and the stem one conv branch
(k = 1, as in the official model); ``num_conv_branches=`` overrides k. Any other recipe,
or a ``Recipe("mobileone", {...})`` with options, is used as given for every conv.

S4's squeeze-excite (reduction 1/16, gate from the stream sum) sits after both convs of
the last 5 blocks of stage 3 and of the single block of stage 4, before the activation,
as in the official layout. There are no residuals, so ``drop_path_rate`` is accepted and
has nothing to act on. ``stem="cifar"`` gives the stem stride 1 (×16 downsampling: 32×32
→ 2×2 before the pool); ``width_mult`` scales every channel count on top of the variant's.
"""

from __future__ import annotations

from torch import Tensor, nn

from ..recipes import Recipe, as_recipe
from ..streams import SqueezeExcite
from .factory import LayerFactory
from .mobilenet import check_args, layer_context, scaled

STAGE_BLOCKS = (2, 8, 10, 1)
STAGE_CHANNELS = (64, 128, 256, 512)
SE_RATIO = 0.0625

# name -> (width multipliers of the 4 stages, num_conv_branches, SE blocks at the end of each stage)
MOBILEONES: dict[str, tuple[tuple[float, ...], int, tuple[int, ...]]] = {
    "mobileone_s0": ((0.75, 1.0, 1.0, 2.0), 4, (0, 0, 0, 0)),
    "mobileone_s1": ((1.5, 1.5, 2.0, 2.5), 1, (0, 0, 0, 0)),
    "mobileone_s2": ((1.5, 2.0, 2.5, 4.0), 1, (0, 0, 0, 0)),
    "mobileone_s3": ((2.0, 2.5, 3.0, 4.0), 1, (0, 0, 0, 0)),
    "mobileone_s4": ((3.0, 3.5, 3.5, 4.0), 1, (0, 0, 5, 1)),
}


class MobileOneBlock(nn.Module):
    """Depthwise 3×3 (stride) [+ SE] + act, pointwise 1×1 [+ SE] + act; both re-parameterized."""

    def __init__(
        self,
        f: LayerFactory,
        in_ch: int,
        out_ch: int,
        stride: int,
        streams: int,
        recipe: str | Recipe,
        se: bool,
        model: str,
        name: str,
    ):
        super().__init__()
        with layer_context(model, f"{name}.dw (depthwise 3×3, {in_ch} channels, stride {stride})"):
            self.dw = f.rep_conv(in_ch, in_ch, 3, stride, groups=in_ch, streams=streams, recipe=recipe)
        self.se_dw = self._se(f, in_ch, self.dw.out_streams, se)
        self.act_dw = f.activation(self.dw.out_streams)
        with layer_context(model, f"{name}.pw (pointwise 1×1, {in_ch} → {out_ch} channels)"):
            self.pw = f.rep_conv(in_ch, out_ch, 1, streams=self.dw.out_streams, recipe=recipe)
        self.se_pw = self._se(f, out_ch, self.pw.out_streams, se)
        self.act_pw = f.activation(self.pw.out_streams)
        self.out_streams = self.pw.out_streams

    @staticmethod
    def _se(f: LayerFactory, channels: int, streams: int, se: bool) -> nn.Module:
        return f.gate(SqueezeExcite(channels, SE_RATIO), streams) if se else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        x = self.act_dw(self.se_dw(self.dw(x)))
        return self.act_pw(self.se_pw(self.pw(x)))


def _uses_mobileone_k(f: LayerFactory) -> bool:
    """True when the blocks take the variant's ``k``: recipe ``mobileone`` without options."""
    recipe = as_recipe(f.recipe)
    return recipe.name == "mobileone" and not recipe.options


def _recipes(f: LayerFactory, k: int) -> tuple[str | Recipe, str | Recipe]:
    """``(stem recipe, block recipe)`` for the factory's recipe (see the module doc)."""
    if _uses_mobileone_k(f):
        return Recipe("mobileone", {"num_conv_branches": 1}), Recipe("mobileone", {"num_conv_branches": k})
    return f.recipe, f.recipe


class MobileOne(nn.Module):
    """``(B, C, H, W) → (B, num_classes)``; ``stem="imagenet"`` (3×3/2) or ``"cifar"`` (3×3/1)."""

    def __init__(
        self,
        f: LayerFactory,
        widths: tuple[float, ...],
        num_conv_branches: int,
        se_blocks: tuple[int, ...] = (0, 0, 0, 0),
        num_classes: int = 1000,
        stem: str = "imagenet",
        drop_path_rate: float = 0.0,
        width_mult: float = 1.0,
        in_chans: int = 3,
        name: str = "mobileone",
    ):
        super().__init__()
        check_args(stem, width_mult)
        stem_recipe, recipe = _recipes(f, num_conv_branches)
        stem_ch = scaled(min(64.0, 64 * widths[0]), width_mult)
        with layer_context(name, f"stem (3×3, {in_chans} → {stem_ch} channels)"):
            self.conv_stem = f.rep_conv(in_chans, stem_ch, 3, 1 if stem == "cifar" else 2, recipe=stem_recipe)
        self.act_stem = f.activation(self.conv_stem.out_streams)
        streams, in_ch = self.conv_stem.out_streams, stem_ch
        stages = []
        for s, (base, w, depth, n_se) in enumerate(zip(STAGE_CHANNELS, widths, STAGE_BLOCKS, se_blocks)):
            out_ch = scaled(base * w, width_mult)
            blocks = []
            for i in range(depth):
                se = i >= depth - n_se
                blk = MobileOneBlock(
                    f, in_ch, out_ch, 2 if i == 0 else 1, streams, recipe, se, name, f"stages.{s}.{i}"
                )
                blocks.append(blk)
                streams, in_ch = blk.out_streams, out_ch
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.merge = f.merge(streams)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_ch, num_classes)
        self.num_features, self.out_streams = in_ch, streams

    def forward_features(self, x: Tensor) -> Tensor:
        x = self.stages(self.act_stem(self.conv_stem(x)))
        return self.merge(x)

    def forward_head(self, x: Tensor) -> Tensor:
        return self.fc(self.avgpool(x).flatten(1))

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


def build_mobileone(name: str, f: LayerFactory, num_conv_branches: int | None = None, **kwargs) -> MobileOne:
    widths, k, se_blocks = MOBILEONES[name]
    if num_conv_branches is not None and not _uses_mobileone_k(f):
        raise ValueError(
            f"{name}: num_conv_branches={num_conv_branches!r} applies to recipe='mobileone' without "
            f"options; got recipe={f.recipe!r} (put the options in the Recipe instead)"
        )
    k = k if num_conv_branches is None else num_conv_branches
    return MobileOne(f, widths, k, se_blocks, name=name, **kwargs)
