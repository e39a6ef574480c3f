"""ResNet-18 (He et al., *Deep Residual Learning for Image Recognition*, CVPR 2016, arXiv:1512.03385) with
torchvision's parameter names (``conv1``, ``bn1``, ``layer1.0.conv1``, ..., ``fc``)."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        idt = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + idt)  # (N, cout, H/s, W/s)


class ResNet18(nn.Module):
    """ResNet-18: BasicBlock x [2, 2, 2, 2].

    Args:
        num_classes: classifier outputs.
        in_channels: input channels.
        small_input: a 3x3 stride-1 stem without max-pool (CIFAR-style, for 28-64 px inputs) instead of the
            ImageNet 7x7 stride-2 stem with max-pool.
        width: channels of the first stage (64 in the paper).
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3, small_input: bool = True, width: int = 64) -> None:
        super().__init__()
        if small_input:
            self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
            self.maxpool: nn.Module = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(in_channels, width, 7, 2, 3, bias=False)
            self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU()
        chans = [width, 2 * width, 4 * width, 8 * width]
        cin = width
        for i, c in enumerate(chans):
            stride = 1 if i == 0 else 2
            setattr(self, f"layer{i + 1}", nn.Sequential(BasicBlock(cin, c, stride), BasicBlock(c, c)))
            cin = c
        self.fc = nn.Linear(cin, num_classes)
        self.block_names = ["conv1", *[f"layer{i}.{j}" for i in range(1, 5) for j in range(2)]]
        self.classifier_name = "fc"
        self.default_input_size = 32 if small_input else 224
        self.in_channels = in_channels  # with default_input_size: the example input edgetrain probes
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))  # (N, 8w, H/8, W/8) for small inputs
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))
