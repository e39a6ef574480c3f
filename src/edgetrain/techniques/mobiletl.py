"""MobileTL: on-device transfer learning with inverted residual blocks.

Chiang, Frumkin, Liang, Marculescu, *MobileTL: On-device Transfer Learning with Inverted Residual Blocks*,
AAAI 2023, arXiv:2212.03246 (spec algorithms_A §3; no public code).

In each fine-tuned block (the last ``last_k_blocks`` of the model's blocks, or all; :mod:`edgetrain.structure`):

* internal BatchNorms (every ``batch_norm`` op of the block but the last, in call order) freeze their scale and
  running statistics and train only the shift: ``y = x * s + (beta - mean * s)`` with constant ``s``, which saves
  nothing for backward (reuses :mod:`._frozen`);
* the block's last BatchNorm trains normally (gamma, beta, batch statistics);
* activation calls backward from a bit-packed 1-bit mask: ReLU ``x > 0`` (exact), ReLU6 ``0 < x < 6``
  (``relu6_mode="exact"``) or ``x > threshold`` (``"step"``), hard-sigmoid (exact, the squeeze-excite gate),
  Hardswish ``x > threshold`` (MobileTL's two-valued "signed" derivative; approximate). A block that calls an
  activation with no such mask (GELU, SiLU, sigmoid, ...) or no BatchNorm is refused;
* conv weights train as usual (their inputs stay saved in full precision).

Blocks below the fine-tuned ones are frozen (no gradient, no saved activations; frozen layers use the
no-save forwards of :mod:`._frozen`); the classifier stays trainable.

Stored for backward per MobileNetV2 block (expansion t, C channels, per pixel; §3.4): conv inputs
``C + tC + tC`` and the last BN's input ``C`` in fp32, plus two 1-bit masks of ``tC`` each: ``14C + tC/16``
instead of ``26C`` (torchvision, in-place ReLU6) -> about 45% less (paper: 46.3%).
"""

from __future__ import annotations

import dataclasses

from torch import nn

from edgetrain.apply import Undo, set_requires_grad, under
from edgetrain.compress.masks import RELU6_MODES, mask_ops
from edgetrain.errors import ConfigError
from edgetrain.registry import TechniqueInfo, register
from edgetrain.structure import ACTIVATION_OPS, Structure, base_op
from edgetrain.technique import Technique, check
from edgetrain.techniques._frozen import freeze_ops, frozen_bn_ops
from edgetrain.techniques.freeze import head, last_blocks

#: activation ops with a 1-bit-mask backward (exact, or MobileTL's step for Hardswish)
MASKED = frozenset({"relu", "relu6", "hardtanh", "leaky_relu", "hardsigmoid", "hardswish"})


@dataclasses.dataclass(frozen=True, kw_only=True)
class MobileTL(Technique):
    """Shift-only internal BatchNorms, 1-bit activation masks, top-k fine-tuning.

    Args:
        last_k_blocks: fine-tune only the last k blocks (``None``: every block). Fewer blocks -> fewer
            saved activations, gradients, optimizer state and backward FLOPs.
        act_threshold: tau of the step derivative ``1[x > tau]`` (Hardswish; ReLU6 in ``step`` mode).
        relu6_mode: ``exact`` (mask ``0 < x < 6``, the true derivative) or ``step`` (``x > tau``).
        classifier: keep the classifier trainable.
    """

    name = "mobiletl"
    last_k_blocks: int | None = None
    act_threshold: float = 0.0
    relu6_mode: str = "exact"
    classifier: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        k = self.last_k_blocks
        check(k is None or (isinstance(k, int) and not isinstance(k, bool) and k >= 1), MobileTL, "last_k_blocks",
              f"must be null or an int >= 1, got {k!r}")
        check(isinstance(self.act_threshold, (int, float)) and not isinstance(self.act_threshold, bool), MobileTL,
              "act_threshold", f"must be a number, got {self.act_threshold!r}")
        check(self.relu6_mode in RELU6_MODES, MobileTL, "relu6_mode",
              f"must be one of {list(RELU6_MODES)}, got {self.relu6_mode!r}")
        check(isinstance(self.classifier, bool), MobileTL, "classifier", f"must be true/false, got {self.classifier!r}")


def tuned_blocks(structure: Structure, cfg: MobileTL) -> list[str]:
    """Names of the blocks MobileTL fine-tunes."""
    if cfg.last_k_blocks is None:
        return list(structure.blocks)
    return last_blocks(structure, cfg.last_k_blocks, "MobileTL.last_k_blocks")


def block_norms(structure: Structure, block: str) -> list[str]:
    """The BatchNorm layers a block's ``batch_norm`` ops use, in call order (a block without one, e.g. a final
    conv, trains its convs plainly); refuses activations MobileTL cannot mask."""
    ops = [op for op in structure.ops if structure.within(op.module, [block])]
    bad = sorted({f"{op.name} in {op.module}" for op in ops
                  if base_op(op.name) in ACTIVATION_OPS and base_op(op.name) not in MASKED})
    if bad:
        raise ConfigError(f"MobileTL: block {block!r} calls {bad[0]}: no 1-bit-mask backward for it (supported: "
                          f"{', '.join(sorted(MASKED))})")
    norms = []
    for op in ops:
        if base_op(op.name) == "batch_norm":
            owner = op.params[0].rpartition(".")[0] if op.params else op.module
            if owner not in norms:
                norms.append(owner)
    return norms


def _apply(model: nn.Module, cfg: MobileTL, targets: list[str], structure: Structure) -> Undo:
    modules = dict(model.named_modules())
    tuned = tuned_blocks(structure, cfg)
    roots = tuned + (head(structure, "MobileTL.classifier") if cfg.classifier else [])
    norms = {b: block_norms(structure, b) for b in tuned}  # validates before changing anything
    if not any(norms.values()):
        raise ConfigError(f"MobileTL: the tuned blocks {tuned} have no batch_norm op; MobileTL needs conv-BN-"
                          "activation blocks")
    internal = [bn for b in tuned for bn in norms[b][:-1]]
    for bn in internal:
        if getattr(modules[bn], "running_mean", None) is None:
            raise ConfigError(f"MobileTL: {bn} has no running statistics (track_running_stats=False)")
    undo = Undo()
    freeze_outside = [p for n, p in model.named_parameters() if not under(n.rpartition(".")[0], roots)]
    set_requires_grad(freeze_outside, False, undo)
    freeze_ops(model, lambda name: not under(name, roots), undo)
    weights = [modules[bn].weight for bn in internal if getattr(modules[bn], "weight", None) is not None]
    set_requires_grad(weights, False, undo)  # internal BNs: frozen scale and statistics, trainable shift
    names = set(internal)
    frozen_bn_ops(model, lambda name: name in names, undo)
    mask_ops(model, undo, lambda name: under(name, tuned), threshold=float(cfg.act_threshold),
             relu6_mode=cfg.relu6_mode, step_hardswish=True)
    return undo


def irb_saved_elements(c: int, t: int = 6, inplace_relu6: bool = True) -> dict[str, float]:
    """Saved elements per pixel of one stride-1 MobileNetV2 block (§3.4), plain vs MobileTL (fp32 units).

    Plain (torchvision, in-place ReLU6): X0, Y1, A1, Y2, A2, Y3 = ``2C + 4tC``; with out-of-place ReLU6 each
    activation also keeps its input (``+2tC``). MobileTL: X0, A1, A2, Y3 plus two masks of ``tC`` bits.
    """
    plain = 2 * c + 4 * t * c + (0 if inplace_relu6 else 2 * t * c)
    mobiletl = 2 * c + 2 * t * c + 2 * t * c / 32
    return {"plain": plain, "mobiletl": mobiletl, "reduction": 1 - mobiletl / plain}


register(
    TechniqueInfo(
        config=MobileTL,
        apply=_apply,
        summary="fine-tune the top-k blocks: shift-only internal BNs (nothing saved), 1-bit activation masks",
        paper="Chiang et al., MobileTL: On-device Transfer Learning with Inverted Residual Blocks, AAAI 2023, "
              "arXiv:2212.03246",
        reduces=frozenset({"activations", "grads", "optimizer", "compute"}),
        default_targets=lambda model, structure: [],
        looks_for="blocks with BatchNorm and maskable activations",
        limits="needs BatchNorm blocks whose activations have a 1-bit mask (ReLU family, hard-swish/-sigmoid); "
               "refuses GELU/SiLU/tanh (transformers, EfficientNet)",
        conflicts=frozenset({"freeze", "bias_only"}),
        exact=False,
        grad_tolerance=0.0,
        grad_cosine=0.9,  # Hardswish's step derivative (measured 0.96 on MobileNetV3; exact masks elsewhere)
        examples=(MobileTL(), MobileTL(last_k_blocks=2, relu6_mode="step", act_threshold=0.5)),
    )
)
