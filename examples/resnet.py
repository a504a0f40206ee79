"""ResNet with torchvision's module structure and names, at a small width for fast tests.

The layout mirrors torchvision's ``resnet18`` / ``resnet50`` module for module
(``conv1 bn1 relu maxpool layer1..layer4 avgpool fc``; blocks with
``conv1/bn1/relu/conv2/bn2(/conv3/bn3)`` and ``downsample = Sequential(conv, bn)``;
``out += identity`` then ``self.relu(out)``), so the converter meets the same
residual pattern it will meet in real code. Only the base width (64 in
torchvision) and the input size are smaller by default.

Input: one float image batch of shape ``(batch, in_channels, image_size, image_size)``.
Output: class logits of shape ``(batch, num_classes)``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from examples._common import image_inputs, logits_shape

BLOCK_KINDS = ("basic", "bottleneck")


@dataclass(frozen=True)
class ResNetConfig:
    """Sizes of a ResNet; ``width`` is the channel count of layer1 (torchvision: 64)."""

    block: str = "basic"
    layers: tuple[int, int, int, int] = (2, 2, 2, 2)
    width: int = 16
    num_classes: int = 10
    in_channels: int = 3
    image_size: int = 32  # pixels per side of the example input

    def __post_init__(self) -> None:
        if self.block not in BLOCK_KINDS:
            raise ValueError(f"ResNetConfig.block must be one of {BLOCK_KINDS}, got {self.block!r}")
        if len(self.layers) != 4 or any(n < 1 for n in self.layers):
            raise ValueError(
                f"ResNetConfig.layers must be four block counts >= 1 (one per stage), got {self.layers!r}"
            )
        for name in ("width", "num_classes", "in_channels", "image_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"ResNetConfig.{name} must be >= 1, got {getattr(self, name)}")


CONFIG = ResNetConfig()
BOTTLENECK_CONFIG = ResNetConfig(block="bottleneck", layers=(3, 4, 6, 3))


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    """3x3 convolution with padding 1 and no bias (a batch norm follows)."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    """1x1 convolution without bias (a batch norm follows)."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection (ResNet-18/34)."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        identity = x

        out = self.conv1(x)
        out = self.bn1(out)
        out = self.relu(out)

        out = self.conv2(out)
        out = self.bn2(out)

        if self.downsample is not None:
            identity = self.downsample(x)

        out += identity
        out = self.relu(out)
        return out


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (carrying the stride), 1x1 expand by 4, residual (ResNet-50/101/152)."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = conv1x1(inplanes, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        identity = x

        out = self.conv1(x)
        out = self.bn1(out)
        out = self.relu(out)

        out = self.conv2(out)
        out = self.bn2(out)
        out = self.relu(out)

        out = self.conv3(out)
        out = self.bn3(out)

        if self.downsample is not None:
            identity = self.downsample(x)

        out += identity
        out = self.relu(out)
        return out


class ResNet(nn.Module):
    """Stem (7x7 stride-2 conv, BN, ReLU, max-pool), four stages, global average pool, linear head."""

    def __init__(self, block: type[BasicBlock | Bottleneck], layers: tuple[int, ...], width: int,
                 num_classes: int, in_channels: int):
        super().__init__()
        self.inplanes = width
        self.conv1 = nn.Conv2d(in_channels, width, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, width, layers[0])
        self.layer2 = self._make_layer(block, width * 2, layers[1], stride=2)
        self.layer3 = self._make_layer(block, width * 4, layers[2], stride=2)
        self.layer4 = self._make_layer(block, width * 8, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(width * 8 * block.expansion, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def _make_layer(self, block: type[BasicBlock | Bottleneck], planes: int, blocks: int,
                    stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                conv1x1(self.inplanes, planes * block.expansion, stride),
                nn.BatchNorm2d(planes * block.expansion),
            )
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers.extend(block(self.inplanes, planes) for _ in range(1, blocks))
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv1(x)
        x = self.bn1(x)
        x = self.relu(x)
        x = self.maxpool(x)

        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        x = self.layer4(x)

        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        x = self.fc(x)
        return x


def resnet_from_config(config: ResNetConfig) -> ResNet:
    """The ResNet that ``config`` describes."""
    block = BasicBlock if config.block == "basic" else Bottleneck
    return ResNet(block, config.layers, config.width, config.num_classes, config.in_channels)


def build_model(**overrides) -> ResNet:
    """ResNet from ``CONFIG`` (basic blocks, 2-2-2-2) with ``overrides`` (ResNetConfig fields) applied."""
    return resnet_from_config(dataclasses.replace(CONFIG, **overrides))


def resnet_basic(**overrides) -> ResNet:
    """ResNet-18 layout (BasicBlock, layers 2-2-2-2) at the small default width."""
    return build_model(**overrides)


def resnet_bottleneck(**overrides) -> ResNet:
    """ResNet-50 layout (Bottleneck, layers 3-4-6-3) at the small default width."""
    return resnet_from_config(dataclasses.replace(BOTTLENECK_CONFIG, **overrides))


example_inputs = image_inputs(CONFIG)
output_shape = logits_shape(CONFIG, "num_classes")


# Per-sample shape of the default input (channels, height, width); the batch dimension comes first.
input_shape = (CONFIG.in_channels, CONFIG.image_size, CONFIG.image_size)
