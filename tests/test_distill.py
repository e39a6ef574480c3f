"""Online distillation (BD-KD, DML, KD) and calibration: the losses against a slow per-sample reference, each
network's gradient from its own loss only, the fixed teacher untouched, both networks metered, ECE/NLL/Brier against
hand-computed values, and one-line errors."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import edgetrain as et
from edgetrain.calibration import ece, metrics, reliability, reliability_plot
from edgetrain.distill import OnlineDistillation, losses
from edgetrain.models import create_model
from edgetrain.train import TrainConfig

D = torch.float64


def _slow(z_s, z_t, y, method, tau, delta, gamma):  # noqa: ANN001, ANN202
    """Per sample, with Python floats: softmax, entropies, both KLs, the weights, the two losses."""
    n, k = z_s.shape
    ls, lt = [], []
    for i in range(n):
        def soft(z, t):  # noqa: ANN001, ANN202
            m = max(z)
            e = [math.exp((v - m) / t) for v in z]
            return [v / sum(e) for v in e]

        zs, zt = z_s[i].tolist(), z_t[i].tolist()
        ps, pt = soft(zs, tau), soft(zt, tau)
        ce_s, ce_t = -math.log(soft(zs, 1)[y[i]]), -math.log(soft(zt, 1)[y[i]])
        fwd = sum(pt[j] * math.log(pt[j] / ps[j]) for j in range(k))  # KL(p_t || p_s)
        rev = sum(ps[j] * math.log(ps[j] / pt[j]) for j in range(k))  # KL(p_s || p_t)
        h_s, h_t = -sum(v * math.log(v) for v in ps), -sum(v * math.log(v) for v in pt)
        if method == "bdkd":
            a, b = (1.0, delta) if h_s > h_t else (delta, 1.0)
            ls.append(ce_s + tau ** 2 * (a * fwd + b * rev))
            lt.append(ce_t + gamma * tau ** 2 * rev)
        else:
            ls.append(ce_s + tau ** 2 * fwd)
            lt.append(ce_t + tau ** 2 * rev)
    return sum(ls) / n, sum(lt) / n


@pytest.mark.parametrize("method", ["bdkd", "dml", "kd"])
@pytest.mark.parametrize("tau,delta,gamma", [(4.0, 2.0, 1.0), (1.0, 3.5, 0.3)])
def test_losses_equal_a_slow_per_sample_reference(method, tau, delta, gamma):
    g = torch.Generator().manual_seed(0)
    z_s, z_t = torch.randn(9, 5, generator=g, dtype=D) * 2, torch.randn(9, 5, generator=g, dtype=D) * 3
    y = torch.randint(0, 5, (9,), generator=g)
    student, teacher = losses(z_s, z_t, y, method, tau, delta, gamma)
    ref_s, ref_t = _slow(z_s, z_t, y, method, tau, delta, gamma)
    assert abs(float(student) - ref_s) <= 1e-12 * abs(ref_s)
    assert (teacher is None) == (method == "kd")
    if teacher is not None:
        assert abs(float(teacher) - ref_t) <= 1e-12 * abs(ref_t)


@pytest.mark.parametrize("method", ["bdkd", "dml"])
def test_each_network_gets_the_gradient_of_its_own_loss_only(method):
    """The joint loss L_S + L_T gives the student dL_S/dtheta_s and the teacher dL_T/dtheta_t (each loss detaches
    the other network's distribution)."""
    torch.manual_seed(0)
    t, s = nn.Linear(6, 4).double(), nn.Linear(6, 4).double()
    pair = OnlineDistillation(t, s, method).train()
    x, y = torch.randn(7, 6, dtype=D), torch.randint(0, 4, (7,))
    pair.training_loss(pair(x), y).backward()
    got = {n: p.grad.clone() for n, p in pair.named_parameters()}
    z_s, z_t = s(x), t(x)
    ls, lt = losses(z_s, z_t, y, method)
    want_s = torch.autograd.grad(ls, list(s.parameters()), retain_graph=True)
    want_t = torch.autograd.grad(lt, list(t.parameters()))
    for (n, _), w in zip(s.named_parameters(), want_s):
        torch.testing.assert_close(got[f"student.{n}"], w, rtol=1e-12, atol=0)
    for (n, _), w in zip(t.named_parameters(), want_t):
        torch.testing.assert_close(got[f"teacher.{n}"], w, rtol=1e-12, atol=0)


def test_kd_keeps_the_teacher_fixed_and_the_meter_sees_both_networks(tmp_path):
    from edgetrain.data import load_data

    tr = load_data("digits", "train", normalize="dataset")
    x, y = next(iter(tr.batches(16, seed=0, epoch=0)))
    sizes = {}
    for method in ("bdkd", "kd"):
        torch.manual_seed(0)
        teacher, student = create_model("small_cnn", 10, in_channels=1), create_model("small_cnn", 10, in_channels=1,
                                                                                        width=0.25)
        before = {k: v.clone() for k, v in teacher.state_dict().items()}
        pair = OnlineDistillation(teacher, student, method)
        sizes[method] = et.measure(pair, (x, y), repeats=0)
        et.train(pair, tr, None, TrainConfig(steps=3, batch_size=16, lr=0.05, threads=1), progress=False)
        same = all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
        assert same == (method == "kd")
    n_t = sum(p.numel() for p in teacher.parameters()) * 4
    n_s = sum(p.numel() for p in student.parameters()) * 4
    assert sizes["bdkd"].grad_bytes == n_t + n_s and sizes["kd"].grad_bytes == n_s
    assert sizes["kd"].saved_bytes < sizes["bdkd"].saved_bytes  # the fixed teacher runs without a graph


def test_ece_nll_and_brier_on_a_hand_computed_example(tmp_path):
    probs = torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [0.2, 0.8]], dtype=D)
    labels = torch.tensor([0, 1, 1, 1])
    # 15 bins of width 1/15: confidences 0.9 (bin 13), 0.6 (bin 8, (0.533, 0.6]), 0.7 (bin 10), 0.8 (bin 11)
    # bins: {0.9: right}, {0.6: wrong}, {0.7: right}, {0.8: right}: ECE = (0.1 + 0.6 + 0.3 + 0.2) / 4 = 0.3
    assert ece(probs, labels) == pytest.approx(0.3, abs=1e-12)
    r = reliability(probs, labels)
    assert sum(r["count"]) == 4 and r["count"][8] == 1 and r["accuracy"][8] == 0
    m = metrics(probs, labels)
    assert m["accuracy"] == 0.75
    assert m["nll"] == pytest.approx(-(math.log(0.9) + math.log(0.4) + math.log(0.7) + math.log(0.8)) / 4, abs=1e-12)
    assert m["brier"] == pytest.approx((2 * 0.01 + 2 * 0.36 + 2 * 0.09 + 2 * 0.04) / 4, abs=1e-12)
    assert ece(probs, labels, bins=1) == pytest.approx(abs(0.75 - (0.9 + 0.6 + 0.7 + 0.8) / 4), abs=1e-12)
    png = reliability_plot({"x": r}, tmp_path / "r.png")
    assert png.stat().st_size > 1000


def test_bad_settings_are_one_line():
    t, s = nn.Linear(2, 2), nn.Linear(2, 2)
    for kw, match in (({"method": "mutual"}, "choose one of"), ({"tau": 0}, "tau"), ({"delta": -1}, "delta"),
                      ({"gamma": -0.5}, "gamma")):
        with pytest.raises(et.ConfigError, match=match) as e:
            OnlineDistillation(t, s, **kw)
        assert "\n" not in str(e.value)
