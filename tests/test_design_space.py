"""The QUIDAM-style design-space model (edgetrain.hardware.design_space): hand-computed cases, refusals and the
orderings the constants imply."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from edgetrain.errors import ConfigError
from edgetrain.hardware import design_space as ds


def _int8(rows: int = 2, cols: int = 2, buffer: int = 64) -> ds.Accelerator:
    return ds.Accelerator(ds.pe_type("int8"), rows, cols, buffer)


# ------------------------------------------------------------------------------------------------ hand-computed
def test_one_gemm_on_one_design_point_by_hand():
    # a linear layer, batch 4: (4 x 3) @ (3 x 2) on a 2x2 int8 array (8-bit operands, 32-bit partial sums) with a
    # 64-byte buffer, 1 GHz, 12.8 GB/s, 160 pJ per DRAM byte
    g = ds.Gemm("fc", m=4, k=3, n=2)
    c = ds.gemm_cost(g, _int8())
    # weights held: k = 3 > 2 rows -> 2 row blocks x 1 column block = 2 tiles of (4 streamed + 2 + 2) cycles
    assert c["stationary"] == "B" and c["cycles"] == 16
    # DRAM: output 8 B + inputs 12 B + weights 6 B (everything fits half the buffer: 32 B)
    assert c["dram_bytes"] == 26
    # buffer: weights once (6 B), inputs once per column block (12 B), psums 8 x 4 B written twice, read once, and
    # the 26 DRAM bytes passing through
    assert c["sram_bytes"] == 6 + 12 + 8 * 4 * 3 + 26 == 140
    sram_pj = 10 / 8 * math.sqrt(64 / 8192)  # Horowitz's 8 KB SRAM, 10 pJ per 64 bits, scaled by sqrt(size)
    assert c["compute_j"] == pytest.approx(24 * (0.2 + 0.1) * 1e-12, rel=1e-12)  # 24 MACs x (int8 mult + int32 add)
    assert c["sram_j"] == pytest.approx(140 * sram_pj * 1e-12, rel=1e-12)
    assert c["dram_j"] == pytest.approx(26 * 160e-12, rel=1e-12)
    assert c["energy_j"] == pytest.approx((7.2 + 140 * sram_pj + 4160) * 1e-12, rel=1e-12)
    assert c["seconds"] == pytest.approx(16e-9, rel=1e-12)  # compute-bound: 26 B / 12.8 GB/s = 2.03 ns < 16 ns
    assert not c["memory_bound"]
    # area: 4 PEs x (282 + 137) um^2 + 64 B x 8 bits x 600 lambda^2 (lambda = 45 nm)
    assert _int8().area_mm2 == pytest.approx((4 * 419 + 512 * 600 * 0.045**2) * 1e-6, rel=1e-12)


def test_one_layer_training_step_by_hand():
    # a bias-free linear layer 3 -> 2 trained at batch 4 (its input needs no gradient): forward (4 x 3) @ (3 x 2)
    # as above, and the weight gradient (3 x 4) @ (4 x 2) = X^T dY, written as 6 32-bit partial sums
    gemms, info = ds.workload(nn.Linear(3, 2, bias=False), torch.zeros(4, 3), batch_size=4)
    assert [(g.m, g.k, g.n, g.out) for g in gemms] == [(4, 3, 2, "act"), (3, 4, 2, "acc")]
    point = ds.evaluate(gemms, _int8())
    # dW, weights (here dY) held: k = 4 -> 2 row blocks, 2 tiles of (3 + 2 + 2) cycles
    assert point["cycles"] == 16 + 14 and point["macs"] == 48 == info["macs"]
    # dW DRAM: X 12 B + dY 8 B + dW 6 x 4 B; buffer: dY 8 + X 12 + psums 6 x 4 x 3 + its 44 DRAM bytes
    assert point["dram_bytes"] == 26 + 44 and point["sram_bytes"] == 140 + (8 + 12 + 72 + 44)
    sram_pj = 10 / 8 * math.sqrt(64 / 8192)
    energy = (48 * 0.3 + 276 * sram_pj + 70 * 160) * 1e-12
    assert point["energy_j"] == pytest.approx(energy, rel=1e-12)
    assert point["seconds"] == pytest.approx(30e-9, rel=1e-12)  # both compute-bound (44 B take 3.4 ns)
    area = (4 * 419 + 512 * 600 * 0.045**2) * 1e-6
    assert point["area_mm2"] == pytest.approx(area, rel=1e-12) and point["utilization"] == 48 / (4 * 30)
    assert point["perf_per_area"] == pytest.approx(1 / 30e-9 / area, rel=1e-12)
    assert point["steps_per_j"] == pytest.approx(1 / energy, rel=1e-12)
    assert point["perf_per_energy"] == pytest.approx(1 / (30e-9 * energy), rel=1e-12)


def test_the_other_orientation_by_hand():
    # the same GEMM with A^T held: 2 row blocks x 2 column blocks (m = 4 > 2 columns) of (2 + 2 + 2) cycles
    o = ds._orientation(ds.Gemm("fc", 4, 3, 2), _int8(), "A")
    assert o["cycles"] == 4 * 6 and o["sram_bytes"] == 12 + 6 * 2 + 96


def test_memory_bound_gemm_by_hand():
    # (1 x 64) @ (64 x 64) int8 on a 64x64 array with 4 KiB: 1 tile of 1 + 128 cycles = 129 ns; DRAM 64 + 4096
    # + 64 B = 4224 B (weights 4096 B > 2 KiB: the psum block (256 B) holds the output, each input streams once)
    c = ds.gemm_cost(ds.Gemm("gemv", 1, 64, 64), ds.Accelerator("int8", 64, 64, 4096))
    assert c["cycles"] == 129 and c["dram_bytes"] == 4224
    assert c["memory_bound"] and c["seconds"] == pytest.approx(4224 / 12.8e9, rel=1e-12)


def test_dram_blocking_refetches_when_nothing_fits():
    # fp32 (4 B, 32-bit psums): a = 64x64 x 4 = 16 KiB, b = 16 KiB, psums 16 KiB, half a 8 KiB buffer = 4 KiB:
    # each blocking re-reads the other operand 4 times: 16 + 4 x 16 KiB (+ the 16 KiB output)
    c = ds.gemm_cost(ds.Gemm("sq", 64, 64, 64), ds.Accelerator("fp32", 8, 8, 8192))
    assert c["dram_bytes"] == 16384 + 16384 + 4 * 16384
    # a weight-gradient-like GEMM (long reduction, small output) in int8: the 64 x 64 output's 32-bit partial sums
    # (16 KiB) need 4 blocks of the 4 KiB half-buffer, each streaming both 256 KiB inputs; written at 32 bits
    c = ds.gemm_cost(ds.Gemm("dW", 64, 4096, 64, out="acc"), ds.Accelerator("int8", 8, 8, 8192))
    assert c["dram_bytes"] == 4 * (262144 + 262144) + 64 * 64 * 4


def test_depthwise_groups_are_packed():
    # depthwise 3x3, 32 channels: k = 9, n = 1 per group; a 64x64 array holds min(64 // 9, 64 // 1) = 7 groups
    assert ds.tiles(9, 1, 32, 64, 64) == (5, 1, 1)
    assert ds.tiles(9, 1, 32, 16, 16) == (32, 1, 1)  # 16 // 9 = 1 group per tile
    assert ds.tiles(9, 1, 32, 8, 8) == (64, 2, 1)  # k = 9 > 8 rows: 2 row blocks per group


def test_pareto_and_spread():
    rows = [{"x": 1, "y": 5}, {"x": 2, "y": 4}, {"x": 2, "y": 3}, {"x": 3, "y": 1}, {"x": 1, "y": 1}]
    assert ds.pareto(rows, "x", "y") == [{"x": 1, "y": 5}, {"x": 2, "y": 4}, {"x": 3, "y": 1}]
    assert ds.spread(rows, "y") == 5


# ------------------------------------------------------------------------------------------------ orderings
def test_pe_costs_follow_the_constants():
    t = ds.PE_TYPES
    for better, worse in (("int8", "bf16"), ("bf16", "fp32"), ("int4", "int8"), ("int8", "int16"),
                          ("pot-1", "int8"), ("pot-1", "pot-2"), ("int16", "bf16")):
        assert t[better].mac_pj < t[worse].mac_pj, (better, worse)
        assert t[better].um2 < t[worse].um2, (better, worse)
    # the power-law fits pass through the sourced points
    assert ds.int_mult(8) == pytest.approx((0.2, 282.0)) and ds.int_mult(32) == pytest.approx((3.1, 3495.0))
    assert ds.fp_mult(11) == pytest.approx((1.1, 1640.0)) and ds.fp_mult(24) == pytest.approx((3.7, 7700.0))


def test_lower_precision_costs_less_per_step():
    gemms = [ds.Gemm("a", 256, 288, 64), ds.Gemm("b", 288, 256, 64, out="acc")]
    energy = [ds.evaluate(gemms, ds.Accelerator(p, 16, 16, 64 * 1024))["energy_j"]
              for p in ("fp32", "bf16", "int8", "int4")]
    assert energy == sorted(energy, reverse=True) and len(set(energy)) == 4


def test_bigger_array_is_not_slower_on_a_big_gemm():
    g = [ds.Gemm("big", 4096, 512, 512)]
    secs = [ds.evaluate(g, ds.Accelerator("int8", s, s, 256 * 1024))["seconds"] for s in (8, 16, 32, 64)]
    assert secs == sorted(secs, reverse=True)


# ------------------------------------------------------------------------------------------------ workload
def test_workload_matches_the_cost_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1, groups=4),
                          nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    gemms, info = ds.workload(model, torch.zeros(2, 1, 6, 6), batch_size=2)
    names = [g.name for g in gemms]
    # the first conv's input needs no gradient: no dX there
    assert names == ["0:fwd", "0:dW", "2:fwd", "2:dX", "2:dW", "4:fwd", "4:dX", "4:dW"]
    first = gemms[0]
    assert (first.m, first.k, first.n, first.groups) == (2 * 36, 9, 4, 1)
    dw, dx, grad = gemms[2:5]  # the depthwise conv: 4 groups of (72 x 9) @ (9 x 1), then (72 x 1) @ (1 x 9)
    assert [(g.m, g.k, g.n, g.groups) for g in (dw, dx, grad)] == [(72, 9, 1, 4), (72, 1, 9, 4), (9, 72, 1, 4)]
    # in DRAM: the feature maps (2 x 4 x 36), not the im2col matrices; the weight gradient at the psum width
    assert dw.dram_elems() == (288, 36, 288) and grad.dram_elems() == (288, 288, 36) and grad.out == "acc"
    assert info == {"macs": sum(g.macs for g in gemms), "unmapped_macs": 0}
    assert info["macs"] == 2 * (36 * 9 * 4 * 2 + 36 * 9 * 4 * 3 + 144 * 3 * 3)


# ------------------------------------------------------------------------------------------------ refusals
@pytest.mark.parametrize("make, words", [
    (lambda: ds.pe_type("int3"), "unknown PE type 'int3'"),
    (lambda: ds.PEType("x", "fp8", 1, 1, 1, 1, 8, 8, 32), "unknown precision 'fp8'"),
    (lambda: ds.PEType("x", "int8", -0.2, 1, 1, 1, 8, 8, 32), "mult_pj must be a positive number, got -0.2"),
    (lambda: ds.PEType("x", "int8", 1, 0, 1, 1, 8, 8, 32), "mult_um2 must be a positive number, got 0"),
    (lambda: ds.PEType("x", "int8", 1, 1, 1, 1, 8, float("nan"), 32), "act_bits must be a positive number"),
    (lambda: ds.Accelerator("int8", 0, 8, 1024), "rows must be a positive int, got 0"),
    (lambda: ds.Accelerator("int8", 8, True, 1024), "cols must be a positive int, got True"),
    (lambda: ds.Accelerator("int8", 8, 8, -1), "buffer_bytes must be a positive int, got -1"),
    (lambda: ds.Accelerator("int8", 8, 8, 1024, clock_hz=0), "clock_hz must be a positive number, got 0"),
    (lambda: ds.Accelerator("int8", 8, 8, 1024, dram_pj_per_byte=-160), "dram_pj_per_byte must be a positive"),
    (lambda: ds.Accelerator("bogus", 8, 8, 1024), "unknown PE type 'bogus'"),
    (lambda: ds.Gemm("g", 0, 1, 1), "m must be a positive int, got 0"),
    (lambda: ds.Gemm("g", 1, 1, 1, out="fp32"), "out must be 'act' or 'acc'"),
    (lambda: ds.evaluate([], ds.Accelerator("int8", 8, 8, 1024)), "no conv or linear layer"),
])
def test_bad_input_is_one_clear_line(make, words):
    with pytest.raises(ConfigError) as e:
        make()
    assert words in str(e.value) and "\n" not in str(e.value)
