"""Approximate GEMM: compiled kernel vs the sequential reference (bitwise), torch path vs float64 sums."""

from __future__ import annotations

import pytest
import torch

from edgetrain.approx import _kernel, amm, amm_sequential, amm_torch, amul, build_lut, get_lut
from edgetrain.approx.gemm import _transposed

def first_operand(a, b, M):
    """A deliberately non-commutative model: the product's mantissa is the first operand's (carry 0)."""
    return a, 0 * b


LUTS = {"first_operand": build_lut(first_operand, 5)}


def lut_of(name: str, M: int):
    return LUTS[name] if name in LUTS else get_lut(name, M)


needs_kernel = pytest.mark.skipif(not _kernel.available(), reason="compiled AMSim kernel unavailable")


def products_sum64(a: torch.Tensor, b: torch.Tensor, lut) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact (float64) sum of the approximate products and the sum of their magnitudes."""
    p = amul(a[:, :, None], b[None], lut).double()  # (m, k, n)
    return p.sum(1), p.abs().sum(1)


def assert_fp32_sum_close(c: torch.Tensor, a: torch.Tensor, b: torch.Tensor, lut) -> None:
    ref, mag = products_sum64(a, b, lut)
    bound = (a.shape[1] + 1) * 2.0**-24 * mag + 1e-30  # recursive fp32 summation error bound
    assert ((c.double() - ref).abs() <= bound).all()


@needs_kernel
@pytest.mark.parametrize("name,M", [("mitchell", 7), ("mbm", 3), ("trunc_exact", 11), ("mbm", 7), ("first_operand", 5)])
@pytest.mark.parametrize("shape", [(5, 7, 3), (40, 70, 19), (33, 20, 70), (3, 130, 300)])
def test_kernel_variants_equal_sequential_reference_bitwise(name, M, shape):
    g = torch.Generator().manual_seed(sum(shape))
    m, k, n = shape
    a, b = torch.randn(m, k, generator=g), torch.randn(k, n, generator=g)
    a[a.abs() < 0.3] = 0.0  # zeros are skipped by the kernel: must stay exact
    lut = lut_of(name, M)
    ref = amm_sequential(a, b, lut)
    vt, bt = _transposed(lut)
    for table in ((False, True) if M <= 8 else (False,)):
        assert torch.equal(_kernel.amm_kernel(a, b, lut.values, lut.bits, M, table), ref), table
        out_t = _kernel.amm_kernel(b.t().contiguous(), a.t().contiguous(), vt, bt, M, table).t()
        assert torch.equal(out_t, ref), ("transposed", table)
    assert torch.equal(amm(a, b, lut), ref)


@needs_kernel
def test_kernel_range_edges_use_exact_semantics():
    """Products that underflow (flush to 0) or overflow (inf) next to normal ones in the same rows."""
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(9, 16, generator=g), torch.randn(16, 40, generator=g)
    a[0, :4] = 1e-30
    b[:4, :3] = 1e-15  # 1e-45 < 2^-126: flushed
    a[1, 5] = 1e30
    b[5, 7] = 3e9  # 3e39 > fp32 max: inf
    b[6, :] = 2.0**126  # b_pow * V may overflow: scalar path
    for name in ("mitchell", "mbm"):
        lut = get_lut(name, 7)
        ref = amm_sequential(a, b, lut)
        assert torch.isinf(ref).any()
        assert torch.equal(amm(a, b, lut), ref)
        vt, bt = _transposed(lut)
        for table in (False, True):
            assert torch.equal(_kernel.amm_kernel(a, b, lut.values, lut.bits, 7, table), ref), table
            out_t = _kernel.amm_kernel(b.t().contiguous(), a.t().contiguous(), vt, bt, 7, table).t()
            assert torch.equal(out_t, ref), ("transposed", table)


def test_nonfinite_inputs_fall_back_and_propagate():
    a, b = torch.randn(4, 6), torch.randn(6, 5)
    a[0, 0], b[1, 2], a[3, 3] = float("inf"), float("nan"), 0.0
    b[3, :] = float("inf")
    lut = get_lut("mitchell", 7)
    out, ref = amm(a, b, lut), amm_sequential(a, b, lut)
    torch.testing.assert_close(out, ref, equal_nan=True, rtol=1e-6, atol=1e-6)
    assert torch.isnan(out[3]).all()  # 0 * inf in row 3


@pytest.mark.parametrize("block_bytes", [1 << 10, 64 << 20])
def test_torch_path_is_an_fp32_sum_of_the_approximate_products(block_bytes):
    g = torch.Generator().manual_seed(4)
    a, b = torch.randn(23, 57, generator=g), torch.randn(57, 11, generator=g)
    lut = get_lut("mbm", 7)
    c = amm_torch(a, b, lut, block_bytes=block_bytes)
    assert_fp32_sum_close(c, a, b, lut)
    exact = (a.double() @ b.double())
    assert not torch.allclose(c.double(), exact, rtol=1e-4, atol=1e-4)  # it is approximate


def test_largest_m_exact_truncation_is_close_to_fp32_matmul():
    """trunc_exact at M = 11: each product within 3 * 2^-11 relative (2 input + 1 output truncations)."""
    g = torch.Generator().manual_seed(5)
    a, b = torch.randn(64, 200, generator=g), torch.randn(200, 48, generator=g)
    mag = a.abs().double() @ b.abs().double()
    err = (amm(a, b, get_lut("trunc_exact", 11)).double() - a.double() @ b.double()).abs()
    assert (err <= 3 * 2.0**-11 * mag + 201 * 2.0**-24 * mag).all()
    err_mit = (amm(a, b, get_lut("mitchell", 11)).double() - a.double() @ b.double()).abs()
    assert (err_mit > 3 * 2.0**-11 * mag).any()  # Mitchell is not an exact multiplier
