"""ActNN: 2-bit activation-compressed training (the compressed-activation baseline).

Chen, Zheng, Li, Mahoney, Stoica, Gonzalez, *ActNN: Reducing Training Memory Footprint via 2-Bit
Activation Compressed Training*, ICML 2021, arXiv:2104.14129 (official code ``ucbrise/actnn``).

Every floating-point tensor that an op inside the targeted modules (default: the whole model) saves for backward is
quantised per group of 256 elements (min/max in bfloat16) to ``bits`` bits with unbiased stochastic rounding, bit-
packed, and dequantised in backward (:class:`edgetrain.compress.GroupQuantCodec`): convs, linears, norms,
GELU/SiLU/any activation, attention, functional calls included, whatever module class makes them. What normalisation
ops (batch/layer/group/RMS norm), softmax / attention and activations without an exact mask (GELU, SiLU, sigmoid,
Hardswish, ...) save uses ``norm_bits`` (default 8): with 2-bit BatchNorm inputs, T1 fine-tuning of MobileNetV2
diverged to NaN within 20 steps (measured), attention probabilities pass their error to every token, and a nonlinear
derivative of a 2-bit input is biased (on the foreign zoo's EfficientNet the gradient cosine to plain PyTorch fell
to 0.12 with 2-bit SiLU inputs; docs/techniques.md). ReLU, ReLU6, hardtanh and LeakyReLU calls instead save a packed
1-bit mask, which is exact, and dropout keeps its mask as packed bits. Parameters are never quantised; forward
values are unchanged. Not combinable with ``checkpoint`` (its recomputation needs its own saved-tensor hooks).

Stored for backward: ``bits + 0.125`` bits per element of each saved activation (plus padding to whole
groups), 1 bit per ReLU/ReLU6 element, and small tensors (< ``min_bytes``, e.g. BN statistics) as they are.
Gradients are unbiased estimates of the exact ones (lossy by design: tested in tests/techniques/test_actnn.py).
"""

from __future__ import annotations

import dataclasses

from torch import nn

from edgetrain.compress.bitpack import SUPPORTED_BITS
from edgetrain.compress.codec import SavedCompressor, compress_scopes
from edgetrain.compress.masks import mask_dropout, mask_ops
from edgetrain.compress.quant import NOISE_MODES, GroupQuantCodec, quant_payload_bytes
from edgetrain.ops import Undo, intercept, register_state
from edgetrain.registry import TechniqueInfo, register
from edgetrain.structure import ACTIVATION_OPS, NORM_OPS, Structure
from edgetrain.technique import Technique, check

#: ops whose saved tensors use ``norm_bits``: normalisations (their backward passes the error on to every earlier
#: layer), softmax / attention (probabilities), and activations without an exact mask (GELU, SiLU, sigmoid, ...):
#: their derivative is nonlinear in the saved input, so unbiased rounding of it does not give an unbiased gradient
#: (ActNN's unbiasedness argument covers the weight gradients of conv/linear, linear in the saved input)
SENSITIVE_OPS = tuple(NORM_OPS) + ("softmax", "log_softmax", "scaled_dot_product_attention") + tuple(
    sorted(ACTIVATION_OPS - {"relu", "relu6", "hardtanh", "leaky_relu"}))


@dataclasses.dataclass(frozen=True, kw_only=True)
class ActNN(Technique):
    """Quantise saved activations to ``bits`` bits per element.

    Args:
        targets: modules whose ops' saved tensors are compressed (default: the whole model).
        bits: 1, 2, 4 or 8 bits per saved element (ActNN's default level L3 is 2). Memory per saved
            activation is ``(bits + 0.125) / 32`` of fp32; fewer bits -> more gradient variance.
        norm_bits: bits for what normalisation ops (batch/layer/group/RMS norm), softmax, attention and
            activations without an exact mask save (see the module docstring); ``None``: same as ``bits``.
            Default 8 (ActNN ``conf.py``: ``activation_compression_bits=[2, 8, 8]``).
        group_size: elements per min/max group (256 as ActNN); smaller groups -> lower error, more stats.
        noise: stochastic-rounding noise, ``pool`` (cheap, unbiased), ``independent`` (one ``rand`` per
            element, about 2x slower on CPU) or ``none`` (round to nearest; biased, for ablations).
        relu_mask: ReLU / ReLU6 / hardtanh / LeakyReLU save an exact 1-bit mask instead of a quantised tensor,
            dropout a 1-bit mask.
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

    def __init__(self, compressor: SavedCompressor, codecs: list | None = None) -> None:
        super().__init__()
        self.compressor = compressor
        self.codecs = list(codecs or [])

    def _codecs(self) -> list[GroupQuantCodec]:
        """The codecs this handle encodes with, in a fixed order (the default, then the one for sensitive ops)."""
        return self.codecs

    def state_dict(self) -> dict:
        """The rounding-noise state of each codec (generator, noise pool, encode count)."""
        return {"codecs": [c.state_dict() for c in self._codecs()]}

    def load_state_dict(self, state: dict) -> None:
        codecs = self._codecs()
        if len(state["codecs"]) != len(codecs):
            raise ValueError(f"{len(state['codecs'])} saved codec states for {len(codecs)} codecs")
        for codec, s in zip(codecs, state["codecs"]):
            codec.load_state_dict(s)


def _apply(model: nn.Module, cfg: ActNN, targets: list[str], structure: Structure) -> CompressHandle:
    codec = GroupQuantCodec(cfg.bits, cfg.group_size, cfg.noise)
    norm_codec = codec
    if cfg.norm_bits not in (None, cfg.bits):
        norm_codec = GroupQuantCodec(cfg.norm_bits, cfg.group_size, cfg.noise, seed=1)
    compressor = SavedCompressor(lambda: [*model.parameters(), *model.buffers()], cfg.min_bytes, codec)
    handle = CompressHandle(compressor, list(dict.fromkeys([codec, norm_codec])))
    compressor.owner = handle
    register_state(model, lambda: [c._pool for c in handle.codecs], handle)  # the rounding-noise pools
    scopes = compress_scopes(model, compressor, targets, handle)
    scope = None if scopes == [""] else (lambda name: structure.within(name, scopes))
    if cfg.relu_mask:
        mask_ops(model, handle, scope)
        mask_dropout(model, handle, scope)
    if norm_codec is not codec:
        intercept(model, SENSITIVE_OPS, compressor.using(norm_codec), handle, count=False, first=True)
    return handle


def estimate_layer(saved_shapes: list[tuple[int, ...]], cfg: ActNN, mask: bool = False) -> dict[str, int]:
    """Saved bytes of one layer whose backward saves tensors of ``saved_shapes`` (fp32), plain vs ActNN."""
    plain = sum(4 * _numel(s) for s in saved_shapes)
    if mask:
        return {"plain_bytes": plain, "saved_bytes": sum(-(-_numel(s) // 8) for s in saved_shapes)}
    return {"plain_bytes": plain,
            "saved_bytes": sum(quant_payload_bytes(s, cfg.bits, cfg.group_size) for s in saved_shapes)}


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
        default_targets=lambda model, structure: [""],
        looks_for="saved floating-point activations",
        limits='not with checkpoint (its recomputation needs its own saved-tensor hooks)',
        conflicts=frozenset({"checkpoint"}),
        exact=False,
        grad_tolerance=0.0,
        # one 2-bit draw at batch 4 (measured 0.75-1.0 on the zoo); unbiased over draws: tests/techniques/test_actnn.py
        grad_cosine=0.7,
        examples=(ActNN(), ActNN(bits=4, norm_bits=None, group_size=64, noise="independent"),
                  ActNN(bits=8, relu_mask=False)),
    )
)
