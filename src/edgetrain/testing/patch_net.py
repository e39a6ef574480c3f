"""The seeded model the conformance suite applies ``PatchExecute``'s examples to (``TechniqueInfo.example_model``):
blocks in one ``nn.Sequential`` whose first ones are frozen, as a pretrained backbone's stem is."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class _Block(nn.Module):
    """Depthwise 3x3 (stride s) -> BN -> ReLU -> pointwise 1x1 -> BN, residual when the shape is kept."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False), nn.BatchNorm2d(cin),
                                  nn.ReLU(), nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.residual = stride == 1 and cin == cout

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv(x) if self.residual else self.conv(x)  # (N, cout, H/s, W/s)


def _conv_bn(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU6())


class PatchNet(nn.Module):
    """The conformance model: a pretrained-and-frozen stem of three blocks (conv 3x3, a stride-2 depthwise block, a
    residual depthwise block; parameters frozen, BatchNorms kept in eval mode as detection backbones keep theirs),
    then a trainable block and the classifier, for 8x8 inputs (``edgetrain.testing.tiny_batch``)."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 8, frozen: int = 3) -> None:
        super().__init__()
        self.features = nn.Sequential(_conv_bn(in_channels, width, 1), _Block(width, 2 * width, 2),
                                      _Block(2 * width, 2 * width, 1), _conv_bn(2 * width, 2 * width, 1))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(2 * width, num_classes)
        self.frozen = frozen
        self.block_names = [f"features.{i}" for i in range(4)]
        self.classifier_name = "classifier"
        self.default_input_size, self.in_channels = 8, in_channels

    def train(self, mode: bool = True) -> PatchNet:
        super().train(mode)
        for m in self.features[:self.frozen].modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.train(False)
        return self

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.pool(self.features(x)).flatten(1))  # (N, num_classes)


def patch_net(dtype: torch.dtype = torch.float32, seed: int = 0, frozen: int = 3) -> PatchNet:
    """A seeded :class:`PatchNet` with non-trivial BatchNorm statistics; its first ``frozen`` blocks frozen."""
    from edgetrain.testing import seeded

    model = seeded(PatchNet(frozen=frozen), seed, torch.float32)
    for p in model.features[:frozen].parameters():
        p.requires_grad_(False)
    return model.to(dtype).train()
