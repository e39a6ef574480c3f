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

import torch
from torch import nn

from edgetrain.apply import Undo, patch_forward
from edgetrain.approx.layers import approx_linear, conv_forward
from edgetrain.approx.lut import MAX_LUT_BITS, get_lut
from edgetrain.approx.multipliers import MULTIPLIERS
from edgetrain.errors import ConfigError
from edgetrain.registry import TechniqueInfo, register
from edgetrain.technique import Technique, check


@dataclasses.dataclass(frozen=True, kw_only=True)
class ApproxMultiply(Technique):
    """Simulate an approximate multiplier in the forward and backward GEMMs of Linear and Conv2d layers.

    Args:
        model: built-in multiplier: ``"mitchell"`` (logarithmic), ``"mbm"`` (minimally biased) or
            ``"trunc_exact"`` (exact product, inputs and output truncated: bfloat16-like at M = 7).
        mantissa_bits: M, the mantissa width of the (1, 8, M) format, 1..11 (7 = bfloat16 layout). The LUT has
            4^M entries (128 KiB at M = 7, 32 MiB at M = 11).
        targets: globs over module names; default every ``nn.Linear`` and ``nn.Conv2d``.
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


def _check_module(name: str, module: nn.Module) -> None:
    if isinstance(module, nn.modules.linear.NonDynamicallyQuantizableLinear):
        raise ConfigError(f"ApproxMultiply: {name!r} is an attention output projection whose forward is never called "
                          "(nn.MultiheadAttention uses its weights directly); it cannot be simulated")
    if type(module) not in (nn.Linear, nn.Conv2d):
        raise ConfigError(f"ApproxMultiply: {name!r} is a {type(module).__name__}; only nn.Linear and nn.Conv2d")
    if module.weight.dtype != torch.float32:
        raise ConfigError(f"ApproxMultiply: {name!r} has {module.weight.dtype} weights; the simulation needs float32 "
                          "(an fp32 container of the (1, 8, M) format)")


def _apply(model: nn.Module, cfg: ApproxMultiply, targets: list[str]) -> Undo:
    lut = get_lut(cfg.model, cfg.mantissa_bits)
    modules = dict(model.named_modules())
    if not targets:
        raise ConfigError(f"ApproxMultiply: {type(model).__name__} has no nn.Linear or nn.Conv2d to simulate")
    for name in targets:
        _check_module(name, modules[name])
    undo = Undo()
    try:
        for name in targets:
            m = modules[name]
            if isinstance(m, nn.Linear):
                fwd = lambda x, m=m: approx_linear(x, m.weight, m.bias, lut)  # noqa: E731
            else:
                fwd = conv_forward(m, lut)
            # the approximate Functions keep their input x (the cost model's trace counts it); a conv with a
            # non-zero padding mode keeps its padded copy instead (counted by ``estimate``)
            fwd.saves_input = isinstance(m, nn.Linear) or m.padding_mode == "zeros"
            patch_forward(m, fwd, undo)
    except BaseException:
        undo.remove()
        raise
    return undo


def estimate(table, cfg: ApproxMultiply, targets: list[str], model: nn.Module) -> None:  # noqa: ANN001
    """Cost model: the approximate Functions keep their fp32 input (and the weight, a parameter); the trace
    counts the input of every simulated layer once (``saves_input``). A conv with a non-zero padding mode keeps
    its padded input instead, added here."""
    modules = dict(model.named_modules())
    for name in targets:
        m = modules[name]
        if isinstance(m, nn.Conv2d) and m.padding_mode != "zeros" and name in table.shapes:
            c, h, w = table.shapes[name][0]
            ph, pw = m.padding if isinstance(m.padding, tuple) else (m.padding, m.padding)
            row = table.row(name)
            row.saved_per_sample += c * (h + 2 * ph) * (w + 2 * pw) * 4
            row.technique = "approx_multiply"


register(
    TechniqueInfo(
        config=ApproxMultiply,
        apply=_apply,
        summary="ApproxTrain/AMSim: LUT-simulated approximate fp multiplier in forward and both backward GEMMs",
        paper="Gong et al., ApproxTrain: Fast Simulation of Approximate Multipliers for DNN Training and Inference, "
              "IEEE TCAD 2023, arXiv:2209.04161",
        reduces=frozenset({"compute"}),  # of the simulated hardware multiplier, not of the CPU (module docstring)
        layer_types=(nn.Linear, nn.Conv2d),
        exact=False,
        grad_tolerance=0.0,  # float64 conformance does not apply (fp32 format); reference tests in tests/approx/
        examples=(ApproxMultiply(), ApproxMultiply(model="mbm", mantissa_bits=3, targets=("features.*",))),
        estimate=estimate,
    )
)
