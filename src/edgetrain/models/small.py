"""A small CNN for 8-32 px grayscale or colour images (the T2/T3 workhorse)."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class SmallCNN(nn.Module):
    """Three conv-BN-ReLU blocks (32, 64, 64 channels at widths 1.0; the last two stride 2), global average
    pooling, a linear classifier. About 60k parameters.

    Args:
        num_classes: classifier outputs.
        in_channels: input channels.
        width: channel multiplier.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: float = 1.0) -> None:
        super().__init__()
        c1, c2, c3 = (max(4, int(c * width)) for c in (32, 64, 64))

        def block(cin: int, cout: int, stride: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())

        self.features = nn.Sequential(block(in_channels, c1, 1), block(c1, c2, 2), block(c2, c3, 2))
        self.classifier = nn.Linear(c3, num_classes)
        self.block_names = ["features.0", "features.1", "features.2"]
        self.classifier_name = "classifier"
        self.default_input_size = 28
        self.in_channels = in_channels  # with default_input_size: the example input edgetrain probes

    def forward(self, x: Tensor) -> Tensor:
        x = self.features(x)  # (N, c3, H/4, W/4)
        return self.classifier(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))  # (N, num_classes)
