"""ApproxMultiply: train with a simulated approximate floating-point multiplier in every Linear/Conv2d GEMM.

Gong, Saadat, Gamaarachchi, Javaid, Hu, Parameswaran, *ApproxTrain: Fast Simulation of Approximate Multipliers
for DNN Training and Inference*, IEEE TCAD 2023, arXiv:2209.04161 (spec ``algorithms_B.md`` §1).

Every product of the forward GEMM and of both backward GEMMs (input and weight gradients) of the targeted layers
goes through AMSim: operands truncated to ``mantissa_bits`` (format (1, 8, M) in an fp32 container), sign and
exponent exact, mantissa product from the multiplier's lookup table; accumulation stays exact fp32. This answers a
hardware designer's question ("does the net still train on my multiplier?"); it saves nothing on the CPU that runs
the simulation (it is slower than native fp32: see ``docs/approx.md``). What it stores for backward: the layer
input and weight in fp32, as plain PyTorch.

Registered ``reduces={"compute"}``: the conformance suite requires a non-empty set and this is the resource the
simulated hardware multiplier reduces (area/energy per multiply) -- **not** CPU time here.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from edgetrain.approx.layers import approx_conv2d, approx_linear
from edgetrain.approx.lut import MAX_LUT_BITS, get_lut
from edgetrain.approx.multipliers import MULTIPLIERS
from edgetrain.errors import ConfigError
from edgetrain.ops import Call, Undo, intercept, register_state
from edgetrain.registry import TechniqueInfo, register
from edgetrain.structure import Structure
from edgetrain.technique import Technique, check
from edgetrain.techniques._frozen import conv_args, explicit_padding


@dataclasses.dataclass(frozen=True, kw_only=True)
class ApproxMultiply(Technique):
    """Simulate an approximate multiplier in the forward and backward GEMMs of Linear and Conv2d layers.

    Args:
        model: built-in multiplier: ``"mitchell"`` (logarithmic), ``"mbm"`` (minimally biased) or
            ``"trunc_exact"`` (exact product, inputs and output truncated: bfloat16-like at M = 7).
        mantissa_bits: M, the mantissa width of the (1, 8, M) format, 1..11 (7 = bfloat16 layout). The LUT has
            4^M entries (128 KiB at M = 7, 32 MiB at M = 11).
        targets: globs over module names; default every layer whose weight feeds a ``linear`` or ``conv2d`` call
            (any module class: the layer's own call is intercepted).
    """

    name = "approx_multiply"
    model: str = "mitchell"
    mantissa_bits: int = 7

    def __post_init__(self) -> None:
        super().__post_init__()
        cls = ApproxMultiply
        check(self.model in MULTIPLIERS, cls, "model",
              f"unknown multiplier {self.model!r}; choose one of {sorted(MULTIPLIERS)}")
        check(isinstance(self.mantissa_bits, int) and not isinstance(self.mantissa_bits, bool)
              and 1 <= self.mantissa_bits <= MAX_LUT_BITS, cls, "mantissa_bits",
              f"must be an int in 1..{MAX_LUT_BITS} (LUT of 4^M entries), got {self.mantissa_bits!r}")


def _check_layer(name: str, module: nn.Module) -> None:
    w = getattr(module, "weight", None)
    if not isinstance(w, nn.Parameter):
        raise ConfigError(f"ApproxMultiply: {name!r} has no weight parameter")
    if w.dtype != torch.float32:
        raise ConfigError(f"ApproxMultiply: {name!r} has {w.dtype} weights; the simulation needs float32 "
                          "(an fp32 container of the (1, 8, M) format)")


def approx_handler(weights: set[int], lut) -> Any:  # noqa: ANN001
    """Handler: ``linear``/``conv2d`` calls whose weight is a targeted layer's run through AMSim."""

    def handle(call: Call) -> Any:
        w = call.arg(1, "weight")
        if id(w) not in weights:
            return NotImplemented
        if call.name == "linear":
            return approx_linear(call.args[0], w, call.arg(2, "bias"), lut)
        x, w, b, stride, padding, dilation, groups = conv_args(call)
        x, padding = explicit_padding(x, w, padding, dilation)
        return approx_conv2d(x, w, b, _pair(stride), _pair(padding), _pair(dilation), groups, lut)

    return handle


def _pair(v: Any) -> tuple[int, int]:
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)  # type: ignore[return-value]


def _apply(model: nn.Module, cfg: ApproxMultiply, targets: list[str], structure: Structure) -> Undo:
    lut = get_lut(cfg.model, cfg.mantissa_bits)
    modules = dict(model.named_modules())
    if not targets:
        opaque = f" (only {', '.join(structure.opaque)}, read inside composite calls edgetrain cannot see into)" \
            if structure.opaque else ""
        raise ConfigError(f"ApproxMultiply: {structure.model} has no linear or conv2d layer to simulate{opaque}")
    for name in targets:
        _check_layer(name, modules[name])
    undo = Undo()
    intercept(model, ("linear", "conv2d"), approx_handler({id(modules[n].weight) for n in targets}, lut), undo,
              first=True)
    register_state(model, lambda: [lut.bits, lut.values], undo)  # the multiplier's table: 4^M entries, twice
    return undo


register(
    TechniqueInfo(
        config=ApproxMultiply,
        apply=_apply,
        summary="ApproxTrain/AMSim: LUT-simulated approximate fp multiplier in forward and both backward GEMMs",
        paper="Gong et al., ApproxTrain: Fast Simulation of Approximate Multipliers for DNN Training and Inference, "
              "IEEE TCAD 2023, arXiv:2209.04161",
        reduces=frozenset({"compute"}),  # of the simulated hardware multiplier, not of the CPU (module docstring)
        layer_kinds=frozenset({"linear", "conv2d"}),
        looks_for="linear or conv2d layers",
        limits='float32 weights; slow on grouped convs (one GEMM per group)',
        forward_bound=lambda cfg: 0.5,  # a simulated multiplier changes every product (docs/approx.md)
        exact=False,
        grad_tolerance=0.0,  # float64 conformance does not apply (fp32 format); reference tests in tests/approx/
        grad_cosine=0.99,  # Mitchell at M=7 on the zoo's last two layers (measured 0.997-1.0)
        examples=(ApproxMultiply(), ApproxMultiply(model="mbm", mantissa_bits=3, targets=("features.*",))),
    )
)
