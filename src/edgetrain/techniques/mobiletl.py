"""MobileTL: on-device transfer learning with inverted residual blocks.

Chiang, Frumkin, Liang, Marculescu, *MobileTL: On-device Transfer Learning with Inverted Residual Blocks*,
AAAI 2023, arXiv:2212.03246 (spec algorithms_A §3; no public code).

In each fine-tuned block (the last ``last_k_blocks`` of ``model.block_names``, or all):

* internal BatchNorms (every BN of the block but the last) freeze their scale and running statistics and
  train only the shift: ``y = x * s + (beta - mean * s)`` with constant ``s``, which saves nothing for
  backward (reuses :mod:`._frozen`);
* the block's last BatchNorm trains normally (gamma, beta, batch statistics);
* ReLU / ReLU6 / Hardswish backward from a bit-packed 1-bit mask: ReLU ``x > 0`` (exact), ReLU6
  ``0 < x < 6`` (``relu6_mode="exact"``) or ``x > threshold`` (``"step"``), Hardswish ``x > threshold``
  (MobileTL's two-valued "signed" derivative; approximate);
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

from edgetrain.apply import Undo, blocks, classifier, patch_forward, set_requires_grad, under
from edgetrain.compress.masks import MASKABLE, RELU6_MODES, masked_forward
from edgetrain.errors import ConfigError
from edgetrain.registry import TechniqueInfo, register
from edgetrain.technique import Technique, check
from edgetrain.techniques._frozen import frozen_bn_forward, patch_frozen

#: Activations MobileTL cannot turn into a 1-bit mask (a fine-tuned block containing one is an error).
UNSUPPORTED_ACTS = (nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardsigmoid, nn.LeakyReLU, nn.ELU, nn.Mish)


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


def tuned_blocks(model: nn.Module, cfg: MobileTL) -> list[str]:
    """Names of the blocks MobileTL fine-tunes."""
    bl = blocks(model)
    if cfg.last_k_blocks is None:
        return bl
    if cfg.last_k_blocks > len(bl):
        raise ConfigError(f"MobileTL.last_k_blocks: {cfg.last_k_blocks} > the model's {len(bl)} blocks")
    return bl[-cfg.last_k_blocks:]


def _check_block(name: str, block: nn.Module) -> list[tuple[str, nn.Module]]:
    bns = [(n, m) for n, m in block.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        raise ConfigError(f"MobileTL: block {name!r} has no BatchNorm; MobileTL needs conv-BN-activation blocks")
    for n, m in block.named_modules():
        if isinstance(m, UNSUPPORTED_ACTS):
            raise ConfigError(f"MobileTL: {name}.{n} is {type(m).__name__}; supported activations: "
                              f"{', '.join(t.__name__ for t in MASKABLE)}")
    for n, m in bns:
        if m.running_mean is None:
            raise ConfigError(f"MobileTL: {name}.{n} has no running statistics (track_running_stats=False)")
    return bns


def _apply(model: nn.Module, cfg: MobileTL, targets: list[str]) -> Undo:
    modules = dict(model.named_modules())
    tuned = tuned_blocks(model, cfg)
    roots = tuned + ([classifier(model)] if cfg.classifier else [])
    plan = {name: _check_block(name, modules[name]) for name in tuned}  # validate before changing anything
    undo = Undo()
    set_requires_grad([p for n, p in model.named_parameters() if not under(n.rpartition(".")[0], roots)], False, undo)
    patch_frozen(model, [n for n in modules if n and not under(n, roots)], undo)
    for name, bns in plan.items():
        for _, bn in bns[:-1]:  # internal BNs: frozen scale and statistics, trainable shift
            if bn.weight is not None:
                set_requires_grad([bn.weight], False, undo)
            patch_forward(bn, frozen_bn_forward(bn), undo)
        for m in modules[name].modules():
            if type(m) in MASKABLE and "forward" not in m.__dict__:
                patch_forward(m, masked_forward(m, float(cfg.act_threshold), cfg.relu6_mode), undo)
    return undo


def irb_saved_elements(c: int, t: int = 6, inplace_relu6: bool = True) -> dict[str, float]:
    """Saved elements per pixel of one stride-1 MobileNetV2 block (§3.4), plain vs MobileTL (fp32 units).

    Plain (torchvision, in-place ReLU6): X0, Y1, A1, Y2, A2, Y3 = ``2C + 4tC``; with out-of-place ReLU6 each
    activation also keeps its input (``+2tC``). MobileTL: X0, A1, A2, Y3 plus two masks of ``tC`` bits.
    """
    plain = 2 * c + 4 * t * c + (0 if inplace_relu6 else 2 * t * c)
    mobiletl = 2 * c + 2 * t * c + 2 * t * c / 32
    return {"plain": plain, "mobiletl": mobiletl, "reduction": 1 - mobiletl / plain}


def estimate(table, cfg, targets, model) -> None:  # noqa: ANN001
    """Cost model: nothing to add. The trace sees the frozen blocks, the shift-only BatchNorms (``x·s + t``
    keeps only ``s``), the fp32 conv inputs and the last BN by rule, and counts the 1-bit masks of
    :func:`edgetrain.compress.masks.masked_forward` itself."""


register(
    TechniqueInfo(
        config=MobileTL,
        apply=_apply,
        summary="fine-tune the top-k blocks: shift-only internal BNs (nothing saved), 1-bit activation masks",
        paper="Chiang et al., MobileTL: On-device Transfer Learning with Inverted Residual Blocks, AAAI 2023, "
              "arXiv:2212.03246",
        reduces=frozenset({"activations", "grads", "optimizer", "compute"}),
        default_targets=lambda model: [],
        conflicts=frozenset({"freeze", "bias_only"}),
        exact=False,
        grad_tolerance=0.0,
        examples=(MobileTL(), MobileTL(last_k_blocks=2, relu6_mode="step", act_threshold=0.5)),
        estimate=estimate,
    )
)
