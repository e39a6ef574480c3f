"""MEBQAT: switchable fake quantization of conv/linear weights and inputs, for one model trained for every bit width.

Youn, Song, Kim, Bahk, *Bitwidth-Adaptive Quantization-Aware Neural Network Training: A Meta-Learning Approach*,
ECCV 2022, arXiv:2207.10188 (official code ``jsjs0369/MEBQAT``; spec algorithms_B §4). The technique is the
quantized model; the paper's training (bit widths as meta-learning tasks, self-distillation from the full-precision
pass) is :mod:`edgetrain.mebqat`, and the integer export :mod:`edgetrain.lowp.intexport`.

Every ``conv1d/2d/3d`` or ``linear`` call whose weight is a target layer's computes on ``Q_w(W)`` and ``Q_a(x)``:
two :class:`~edgetrain.lowp.fakequant.FakeQuant` modules registered on the layer (``mebqat_weight``,
``mebqat_input``), LSQ or Yu21 (DoReFa-style, Any-Precision DNN), with straight-through estimators. Their bit widths
switch at run time for the whole model (:func:`set_bits`); 32 is full precision (the quantizers are the identity).
LSQ's learned steps are parameters of those modules, so ``model.parameters()`` (and an optimizer built after
``apply_``) holds them and ``state_dict`` names them (``<layer>.mebqat_weight.step``); ``remove()`` deletes them.
By default the first and the last conv/linear layer of the model stay full precision, as in the paper's CIFAR
configs (``Q_BITS_W_FIRST = Q_BITS_W_LAST = Q_BITS_A_LAST = None``); ``quantize_first_last=True`` quantizes them.

Stored for backward beyond plain PyTorch (simulation, fp32): every quantized layer's op saves its quantised
weight (a new weight-sized tensor, where plain PyTorch saves the resident parameter) and its quantised input; LSQ
also keeps the raw input (for the step's gradient), Yu21 a 1-byte mask per input element (its weight chain is
recomputed in backward from the parameter). Measured on the zoo's resnet18 (64 px, batch 4, weights dominate):
54.6 MB saved against plain PyTorch's 7.3 MB. Nothing here saves training memory: it buys a deployable low-bit model
(``reduces={"weights"}``, of the exported model, :mod:`edgetrain.lowp.intexport`).
"""

from __future__ import annotations

import dataclasses

from torch import nn

from edgetrain.errors import ConfigError
from edgetrain.lowp.fakequant import (ACT_GRIDS, ALLOWED_BITS, DEFAULT_CANDIDATES, FP, METHODS, STEP_SIZES,
                                      FakeQuant, get_bits, set_bits)
from edgetrain.ops import Call, Undo, intercept
from edgetrain.registry import TechniqueInfo, register
from edgetrain.structure import Structure
from edgetrain.technique import Technique, check

__all__ = ["MEBQAT", "get_bits", "quantized_layers", "set_bits"]

KINDS = frozenset({"conv1d", "conv2d", "conv3d", "linear"})
WEIGHT, INPUT = "mebqat_weight", "mebqat_input"  # the quantizers' attribute names on a layer


def _bits_ok(b: object) -> bool:
    return isinstance(b, int) and not isinstance(b, bool) and (b == FP or b in ALLOWED_BITS)


@dataclasses.dataclass(frozen=True, kw_only=True)
class MEBQAT(Technique):
    """Fake-quantize the weights and inputs of conv/linear layers at run-time switchable bit widths.

    Args:
        method: ``"dorefa"`` (Yu21: the Any-Precision DNN quantizer of MEBQAT's CIFAR-10/SVHN configs; has 1 bit) or
            ``"lsq"`` (learned step sizes, 2..16 bits; adds one or a few scalar parameters per layer).
        weight_bits: weight bit width at apply (``None`` or 32: full precision); switch later with :func:`set_bits`.
        act_bits: input (activation) bit width at apply.
        candidates: the bit widths the model may be switched to (and that MEBQAT training samples from); full
            precision is always one. Default: MEBQAT's, 1..8 and 16 for dorefa, 2..8 and 16 for lsq.
        step_sizes: LSQ: ``"shared"`` (one step per quantizer for every bit width, MEBQAT's; the default) or
            ``"per_bitwidth"`` (one per candidate; our option).
        act_grid: LSQ inputs: ``"faithful"`` (``p = 2^b - 1``, a b-bit unsigned grid) or ``"upstream"``
            (``p = 2^b``, the MEBQAT code's quirk).
        quantize_first_last: also quantize the model's first and last conv/linear layer (default: they stay full
            precision, as in the paper). Only applies when the config gives no ``targets``.
        targets: layers to quantize (globs); default every conv/linear layer but the first and the last.
    """

    name = "mebqat"
    method: str = "dorefa"
    weight_bits: int | None = 8
    act_bits: int | None = 8
    candidates: tuple[int, ...] | None = None
    step_sizes: str = "shared"
    act_grid: str = "faithful"
    quantize_first_last: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        cls = MEBQAT
        check(self.method in METHODS, cls, "method", f"must be one of {', '.join(METHODS)}, got {self.method!r}")
        cands = self.candidates
        if cands is not None:
            check(isinstance(cands, (list, tuple)) and len(cands) > 0 and all(_bits_ok(b) and b != FP for b in cands),
                  cls, "candidates", f"must be a non-empty list of bit widths in 1..16, got {cands!r}")
            cands = tuple(sorted(set(cands)))
            check(self.method != "lsq" or 1 not in cands, cls, "candidates",
                  "LSQ has no 1-bit weights (p = 2^(b-1) - 1 = 0); 1 bit is dorefa's only")
            object.__setattr__(self, "candidates", cands)
        allowed = self.bit_set
        for field in ("weight_bits", "act_bits"):
            b = FP if getattr(self, field) is None else getattr(self, field)
            check(_bits_ok(b) and (b == FP or b in allowed), cls, field,
                  f"{b!r} is not in the candidate set ({', '.join(map(str, allowed))} or 32 = full precision)")
            object.__setattr__(self, field, b)
        check(self.step_sizes in STEP_SIZES, cls, "step_sizes",
              f"must be one of {', '.join(STEP_SIZES)}, got {self.step_sizes!r}")
        check(self.act_grid in ACT_GRIDS, cls, "act_grid",
              f"must be one of {', '.join(ACT_GRIDS)}, got {self.act_grid!r}")
        check(isinstance(self.quantize_first_last, bool), cls, "quantize_first_last",
              f"must be true/false, got {self.quantize_first_last!r}")

    @property
    def bit_set(self) -> tuple[int, ...]:
        """The quantised candidate bit widths (the method's default when ``candidates`` is None)."""
        return self.candidates if self.candidates is not None else DEFAULT_CANDIDATES[self.method]


def quantized_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The layers of ``model`` MEBQAT quantizes, by qualified name."""
    return {n: m for n, m in model.named_modules() if isinstance(m._modules.get(WEIGHT), FakeQuant)}


def _handler(targets: dict[str, nn.Module], modules: dict[str, nn.Module]):  # noqa: ANN202
    """Handler: a conv/linear call made by a target layer's own forward (its weight parameter, or a weight it
    computes from its parameters, e.g. weight standardisation), or by any module with a target's weight parameter,
    computes on the layer's quantized weight and input."""
    def handle(call: Call):  # noqa: ANN202
        w = call.arg(1, "weight")
        layer = targets.get(call.module)
        if layer is not None and isinstance(w, nn.Parameter) and w is not layer._parameters.get("weight"):
            layer = None  # the target's forward calling the op with another module's parameter
        if layer is None:
            caller = modules.get(call.module)
            if caller is not None and w is caller._parameters.get("weight"):
                return NotImplemented  # a layer that is not a target, using its own (maybe tied) weight
            layer = next((m for m in targets.values() if m._parameters.get("weight") is w), None)
        if layer is None or WEIGHT not in layer._modules:
            return NotImplemented
        if w is not layer._parameters.get("weight"):
            layer._modules[WEIGHT].computed = True  # the integer export cannot write such a weight as codes
        args, kwargs = list(call.args), dict(call.kwargs)
        for i, key, q in ((0, "input", layer._modules[INPUT]), (1, "weight", layer._modules[WEIGHT])):
            if len(args) > i:
                args[i] = q(args[i])
            else:
                kwargs[key] = q(kwargs[key])
        return call.proceed(*args, **kwargs)  # later handlers (frozen no-save ops), then the stock op

    return handle


def _first_last(structure: Structure) -> set[str]:
    layers = structure.layers_of(KINDS)
    return {layers[0], structure.classifier or layers[-1]} if layers else set()


def _apply(model: nn.Module, cfg: MEBQAT, targets: list[str], structure: Structure) -> Undo:
    modules = dict(model.named_modules())
    names = list(targets)
    chosen = cfg.targets is not None or set(names) != set(structure.layers_of(KINDS))  # the config's or the recipe's
    if not chosen and not cfg.quantize_first_last:
        names = [n for n in names if n not in _first_last(structure)]
    if not names:
        raise ConfigError(f"MEBQAT: no conv/linear layer of {structure.model} to quantize besides the first and the "
                          "last (set quantize_first_last=True or give targets)")
    for n in names:
        w = getattr(modules[n], "weight", None)
        if not isinstance(w, nn.Parameter) or not w.is_floating_point():
            raise ConfigError(f"MEBQAT: layer {n!r} has no floating-point weight parameter to quantize")
        if WEIGHT in modules[n]._modules:
            raise ConfigError(f"MEBQAT: layer {n!r} is already quantized (remove the first MEBQAT)")
    undo = Undo()  # no `changes`: the quantizers count only once a call reaches them (apply_'s check)
    layers = {}
    for n in names:
        layer, w = modules[n], modules[n].weight
        for attr, kind, bits in ((WEIGHT, "weight", cfg.weight_bits), (INPUT, "act", cfg.act_bits)):
            q = FakeQuant(cfg.method, kind, cfg.bit_set, bits, cfg.step_sizes, cfg.act_grid).to(w.device, w.dtype)
            layer.add_module(attr, q)
        layers[n] = layer

        def drop(layer: nn.Module = layer) -> None:
            for attr in (WEIGHT, INPUT):
                layer._modules.pop(attr, None)

        undo.add(drop)
    intercept(model, tuple(KINDS), _handler(layers, modules), undo, first=True)
    return undo


def _forward_bound(cfg: MEBQAT) -> float:
    """The eval-output change ``apply_`` accepts: 0 at full precision; for LSQ at 8 bits or more 0.15 (measured on
    the foreign zoo, relative error of the eval output: at 8 bits mobilenetv3 0.081, resnet 0.063, efficientnet
    0.029, vit 0.022, audio 0.021, bert 0.010, functional 0.004; at 16 bits at most 0.006); none below 8 bits, nor
    for Yu21, which renormalises the weights (``tanh / max|tanh| * mean|w|``) and clips inputs to [0, 1] at every
    bit width: another function by design."""
    if cfg.weight_bits == FP and cfg.act_bits == FP:
        return 0.0  # the quantizers are the identity
    if cfg.method == "lsq" and min(cfg.weight_bits, cfg.act_bits) >= 8:
        return 0.15
    return float("inf")


register(
    TechniqueInfo(
        config=MEBQAT,
        apply=_apply,
        summary="MEBQAT: run-time switchable LSQ / DoReFa (Any-Precision) fake quantization of conv/linear weights "
                "and inputs; one model trained for every bit width (edgetrain.mebqat), integer export",
        paper="Youn et al., Bitwidth-Adaptive Quantization-Aware Neural Network Training: A Meta-Learning Approach, "
              "ECCV 2022, arXiv:2207.10188",
        reduces=frozenset({"weights"}),  # of the deployed model (packed low-bit weights), not training memory
        layer_kinds=KINDS,
        looks_for="conv/linear layers with a weight parameter (the first and last stay full precision by default)",
        limits="Yu21 clips inputs to [0, 1] (after a ReLU, as in the paper); LSQ inputs with negatives get the signed "
               "grid; weights read inside nn.MultiheadAttention or transformers' Conv1D (addmm) are not reached; a "
               "non-target layer using a tied target weight in its own forward stays full precision",
        forward_bound=_forward_bound,
        conflicts=frozenset({"int8", "int8_frozen", "bnn_edge", "approx_multiply", "lora", "krona", "sparse_update"}),
        exact=False,  # lossy by design; tests/test_mebqat.py checks it against the papers' formulas
        grad_tolerance=0.0,
        # the zoo's config is LSQ at 16 bits (its steps left out of the comparison), measured: efficientnet 0.971,
        # mobilenetv3 0.986, resnet 0.993, audio 0.9993, bert, vit and functional above 0.9999. At 8 bits the
        # clipping of LSQ's initial step takes whole gradients away on the random-weight efficientnet (0.006) and
        # mobilenetv3 (0.44): a quantized step, not a bound worth stating. Yu21 computes another function
        grad_cosine=0.95,
        examples=(MEBQAT(), MEBQAT(method="lsq", weight_bits=4, act_bits=4),
                  MEBQAT(method="lsq", step_sizes="per_bitwidth", act_grid="upstream", quantize_first_last=True),
                  MEBQAT(weight_bits=1, act_bits=1, candidates=(1, 2, 4))),
    )
)
