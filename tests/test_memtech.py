"""The last-level cache technology model (edgetrain.hardware.memtech): one layer and one access pattern by hand,
the technology table's interpolation and iso-area capacity by hand, the iso-area mechanism on a real model, and
one-line refusals."""

from __future__ import annotations

import math

import pytest
import torch

import edgetrain as et
from edgetrain.cost import CostTable, LayerCost, estimate
from edgetrain.errors import ConfigError
from edgetrain.hardware.memtech import (
    DRAM,
    TECHNOLOGIES,
    compare,
    iso_area_capacity,
    llc,
    llc_cost,
    parse_dram,
    parse_llc,
)
from edgetrain.models import create_model

MiB = 1024 * 1024


def _c(v) -> dict:
    return {"value": v, "source": "test"}


def cache(**over) -> dict:
    """A toy cache: 4-byte lines; hit 1 pJ / 1 ns, write 3 pJ / 2 ns, miss lookup 0.5 pJ / 0.5 ns, 1 mW leakage."""
    d = {"technology": "stt_mram", "capacity": _c(64), "line_bytes": _c(4), "area_mm2": _c(2.0),
         "read_latency_s": _c(1e-9), "miss_latency_s": _c(0.5e-9), "write_latency_s": _c(2e-9),
         "read_energy_j": _c(1e-12), "miss_energy_j": _c(0.5e-12), "write_energy_j": _c(3e-12), "leakage_w": _c(1e-3)}
    d.update(over)
    return d


DRAM_TOY = parse_dram({"read_pj_per_byte": _c(2), "write_pj_per_byte": _c(4), "line_latency_s": _c(10e-9)})


def one_linear() -> CostTable:
    """Linear(4 -> 3) at batch 2 that trains its weight and passes the gradient on (2 backward products per MAC)."""
    row = LayerCost(name="fc", kind="Linear", in_shape=(4,), out_shape=(3,), weight_bytes=60, trainable_bytes=60,
                    macs=12, backward_macs=24, saved_per_sample=16.0)
    return CostTable({"fc": row}, batch_size=2, optimizer="sgd_momentum", input_shape=(4,))


def test_one_layer_streaming_in_the_llc_resident_in_dram_by_hand():
    # resident 244 B > 64: DRAM; streaming 32 + 24 = 56 B <= 64: the LLC (tests/test_hardware_energy.py's split):
    # LLC reads 56 B, writes 56 B; DRAM reads 332 B, writes 212 B. Lines of 4 B: 14 hits, 14 writes, 136 misses.
    c = llc_cost(one_linear(), parse_llc(cache()), dram=DRAM_TOY)
    assert c.resident_level == "dram"
    assert (c.llc_read_bytes, c.llc_write_bytes, c.dram_read_bytes, c.dram_write_bytes) == (56, 56, 332, 212)
    assert c.llc_dynamic_j == pytest.approx((14 * 1 + 14 * 3 + 136 * 0.5) * 1e-12, rel=1e-12)  # 124 pJ
    assert c.llc_time_s == pytest.approx((14 * 1 + 14 * 2 + 136 * 0.5) * 1e-9, rel=1e-12)  # 110 ns
    assert c.dram_time_s == pytest.approx(136 * 10e-9, rel=1e-12)  # 1360 ns
    assert c.time_s == pytest.approx(1470e-9, rel=1e-12)
    assert c.llc_leakage_j == pytest.approx(1e-3 * 1470e-9, rel=1e-12)  # 1470 pJ
    assert c.dram_j == pytest.approx((332 * 2 + 212 * 4) * 1e-12, rel=1e-12)  # 1512 pJ
    assert c.llc_energy_j == pytest.approx(1594e-12, rel=1e-12)
    assert c.energy_j == pytest.approx(3106e-12, rel=1e-12)
    assert c.edp_js == pytest.approx(3106e-12 * 1470e-9, rel=1e-12)
    assert c.llc_edp_js == pytest.approx(1594e-12 * 1470e-9, rel=1e-12)
    assert c.area_mm2 == 2.0
    c = llc_cost(one_linear(), parse_llc(cache()), dram=DRAM_TOY, other_time_s=1e-6)  # the LLC leaks meanwhile
    assert c.llc_leakage_j == pytest.approx(1e-3 * 2470e-9, rel=1e-12) and c.time_s == pytest.approx(1470e-9)


def test_everything_in_the_llc_and_an_upper_level_taking_the_stream_by_hand():
    # capacity 1024: all 244 resident + 56 streaming bytes live in the LLC, no write-back of the 32 saved bytes:
    # reads 56 + 332 = 388 B (97 lines), writes 56 + 212 - 32 = 236 B (59 lines), no DRAM.
    c = llc_cost(one_linear(), parse_llc(cache(capacity=_c("1KiB"))), dram=DRAM_TOY)
    assert c.resident_level == "llc" and c.dram_read_bytes == c.dram_write_bytes == 0
    assert c.llc_dynamic_j == pytest.approx((97 * 1 + 59 * 3) * 1e-12, rel=1e-12)  # 274 pJ
    assert c.time_s == pytest.approx((97 * 1 + 59 * 2) * 1e-9, rel=1e-12)  # 215 ns
    assert c.energy_j == pytest.approx(274e-12 + 1e-3 * 215e-9, rel=1e-12)
    # a 60-byte L1 holds the 56 streaming bytes: the LLC sees none of them, only the 136 lines missing to DRAM
    c = llc_cost(one_linear(), parse_llc(cache()), upper=(("l1", 60),), dram=DRAM_TOY)
    assert c.llc_read_bytes == c.llc_write_bytes == 0
    assert c.llc_dynamic_j == pytest.approx(136 * 0.5e-12, rel=1e-12)
    assert c.time_s == pytest.approx(136 * (0.5e-9 + 10e-9), rel=1e-12)


def test_table_interpolation_and_iso_area_capacity_by_hand():
    # at the geometric mean of two published capacities the log-log interpolation is the geometric mean of values
    mid = llc("sram", math.sqrt(2) * MiB)  # between op_SRAM_ww512/1M.txt and 2M.txt
    assert mid.read_energy_j.value == pytest.approx(math.sqrt(0.160 * 0.222) * 1e-9, rel=1e-12)
    assert mid.leakage_w.value == pytest.approx(math.sqrt(1393.899 * 2628.406) * 1e-3, rel=1e-12)
    assert mid.area_mm2.source.startswith("ours: log-log interpolation")
    assert llc("sram", "1MiB").area_mm2.source.endswith("op_SRAM_ww512/1M.txt, 'Total Area (mm^2)'")
    # a 1 MiB SRAM cache is 0.804 mm^2; STT-MRAM is 0.747 mm^2 at 2 MiB and 1.259 mm^2 at 4 MiB
    t = math.log(0.804 / 0.747) / math.log(1.259 / 0.747)
    cap = iso_area_capacity("stt_mram", "1MiB")
    assert cap == pytest.approx(2 * MiB * 2**t, rel=1e-12)  # about 2.2 MiB
    assert llc("stt_mram", cap).area_mm2.value == pytest.approx(0.804, rel=1e-12)


def test_iso_capacity_ratio_on_one_layer_by_hand():
    # a 1 MiB LLC holds the whole step: 388 B read (6.0625 lines), 236 B written (3.6875 lines), no DRAM
    h, w = 388 / 64, 236 / 64
    e_s, t_s = h * 0.160e-9 + w * 0.152e-9, h * 0.708e-9 + w * 0.343e-9  # op_SRAM_ww512/1M.txt
    e_m, t_m = h * 0.309e-9 + w * 1.154e-9, h * 4.042e-9 + w * 10.635e-9  # op_MRAM_ww512/1M.txt
    e_s, e_m = e_s + 1393.899e-3 * t_s, e_m + 140.996e-3 * t_m
    rows = {r["technology"] + r["mode"]: r for r in compare(one_linear(), "1MiB")}
    assert rows["stt_mramiso-capacity"]["edp_ratio"] == pytest.approx(e_s * t_s / (e_m * t_m), rel=1e-12)
    assert rows["stt_mramiso-capacity"]["area_ratio"] == pytest.approx(0.804 / 0.342, rel=1e-12)
    assert rows["sot_mramiso-area"]["area_ratio"] == pytest.approx(1.0, rel=1e-12)
    assert rows["srambaseline"]["edp_ratio"] == 1.0 and len(rows) == 5


def test_iso_area_holds_more_of_the_step_and_misses_less():
    torch.manual_seed(0)
    model = create_model("small_cnn", num_classes=10, in_channels=1)
    x, recipe = torch.zeros(2, 1, 28, 28), et.Recipe([et.Freeze(last_k_blocks=1)])
    table = estimate(model, recipe, batch_size=32, example=x)
    with et.apply_(model, recipe, x):
        rows = {r["technology"] + r["mode"]: r for r in compare(table, "2MiB", model, upper=(("l1", 32 * 1024),))}
    sram, iso_cap, iso_area = rows["srambaseline"], rows["stt_mramiso-capacity"], rows["stt_mramiso-area"]
    assert sram["resident_level"] == iso_cap["resident_level"] == "dram"  # the resident state exceeds 2 MiB
    assert iso_area["resident_level"] == "llc" and iso_area["capacity_ratio"] > 2  # ... but not 2.4 MiB of STT
    assert iso_area["dram_read_bytes"] < sram["dram_read_bytes"] / 2
    assert iso_area["edp_ratio"] > iso_cap["edp_ratio"]  # here the capacity, not the cell, wins the EDP
    assert sram["dram_read_bytes"] == iso_cap["dram_read_bytes"]  # same capacity, same placement


def test_refusals_are_one_line():
    known = "known: sram, stt_mram, sot_mram"
    with pytest.raises(ConfigError, match=f"unknown memory technology 'rram'; {known}"):
        llc("rram", "1MiB")
    with pytest.raises(ConfigError, match=f"unknown memory technology 'pcm'; {known}"):
        parse_llc(cache(technology="pcm"))
    with pytest.raises(ConfigError, match=f"unknown memory technology 'edram'; {known}"):
        compare(one_linear(), "1MiB", technologies=("sram", "edram"))
    bad = [
        (cache(read_energy_j=_c(0)), "read_energy_j must be > 0, got 0"),
        (cache(leakage_w=_c(-1.0)), "leakage_w must be > 0, got -1.0"),
        (cache(capacity=_c(-64)), "capacity must be > 0, got -64"),
        (cache(write_latency_s=2e-9), r"write_latency_s must be \{value: ..., source"),
        (cache(area_mm2={"value": 1, "source": " "}), "area_mm2 must be .* non-empty source"),
        (cache(miss_energy_j=_c("lots")), "miss_energy_j must be a number, got 'lots'"),
        (cache(banks=_c(8)), r"unknown keys \['banks'\]"),
    ]
    for d, msg in bad:
        with pytest.raises(ConfigError, match=msg):
            parse_llc(d)
    d = cache()
    del d["line_bytes"]
    with pytest.raises(ConfigError, match="missing line_bytes"):
        parse_llc(d)
    with pytest.raises(ConfigError, match="dram: line_latency_s must be > 0, got -1"):
        parse_dram({"read_pj_per_byte": _c(1), "write_pj_per_byte": _c(1), "line_latency_s": _c(-1)})
    with pytest.raises(ConfigError, match="cache capacity must be > 0 bytes, got 0"):
        llc("sram", 0)
    with pytest.raises(ConfigError, match="cache capacity 32768 KiB is outside the technology table's 16 KiB-8 MiB"):
        llc("sot_mram", "32MiB")
    with pytest.raises(ConfigError, match="no stt_mram cache in the table .* has the 5.75 mm\\^2 of a 8192 KiB SRAM"):
        iso_area_capacity("stt_mram", "8MiB")
    with pytest.raises(ConfigError, match="other_time_s must be >= 0 seconds, got -1"):
        llc_cost(one_linear(), parse_llc(cache()), other_time_s=-1)
    with pytest.raises(ConfigError, match="upper level 'l1' capacity must be > 0 and below the LLC's 64 bytes"):
        llc_cost(one_linear(), parse_llc(cache()), upper=(("l1", 64),))


def test_every_table_constant_has_a_source_and_each_technology_prices_a_step():
    for tech in TECHNOLOGIES:
        for cap in ("16KiB", "1.5MiB", "8MiB"):
            consts = llc(tech, cap).constants()
            assert len(consts) == 10 and all(v > 0 and src for _, v, src in consts)
    assert DRAM.line_latency_s.value > 0 and DRAM.read_pj_per_byte.source
