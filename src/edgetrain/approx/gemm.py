"""Approximate GEMM: ``C[i, j] = sum_l amsim(A[i, l], B[l, j])`` with exact fp32 accumulation.

Only the multiplier is approximate; additions are ordinary fp32 (ApproxTrain, arXiv:2209.04161 §III-C; spec
``algorithms_B.md`` §1.3). ``A`` is the first multiplier operand (the LUT row) in every product.

Paths:

* the compiled kernel (:mod:`edgetrain.approx._kernel`) when it builds: per-product bit-identical to
  :func:`edgetrain.approx.amsim.amul`, sums sequential over K (bit-identical to :func:`amm_sequential`);
* pure torch otherwise (and for operands holding inf/NaN): :func:`amul` on ``(rows, K-chunk, N)`` blocks sized so
  that the broadcast intermediates stay under ``block_bytes`` (64 MiB by default), each block summed over K by
  torch (fp32, torch's summation order).
"""

from __future__ import annotations

import torch
from torch import Tensor

from edgetrain.approx import _kernel
from edgetrain.approx.amsim import amul, check_fp32
from edgetrain.approx.lut import LUT

BLOCK_BYTES = 64 << 20
_LIVE = 8  # int32/float32 temporaries of the block's size alive at once inside amul (measured upper bound)


def _transposed(lut: LUT) -> tuple[Tensor, Tensor]:
    n = 1 << lut.M
    return lut.values.t().contiguous(), lut.bits.view(n, n).t().contiguous().view(-1)


def amm_torch(a: Tensor, b: Tensor, lut: LUT, block_bytes: int = BLOCK_BYTES) -> Tensor:
    """Blocked broadcast of :func:`amul`: the (rows, K-chunk, N) intermediate stays within ``block_bytes``."""
    m, k = a.shape
    n = b.shape[1]
    budget = max(1, block_bytes // (4 * _LIVE))  # elements per block
    kc = max(1, min(k, budget // max(n, 1)))
    mc = max(1, min(m, budget // (kc * max(n, 1))))
    out = torch.zeros(m, n, dtype=torch.float32)
    for i in range(0, m, mc):
        for l in range(0, k, kc):
            p = amul(a[i:i + mc, l:l + kc, None], b[None, l:l + kc, :], lut)  # (mc, kc, n)
            out[i:i + mc] += p.sum(1)
    return out


# Rough per-operation costs of the kernel variants (ns, one thread, on the development machine; from
# benchmarks/approx/speed.py and per-variant timings): a gathered product, a table product (per padded output lane),
# a table entry built by gathers (M < 4) or by in-register transposes of LUT columns (M >= 4).
GATHER_NS, TABLE_PRODUCT_NS, TABLE_ENTRY_NS, TABLE_ENTRY_T16_NS = 0.7, 0.3, 1.0, 0.3


def _padded(n: int) -> int:
    return 16 if n <= 16 else 32 if n <= 32 else -(-n // 64) * 64


def _plan(m: int, k: int, n: int, M: int) -> tuple[bool, bool]:
    """(transpose, table): the cheapest kernel variant by the cost model above."""
    options = {(n < m, False): GATHER_NS * m * k * n}  # gather kernel: the longer side innermost
    if M <= 8:
        for t, (outer, inner) in ((False, (m, n)), (True, (n, m))):
            entry = TABLE_ENTRY_T16_NS if M >= 4 else TABLE_ENTRY_NS
            options[(t, True)] = (TABLE_PRODUCT_NS * outer + entry * (1 << M)) * k * _padded(inner)
    return min(options, key=options.get)


def _amm_kernel(a: Tensor, b: Tensor, lut: LUT) -> Tensor | None:
    m, k = a.shape
    n = b.shape[1]
    transpose, table = _plan(m, k, n, lut.M)
    if not transpose:
        return _kernel.amm_kernel(a, b, lut.values, lut.bits, lut.M, table)
    vt, bt = _transposed(lut)  # C^T = B^T (x) A^T with the transposed LUT (B's mantissa is now the row)
    out = _kernel.amm_kernel(b.t().contiguous(), a.t().contiguous(), vt, bt, lut.M, table)
    return None if out is None else out.t().contiguous()


def amm(a: Tensor, b: Tensor, lut: LUT, *, use_kernel: bool = True, block_bytes: int = BLOCK_BYTES) -> Tensor:
    """Approximate ``a @ b`` for 2-D float32 ``a`` (m, k) and ``b`` (k, n) -> (m, n) float32."""
    check_fp32(a, b, what="approximate GEMM")
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[0]:
        raise ValueError(f"amm: expected (m, k) @ (k, n), got {tuple(a.shape)} @ {tuple(b.shape)}")
    if use_kernel and _kernel.available() and a.numel() and b.numel():
        out = _amm_kernel(a, b, lut)
        if out is not None:
            return out
    return amm_torch(a, b, lut, block_bytes)


def amm_sequential(a: Tensor, b: Tensor, lut: LUT) -> Tensor:
    """Reference: ``C += amul(A[:, l], B[l, :])`` for l = 0..K-1 in order (fp32), the kernel's summation order."""
    check_fp32(a, b, what="approximate GEMM")
    out = torch.zeros(a.shape[0], b.shape[1], dtype=torch.float32)
    for l in range(a.shape[1]):
        out += amul(a[:, l, None], b[None, l, :], lut)
    return out
