"""The foreign zoo: models edgetrain did not write, to hold every technique to "any model" (issue: generality).

Each entry builds a small, seeded model (no weights are downloaded) and an example batch ``(inputs, target)``:

* ``efficientnet``: timm ``tf_efficientnet_b0``: ``Conv2dSame`` convolutions that pad TF-"SAME" in their own
  forward, SiLU, squeeze-excite with a sigmoid gate, ``BatchNormAct2d``, blocks in nested ``Sequential`` stages;
* ``mobilenetv3``: timm ``mobilenetv3_small_050``: hard-swish, squeeze-excite with hard-sigmoid, ReLU;
* ``resnet``: timm ``resnet18`` (in-place ReLU, residual ``BasicBlock``);
* ``vit``: timm ``vit_tiny_patch16_224`` at 32 px with 8 px patches: GELU, LayerNorm, fused attention
  (``F.scaled_dot_product_attention``), a class token and position embedding that are root parameters;
* ``bert``: a ``transformers`` ``BertForSequenceClassification`` built from a config (2 layers, width 64), called
  with ``input_ids`` and an ``attention_mask`` that pads part of a sequence, with attention and hidden dropout;
* ``audio``: a hand-written Conv1d net on raw waveforms (M5-like, Dai et al. 2017);
* ``functional``: a hand-written CNN with a ``Conv2d`` subclass that pads in its own forward, ``F.relu6`` and
  ``F.gelu`` called in forwards, a third-party-style activation class, and its blocks in a ``ModuleList``.

The timm and transformers entries need those packages (test extras); :func:`available` lists what can be built.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclasses.dataclass(frozen=True)
class ZooModel:
    name: str
    build: Callable[[], nn.Module]
    batch: Callable[[int], tuple[Any, Tensor]]  # batch size -> (inputs, target)
    needs: str | None = None  # the package it needs
    description: str = ""


def _seeded(model: nn.Module, seed: int = 0) -> nn.Module:
    """Deterministic weights whatever the global RNG (timm/transformers initialise from it): re-draw every
    floating-point parameter from a local generator with the scale it has, and give BatchNorms real statistics."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            std = float(p.std()) if p.numel() > 1 else 0.0
            p.copy_(torch.randn(p.shape, generator=g) * (std if std > 0 else 0.1) + (1.0 if std == 0 and
                                                                                     float(p.mean()) == 1.0 else 0.0))
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model.eval().train()


def _images(n: int, size: int = 32, classes: int = 10, seed: int = 1) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g), torch.randint(0, classes, (n,), generator=g)


def _timm(name: str, **kwargs: Any) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        from edgetrain.models.foreign import import_timm

        return _seeded(import_timm().create_model(name, pretrained=False, num_classes=10, **kwargs))

    return build


def _bert() -> nn.Module:
    from edgetrain.models.foreign import ensure_torchvision

    ensure_torchvision()  # transformers imports torchvision when it is installed
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=128, max_position_embeddings=32, num_labels=4, hidden_dropout_prob=0.1,
                     attention_probs_dropout_prob=0.1)
    return _seeded(BertForSequenceClassification(cfg))


def _tokens(n: int, seq: int = 16, seed: int = 1) -> tuple[dict[str, Tensor], Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 100, (n, seq), generator=g)
    mask = torch.ones(n, seq, dtype=torch.long)
    mask[::2, seq * 3 // 4:] = 0  # every other sequence is padded
    return {"input_ids": ids, "attention_mask": mask}, torch.randint(0, 4, (n,), generator=g)


class AudioNet(nn.Module):
    """An M5-like raw-waveform classifier (Dai et al., Very Deep CNNs for Raw Waveforms, ICASSP 2017)."""

    def __init__(self, classes: int = 10, width: int = 16) -> None:
        super().__init__()
        chans = [1, width, width, 2 * width, 2 * width]
        layers: list[nn.Module] = []
        for i in range(4):
            k, s = (80, 4) if i == 0 else (3, 1)
            layers += [nn.Conv1d(chans[i], chans[i + 1], k, s), nn.BatchNorm1d(chans[i + 1]), nn.ReLU(),
                       nn.MaxPool1d(4 if i < 3 else 1)]
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(chans[-1], classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.features(x).mean(-1))  # (N, classes)


def _waves(n: int, seed: int = 1) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 1600, generator=g), torch.randint(0, 10, (n,), generator=g)


class PadSameConv2d(nn.Conv2d):
    """A ``Conv2d`` subclass that pads TF-"SAME" in its own forward, then calls ``F.conv2d`` with padding 0."""

    def forward(self, x: Tensor) -> Tensor:
        ih, iw = x.shape[-2:]
        kh, kw = self.weight.shape[-2:]
        ph = max((-(-ih // self.stride[0]) - 1) * self.stride[0] + kh - ih, 0)
        pw = max((-(-iw // self.stride[1]) - 1) * self.stride[1] + kw - iw, 0)
        x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class QuickGELU(nn.Module):
    """A library's own activation class (as CLIP's): ``x * sigmoid(1.702 x)``."""

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(1.702 * x)


class FunctionalBlock(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.expand = nn.Conv2d(c, 2 * c, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(2 * c)
        self.dw = nn.Conv2d(2 * c, 2 * c, 3, padding=1, groups=2 * c, bias=False)
        self.bn2 = nn.BatchNorm2d(2 * c)
        self.project = nn.Conv2d(2 * c, c, 1)
        self.act = QuickGELU()

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu6(self.bn1(self.expand(x)))  # a functional activation
        h = self.act(self.bn2(self.dw(h)))
        return x + F.gelu(self.project(h))  # residual, functional GELU


class FunctionalNet(nn.Module):
    def __init__(self, classes: int = 10, c: int = 16, depth: int = 3) -> None:
        super().__init__()
        self.stem = PadSameConv2d(3, c, 3, stride=2)
        self.stem_bn = nn.BatchNorm2d(c)
        self.blocks = nn.ModuleList(FunctionalBlock(c) for _ in range(depth))
        self.head = nn.Linear(c, classes)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.stem_bn(self.stem(x)))
        for block in self.blocks:
            x = block(x)
        return self.head(F.adaptive_avg_pool2d(x, 1).flatten(1))  # (N, classes)


ZOO: dict[str, ZooModel] = {z.name: z for z in (
    ZooModel("efficientnet", _timm("tf_efficientnet_b0"), _images, "timm", "timm tf_efficientnet_b0 (Conv2dSame, SiLU, SE)"),
    ZooModel("mobilenetv3", _timm("mobilenetv3_small_050"), _images, "timm",
             "timm mobilenetv3_small_050 (hard-swish, SE)"),
    ZooModel("resnet", _timm("resnet18"), _images, "timm", "timm resnet18"),
    ZooModel("vit", _timm("vit_tiny_patch16_224", img_size=32, patch_size=8), _images, "timm",
             "timm vit_tiny at 32 px, 8 px patches (GELU, LayerNorm, SDPA)"),
    ZooModel("bert", _bert, _tokens, "transformers",
             "transformers BERT from a config (2x64, attention mask, dropout)"),
    ZooModel("audio", lambda: _seeded(AudioNet()), _waves, None, "Conv1d waveform net (M5-like)"),
    ZooModel("functional", lambda: _seeded(FunctionalNet()), _images, None,
             "hand-written: Conv2d subclass padding in forward, F.relu6/F.gelu, ModuleList blocks"),
)}


def available() -> list[str]:
    """The zoo entries whose packages are installed."""
    import importlib.util

    return [n for n, z in ZOO.items() if z.needs is None or importlib.util.find_spec(z.needs) is not None]
