"""Thermal-aware execution (edgetrain.hardware.thermal): the RC step against the closed form for a constant power
(exact step, Euler's first-order convergence), the device's power and latency on hand-computed cases, the step-wise
governor on a hand-made temperature trace, the width policy on a hand-made device where the switch frame and its
temperature are computed by hand (before the trip point; the always-wide run throttles and misses deadlines from a
hand-computed frame on), the slimmable network against a float64 reference built from sliced weights, per-width
MACs from the cost model against a hand count, and the refusals (one line each)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from edgetrain.cost import estimate
from edgetrain.errors import ConfigError
from edgetrain.hardware.thermal import (
    PHONE,
    RC,
    Device,
    Governor,
    SlimmableCNN,
    Trace,
    choose_width,
    set_width,
    simulate,
    slimmable_step,
)

D = torch.float64


# ------------------------------------------------------------------------------------------------ RC model
def test_rc_exact_step_is_the_closed_form():
    rc = RC(r=10.0, c=2.0, amb=20.0)  # tau 20 s; 3 W -> T_inf = 50 C
    assert rc.step(20.0, 3.0, 20.0) == pytest.approx(20.0 + 30.0 * (1 - math.exp(-1.0)), abs=1e-12)  # 38.9636...
    assert rc.step(20.0, 3.0, 20.0) == pytest.approx(38.963616764, abs=1e-8)
    t = 20.0
    for _ in range(20):  # 20 steps of 1 s compose to one step of 20 s
        t = rc.step(t, 3.0, 1.0)
    assert t == pytest.approx(rc.step(20.0, 3.0, 20.0), abs=1e-12)
    assert rc.step(70.0, 0.0, 20.0) == pytest.approx(20.0 + 50.0 * math.exp(-1.0), abs=1e-12)  # cooling
    assert rc.step(33.0, 3.0, 1e6) == pytest.approx(50.0, abs=1e-9)  # steady state T_amb + P R
    assert rc.step(33.0, 3.0, 0.0) == 33.0


def test_rc_euler_step_by_hand_and_first_order_convergence():
    rc = RC(r=10.0, c=2.0, amb=20.0)
    assert rc.step(20.0, 3.0, 1.0, method="euler") == pytest.approx(21.5, abs=1e-12)  # 20 + 1 * (30 - 0) / 20
    exact = 20.0 + 30.0 * (1 - math.exp(-1.0))
    errors = []
    for n in (100, 200):
        t = 20.0
        for _ in range(n):
            t = rc.step(t, 3.0, 20.0 / n, method="euler")
        errors.append(abs(t - exact))
    assert errors[0] < 0.1
    assert errors[0] / errors[1] == pytest.approx(2.0, rel=0.02)  # halving dt halves the error


# ------------------------------------------------------------------------------------------------ device
def tiny(**kw) -> Device:
    """Two levels (1000, 2000 MHz) at 1 V, one core, k 1000 uW/MHz/V^2 (1 W and 2 W busy), no static power,
    1 MAC/cycle; R 10 K/W, C 1 J/K (tau 10 s), ambient 20 C; trip 35 C, hysteresis 1 C, polled every 1 s."""
    args = {"rc": RC(10.0, 1.0, 20.0), "mhz": (1000.0, 2000.0), "volts": (1.0, 1.0), "cores": 1, "k_dyn": 1000.0,
            "p_static": 0.0, "macs_per_cycle": 1.0, "trip": 35.0, "hysteresis": 1.0, "poll": 1.0}
    return Device(**{**args, **kw})


def test_device_power_and_latency_by_hand():
    dev = tiny(mhz=(1000.0, 2000.0), volts=(0.8, 1.0), cores=2, k_dyn=100.0, p_static=0.5, macs_per_cycle=2.0)
    assert dev.dynamic_power(0) == pytest.approx(2 * 100 * 1000 * 0.64e-6, abs=1e-15)  # 0.128 W
    assert dev.dynamic_power(1) == pytest.approx(0.4, abs=1e-15)
    assert dev.power(1, 0.5) == pytest.approx(0.7, abs=1e-15)
    assert dev.latency(4e9, 0) == pytest.approx(1.0, abs=1e-15)  # 4e9 / (2 cores * 2 MAC * 1e9 Hz)
    assert PHONE.dynamic_power(len(PHONE.mhz) - 1) == pytest.approx(4 * 442 * 2803.2 * 1.05**2 * 1e-6, rel=1e-12)


# ------------------------------------------------------------------------------------------------ governor
def test_step_wise_governor_on_a_hand_trace():
    gov = Governor(tiny(mhz=(500.0, 1000.0, 1500.0, 2000.0), volts=(1.0,) * 4, trip=90.0, hysteresis=2.0,
                        rc=RC(10.0, 1.0, 25.0)))
    trace = [80, 91, 92, 92, 91, 89, 87.9, 87, 95]
    # 80 below; 91, 92 above and rising: down, down; 92 flat, 91 falling, 89 inside the band: hold;
    # 87.9, 87 below trip - hysteresis: up, up; 95 above and rising: down
    assert [gov.update(t) for t in trace] == [3, 2, 1, 1, 1, 1, 2, 3, 2]
    for t in range(100, 110):  # clamped at the lowest level
        gov.update(float(t))
    assert gov.level == 0 and gov.state == 3


# ------------------------------------------------------------------------------------------------ policy
def test_choose_width_by_hand():
    rc = RC(10.0, 1.0, 20.0)
    powers = {0.5: 5.0, 1.0: 8.0}  # T_inf 70 and 100 C
    # from 80 C, 10 s ahead: wide 100 - 20/e = 92.6 (over 90), narrow 70 + 10/e = 73.7
    assert choose_width(rc, 80.0, powers, 10.0, 90.0) == 0.5
    assert choose_width(rc, 60.0, powers, 10.0, 90.0) == 1.0  # wide: 100 - 40/e = 85.3
    assert choose_width(rc, 99.0, powers, 10.0, 50.0) == 0.5  # none fits: the narrowest


def test_policy_switches_before_the_trip_point_hand_case():
    dev = tiny()
    macs = {0.5: 0.5e9, 1.0: 2e9}  # at 2000 MHz: 0.25 s and 1 s per 1 s frame (0.5 W and 2 W on average)
    wide = simulate(dev, macs, [1.0], seconds=30, fps=1.0)
    # always wide: T_k = 40 - 20 exp(-k/10); the poll at t = 14 s sees 35.07 C, rising -> 1000 MHz, 2 s frames
    assert wide.time[:15] == [float(k) for k in range(15)] and wide.mhz[14] == 1000.0
    assert min(t for t, x in zip(wide.time, wide.latency) if x > 1.0) == 14.0
    assert wide.peak >= dev.trip and wide.throttled_s > 0
    pol = simulate(dev, macs, [0.5, 1.0], seconds=30, fps=1.0, horizon=2.0)
    # the wide prediction 2 s ahead, 40 - 20 exp(-(k+2)/10), first reaches 35 C at k = 12 (k < 10 ln 4 - 2 = 11.86)
    assert pol.width[:12] == [1.0] * 12 and pol.width[12] == 0.5
    assert pol.temp[11] == pytest.approx(40 - 20 * math.exp(-1.2), abs=1e-9)  # 33.98 C at the switch: below trip
    assert pol.peak < dev.trip and pol.throttled_s == 0 and pol.on_time == pol.slots == 30
    assert set(pol.mhz) == {2000.0}


def test_trace_summary_weights_accuracy_by_time_by_hand():
    tr = Trace(time=[0.0, 1.0, 2.0], width=[1.0, 1.0, 0.5], mhz=[1.0] * 3, latency=[0.5, 0.9, 1.5],
               temp=[30.0] * 3, held=[1.0, 1.0, 2.0], slots=4, on_time=2, peak=31.0)
    s = tr.summary({0.5: 0.8, 1.0: 0.9}, 1.0)
    assert s["mean_accuracy"] == pytest.approx(0.5 * 0.9 + 0.5 * 0.8, abs=1e-15)
    assert s["on_time_accuracy"] == pytest.approx(2 * 0.9 / 4, abs=1e-15)
    assert s["miss_rate"] == 0.5 and s["dropped"] == 1 and s["latency_max_ms"] == 1500.0


# ------------------------------------------------------------------------------------------------ slimmable network
def test_slimmable_width_matches_a_sliced_reference():
    torch.manual_seed(0)
    net = SlimmableCNN(chans=(4, 6, 8)).to(D)
    for bn in net.bns:  # non-trivial statistics and affine parameters per width
        for b in bn.bn:
            b.running_mean.uniform_(-1, 1), b.running_var.uniform_(0.5, 2), b.weight.data.uniform_(0.5, 2)
    x = torch.randn(3, 1, 12, 12, dtype=D)
    set_width(net, 0.5).eval()
    h, cin = x, 1
    for i, (conv, bn, c) in enumerate(zip(net.convs, net.bns, (2, 3, 4))):
        b = bn.bn[net.widths.index(0.5)]
        h = F.conv2d(h, conv.weight[:c, :cin], padding=1)
        h = F.relu(F.batch_norm(h, b.running_mean, b.running_var, b.weight, b.bias, False, 0.0, b.eps))
        h = F.max_pool2d(h, 2) if i < 2 else h
        cin = c
    ref = h.mean((2, 3)) @ net.head.weight[:, :4].T + net.head.bias
    assert torch.equal(net(x), ref)
    assert not torch.equal(set_width(net, 1.0)(x), ref)


def test_switchable_bn_keeps_statistics_per_width():
    torch.manual_seed(0)
    net = SlimmableCNN(chans=(4, 6, 8))
    before = [b.running_mean.clone() for bn in net.bns for b in bn.bn]
    set_width(net, 0.5).train()(torch.randn(4, 1, 12, 12))
    after = [b.running_mean for bn in net.bns for b in bn.bn]
    moved = [not torch.equal(a, b) for a, b in zip(before, after)]
    i = net.widths.index(0.5)
    assert moved == [j % len(net.widths) == i for j in range(len(moved))]


def test_per_width_macs_from_the_cost_model_by_hand():
    net = SlimmableCNN()
    # per image: conv1 c1*9*784 + conv2 c2*c1*9*196 + conv3 c3*c2*9*49 + head c3*10
    hand = {1.0: 16 * 9 * 784 + 32 * 16 * 9 * 196 + 64 * 32 * 9 * 49 + 640,  # 1,919,872
            0.5: 8 * 9 * 784 + 16 * 8 * 9 * 196 + 32 * 16 * 9 * 49 + 320}  # 508,352
    for w, m in hand.items():
        assert estimate(set_width(net, w), input_shape=(1, 28, 28), batch_size=4).macs == 4 * m


def test_slimmable_step_gradients_sum_over_widths():
    torch.manual_seed(0)
    net = SlimmableCNN(widths=(0.5, 1.0), chans=(4, 6, 8)).to(D)
    x, y = torch.randn(5, 1, 12, 12, dtype=D), torch.tensor([0, 1, 2, 3, 4])
    params = list(net.parameters())
    wide = set_width(net, 1.0)(x)
    soft = F.softmax(wide.detach(), 1)
    loss = F.cross_entropy(wide, y) + F.kl_div(F.log_softmax(set_width(net, 0.5)(x), 1), soft, reduction="batchmean")
    ref = torch.autograd.grad(loss, params, allow_unused=True)
    slimmable_step(net, x, y, torch.optim.SGD(params, lr=0.0))
    for p, r in zip(params, ref):
        if r is None:
            assert p.grad is None or not p.grad.any()
        else:
            torch.testing.assert_close(p.grad, r, rtol=1e-12, atol=1e-14)
    assert net.width == 1.0


# ------------------------------------------------------------------------------------------------ refusals
@pytest.mark.parametrize("make, match", [
    (lambda: RC(r=0.0, c=1.0), "RC r"), (lambda: RC(r=-1.0, c=1.0), "RC r"), (lambda: RC(r=1.0, c=0.0), "RC c"),
    (lambda: RC(r=1.0, c=-2.0), "RC c"), (lambda: RC(r=float("nan"), c=1.0), "RC r"),
    (lambda: RC(1.0, 1.0).step(30.0, -1.0, 1.0), "power"), (lambda: RC(1.0, 1.0).step(30.0, 1.0, -1.0), "dt"),
    (lambda: RC(1.0, 1.0).step(30.0, 1.0, 1.0, method="rk4"), "method"),
    (lambda: tiny(mhz=(2000.0, 1000.0)), "ascending"), (lambda: tiny(volts=(1.0,)), "one voltage"),
    (lambda: tiny(k_dyn=0.0), "k_dyn"), (lambda: tiny(p_static=-0.1), "p_static"), (lambda: tiny(poll=0.0), "poll"),
    (lambda: tiny(trip=15.0), "above the ambient"), (lambda: tiny(cores=0), "cores"),
    (lambda: tiny().power(5, 0.5), "frequency level"), (lambda: tiny().power(0, 1.5), "busy"),
    (lambda: simulate(tiny(), {1.0: 1e9}, [0.5], seconds=1, fps=1), "unknown width"),
    (lambda: simulate(tiny(), {1.0: 1e9, 0.5: 1e8}, [0.5, 1.0], seconds=1, fps=1), "horizon"),
    (lambda: simulate(tiny(), {1.0: 1e9}, [1.0], seconds=1, fps=0), "fps"),
    (lambda: choose_width(RC(1.0, 1.0), 30.0, {1.0: 1.0}, 0.0, 90.0), "horizon"),
    (lambda: set_width(SlimmableCNN(), 0.3), "unknown width 0.3"),
    (lambda: SlimmableCNN(widths=(0.5, 0.75)), "including 1.0"),
])
def test_refusals_are_one_line(make, match):
    with pytest.raises(ConfigError, match=match) as e:
        make()
    assert "\n" not in str(e.value)
