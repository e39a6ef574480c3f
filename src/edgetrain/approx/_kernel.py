"""Optional compiled GEMM kernel for AMSim (C++, built at first use with ``torch.utils.cpp_extension``).

The kernel is our own (ApproxTrain's is a CUDA tiled GEMM, arXiv:2209.04161 §III-C). Per product it computes
``a_pow * (b_pow * V[ia, ib])``, where ``x_pow = ±2^(e-127)`` is the operand with its mantissa cleared and
``V`` is the LUT's float view ``(1 + mant/2^M) 2^carry``. Both multiplications are exact powers-of-two scalings
whenever the product is a normal number, so the product equals :func:`edgetrain.approx.amsim.amul` bit for bit;
pairs that could leave the normal range (checked per A element against the min/max exponent of its B row) take a
scalar integer path with flush-to-zero/overflow semantics. Sums are sequential over K in fp32 for every output
(the order of ApproxTrain's per-thread ``value += amsim(...)``), so results equal
:func:`edgetrain.approx.gemm.amm_sequential` bit for bit. Inputs holding inf/NaN are left to the torch path.

Blocking: B is walked in (64 x 256) blocks that stay in L2; the 2^2M-entry float LUT (64 KiB at M = 7) stays in
L1/L2. Zero A operands are skipped (their products are exact zeros). Single-threaded.

Disable with ``EDGETRAIN_NO_EXT=1``; if the build fails (no compiler) a warning is issued once and the
pure-torch path is used.
"""

from __future__ import annotations

import functools
import os
import warnings

import torch

SOURCE = r"""
#include <torch/extension.h>
#include <cstdint>
#include <cstring>
#include <vector>
#include <algorithm>

typedef float v16 __attribute__((vector_size(64)));
static inline uint32_t fbits(float x) { uint32_t u; std::memcpy(&u, &x, 4); return u; }
static inline float bitsf(uint32_t u) { float x; std::memcpy(&x, &u, 4); return x; }

// One product with the full FTZ / overflow semantics (integer assembly): for pairs near the range limits.
static inline float slow_product(uint32_t ua, uint32_t ub, int ea, const int32_t* lrow, int32_t bi) {
  const int eb = (ub >> 23) & 255;
  const uint32_t s = (ua ^ ub) & 0x80000000u;
  if (eb == 0) return bitsf(s);
  const uint32_t entry = (uint32_t)lrow[bi];
  const int e = ea + eb - 127 + (int)(entry >> 23);
  if (e >= 255) return bitsf(s | 0x7F800000u);
  if (e <= 0) return bitsf(s);
  return bitsf(s | (((uint32_t)(ea + eb - 127) << 23) + entry));
}

// Table variant: for a (KB x NB) block of B build T[l][v][:] = b_pow[l, :] * V[v, ib[l, :]] for every A mantissa v,
// then every A element (i, l) adds a_pow * T[l][ia] to a register-resident row of NB outputs (no gather per
// product). Pays 2^M * KB * NB table entries per block, amortised over the m rows of A.
template <int NB>
torch::Tensor table_gemm(const float* a, const float* b, const float* V, const int32_t* LB, int64_t M,
                         const std::vector<float>& apow, const std::vector<int32_t>& aoff,
                         const std::vector<uint8_t>& aexp, const std::vector<float>& bpow,
                         const std::vector<int32_t>& bidx, const std::vector<int>& bmin, const std::vector<int>& bmax,
                         int64_t m, int64_t k, int64_t n, torch::TensorOptions opt) {
  const int64_t KB = 16, R = (int64_t)1 << M;
  torch::Tensor C = torch::zeros({m, n}, opt);
  float* c = C.data_ptr<float>();
  constexpr int NV = NB / 16;
  std::vector<float> T(KB * R * NB);
  for (int64_t jb = 0; jb < n; jb += NB) {
    const int64_t nj = std::min((int64_t)NB, n - jb);
    for (int64_t lb = 0; lb < k; lb += KB) {
      const int64_t le = std::min(lb + KB, k);
      for (int64_t l = lb; l < le; ++l) {
        const float* bp = bpow.data() + l * n + jb;
        const int32_t* bi = bidx.data() + l * n + jb;
        for (int64_t v = 0; v < R; ++v) {
          float* __restrict__ t = T.data() + ((l - lb) * R + v) * NB;
          const float* __restrict__ row = V + v * R;
          for (int64_t j = 0; j < nj; ++j) t[j] = bp[j] * row[bi[j]];
          for (int64_t j = nj; j < NB; ++j) t[j] = 0.0f;
        }
      }
      for (int64_t i = 0; i < m; ++i) {
        float* ci = c + i * n + jb;
        alignas(64) float buf[NB];
        for (int j = 0; j < NB; ++j) buf[j] = j < nj ? ci[j] : 0.0f;
        v16 acc[NV];
        for (int q = 0; q < NV; ++q) std::memcpy(&acc[q], buf + 16 * q, 64);
        for (int64_t l = lb; l < le; ++l) {
          const int64_t t_ = i * k + l;
          const float ap = apow[t_];
          if (ap == 0.0f || bmax[l] == 0) continue;
          const int ea = aexp[t_];
          if (bmax[l] <= 253 && ea + bmin[l] - 127 >= 1 && ea + bmax[l] - 126 <= 254) {
            const float* t = T.data() + ((l - lb) * R + (aoff[t_] >> M)) * NB;
            for (int q = 0; q < NV; ++q) {
              v16 tv; std::memcpy(&tv, t + 16 * q, 64);
              acc[q] += ap * tv;
            }
          } else {
            uint32_t ua; std::memcpy(&ua, a + t_, 4);
            for (int64_t j = 0; j < nj; ++j) {
              uint32_t ub; std::memcpy(&ub, b + l * n + jb + j, 4);
              acc[j / 16][j % 16] += slow_product(ua, ub, ea, LB + aoff[t_], bidx[l * n + jb + j]);
            }
          }
        }
        for (int q = 0; q < NV; ++q) std::memcpy(buf + 16 * q, &acc[q], 64);
        for (int64_t j = 0; j < nj; ++j) ci[j] = buf[j];
      }
    }
  }
  return C;
}

// C (m x n) = sum_l amsim(A[i,l], B[l,j]); values/bits: (2^M x 2^M) LUT, row = A's mantissa.
// Returns an undefined tensor when A or B holds inf/NaN (the caller uses the torch path).
torch::Tensor amm_lut(torch::Tensor A, torch::Tensor B, torch::Tensor values, torch::Tensor lbits, int64_t M,
                      bool table) {
  TORCH_CHECK(A.dtype() == torch::kFloat32 && B.dtype() == torch::kFloat32, "amm_lut: float32 only");
  A = A.contiguous(); B = B.contiguous(); values = values.contiguous(); lbits = lbits.contiguous();
  const int64_t m = A.size(0), k = A.size(1), n = B.size(1);
  TORCH_CHECK(B.size(0) == k, "amm_lut: inner sizes differ");
  const float* a = A.data_ptr<float>();
  const float* b = B.data_ptr<float>();
  const float* V = values.data_ptr<float>();
  const int32_t* LB = lbits.data_ptr<int32_t>();
  const int sh = 23 - (int)M;
  const uint32_t mask = (1u << M) - 1;
  std::vector<float> apow(m * k), bpow(k * n);
  std::vector<int32_t> aoff(m * k), bidx(k * n);
  std::vector<uint8_t> aexp(m * k);
  std::vector<int> bmin(k, 255), bmax(k, 0);
  for (int64_t t = 0; t < m * k; ++t) {
    uint32_t u = fbits(a[t]); uint32_t e = (u >> 23) & 255u;
    if (e == 255u) return torch::Tensor();
    aexp[t] = (uint8_t)e;
    apow[t] = e == 0 ? 0.0f : bitsf(u & 0xFF800000u);
    aoff[t] = (int32_t)(((u >> sh) & mask) << M);
  }
  for (int64_t l = 0; l < k; ++l) {
    for (int64_t j = 0; j < n; ++j) {
      int64_t t = l * n + j;
      uint32_t u = fbits(b[t]); uint32_t e = (u >> 23) & 255u;
      if (e == 255u) return torch::Tensor();
      bpow[t] = e == 0 ? 0.0f : bitsf(u & 0xFF800000u);
      bidx[t] = (int32_t)((u >> sh) & mask);
      if (e) { bmin[l] = std::min(bmin[l], (int)e); bmax[l] = std::max(bmax[l], (int)e); }
    }
  }
  if (table) {
    if (n <= 16) return table_gemm<16>(a, b, V, LB, M, apow, aoff, aexp, bpow, bidx, bmin, bmax, m, k, n, A.options());
    if (n <= 32) return table_gemm<32>(a, b, V, LB, M, apow, aoff, aexp, bpow, bidx, bmin, bmax, m, k, n, A.options());
    return table_gemm<64>(a, b, V, LB, M, apow, aoff, aexp, bpow, bidx, bmin, bmax, m, k, n, A.options());
  }
  torch::Tensor C = torch::zeros({m, n}, A.options());
  float* c = C.data_ptr<float>();
  const int64_t KB = 64, NB = 256;
  for (int64_t jb = 0; jb < n; jb += NB) {
    const int64_t nj = std::min(NB, n - jb);
    for (int64_t lb = 0; lb < k; lb += KB) {
      const int64_t le = std::min(lb + KB, k);
      for (int64_t i = 0; i < m; ++i) {
        float* __restrict__ ci = c + i * n + jb;
        for (int64_t l = lb; l < le; ++l) {
          const int64_t t = i * k + l;
          const float ap = apow[t];
          if (ap == 0.0f || bmax[l] == 0) continue;  // exact zero products
          const int ea = aexp[t];
          const float* __restrict__ row = V + aoff[t];
          const float* __restrict__ bp = bpow.data() + l * n + jb;
          const int32_t* __restrict__ bi = bidx.data() + l * n + jb;
          if (bmax[l] <= 253 && ea + bmin[l] - 127 >= 1 && ea + bmax[l] - 126 <= 254) {
            for (int64_t j = 0; j < nj; ++j) ci[j] += ap * (bp[j] * row[bi[j]]);
          } else {  // may under/overflow: integer assembly with FTZ / inf semantics
            uint32_t ua; std::memcpy(&ua, a + t, 4);
            for (int64_t j = 0; j < nj; ++j) {
              uint32_t ub; std::memcpy(&ub, b + l * n + jb + j, 4);
              ci[j] += slow_product(ua, ub, ea, LB + aoff[t], bi[j]);
            }
          }
        }
      }
    }
  }
  return C;
}
"""


@functools.lru_cache(maxsize=1)
def kernel():
    """The compiled ``amm_lut`` function, or ``None`` (disabled, or the build failed: warned once)."""
    if os.environ.get("EDGETRAIN_NO_EXT"):
        return None
    try:
        from torch.utils.cpp_extension import load_inline

        mod = load_inline(name="edgetrain_amsim_v3", cpp_sources=SOURCE, functions=["amm_lut"],
                          extra_cflags=["-O3", "-march=native"], verbose=False)
        return mod.amm_lut
    except Exception as e:  # no compiler, no ninja, headers missing...
        warnings.warn(f"edgetrain.approx: compiled AMSim kernel unavailable ({type(e).__name__}: "
                      f"{str(e).splitlines()[0] if str(e) else ''}); using the slower pure-torch path", stacklevel=2)
        return None


def available() -> bool:
    return kernel() is not None


def amm_kernel(a: torch.Tensor, b: torch.Tensor, values: torch.Tensor, bits: torch.Tensor, M: int, table: bool):
    """``C = A (x) B`` with the compiled kernel; ``None`` when unavailable or an operand holds inf/NaN."""
    fn = kernel()
    if fn is None:
        return None
    return fn(a, b, values, bits, M, table)  # an undefined C++ tensor arrives as None
