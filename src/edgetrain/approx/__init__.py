"""Approximate-multiplier training simulation (ApproxTrain / AMSim) on the CPU.

Gong, Saadat, Gamaarachchi, Javaid, Hu, Parameswaran, *ApproxTrain: Fast Simulation of Approximate Multipliers
for DNN Training and Inference*, IEEE TCAD 2023, arXiv:2209.04161. Every multiply of a Linear/Conv2d forward and
of both backward GEMMs goes through a simulated approximate floating-point multiplier: sign and exponent exact,
the mantissa product from a 4^M-entry lookup table built from a designer's functional model.

* :mod:`~edgetrain.approx.multipliers`: functional models (``trunc_exact``, ``mitchell``, ``mbm``);
* :mod:`~edgetrain.approx.lut`: :func:`build_lut` (M = 1..11);
* :mod:`~edgetrain.approx.amsim`: :func:`amul` (element-wise) and the per-element golden model;
* :mod:`~edgetrain.approx.gemm`: :func:`amm` (approximate GEMM, fp32 accumulation);
* :mod:`~edgetrain.approx.layers`: :class:`ApproxLinear`, :class:`ApproxConv2d`.
"""

from edgetrain.approx.amsim import amul, amul_scalar, truncate
from edgetrain.approx.gemm import amm, amm_sequential, amm_torch
from edgetrain.approx.layers import ApproxConv2d, ApproxLinear, approx_conv2d, approx_linear
from edgetrain.approx.lut import LUT, MAX_LUT_BITS, build_lut, get_lut
from edgetrain.approx.multipliers import MULTIPLIERS, mbm, mitchell, trunc_exact, vectorized

__all__ = [
    "LUT", "MAX_LUT_BITS", "MULTIPLIERS", "ApproxConv2d", "ApproxLinear", "amm", "amm_sequential", "amm_torch",
    "amul", "amul_scalar", "approx_conv2d", "approx_linear", "build_lut", "get_lut", "mbm", "mitchell", "trunc_exact",
    "truncate", "vectorized",
]
