"""NVM device variation (edgetrain.hardware.variation): each model against its formula on tiny tensors with fixed
seeds (quantization to levels by hand, D2D log-normal drawn once per chip, C2C drawn anew per call), the model's
weights, buffers and train/eval flags bit for bit unchanged by every evaluation, the worst-case search at the
hand-derived vertex on a linear model and at least as damaging as random perturbations while inside its bound
element-wise, the Student-t interval by hand, variation-aware steps against hand-built references, refusals."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from edgetrain.errors import ConfigError
from edgetrain.hardware import variation as nvm
from edgetrain.hardware.variation import Chip, Variation, accuracy, expected_accuracy, mean_ci, quantize, targets

variation_step, worst_case = nvm.variation_step, nvm.worst_case

D = torch.float64
W0 = [[1.0, -2.0], [0.5, 0.0]]


def linear(weight: list, bias: bool = True, dtype: torch.dtype = torch.float32) -> nn.Linear:
    m = nn.Linear(len(weight[0]), len(weight), bias=bias).to(dtype)
    with torch.no_grad():
        m.weight.copy_(torch.tensor(weight, dtype=dtype))
        if bias:
            m.bias.copy_(torch.arange(len(weight), dtype=dtype) / 10)
    return m


def toy_data(n: int = 256, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    return x, (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()  # 3 classes


def trained_mlp() -> nn.Sequential:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
    x, y = toy_data()
    opt = torch.optim.Adam(m.parameters(), 1e-2)
    for _ in range(150):
        opt.zero_grad()
        F.cross_entropy(m(x), y).backward()
        opt.step()
    return m


def test_quantize_by_hand():
    w = torch.tensor([0.9, -0.3, 0.1, -1.0])  # max 1, 3 levels: D = 0.5
    assert torch.equal(quantize(w, 3), torch.tensor([1.0, -0.5, 0.0, -1.0]))
    assert torch.equal(quantize(w, 5), torch.tensor([1.0, -0.25, 0.0, -1.0]))  # D = 0.25: round(-1.2) = -1
    assert quantize(w, None) is w and torch.equal(quantize(torch.zeros(3), 4), torch.zeros(3))
    v = w.clone().requires_grad_(True)
    quantize(v, 3).sum().backward()
    assert torch.equal(v.grad, torch.ones(4))  # straight through


def test_targets_are_conv_and_linear_weights():
    m = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(2, 3))
    assert list(targets(m)) == ["0.weight", "3.weight"]
    assert list(targets(nn.Linear(2, 2))) == ["weight"]


def test_d2d_log_normal_once_per_chip():
    m = linear(W0)
    chip = Chip(m, Variation(d2d=0.1), seed=7)
    theta = 0.1 * torch.randn((2, 2), generator=torch.Generator().manual_seed(7))
    want = torch.tensor(W0) * torch.exp(theta)
    first = chip.weights()["weight"]
    assert torch.equal(first, want)
    assert torch.equal(chip.weights()["weight"], first)  # drawn once: the same chip reads the same weights
    assert first[1, 1] == 0  # a zero weight is an off device: a factor leaves it zero
    x = torch.tensor([[1.0, 2.0], [-1.0, 0.5]])
    assert torch.equal(chip(x), F.linear(x, want, m.bias))  # the bias stays digital
    assert not torch.equal(Chip(m, Variation(d2d=0.1), seed=8).weights()["weight"], first)


def test_c2c_gaussian_anew_per_call_and_with_d2d_and_levels():
    m = linear(W0)
    chip = Chip(m, Variation(c2c=0.05), seed=3)
    g = torch.Generator().manual_seed(3)
    for _ in range(2):  # max |w| = 2: sigma 0.05 * 2 per weight, a new draw per call
        want = torch.tensor(W0) + 0.05 * torch.tensor(2.0) * torch.randn((2, 2), generator=g)
        assert torch.equal(chip.weights()["weight"], want)
    both = Chip(m, Variation(d2d=0.2, c2c=0.05, levels=3), seed=4)
    g = torch.Generator().manual_seed(4)
    theta = 0.2 * torch.randn((2, 2), generator=g)  # D2D first, then C2C per call
    q = torch.tensor([[1.0, -2.0], [0.0, 0.0]])  # 3 levels of max 2: D = 1, round(0.5) = 0 (half to even)
    want = q * torch.exp(theta) + 0.05 * torch.tensor(2.0) * torch.randn((2, 2), generator=g)
    assert torch.equal(both.weights()["weight"], want)


def test_d2d_statistics():
    m = nn.Linear(400, 500)
    with torch.no_grad():
        m.weight.fill_(0.5)
    theta = torch.log(Chip(m, Variation(d2d=0.2), seed=0).weights()["weight"] / 0.5)
    assert abs(float(theta.mean())) < 0.002 and abs(float(theta.std()) - 0.2) < 0.002  # 200,000 draws


def test_mean_ci_by_hand():
    mean, half = mean_ci([0.5, 0.7, 0.6])  # s = 0.1, t(0.975, 2) = 4.302652729749464 (t table)
    assert mean == pytest.approx(0.6, abs=1e-15) and half == pytest.approx(4.302652729749464 * 0.1 / math.sqrt(3))


def test_expected_accuracy_is_the_chips():
    m = trained_mlp()
    x, y = toy_data(128, seed=1)
    data = [(x[:64], y[:64]), (x[64:], y[64:])]
    var = Variation(d2d=0.3, c2c=0.05)
    got = expected_accuracy(m, data, var, chips=5, seed=10)
    per = [accuracy(m, data, Chip(m, var, 10 + i)) for i in range(5)]
    assert got["per_chip"] == per and got["worst"] == min(per) and got["mean"] == pytest.approx(sum(per) / 5)
    assert len(set(per)) > 1  # the chips differ


def test_evaluations_leave_the_model_bit_for_bit():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(12, 3))
    m.train()
    m[1].eval()  # a mixed train/eval model: each flag must come back
    x = torch.randn(8, 1, 4, 4)
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    before = {k: v.clone() for k, v in m.state_dict().items()}
    ptrs = {k: v.data_ptr() for k, v in m.state_dict().items()}
    var = Variation(d2d=0.2, c2c=0.05, levels=4)
    expected_accuracy(m, [(x, y)], var, chips=3)
    worst_case(m, [(x, y)], var, steps=3)
    accuracy(m, [(x, y)], Chip(m, var))
    assert all(torch.equal(before[k], v) and v.data_ptr() == ptrs[k] for k, v in m.state_dict().items())
    assert m.training and m[0].training and not m[1].training


@pytest.mark.parametrize("domain", ["log", "additive"])
def test_worst_case_reaches_the_hand_derived_vertex(domain):
    # one sample, a linear map: dL/dz_y = p_y - 1 < 0 and dL/dz_j = p_j > 0, so the ascent direction of each
    # weight's deviation never changes sign: the worst case is the corner b * sign(w_ji x_i) (log domain) or
    # b * sign(x_i) (additive), negated on the true class's row
    w = [[0.5, -1.0, 0.25], [-0.75, 0.5, 1.0]]
    m = linear(w, bias=False)
    x, y = torch.tensor([[1.0, -2.0, 0.5]]), torch.tensor([1])
    var = Variation(d2d=0.1) if domain == "log" else Variation(c2c=0.05)
    r = worst_case(m, [(x, y)], var, k=3.0, steps=4, seed=5)
    rows = torch.tensor([[1.0], [-1.0]])  # +1 on the other class, -1 on the true class (y = 1)
    if domain == "log":
        want = rows * torch.sign(torch.tensor(w) * x) * torch.tensor(r["theta_bound"], dtype=torch.float32)
        assert r["theta_bound"] == pytest.approx(0.3) and r["delta"] is None
        assert torch.equal(r["theta"]["weight"], want)
    else:
        want = rows * torch.sign(x) * torch.tensor(r["delta_bound"]["weight"], dtype=torch.float32)
        assert r["delta_bound"]["weight"] == pytest.approx(3 * 0.05 * 1.0) and r["theta"] is None
        assert torch.equal(r["delta"]["weight"], want)
    assert r["curve"][-1][1] > r["curve"][0][1]  # the loss went up from the random start


def test_worst_case_beats_random_within_its_bound():
    m = trained_mlp()
    x, y = toy_data(256, seed=2)
    data = [(x[:128], y[:128]), (x[128:], y[128:])]
    var = Variation(d2d=0.1, c2c=0.02)
    r = worst_case(m, data, var, k=2.0, steps=10)
    base = {n: w.detach() for n, w in targets(m).items()}
    for n, t in r["theta"].items():  # element-wise, in the weights' dtype
        assert bool((t.abs() <= torch.tensor(r["theta_bound"], dtype=t.dtype)).all())
        assert bool((r["delta"][n].abs() <= torch.tensor(r["delta_bound"][n], dtype=t.dtype)).all())
        assert r["delta_bound"][n] == pytest.approx(2 * 0.02 * float(base[n].abs().max()))

    def score(theta: dict, delta: dict) -> tuple[float, float]:
        weights = {n: base[n] * torch.exp(theta[n]) + delta[n] for n in base}
        with torch.no_grad():
            out = torch.func.functional_call(m, weights, (x,), strict=False)
        return float((out.argmax(1) == y).double().mean()), float(F.cross_entropy(out, y))

    found = score(r["theta"], r["delta"])
    assert found[0] == r["accuracy"] == r["search_accuracy"]  # the best iterate is the one returned
    g = torch.Generator().manual_seed(0)
    randoms = [score({n: (2 * torch.rand(w.shape, generator=g) - 1) * r["theta_bound"] for n, w in base.items()},
                     {n: (2 * torch.rand(w.shape, generator=g) - 1) * r["delta_bound"][n] for n, w in base.items()})
               for _ in range(30)]
    assert found[0] <= min(a for a, _ in randoms) and found[1] >= max(c for _, c in randoms)
    chips = expected_accuracy(m, data, var, chips=30)  # unclipped Gaussian chips
    assert r["accuracy"] < chips["worst"]


def test_plain_step_is_a_plain_sgd_step():
    m, ref = linear(W0, dtype=D), linear(W0, dtype=D)
    x, y = torch.tensor([[1.0, -1.0], [0.5, 2.0]], dtype=D), torch.tensor([0, 1])
    variation_step(m, x, y, torch.optim.SGD(m.parameters(), 0.1), Variation(d2d=0.1), "plain",
                   generator=torch.Generator())
    opt = torch.optim.SGD(ref.parameters(), 0.1)
    F.cross_entropy(ref(x), y).backward()
    opt.step()
    assert torch.equal(m.weight, ref.weight) and torch.equal(m.bias, ref.bias)


def test_noise_step_against_a_hand_built_reference():
    m = linear(W0, dtype=D)
    x, y = torch.tensor([[1.0, -1.0], [0.5, 2.0]], dtype=D), torch.tensor([0, 1])
    loss = variation_step(m, x, y, torch.optim.SGD(m.parameters(), 0.1), Variation(d2d=0.2, c2c=0.1), "noise",
                          generator=torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    w = torch.tensor(W0, dtype=D, requires_grad=True)
    theta = 0.2 * torch.randn((2, 2), generator=g, dtype=D)
    eps = 0.1 * 2.0 * torch.randn((2, 2), generator=g, dtype=D)  # c2c * max|w| * eps
    b = (torch.arange(2, dtype=D) / 10).requires_grad_(True)
    ref = F.cross_entropy(F.linear(x, w * torch.exp(theta) + eps, b), y)
    ref.backward()
    assert loss == pytest.approx(float(ref.detach()), rel=1e-14)
    torch.testing.assert_close(m.weight.detach(), (w - 0.1 * w.grad).detach(), rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(m.bias.detach(), (b - 0.1 * b.grad).detach(), rtol=1e-14, atol=1e-14)


def test_adversarial_step_at_the_vertex_and_buffers_updated_once():
    w = [[0.5, -1.0, 0.25], [-0.75, 0.5, 1.0]]
    m = linear(w, bias=False, dtype=D)
    x, y = torch.tensor([[1.0, -2.0, 0.5]], dtype=D), torch.tensor([1])
    variation_step(m, x, y, torch.optim.SGD(m.parameters(), 0.1), Variation(d2d=0.1), "adversarial",
                   generator=torch.Generator().manual_seed(0), k=3.0, adv_steps=1)
    # one PGD step of 2.5 * bound from anywhere in the box lands on the vertex (see the worst-case test)
    theta = torch.tensor([[1.0], [-1.0]], dtype=D) * torch.sign(torch.tensor(w, dtype=D) * x) * 0.3
    ref = torch.tensor(w, dtype=D, requires_grad=True)
    F.cross_entropy(F.linear(x, ref * torch.exp(theta)), y).backward()
    torch.testing.assert_close(m.weight.detach(), (ref - 0.1 * ref.grad).detach(), rtol=1e-14, atol=1e-14)
    bn = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    variation_step(bn, torch.randn(5, 3), torch.tensor([0, 1, 0, 1, 1]), torch.optim.SGD(bn.parameters(), 0.1),
                   Variation(d2d=0.1), "adversarial", generator=torch.Generator(), adv_steps=3)
    assert int(bn[1].num_batches_tracked) == 1  # the PGD passes' statistics were put back


@pytest.mark.parametrize("make, fragment", [
    (lambda: Variation(d2d=-0.1), "d2d must be a finite number >= 0, got -0.1"),
    (lambda: Variation(c2c=float("nan")), "c2c must be a finite number >= 0, got nan"),
    (lambda: Variation(d2d=True), "d2d must be a finite number >= 0, got True"),
    (lambda: Variation(), "d2d and c2c are both 0"),
    (lambda: Variation(d2d=0.1, levels=1), "levels must be an int >= 2, got 1"),
    (lambda: Variation(d2d=0.1, levels=2.5), "levels must be an int >= 2, got 2.5"),
    (lambda: targets(nn.Sequential(nn.ReLU())), "has no nn.Linear or nn.Conv*d weight"),
    (lambda: Chip(nn.Linear(2, 2), Variation(d2d=0.1), seed=-1), "Chip seed must be an int >= 0, got -1"),
    (lambda: worst_case(nn.Linear(2, 2), [(torch.ones(1, 2), torch.zeros(1).long())], Variation(d2d=0.1), k=0),
     "k must be a finite number > 0, got 0"),
    (lambda: worst_case(nn.Linear(2, 2), [(torch.ones(1, 2), torch.zeros(1).long())], Variation(d2d=0.1), steps=0),
     "steps must be an int >= 1, got 0"),
    (lambda: worst_case(nn.Linear(2, 2), [(torch.ones(1, 2), torch.zeros(1).long())], Variation(d2d=0.1),
                        start="zero"), "start must be 'uniform' or 'gaussian', got 'zero'"),
    (lambda: worst_case(nn.Linear(2, 2), [], Variation(d2d=0.1)), "the search data has no batches"),
    (lambda: expected_accuracy(nn.Linear(2, 2), [], Variation(d2d=0.1), chips=1), "chips must be an int >= 2, got 1"),
    (lambda: accuracy(nn.Linear(2, 2), []), "the data has no samples"),
    (lambda: mean_ci([0.5, 0.6], confidence=1.0), "confidence must be in (0, 1), got 1.0"),
    (lambda: variation_step(nn.Linear(2, 2), torch.ones(1, 2), torch.zeros(1).long(), None, Variation(d2d=0.1),
                            "sam", generator=torch.Generator()), "mode must be one of"),
    (lambda: variation_step(nn.Linear(2, 2), torch.ones(1, 2), torch.zeros(1).long(), None, Variation(d2d=0.1),
                            "adversarial", generator=torch.Generator(), adv_steps=0), "adv_steps must be an int >= 1"),
])
def test_refusals_are_one_line(make, fragment):
    with pytest.raises(ConfigError) as e:
        make()
    assert fragment in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("argv, fragment", [
    (["--sigmas", "0.1,-0.2"], "d2d must be a finite number >= 0, got -0.2"),
    (["--sigmas", "0"], "d2d and c2c are both 0"),
    (["--sigmas", "a"], "--sigmas must be comma-separated numbers"),
    (["--modes", "plain,sam"], "unknown mode(s) ['sam']"),
    (["--search", "0"], "--search must be >= 1"),
])
def test_benchmark_refusals(argv, fragment, tmp_path):
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "hardware" / "variation.py"
    spec = importlib.util.spec_from_file_location("variation_bench", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    with pytest.raises(ConfigError) as e:
        mod.main(["--name", "x", "--out", str(tmp_path), *argv])
    assert fragment in str(e.value) and "\n" not in str(e.value)
    assert not list(tmp_path.iterdir())  # nothing half-done
