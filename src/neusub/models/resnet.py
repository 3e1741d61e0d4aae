"""ResNet / ResNeXt: timm's definitions, converted with :func:`neusub.convert`.

Re-parameterized by default: every k×k conv of the residual branches; the stem, the 1×1
convs of bottlenecks and the downsample shortcuts stay plain (under branch-level
connectivity they map each stream on its own). ``layers="paper"`` is the official code's
structure: also every 1×1 conv and shortcut, with four 1×1 branches. ``stem="cifar"`` is a
3×3 stride-1 stem without max-pool; ``width_mult`` scales every channel count, the stem's too.
"""

from __future__ import annotations

from torch import nn

from ..activations import timm_act_layer
from ..convert import LayerSpec
from .factory import LayerFactory
from .staged import image_cfg

# name: cardinality (groups of the 3×3 convs); the block and depths are timm's
RESNETS = {"resnet18": 1, "resnet34": 1, "resnet50": 1, "resnet101": 1, "resnext50_32x4d": 32}


def residual_kxk(path: str, module: nn.Module) -> bool:
    """The default policy: the k×k convs of the residual branches (not the stem ``conv1``)."""
    return isinstance(module, nn.Conv2d) and path != "conv1" and tuple(module.kernel_size) != (1, 1)


def plain_resnet(
    name: str,
    num_classes: int = 1000,
    stem: str = "imagenet",
    act: str = "relu",
    drop_path_rate: float = 0.0,
    width_mult: float = 1.0,
    in_chans: int = 3,
    **timm_kwargs,
) -> nn.Module:
    """timm's ``name`` with neusub's stem and width options (the plain network)."""
    import timm

    if stem not in ("imagenet", "cifar"):
        raise ValueError(f"unknown stem {stem!r}; choose 'imagenet' or 'cifar'")
    groups = RESNETS[name]
    widths = [max(1, int(round(c * width_mult))) for c in (64, 128, 256, 512)]
    if groups > 1:  # timm's grouped 3×3 has planes · base_width/64 · groups channels: keep it ≥ groups
        widths = [max(16, w) for w in widths]
    model = timm.create_model(
        name,
        pretrained=False,
        num_classes=num_classes,
        in_chans=in_chans,
        channels=tuple(widths),
        act_layer=timm_act_layer(act),
        drop_path_rate=drop_path_rate,
        **timm_kwargs,
    )
    _set_stem(model, stem, in_chans, widths[0])
    model.pretrained_cfg = {**model.pretrained_cfg, **image_cfg(in_chans, stem, 8 if stem == "cifar" else 32)}
    return model


def _set_stem(model: nn.Module, stem: str, in_chans: int, width: int) -> None:
    """The stem conv (7×7/2, or 3×3/1 without max-pool for ``cifar``) with ``width`` channels.

    timm's stem always has 64; a narrower one changes the input side of ``layer1[0]`` too
    (its first conv and its shortcut, which becomes an identity when the shapes then match)."""
    if stem == "cifar":
        model.conv1 = nn.Conv2d(in_chans, width, 3, 1, 1, bias=False)
        model.maxpool = nn.Identity()
    else:
        model.conv1 = nn.Conv2d(in_chans, width, 7, 2, 3, bias=False)
    model.bn1 = nn.BatchNorm2d(width)
    first = model.layer1[0]
    conv = first.conv1
    first.conv1 = nn.Conv2d(width, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, bias=False)
    out_channels = (first.conv3 if hasattr(first, "conv3") else first.conv2).out_channels
    if width == out_channels:
        first.downsample = None
    else:  # timm's projection shortcut: 1×1 conv + BN
        stride = first.conv2.stride if hasattr(first, "conv3") else conv.stride
        first.downsample = nn.Sequential(
            nn.Conv2d(width, out_channels, 1, stride, bias=False), nn.BatchNorm2d(out_channels)
        )
    info = getattr(model, "feature_info", None)
    info = info.info if hasattr(info, "info") else info  # a features_only model's FeatureInfo
    for point in info or []:  # the stem's channels; without its two stride-2 ops, reductions / 4
        if point["module"] in ("act1", "conv1", "bn1"):
            point["num_chs"] = width
        if stem == "cifar":
            point["reduction"] //= 2 if point["module"] == "act1" else 4


def build_resnet(
    name: str,
    f: LayerFactory,
    num_classes: int = 1000,
    stem: str = "imagenet",
    drop_path_rate: float = 0.0,
    width_mult: float = 1.0,
    in_chans: int = 3,
    layers: LayerSpec = None,
    **timm_kwargs,
) -> nn.Module:
    """The converted ResNet ``name`` (``layers``: a :func:`neusub.convert` policy; default
    :func:`residual_kxk`). Extra keyword arguments go to ``timm.create_model``; with the
    factory's ``features_only``, timm's features model is converted."""
    if f.features_only:  # timm's own features_only model, converted
        timm_kwargs.update(
            features_only=True, **({} if f.out_indices is None else {"out_indices": f.out_indices})
        )
    plain = plain_resnet(name, num_classes, stem, f.act, drop_path_rate, width_mult, in_chans, **timm_kwargs)
    return f.convert(plain, residual_kxk if layers is None else layers, (1, in_chans, 64, 64))
