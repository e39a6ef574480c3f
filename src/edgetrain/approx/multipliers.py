"""Functional models of approximate mantissa multipliers, written the way a hardware designer writes them.

A model is a function ``fn(a, b, M) -> (mant, carry)`` of two **M-bit mantissas without the hidden 1**
(integers ``0 <= a, b < 2**M``, i.e. the operands are ``1.a`` and ``1.b``). It returns the product's
mantissa, truncated to M bits (no hidden 1), and ``carry`` (1 when the product is ``>= 2``, so the
exponent grows by one):

    (1 + a / 2**M) * (1 + b / 2**M)  ~=  (1 + mant / 2**M) * 2**carry,   0 <= mant < 2**M, carry in {0, 1}

Signs, exponents and special values are not the model's business: AMSim (:mod:`edgetrain.approx.amsim`)
does them exactly with integer operations (ApproxTrain, Gong et al., arXiv:2209.04161, §III; spec
``algorithms_B.md`` §1.3). A model may depend only on the two truncated mantissas; one that looks at more
bits or at the exponents cannot be tabulated.

The built-in models use only ``+ - * >> << & |``, comparisons and :func:`select`, so they run on Python
ints (the designer's scalar reference) and, unchanged, on int64 tensors over the whole ``(a, b)`` grid (how
:func:`edgetrain.approx.lut.build_lut` tabulates them fast). They are marked with :func:`vectorized`;
user models without that mark are called once per mantissa pair.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

Model = Callable[[Any, Any, int], tuple[Any, Any]]

FRAC = 23  # fixed-point fraction bits of the fp32 mantissa field (IEEE 754 binary32)
ONE = 1 << FRAC  # 1.0 in FRAC-bit fixed point
# MBM error-correction constant c = 2^-4 + 2^-6 = 0.078125 (Saadat et al., "Minimally Biased Multipliers for
# Approximate Integer and Floating-Point Multiplication", IEEE TCAD 2018; the value ApproxTrain uses, spec §1.2).
MBM_CORRECTION = (1 << (FRAC - 4)) + (1 << (FRAC - 6))  # 655360 = c * 2^23


def vectorized(fn: Model) -> Model:
    """Mark a model as safe to call on int64 tensors holding the whole mantissa grid at once."""
    fn.vectorized = True  # type: ignore[attr-defined]
    return fn


def select(cond: Any, a: Any, b: Any) -> Any:
    """``a if cond else b`` for Python scalars, ``torch.where`` for tensors (lets one model serve both)."""
    if isinstance(cond, torch.Tensor):
        return torch.where(cond, a, b)
    return a if cond else b


@vectorized
def trunc_exact(a: Any, b: Any, M: int) -> tuple[Any, Any]:
    """The exact product of the two M-bit mantissas, truncated (not rounded) to M bits.

    ApproxTrain's ``ACC_7`` ("bfloat16" at M = 7): inputs truncated, product exact, output truncated (spec §1.2).
    The full product ``(2^M + a)(2^M + b)`` has ``2M + 2`` bits and lies in ``[2^2M, 2^(2M+2))``.
    """
    p = ((1 << M) + a) * ((1 << M) + b)
    carry = p >> (2 * M + 1)  # product >= 2
    mant = (p >> (M + carry)) & ((1 << M) - 1)
    return mant, carry


@vectorized
def mitchell(a: Any, b: Any, M: int) -> tuple[Any, Any]:
    """Mitchell's logarithmic multiplier (Mitchell, IRE Trans. Electronic Computers, 1962).

    ``log2(1 + x) ~= x``: the product of ``1.x`` and ``1.y`` is ``1 + x + y`` when ``x + y < 1``, else
    ``2 (x + y)``. In M-bit integers that is the sum ``a + b``: its bit M is the carry, its low M bits the
    mantissa, with no truncation needed. The error is always <= 0 (at most -11.1%).
    """
    s = a + b
    return s & ((1 << M) - 1), s >> M


@vectorized
def mbm(a: Any, b: Any, M: int) -> tuple[Any, Any]:
    """Minimally biased multiplier, MBM (Saadat et al., IEEE TCAD 2018), in 23-bit fixed point as ApproxTrain.

    Mitchell's sum with (1) each truncated input fraction centred by adding half an LSB, ``2^-(M+1)``,
    (2) the correction ``c = 2^-4 + 2^-6`` added to the fraction sum (``c / 2`` when the sum carries),
    (3) the correction skipped when it would push a carrying sum to 4. The result ``(1 + frac) 2^carry`` is
    renormalised and truncated to M bits (spec §1.2).

    Note: ApproxTrain's ``FPmultMBM_fast*.inl`` ORs a 1 into the *lowest kept* bit (``2^-M``) instead of
    adding half an LSB, which discards an input bit; we follow the spec's half-LSB reading, so our MBM tables
    differ from upstream's ``MBM_M.bin`` files.
    """
    half = 1 << (FRAC - M - 1)  # half an input LSB, 2^-(M+1)
    s = (a << (FRAC - M)) + half + (b << (FRAC - M)) + half  # x + y, centred; < 2^24
    carry = s >> FRAC  # x + y >= 1
    frac = (s & (ONE - 1)) + (MBM_CORRECTION >> carry)
    frac = select((carry == 1) & (frac >= ONE), s & (ONE - 1), frac)  # corner case: skip the correction
    v = (ONE + frac) << carry  # (1 + frac) 2^carry in [2^23, 2^25): can carry once more (no-carry sum + c >= 1)
    renorm = v >> (FRAC + 1)
    mant = ((v >> renorm) & (ONE - 1)) >> (FRAC - M)  # drop the hidden 1, truncate to M bits
    return mant, renorm


#: Built-in multipliers by name (``mantissa_bits`` 1..MAX in each).
MULTIPLIERS: dict[str, Model] = {"trunc_exact": trunc_exact, "mitchell": mitchell, "mbm": mbm}
