"""ActNN: 2-bit activation-compressed training (the compressed-activation baseline).

Chen, Zheng, Li, Mahoney, Stoica, Gonzalez, *ActNN: Reducing Training Memory Footprint via 2-Bit
Activation Compressed Training*, ICML 2021, arXiv:2104.14129 (official code ``ucbrise/actnn``).

Every tensor that a targeted conv / linear / norm layer saves for backward is quantised per group of 256
elements (min/max in bfloat16) to ``bits`` bits with unbiased stochastic rounding, bit-packed, and
dequantised in backward (:class:`edgetrain.compress.GroupQuantCodec`). Normalisation-layer inputs use
``norm_bits`` (default 8): with 2-bit BatchNorm inputs, T1 fine-tuning of MobileNetV2 diverged to NaN
within 20 steps (measured). ReLU and ReLU6 instead save a packed 1-bit mask, which is exact, and Dropout
keeps its mask as packed bits. Parameters are never quantised; forward values are unchanged.

Stored for backward: ``bits + 0.125`` bits per element of each saved activation (plus padding to whole
groups), 1 bit per ReLU/ReLU6 element, and small tensors (< ``min_bytes``, e.g. BN statistics) as they are.
Gradients are unbiased estimates of the exact ones (lossy by design: tested in tests/techniques/test_actnn.py).
"""

from __future__ import annotations

import dataclasses

from torch import nn

from edgetrain.apply import Undo, patch_forward
from edgetrain.compress.bitpack import SUPPORTED_BITS
from edgetrain.compress.codec import SavedCompressor, hooked_forward
from edgetrain.compress.masks import dropout_forward, masked_forward
from edgetrain.compress.quant import NOISE_MODES, GroupQuantCodec, quant_payload_bytes
from edgetrain.registry import TechniqueInfo, register
from edgetrain.technique import Technique, check

#: Layers whose saved tensors are quantised; ReLU/ReLU6 get 1-bit masks instead (if ``relu_mask``).
QUANT_LAYERS: tuple[type[nn.Module], ...] = (
    nn.Conv1d, nn.Conv2d, nn.Linear, nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm,
    nn.GELU, nn.SiLU, nn.Hardswish, nn.Sigmoid, nn.Tanh, nn.ReLU, nn.ReLU6, nn.Dropout,
)
MASK_LAYERS = (nn.ReLU, nn.ReLU6)
NORM_LAYERS = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ActNN(Technique):
    """Quantise saved activations to ``bits`` bits per element.

    Args:
        targets: layers whose saved tensors are compressed (default: every conv, linear, norm and
            activation layer not already changed by another technique).
        bits: 1, 2, 4 or 8 bits per saved element (ActNN's default level L3 is 2). Memory per saved
            activation is ``(bits + 0.125) / 32`` of fp32; fewer bits -> more gradient variance.
        norm_bits: bits for the inputs of normalisation layers (BatchNorm, LayerNorm, GroupNorm), whose
            backward passes quantisation error on to every earlier layer; ``None``: same as ``bits``.
            Default 8 (ActNN ``conf.py``: ``activation_compression_bits=[2, 8, 8]``).
        group_size: elements per min/max group (256 as ActNN); smaller groups -> lower error, more stats.
        noise: stochastic-rounding noise, ``pool`` (cheap, unbiased), ``independent`` (one ``rand`` per
            element, about 2x slower on CPU) or ``none`` (round to nearest; biased, for ablations).
        relu_mask: ReLU / ReLU6 save an exact 1-bit mask instead of a quantised tensor.
        min_bytes: saved tensors smaller than this stay uncompressed (statistics, scalars).
    """

    name = "actnn"
    bits: int = 2
    norm_bits: int | None = 8
    group_size: int = 256
    noise: str = "pool"
    relu_mask: bool = True
    min_bytes: int = 4096

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.bits in SUPPORTED_BITS and not isinstance(self.bits, bool), ActNN, "bits",
              f"must be one of {list(SUPPORTED_BITS)}, got {self.bits!r}")
        check(self.norm_bits is None or (self.norm_bits in SUPPORTED_BITS and not isinstance(self.norm_bits, bool)),
              ActNN, "norm_bits", f"must be null or one of {list(SUPPORTED_BITS)}, got {self.norm_bits!r}")
        check(isinstance(self.group_size, int) and self.group_size >= 2, ActNN, "group_size",
              f"must be an int >= 2, got {self.group_size!r}")
        check(self.noise in NOISE_MODES, ActNN, "noise", f"must be one of {list(NOISE_MODES)}, got {self.noise!r}")
        check(isinstance(self.relu_mask, bool), ActNN, "relu_mask", f"must be true/false, got {self.relu_mask!r}")
        check(isinstance(self.min_bytes, int) and self.min_bytes >= 0, ActNN, "min_bytes",
              f"must be an int >= 0, got {self.min_bytes!r}")


class CompressHandle(Undo):
    """The removable change of a compression technique; ``compressor`` holds running encode statistics."""

    def __init__(self, compressor: SavedCompressor) -> None:
        super().__init__()
        self.compressor = compressor


def _apply(model: nn.Module, cfg: ActNN, targets: list[str]) -> CompressHandle:
    modules = dict(model.named_modules())
    compressor = SavedCompressor(lambda: [*model.parameters(), *model.buffers()], cfg.min_bytes)
    codec = GroupQuantCodec(cfg.bits, cfg.group_size, cfg.noise)
    norm_codec = codec
    if cfg.norm_bits not in (None, cfg.bits):
        norm_codec = GroupQuantCodec(cfg.norm_bits, cfg.group_size, cfg.noise, seed=1)
    handle = CompressHandle(compressor)
    for name in targets:
        m = modules[name]
        if "forward" in m.__dict__:
            continue  # already changed by another technique (e.g. MobileTL's masks, Freeze's frozen convs)
        if type(m) is nn.Dropout:
            patch_forward(m, dropout_forward(m), handle)
        elif cfg.relu_mask and type(m) in MASK_LAYERS:
            patch_forward(m, masked_forward(m), handle)
        else:
            c = norm_codec if isinstance(m, NORM_LAYERS) else codec
            patch_forward(m, hooked_forward(m, compressor, lambda c=c: c), handle)
    return handle


def estimate_layer(saved_shapes: list[tuple[int, ...]], cfg: ActNN, mask: bool = False) -> dict[str, int]:
    """Saved bytes of one layer whose backward saves tensors of ``saved_shapes`` (fp32), plain vs ActNN."""
    plain = sum(4 * _numel(s) for s in saved_shapes)
    if mask:
        return {"plain_bytes": plain, "saved_bytes": sum(-(-_numel(s) // 8) for s in saved_shapes)}
    return {"plain_bytes": plain,
            "saved_bytes": sum(quant_payload_bytes(s, cfg.bits, cfg.group_size) for s in saved_shapes)}


def estimate(table, cfg: ActNN, targets: list[str], model: nn.Module) -> None:  # noqa: ANN001
    """Cost model: each tensor a hooked layer saves (as the trace's rules see it) becomes its group-quantised
    payload when the codec would take it (floating point, at least ``min_bytes``); 1-bit masks of ReLU and
    Dropout are counted by the trace itself."""
    modules = dict(model.named_modules())
    for name in targets:
        m = modules[name]
        if getattr(m.__dict__.get("forward"), "compressor", None) is None or name not in table.layers:
            continue
        bits = cfg.norm_bits if isinstance(m, NORM_LAYERS) and cfg.norm_bits is not None else cfg.bits
        row = table.row(name)
        total = 0
        for nbytes, shape, is_float in row.items:
            eligible = is_float and shape is not None and nbytes >= cfg.min_bytes
            total += quant_payload_bytes(shape, bits, cfg.group_size) if eligible else nbytes
        row.saved_per_sample, row.saved_fixed, row.technique = 0.0, float(total), "actnn"


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


register(
    TechniqueInfo(
        config=ActNN,
        apply=_apply,
        summary="quantise saved activations to 2 bits per group of 256 (stochastic rounding); ReLU saves 1-bit masks",
        paper="Chen et al., ActNN: Reducing Training Memory Footprint via 2-Bit Activation Compressed Training, "
              "ICML 2021, arXiv:2104.14129",
        reduces=frozenset({"activations"}),
        layer_types=QUANT_LAYERS,
        exact=False,
        grad_tolerance=0.0,
        examples=(ActNN(), ActNN(bits=4, norm_bits=None, group_size=64, noise="independent"),
                  ActNN(bits=8, relu_mask=False)),
        estimate=estimate,
    )
)
