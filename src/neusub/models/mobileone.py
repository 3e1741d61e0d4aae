"""MobileOne S0–S4 (Vasu et al., 2023), written from the paper's description as a plain
network and converted with :func:`neusub.convert`.

Layout: a stem (3×3/2 conv-BN-act, ``3 → min(64, 64·w0)`` channels), then four stages of
[2, 8, 10, 1] blocks with ``64·w1, 128·w2, 256·w3, 512·w4`` channels; each block is a
depthwise 3×3 conv-BN-act (stride 2 on the first block of a stage) and a pointwise 1×1
conv-BN-act; global average pool and a linear classifier. Every conv but the squeeze-excite
gates', the stem's included, is re-parameterized. Deployed: a :class:`MobileOne` (conv + BN;
``neusub.deploy(..., fold_norms=True)`` gives Apple's inference layout, conv + bias).

Width multipliers ``(w1, w2, w3, w4)`` and ``k`` (``num_conv_branches``):

    s0 (0.75, 1, 1, 2) k=4    s1 (1.5, 1.5, 2, 2.5) k=1    s2 (1.5, 2, 2.5, 4) k=1
    s3 (2, 2.5, 3, 4) k=1     s4 (3, 3.5, 3.5, 4) k=1 + squeeze-excite

with ``w0 = w1``. With ``recipe="mobileone"`` (a name or a ``Recipe`` without options) the
blocks get ``Recipe("mobileone", {"num_conv_branches": k})`` and the stem one conv branch
(k = 1, as in the official model); ``num_conv_branches=`` overrides k. Any other recipe,
or a ``Recipe("mobileone", {...})`` with options, is used as given for every conv.

S4's squeeze-excite (reduction 1/16, its gate computed from the stream sum) sits after the
BN of both convs of the last 5 blocks of stage 3 and of the single block of stage 4, before
the activation, as in the official layout. There are no residuals, so ``drop_path_rate`` is
accepted and has nothing to act on. ``stem="cifar"`` gives the stem stride 1 (×16
downsampling: 32×32 → 2×2 before the pool); ``width_mult`` scales every channel count on top
of the variant's.
"""

from __future__ import annotations

from torch import nn

from ..recipes import Recipe, as_recipe
from .factory import LayerFactory
from .mobilenet import DepthwiseSeparable, check_args, scaled, separable_convs
from .staged import StagedClassifier, conv_norm_act, image_cfg

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


def _uses_mobileone_k(f: LayerFactory) -> bool:
    """True when the blocks take the variant's ``k``: recipe ``mobileone`` without options."""
    recipe = as_recipe(f.recipe)
    return recipe.name == "mobileone" and not recipe.options


def _recipes(f: LayerFactory, k: int) -> tuple[str | Recipe, str | Recipe]:
    """``(stem recipe, block recipe)`` for the factory's recipe (see the module doc)."""
    if _uses_mobileone_k(f):
        return Recipe("mobileone", {"num_conv_branches": 1}), Recipe("mobileone", {"num_conv_branches": k})
    return f.recipe, f.recipe


class MobileOne(StagedClassifier):
    """``(B, C, H, W) → (B, num_classes)``; ``stem="imagenet"`` (3×3/2) or ``"cifar"`` (3×3/1)."""

    def __init__(
        self,
        widths: tuple[float, ...],
        se_blocks: tuple[int, ...] = (0, 0, 0, 0),
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
        in_ch = scaled(min(64.0, 64 * widths[0]), width_mult)
        reduction = 1 if stem == "cifar" else 2  # the stem's stride
        self.stem = conv_norm_act(in_chans, in_ch, 3, reduction, act)
        self.feature_info = [{"num_chs": in_ch, "reduction": reduction, "module": "stem"}]
        stages = []
        for s, (base, w, depth, n_se) in enumerate(zip(STAGE_CHANNELS, widths, STAGE_BLOCKS, se_blocks)):
            out_ch, reduction = scaled(base * w, width_mult), reduction * 2
            blocks = []
            for i in range(depth):
                se = SE_RATIO if i >= depth - n_se else None
                blocks.append(DepthwiseSeparable(in_ch, out_ch, 2 if i == 0 else 1, act, se))
                in_ch = out_ch
            stages.append(nn.Sequential(*blocks))
            self.feature_info.append({"num_chs": out_ch, "reduction": reduction, "module": f"stages.{s}"})
        self.stages = nn.Sequential(*stages)
        self.init_head(in_ch, num_classes, global_pool, drop_rate)
        self.pretrained_cfg = image_cfg(in_chans, stem, reduction)


def build_mobileone(
    name: str,
    f: LayerFactory,
    num_conv_branches: int | None = None,
    **kwargs,
) -> nn.Module:
    widths, k, se_blocks = MOBILEONES[name]
    if num_conv_branches is not None and not _uses_mobileone_k(f):
        raise ValueError(
            f"{name}: num_conv_branches={num_conv_branches!r} applies to recipe='mobileone' without "
            f"options; got recipe={f.recipe!r} (put the options in the Recipe instead)"
        )
    stem_recipe, recipe = _recipes(f, k if num_conv_branches is None else num_conv_branches)
    plain = MobileOne(widths, se_blocks, act=f.act, **kwargs)
    stem_conv, chosen = plain.stem.conv, separable_convs(plain)

    def layers(path: str, module: nn.Module) -> str | Recipe | None:
        if module is stem_conv:
            return stem_recipe
        return recipe if id(module) in chosen else None

    return f.convert(plain, layers, (1, stem_conv.in_channels, 64, 64))
