"""Optional compiled GEMM kernel for AMSim (C++, built at first use with ``torch.utils.cpp_extension``).

The kernel is our own (ApproxTrain's is a CUDA tiled GEMM, arXiv:2209.04161 §III-C). Per product it computes
``a_pow * (b_pow * V[ia, ib])``, where ``x_pow = ±2^(e-127)`` is the operand with its mantissa cleared and
``V`` is the LUT's float view ``(1 + mant/2^M) 2^carry``. Both multiplications are exact powers-of-two scalings
whenever the product is a normal number, so the product equals :func:`edgetrain.approx.amsim.amul` bit for bit;
pairs that could leave the normal range (checked per A element against the min/max exponent of its B row) take a
scalar integer path with flush-to-zero/overflow semantics. Sums are sequential over K in fp32 for every output
(the order of ApproxTrain's per-thread ``value += amsim(...)``), so results equal
:func:`edgetrain.approx.gemm.amm_sequential` bit for bit. Inputs holding inf/NaN are left to the torch path.

Two variants (``table`` flag; :func:`edgetrain.approx.gemm._plan` picks one per GEMM shape with a cost model):

* gather: for each A element, the LUT row of its mantissa (2^M floats, L1-resident) is gathered at the B row's
  mantissas; B is walked in (64 x 256) blocks that stay in L2. Zero A operands are skipped (exact zero products).
* table: for a (16 x NB) block of B, all 2^M LUT rows are pre-multiplied (``T[l][v][:] = b_pow[l, :] * V[v, ib]``,
  built from contiguous LUT columns by 16 x 16 in-register transposes when M >= 4, else by gathers),
  then each A element adds ``a_pow * T[l][ia]`` -- one contiguous, vectorised row -- to register-resident
  accumulators of 4 A rows. Pays 2^M table entries per B element, so it wins when A has many rows.

A per-element naive simulator (``amm_naive``: scalar AMSim per product, no blocking or vectorisation) is compiled
alongside, for speed comparisons only. Single-threaded.

Disable with ``EDGETRAIN_NO_EXT=1``; if the build fails (no compiler) a warning is issued once and the
pure-torch path is used.
"""

from __future__ import annotations

import functools
import os
import shutil
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

typedef int32_t v16i __attribute__((vector_size(64)));

// In-register transpose of 16 rows of 16 floats (four stages of 2-input shuffles, distances 8, 4, 2, 1).
static inline void transpose16(v16* r) {
  const v16i lo[4] = {{0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23},
                      {0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27},
                      {0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29},
                      {0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30}};
  const v16i hi[4] = {{8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31},
                      {4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31},
                      {2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31},
                      {1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31}};
  int s = 0;
  for (int d = 8; d >= 1; d >>= 1, ++s) {
    for (int i = 0; i < 16; ++i) {
      if (i & d) continue;
      const v16 a = r[i], c = r[i + d];
      r[i] = __builtin_shuffle(a, c, lo[s]);
      r[i + d] = __builtin_shuffle(a, c, hi[s]);
    }
  }
}

// Table variant: for a (KB x NB) block of B build T[l][v][:] = b_pow[l, :] * V[v, ib[l, :]] for every A mantissa v,
// then every A element (i, l) adds a_pow * T[l][ia] to register-resident rows of NB outputs (no gather per product;
// IB rows of A at a time). Pays 2^M * KB * NB table entries per block, amortised over the m rows of A.
template <int NB>
torch::Tensor table_gemm(const float* a, const float* b, const float* V, const float* VT, const int32_t* LB,
                         int64_t M,
                         const std::vector<float>& apow, const std::vector<int32_t>& aidx,
                         const std::vector<uint8_t>& aexp, const std::vector<uint8_t>& slowf,
                         const std::vector<float>& bpow, const std::vector<int32_t>& bidx, const std::vector<int>& bmax,
                         int64_t m, int64_t k, int64_t n, torch::TensorOptions opt) {
  constexpr int NV = NB / 16, IB = 4;
  const int64_t KB = 16, R = (int64_t)1 << M;
  torch::Tensor C = torch::zeros({m, n}, opt);
  float* c = C.data_ptr<float>();
  std::vector<float> T(KB * R * NB);
  alignas(64) float buf[NB];
  for (int64_t jb = 0; jb < n; jb += NB) {
    const int64_t nj = std::min((int64_t)NB, n - jb);
    for (int64_t lb = 0; lb < k; lb += KB) {
      const int64_t le = std::min(lb + KB, k);
      for (int64_t l = lb; l < le; ++l) {
        float* Tl = T.data() + (l - lb) * R * NB;
        if (bmax[l] > 253) { std::fill(Tl, Tl + R * NB, 0.0f); continue; }  // every non-zero A takes the slow path
        const float* bp = bpow.data() + l * n + jb;
        const int32_t* bi = bidx.data() + l * n + jb;
        if (R >= 16) {  // T[v][j] = b_pow[j] * VT[ib[j]][v]: contiguous LUT columns, transposed in registers
          for (int jc = 0; jc < NB; jc += 16) {
            for (int64_t v0 = 0; v0 < R; v0 += 16) {
              v16 rr[16];
              for (int j = 0; j < 16; ++j) {
                if (jc + j < nj) { std::memcpy(&rr[j], VT + (int64_t)bi[jc + j] * R + v0, 64); rr[j] *= bp[jc + j]; }
                else rr[j] = v16{};
              }
              transpose16(rr);
              for (int q = 0; q < 16; ++q) std::memcpy(Tl + (v0 + q) * NB + jc, &rr[q], 64);
            }
          }
          continue;
        }
        for (int64_t v = 0; v < R; ++v) {
          float* __restrict__ t = Tl + v * NB;
          const float* __restrict__ row = V + v * R;
          for (int64_t j = 0; j < nj; ++j) t[j] = bp[j] * row[bi[j]];
          for (int64_t j = nj; j < NB; ++j) t[j] = 0.0f;
        }
      }
      for (int64_t i0 = 0; i0 < m; i0 += IB) {
        const int rows = (int)std::min((int64_t)IB, m - i0);
        v16 acc[IB][NV];
        for (int r = 0; r < IB; ++r) {
          if (r < rows && nj == NB) {
            for (int q = 0; q < NV; ++q) std::memcpy(&acc[r][q], c + (i0 + r) * n + jb + 16 * q, 64);
          } else {
            for (int j = 0; j < NB; ++j) buf[j] = (r < rows && j < nj) ? c[(i0 + r) * n + jb + j] : 0.0f;
            for (int q = 0; q < NV; ++q) std::memcpy(&acc[r][q], buf + 16 * q, 64);
          }
        }
        for (int64_t l = lb; l < le; ++l) {
          const float* Tl = T.data() + (l - lb) * R * NB;
          for (int r = 0; r < IB; ++r) {
            if (r >= rows) break;
            const int64_t t_ = (i0 + r) * k + l;
            if (__builtin_expect(slowf[t_], 0)) {  // may under/overflow: exact integer assembly per product
              uint32_t ua; std::memcpy(&ua, a + t_, 4);
              for (int64_t j = 0; j < NB; ++j) {
                uint32_t ub = 0;
                if (j < nj) std::memcpy(&ub, b + l * n + jb + j, 4);
                buf[j] = j < nj ? slow_product(ua, ub, aexp[t_], LB + (aidx[t_] << M), bidx[l * n + jb + j]) : 0.0f;
              }
              for (int q = 0; q < NV; ++q) { v16 pv; std::memcpy(&pv, buf + 16 * q, 64); acc[r][q] += pv; }
            } else {
              const float ap = apow[t_];
              const float* tr = Tl + (int64_t)aidx[t_] * NB;
              for (int q = 0; q < NV; ++q) { v16 tv; std::memcpy(&tv, tr + 16 * q, 64); acc[r][q] += ap * tv; }
            }
          }
        }
        for (int r = 0; r < rows; ++r) {
          for (int q = 0; q < NV; ++q) std::memcpy(buf + 16 * q, &acc[r][q], 64);
          std::memcpy(c + (i0 + r) * n + jb, buf, nj * 4);
        }
      }
    }
  }
  return C;
}

// Per-element reference simulator (for speed comparisons only): every product through the scalar integer AMSim,
// dot-product loop order, no blocking, vectorisation disabled. Finite inputs only.
__attribute__((optimize("no-tree-vectorize")))
torch::Tensor amm_naive(torch::Tensor A, torch::Tensor B, torch::Tensor lbits, int64_t M) {
  A = A.contiguous(); B = B.contiguous(); lbits = lbits.contiguous();
  const int64_t m = A.size(0), k = A.size(1), n = B.size(1);
  const float* a = A.data_ptr<float>();
  const float* b = B.data_ptr<float>();
  const int32_t* LB = lbits.data_ptr<int32_t>();
  const int sh = 23 - (int)M;
  const uint32_t mask = (1u << M) - 1;
  torch::Tensor C = torch::zeros({m, n}, A.options());
  float* c = C.data_ptr<float>();
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < n; ++j) {
      float acc = 0.0f;
      for (int64_t l = 0; l < k; ++l) {
        const uint32_t ua = fbits(a[i * k + l]), ub = fbits(b[l * n + j]);
        const int ea = (ua >> 23) & 255;
        if (ea == 0) { acc += bitsf((ua ^ ub) & 0x80000000u); continue; }
        acc += slow_product(ua, ub, ea, LB + (((ua >> sh) & mask) << M), (int32_t)((ub >> sh) & mask));
      }
      c[i * n + j] = acc;
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
  std::vector<int32_t> aidx(m * k), bidx(k * n);
  std::vector<uint8_t> aexp(m * k), slowf(m * k);
  std::vector<int> bmin(k, 255), bmax(k, 0);
  uint32_t special = 0;
  for (int64_t l = 0; l < k; ++l) {
    int lo = 255, hi = 0;
    for (int64_t j = 0; j < n; ++j) {
      const int64_t t = l * n + j;
      const uint32_t u = fbits(b[t]), e = (u >> 23) & 255u;
      special |= (e == 255u);
      bpow[t] = bitsf(e ? (u & 0xFF800000u) : 0u);
      bidx[t] = (int32_t)((u >> sh) & mask);
      lo = std::min(lo, e ? (int)e : 255);
      hi = std::max(hi, (int)e);
    }
    bmin[l] = lo; bmax[l] = hi;
  }
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t l = 0; l < k; ++l) {
      const int64_t t = i * k + l;
      const uint32_t u = fbits(a[t]), e = (u >> 23) & 255u;
      special |= (e == 255u);
      aexp[t] = (uint8_t)e;
      apow[t] = bitsf(e ? (u & 0xFF800000u) : 0u);  // zero / subnormal: exact zero products
      aidx[t] = (int32_t)((u >> sh) & mask);
      // products of this A element may leave the normal range (or b_pow * V may overflow): exact scalar path
      slowf[t] = (e != 0u) & ((bmax[l] > 253) | ((int)e + bmin[l] < 128) | ((int)e + bmax[l] > 380));
    }
  }
  if (special) return torch::Tensor();
  if (table) {
    torch::Tensor vt = values.t().contiguous();
    const float* VT = vt.data_ptr<float>();
#define TG(NB_) table_gemm<NB_>(a, b, V, VT, LB, M, apow, aidx, aexp, slowf, bpow, bidx, bmax, m, k, n, A.options())
    if (n <= 16) return TG(16);
    if (n <= 32) return TG(32);
    return TG(64);
#undef TG
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
          const int32_t* __restrict__ bi = bidx.data() + l * n + jb;
          if (!slowf[t]) {
            const float* __restrict__ row = V + ((int64_t)aidx[t] << M);
            const float* __restrict__ bp = bpow.data() + l * n + jb;
            for (int64_t j = 0; j < nj; ++j) ci[j] += ap * (bp[j] * row[bi[j]]);
          } else {  // may under/overflow: integer assembly with FTZ / inf semantics
            uint32_t ua; std::memcpy(&ua, a + t, 4);
            for (int64_t j = 0; j < nj; ++j) {
              uint32_t ub; std::memcpy(&ub, b + l * n + jb + j, 4);
              ci[j] += slow_product(ua, ub, aexp[t], LB + ((int64_t)aidx[t] << M), bi[j]);
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
    """The compiled module (``amm_lut``, ``amm_naive``), or ``None`` (disabled, or the build failed: warned once)."""
    if os.environ.get("EDGETRAIN_NO_EXT"):
        return None
    try:
        from torch.utils.cpp_extension import load_inline

        if shutil.which("ninja") is None:  # the PyPI ninja (test extra) when the venv is not on PATH
            try:
                import ninja

                os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
            except ImportError:
                pass

        mod = load_inline(name="edgetrain_amsim_v7", cpp_sources=SOURCE, functions=["amm_lut", "amm_naive"],
                          extra_cflags=["-O3", "-march=native"], verbose=False)
        return mod
    except Exception as e:  # no compiler, no ninja, headers missing...
        warnings.warn(f"edgetrain.approx: compiled AMSim kernel unavailable ({type(e).__name__}: "
                      f"{str(e).splitlines()[0] if str(e) else ''}); using the slower pure-torch path", stacklevel=2)
        return None


def naive():
    """The compiled per-element reference ``amm_naive(A, B, lut_bits, M)`` (benchmarks), or ``None``."""
    mod = kernel()
    return None if mod is None else mod.amm_naive


def available() -> bool:
    return kernel() is not None


def amm_kernel(a: torch.Tensor, b: torch.Tensor, values: torch.Tensor, bits: torch.Tensor, M: int, table: bool):
    """``C = A (x) B`` with the compiled kernel; ``None`` when unavailable or an operand holds inf/NaN."""
    mod = kernel()
    if mod is None:
        return None
    return mod.amm_lut(a, b, values, bits, M, table)  # an undefined C++ tensor arrives as None
