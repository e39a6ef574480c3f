"""LightNorm: range batch normalisation, low-bit floating-point BN, block floating point.

Noh, Park, Park, Koo, Choi, Kung, *LightNorm: Area and Energy-Efficient Batch Normalization Hardware for On-Device
DNN Training*, ICCD 2022 (spec algorithms_A §7; the authors' simulation is BFPSim-based, ``bfp/module.py``).

Every training-mode ``batch_norm`` call whose weight is a targeted layer's (any BatchNorm1d/2d/3d, or a model's own
module calling ``F.batch_norm``) runs :class:`edgetrain.lowp.norm.LightNormFunction`: three composable pieces,

* ``range_bn``: the scale is the mean chunk range times ``C`` (no variance, no square root);
* ``fwd_format``/``bwd_format``: BN's arithmetic and storage in low-bit floats by bit manipulation of fp32 (fp10
  1-5-4 forward, fp10 1-6-3 backward, statistics and parameter gradients with ``acc_bits`` more mantissa bits);
  ``"fp32"`` for both turns this piece off;
* ``bfp_bits``: block floating point on the tensors BN reads and writes (input and output ``bfp_bits``, the
  gradients ``bfp_grad_bits``; ``bfp_block`` channels share an exponent); ``None`` turns it off.

What BN saves for backward is its input in the stored low-bit form (BFP codes: ~1 byte per element; low-bit float
codes: 2 bytes) instead of fp32. Eval mode is the stock fp32 op on the running statistics (range BN keeps
``sigma^2`` in ``running_var``), so a LightNorm-trained model deploys, folds and exports as a plain BN model.

This is an emulation: no low-bit hardware runs here. The numbers it changes are the ones the paper's hardware would
compute (to the stated deviations of :mod:`edgetrain.lowp.formats` and :mod:`edgetrain.lowp.bfp`); the CPU step
is slower than stock BN, and the energy/area claims are not reproduced (spec §7.3 pitfall 6).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from edgetrain.errors import ConfigError
from edgetrain.lowp.bfp import BFP, VARIANTS
from edgetrain.lowp.formats import FORMATS, ROUNDINGS, get_format
from edgetrain.lowp.norm import SCALES, Numerics, lightnorm_batch_norm
from edgetrain.ops import Call, Undo, intercept
from edgetrain.registry import TechniqueInfo, register
from edgetrain.structure import Structure
from edgetrain.technique import Technique, check


def _int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclasses.dataclass(frozen=True, kw_only=True)
class LightNorm(Technique):
    """LightNorm's BatchNorm on the targeted BN layers (default: every BatchNorm with an affine weight).

    Args:
        range_bn: range normalisation (Banner et al. 2018) instead of the variance.
        num_chunks: K chunks per channel for range BN (8 in LightNorm's simulation; Banner's default is 16).
        scale: ``"banner"`` (``C = 1/sqrt(2 ln s)``, faithful) or ``"d2"`` (the Gaussian expected range: keeps a
            pre-trained model's scale; ours).
        fwd_format, bwd_format: floating-point formats of the forward and backward BN arithmetic (names in
            :data:`edgetrain.lowp.formats.FORMATS`; ``"fp32"`` = off). Defaults: the paper's fp10 1-5-4 / 1-6-3.
        acc_bits: extra mantissa bits of the statistics and parameter-gradient accumulations (the simulation's +8).
        rounding: ``"truncate"`` (the simulation's bit masking, biased toward zero) or ``"nearest"``.
        bfp_bits: mantissa bits (leading one included) of the BFP input and output; ``None``: no BFP. 5 in the
            paper's ``default_FP10_154_bfloat_dim32`` config.
        bfp_grad_bits: mantissa bits of the BFP gradients (8 in that config).
        bfp_block: channels per block (32 in that config).
        bfp_variant: ``"flexblock"`` (the simulation's: second-largest exponent) or ``"standard"``.
    """

    name = "lightnorm"
    range_bn: bool = True
    num_chunks: int = 8
    scale: str = "banner"
    fwd_format: str = "fp10_154"
    bwd_format: str = "fp10_163"
    acc_bits: int = 8
    rounding: str = "truncate"
    bfp_bits: int | None = 5
    bfp_grad_bits: int = 8
    bfp_block: int = 32
    bfp_variant: str = "flexblock"

    def __post_init__(self) -> None:
        super().__post_init__()
        cls = LightNorm
        check(isinstance(self.range_bn, bool), cls, "range_bn", f"must be true/false, got {self.range_bn!r}")
        check(_int(self.num_chunks) and self.num_chunks >= 1, cls, "num_chunks",
              f"must be an int >= 1, got {self.num_chunks!r}")
        check(self.scale in SCALES, cls, "scale", f"must be one of {list(SCALES)}, got {self.scale!r}")
        for field in ("fwd_format", "bwd_format"):
            value = getattr(self, field)
            check(value in FORMATS, cls, field, f"unknown floating-point format {value!r}; known: {', '.join(FORMATS)}")
        check(_int(self.acc_bits) and 0 <= self.acc_bits <= 23, cls, "acc_bits",
              f"must be an int in [0, 23], got {self.acc_bits!r}")
        check(self.rounding in ROUNDINGS, cls, "rounding", f"must be one of {list(ROUNDINGS)}, got {self.rounding!r}")
        check(self.bfp_bits is None or (_int(self.bfp_bits) and 2 <= self.bfp_bits <= 7), cls, "bfp_bits",
              f"must be null or an int in [2, 7] (one signed byte per element), got {self.bfp_bits!r}")
        check(_int(self.bfp_grad_bits) and 2 <= self.bfp_grad_bits <= 15, cls, "bfp_grad_bits",
              f"must be an int in [2, 15], got {self.bfp_grad_bits!r}")
        check(_int(self.bfp_block) and 2 <= self.bfp_block <= 256, cls, "bfp_block",
              f"must be an int in [2, 256] (channels per block), got {self.bfp_block!r}")
        check(self.bfp_variant in VARIANTS, cls, "bfp_variant",
              f"must be one of {list(VARIANTS)}, got {self.bfp_variant!r}")

    def numerics(self) -> Numerics:
        """The :class:`Numerics` this config asks for."""
        bfp = None if self.bfp_bits is None else BFP(self.bfp_bits, self.bfp_block, self.bfp_variant, self.rounding)
        grad = None if self.bfp_bits is None else BFP(self.bfp_grad_bits, self.bfp_block, self.bfp_variant,
                                                      self.rounding)
        return Numerics(get_format(self.fwd_format), get_format(self.bwd_format), self.acc_bits, self.rounding,
                        bfp, grad, self.range_bn, self.num_chunks, self.scale)


def lightnorm_handler(weights: set[int], num: Numerics, modules: dict[str, nn.Module] | None = None):  # noqa: ANN201
    """Handler: training-mode ``batch_norm`` calls whose weight is in ``weights`` run LightNorm's BN (``modules``:
    the model's modules by name, so that a call made in eval mode by a BatchNorm without running statistics, which
    torch makes with ``training=True``, stays the stock op)."""

    def handle(call: Call):  # noqa: ANN202
        x, w = call.args[0], call.arg(3, "weight")
        if id(w) not in weights or not call.arg(5, "training", False) or not x.is_floating_point():
            return NotImplemented  # eval mode: the stock op on the running statistics
        caller = (modules or {}).get(call.module)
        if caller is not None and not caller.training:
            return NotImplemented  # eval mode of a BatchNorm that has no running statistics
        if not w.requires_grad and call.arg(1, "running_mean") is not None:
            return NotImplemented  # frozen by another technique (its no-save affine op, or stock)
        if x.numel() // x.shape[1] < 2:
            return NotImplemented  # one value per channel: the stock op raises its own error
        args = (call.arg(1, "running_mean"), call.arg(2, "running_var"), w, call.arg(4, "bias"),
                call.arg(6, "momentum", 0.1), call.arg(7, "eps", 1e-5), num)
        if x.dtype in (torch.float32, torch.float64):
            return lightnorm_batch_norm(x, *args)
        # bfloat16/float16 (a half model, autocast): the emulation's bit manipulation is of fp32, so BN runs there
        rm, rv, w, b = args[:4]
        y = lightnorm_batch_norm(x.float(), rm, rv, None if w is None else w.float(), None if b is None else b.float(),
                                 *args[4:])
        return y.to(x.dtype)

    return handle


def _apply(model: nn.Module, cfg: LightNorm, targets: list[str], structure: Structure) -> Undo:
    if not targets:
        raise ConfigError(f"LightNorm: {structure.model} has no BatchNorm layer with an affine weight "
                          "(LayerNorm/GroupNorm models are not LightNorm's)")
    modules = dict(model.named_modules())
    # the parameters the traced batch_norm calls read (a model's own module may name them as it likes)
    params = [model.get_parameter(p) for n in targets for p in structure.layers[n].params] \
        if all(n in structure.layers for n in targets) else \
        [modules[n].weight for n in targets if getattr(modules[n], "weight", None) is not None]
    trained = [p for p in params if p.requires_grad]
    if not trained:
        raise ConfigError(f"LightNorm: every targeted BatchNorm of {structure.model} is frozen "
                          f"({targets[0] or structure.model}, ...); LightNorm changes how a BatchNorm trains")
    undo = Undo()
    intercept(model, ("batch_norm",), lightnorm_handler({id(p) for p in params}, cfg.numerics(), modules), undo)
    # the targets were resolved from the traced batch_norm ops: each runs LightNorm's BN in every training step
    # (eval mode runs the stock op, so apply's eval-mode check sees no hit)
    undo.changes += len(trained)
    return undo


register(
    TechniqueInfo(
        config=LightNorm,
        apply=_apply,
        summary="LightNorm: range BN, fp10 BN arithmetic and BFP tensors; BN's saved input stored in ~1 byte",
        paper="Noh et al., LightNorm: Area and Energy-Efficient Batch Normalization Hardware for On-Device DNN "
              "Training, ICCD 2022",
        reduces=frozenset({"activations", "compute"}),  # compute: of the simulated BN unit, not the CPU's
        layer_kinds=frozenset({"batch_norm"}),
        looks_for="BatchNorm layers with an affine weight",
        limits="training-mode BatchNorm only (eval runs the stock op); affine=False and frozen BatchNorms are not "
               "reached; bfloat16/float16 inputs run the emulation in fp32; a BatchNorm that Checkpoint targets itself "
               "(not a block holding it) recomputes with the stock op and fails checkpoint's check; "
               "an emulation: slower than stock BN on the CPU",
        forward_bound=lambda cfg: 0.0,  # eval mode is the stock op
        exact=False,
        grad_tolerance=0.0,  # lossy by design; tests/test_lightnorm.py holds it to references
        # the zoo runs LightNorm(range_bn=False) (range BN is another normaliser: not comparable to plain BN's
        # gradients). fp10 + 5-bit BFP on every BN of a randomly initialised net, one step at batch 4, measured:
        # EfficientNet-B0 0.069, MobileNetV3 0.263, audio CNN 0.753, ResNet 0.824, functional 0.997. The error
        # compounds over depth (fp32 formats without BFP: 1.0, tests/techniques/test_lightnorm.py); whether it
        # trains is the benchmark's question (docs/low_precision.md)
        grad_cosine=0.05,
        examples=(LightNorm(), LightNorm(range_bn=False, bfp_bits=None, fwd_format="bfloat16", bwd_format="bfloat16"),
                  LightNorm(scale="d2", bfp_variant="standard", bfp_block=4, rounding="nearest")),
    )
)
