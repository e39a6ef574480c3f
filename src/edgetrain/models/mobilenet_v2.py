"""MobileNetV2 (Sandler et al., *MobileNetV2: Inverted Residuals and Linear Bottlenecks*, CVPR 2018,
arXiv:1801.04381), with parameter names and shapes identical to torchvision's ``mobilenet_v2`` so that
torchvision's ImageNet weights (``mobilenet_v2-b0353104.pth``) load with ``strict=True``.

Structure, channel rounding (``_make_divisible``) and initialisation follow torchvision's
``torchvision/models/mobilenetv2.py`` (read for the facts; written anew here, torchvision is not a
dependency).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

#: (expansion t, output channels c, repeats n, first stride s) — Table 2 of the paper.
IMAGENET_SETTING = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                    (6, 320, 1, 1))


def make_divisible(v: float, divisor: int = 8, min_value: int | None = None) -> int:
    """Round channels to a multiple of ``divisor``, never more than 10% below ``v`` (torchvision's rule)."""
    min_value = min_value or divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    return new_v + divisor if new_v < 0.9 * v else new_v


class ConvBNAct(nn.Sequential):
    """Conv2d (no bias) -> BatchNorm2d -> activation; children named 0, 1, 2 as torchvision's Conv2dNormActivation."""

    def __init__(self, cin: int, cout: int, kernel: int = 3, stride: int = 1, groups: int = 1,
                 act: type[nn.Module] | None = nn.ReLU6) -> None:
        layers: list[nn.Module] = [nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
                                   nn.BatchNorm2d(cout)]
        if act is not None:
            layers.append(act(inplace=False))
        super().__init__(*layers)


class InvertedResidual(nn.Module):
    """Expand 1x1 -> depthwise 3x3 -> project 1x1 (linear); residual when the shape is kept."""

    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"stride must be 1 or 2, got {stride}")
        hidden = int(round(inp * expand_ratio))
        self.use_res_connect = stride == 1 and inp == oup
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(ConvBNAct(inp, hidden, kernel=1))
        layers += [ConvBNAct(hidden, hidden, stride=stride, groups=hidden), nn.Conv2d(hidden, oup, 1, 1, 0, bias=False),
                   nn.BatchNorm2d(oup)]
        self.conv = nn.Sequential(*layers)
        self.out_channels = oup

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)  # (N, oup, H/s, W/s)


class MobileNetV2(nn.Module):
    """MobileNetV2 with a width multiplier.

    Args:
        num_classes: classifier outputs (1000 for the ImageNet weights).
        width_mult: channel multiplier (0.35 ... 1.4); channels are rounded to multiples of ``round_nearest``.
        in_channels: input channels (3 for ImageNet; the first conv adapts).
        setting: inverted-residual setting rows (t, c, n, s); default the paper's ImageNet setting.
        last_channel: channels of the final 1x1 conv (1280 in the paper).
        dropout: dropout before the classifier (0.2 as torchvision).
    """

    def __init__(self, num_classes: int = 1000, width_mult: float = 1.0, in_channels: int = 3,
                 setting: Sequence[tuple[int, int, int, int]] = IMAGENET_SETTING, last_channel: int = 1280,
                 round_nearest: int = 8, dropout: float = 0.2) -> None:
        super().__init__()
        cin = make_divisible(32 * width_mult, round_nearest)
        self.last_channel = make_divisible(last_channel * max(1.0, width_mult), round_nearest)
        features: list[nn.Module] = [ConvBNAct(in_channels, cin, stride=2)]
        for t, c, n, s in setting:
            cout = make_divisible(c * width_mult, round_nearest)
            for i in range(n):
                features.append(InvertedResidual(cin, cout, s if i == 0 else 1, expand_ratio=t))
                cin = cout
        features.append(ConvBNAct(cin, self.last_channel, kernel=1))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(p=dropout), nn.Linear(self.last_channel, num_classes))
        self.block_names = [f"features.{i}" for i in range(len(features))]
        self.classifier_name = "classifier.1"
        self.default_input_size = 224
        self.in_channels = in_channels  # with default_input_size: the example input edgetrain probes
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():  # torchvision's initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.features(x)  # (N, last_channel, H/32, W/32)
        x = torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)  # (N, last_channel)
        return self.classifier(x)  # (N, num_classes)


#: MCUNet-like tiny setting: few, narrow inverted-residual stages for 28-64 px inputs on a microcontroller
#: (in the spirit of Lin et al., *MCUNet: Tiny Deep Learning on IoT Devices*, NeurIPS 2020, arXiv:2007.10319;
#: not their searched architecture).
MCUNET_TINY_SETTING = ((1, 8, 1, 1), (4, 16, 2, 2), (4, 24, 2, 2), (4, 40, 2, 2), (4, 48, 1, 1))


def mcunet_tiny(num_classes: int = 10, in_channels: int = 3, width_mult: float = 1.0) -> MobileNetV2:
    """A tiny inverted-residual network (about 60k parameters at width 1.0)."""
    model = MobileNetV2(num_classes, width_mult, in_channels, setting=MCUNET_TINY_SETTING, last_channel=160,
                        dropout=0.0)
    model.default_input_size = 32
    return model
