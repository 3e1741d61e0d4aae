"""ResNet / ResNeXt with re-parameterized 3×3 convs (torchvision's layout).

Re-parameterized: the k×k convs of the residual branches. Plain: the stem, the
1×1 convs of bottlenecks and the downsample shortcuts (conv-BN folded on deploy;
under branch-level connectivity they map each stream on its own). Residual adds,
max-pool and drop-path go through the stream ops; the head sums the streams.
"""

from __future__ import annotations

from torch import Tensor, nn

from .factory import LayerFactory


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, f: LayerFactory, in_ch: int, planes: int, stride: int, streams: int,
                 drop_path: float, groups: int = 1, base_width: int = 64):  # fmt: skip
        super().__init__()
        self.conv1 = f.rep_conv(in_ch, planes, 3, stride, streams=streams)
        self.act1 = f.activation(self.conv1.out_streams)
        self.conv2 = f.rep_conv(planes, planes, 3, 1, streams=self.conv1.out_streams)
        self._finish(f, in_ch, planes, stride, streams, self.conv2.out_streams, drop_path)

    def _finish(self, f: LayerFactory, in_ch: int, out_ch: int, stride: int, streams: int,
                out_streams: int, drop_path: float) -> None:  # fmt: skip
        shortcut_streams = streams
        self.downsample: nn.Module = nn.Identity()
        if stride != 1 or in_ch != out_ch:
            self.downsample = f.plain_conv(in_ch, out_ch, 1, stride, streams=streams)
            shortcut_streams = self.downsample.out_streams
        self.shortcut, self.add = f.residual(out_streams, shortcut_streams)
        self.drop_path = f.drop_path(drop_path, out_streams)
        self.act_out = f.activation(out_streams)
        self.out_streams = out_streams

    def residual(self, x: Tensor) -> Tensor:
        return self.conv2(self.act1(self.conv1(x)))

    def forward(self, x: Tensor) -> Tensor:
        out = self.drop_path(self.residual(x))
        return self.act_out(self.add(out, self.shortcut(self.downsample(x))))


class Bottleneck(BasicBlock):
    expansion = 4

    def __init__(self, f: LayerFactory, in_ch: int, planes: int, stride: int, streams: int,
                 drop_path: float, groups: int = 1, base_width: int = 64):  # fmt: skip
        nn.Module.__init__(self)
        width = int(planes * (base_width / 64.0)) * groups
        out_ch = planes * self.expansion
        self.conv1 = f.plain_conv(in_ch, width, 1, streams=streams)
        self.act1 = f.activation(self.conv1.out_streams)
        self.conv2 = f.rep_conv(width, width, 3, stride, groups=groups, streams=self.conv1.out_streams)
        self.act2 = f.activation(self.conv2.out_streams)
        self.conv3 = f.plain_conv(width, out_ch, 1, streams=self.conv2.out_streams)
        self._finish(f, in_ch, out_ch, stride, streams, self.conv3.out_streams, drop_path)

    def residual(self, x: Tensor) -> Tensor:
        return self.conv3(self.act2(self.conv2(self.act1(self.conv1(x)))))


class ResNet(nn.Module):
    """``(B, 3, H, W) → (B, num_classes)``; ``stem="imagenet"`` (7×7/2 + max-pool) or ``"cifar"`` (3×3/1)."""

    def __init__(self, block: type[BasicBlock], layers: list[int], f: LayerFactory, num_classes: int = 1000,
                 stem: str = "imagenet", drop_path_rate: float = 0.0, width_mult: float = 1.0,
                 groups: int = 1, base_width: int = 64, in_chans: int = 3):  # fmt: skip
        super().__init__()
        if stem not in ("imagenet", "cifar"):
            raise ValueError(f"unknown stem {stem!r}; choose 'imagenet' or 'cifar'")
        widths = [max(1, int(round(c * width_mult))) for c in (64, 128, 256, 512)]
        if groups > 1:  # grouped 3×3 needs widths divisible by the groups
            widths = [max(groups, (w // groups) * groups) for w in widths]
        self.stem_kind = stem
        if stem == "imagenet":
            self.conv1 = f.plain_conv(in_chans, widths[0], 7, 2)
            self.act1 = f.activation(1)
            self.maxpool: nn.Module = f.max_pool(3, 2, 1, streams=1)
        else:
            self.conv1 = f.plain_conv(in_chans, widths[0], 3, 1)
            self.act1 = f.activation(1)
            self.maxpool = nn.Identity()
        streams, in_ch = 1, widths[0]
        total, index = sum(layers), 0
        stages = []
        for stage, (width, depth) in enumerate(zip(widths, layers)):
            blocks = []
            for i in range(depth):
                stride = 2 if stage > 0 and i == 0 else 1
                rate = drop_path_rate * index / max(total - 1, 1)
                blk = block(f, in_ch, width, stride, streams, rate, groups, base_width)
                blocks.append(blk)
                streams, in_ch, index = blk.out_streams, width * block.expansion, index + 1
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.merge = f.merge(streams)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_ch, num_classes)
        self.num_features, self.out_streams = in_ch, streams

    def forward_features(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.act1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.merge(x)

    def forward_head(self, x: Tensor) -> Tensor:
        return self.fc(self.avgpool(x).flatten(1))

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


RESNETS = {
    "resnet18": (BasicBlock, [2, 2, 2, 2], {}),
    "resnet34": (BasicBlock, [3, 4, 6, 3], {}),
    "resnet50": (Bottleneck, [3, 4, 6, 3], {}),
    "resnet101": (Bottleneck, [3, 4, 23, 3], {}),
    "resnext50_32x4d": (Bottleneck, [3, 4, 6, 3], {"groups": 32, "base_width": 4}),
}


def build_resnet(name: str, f: LayerFactory, **kwargs) -> ResNet:
    block, layers, extra = RESNETS[name]
    return ResNet(block, layers, f, **extra, **kwargs)
