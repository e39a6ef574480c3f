"""MAC (edgetrain.mac, spec algorithms_B §7.3): before adaptation the widened network predicts exactly what the base
predicts (torch.equal, on models of different styles); one inner step's gradients and a whole adaptation against a
plain-PyTorch reference built by hand (an ACU module whose pooled output is concatenated to the head's features, and
one concatenated head weight) in float64; dead ACUs reduce MAC to ANIL bit for bit; the user's model is unchanged by
evaluation; the init is the stated He init, reproducible per episode; each refusal is one line."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import edgetrain as et
from edgetrain.data import load_data
from edgetrain.mac import MAC, MACNet, episode_seed
from edgetrain.meta import Conv4, Episodes, MetaLearner, meta_train

D = torch.float64


class FunctionalReLU(nn.Module):
    """Activations as F.relu calls in forward (no ReLU modules)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.out = nn.Linear(6, 10), nn.Linear(10, 7), nn.Linear(7, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(F.relu(self.fc2(F.relu(self.fc1(x)))))


class Blocks(nn.Module):
    """Conv blocks in an nn.ModuleList; a strided, dilated, grouped, reflect-padded conv; BatchNorm with running
    statistics."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([
            nn.Sequential(nn.Conv2d(2, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU()),
            nn.Sequential(nn.Conv2d(6, 8, 3, stride=2, padding=2, dilation=2, groups=2, padding_mode="reflect"),
                          nn.ReLU())])
        self.fc = nn.Linear(8, 4)

    def forward(self, x: Tensor) -> Tensor:
        for b in self.blocks:
            x = b(x)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def _seeded(cls: Callable[[], nn.Module]) -> nn.Module:
    torch.manual_seed(0)
    return cls()


def _conv4() -> nn.Module:
    torch.manual_seed(0)
    return Conv4(ways=5, in_channels=1, width=8)


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 9), nn.Tanh(), nn.Linear(9, 4))


CASES = {  # name: (model, ACU layer, input shape, classes)
    "conv4-last-block": (_conv4, "features.3.0", (10, 1, 16, 16), 5),
    "conv4-first-block": (_conv4, "features.0.0", (10, 1, 16, 16), 5),
    "sequential-mlp": (_mlp, "2", (10, 6), 4),
    "input-layer-and-head-without-bias": (lambda: _seeded(lambda: nn.Sequential(nn.Linear(6, 12), nn.ReLU(),
                                                                                  nn.Linear(12, 4, bias=False))),
                                          "0", (10, 6), 4),
    "functional-relu": (lambda: _seeded(FunctionalReLU), "fc2", (10, 6), 3),
    "modulelist-blocks": (lambda: _seeded(Blocks), "blocks.1.0", (10, 2, 9, 9), 4),
}


def _data(shape: tuple[int, ...], classes: int, seed: int = 0,
          dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=dtype), torch.arange(shape[0]) % classes


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_before_adaptation_mac_predicts_exactly_what_the_base_predicts(case, mode):
    build, layer, shape, classes = CASES[case]
    model = build()
    model.train(mode == "train")
    x, y = _data(shape, classes)
    learner = MetaLearner(model, "mac", inner_steps=3, inner_lr=0.5, acu_layer=layer, n_acu=5)
    params = learner.adapt(x, y, steps=0)
    with torch.no_grad():
        want = model(x)
    assert torch.equal(learner.logits(params, x), want)  # tolerance 0
    assert not params["head.acu_columns"].any()
    adapted = learner.adapt(x, y)  # and the widening does something once adapted
    assert adapted["head.acu_columns"].abs().sum() > 0 and not torch.equal(adapted["acu.weight"], params["acu.weight"])
    assert not torch.equal(learner.logits(adapted, x), want)


# --------------------------------------------------------------------------------------------- the reference
class Reference(nn.Module):
    """MAC by hand: the frozen base up to L's input and up to the head's input, an explicit ACU module (conv or
    linear, then ReLU, then global average pooling), the features concatenated, one head of in + n_acu columns."""

    def __init__(self, to_layer: Callable[[Tensor], Tensor], to_head: Callable[[Tensor], Tensor], acu: nn.Module,
                 params: dict[str, Tensor]) -> None:
        super().__init__()
        self.to_layer, self.to_head, self.acu = to_layer, to_head, acu
        out, n_in = params["head.weight"].shape
        self.head = nn.Linear(n_in + acu.weight.shape[0], out).double()
        with torch.no_grad():
            self.acu.weight.copy_(params["acu.weight"])
            self.acu.bias.copy_(params["acu.bias"])
            self.head.weight.copy_(torch.cat([params["head.weight"], params["head.acu_columns"]], 1))
            self.head.bias.copy_(params["head.bias"])

    def forward(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            h, f = self.to_layer(x), self.to_head(x)
        a = F.relu(self.acu(h))
        a = a.mean((2, 3)) if a.ndim == 4 else a
        return self.head(torch.cat([f, a], 1))


def _reference_case(kind: str) -> tuple[nn.Module, MAC, Callable[[dict[str, Tensor]], Reference], Tensor, Tensor]:
    """(model, MAC, reference builder, support x, y) in float64: an ACU conv beside Conv4's last conv, or an ACU
    linear beside the MLP's hidden linear."""
    if kind == "conv":
        model = _conv4().double()
        mac = MAC(model, "features.3.0", 6, lr=0.3, acu_lr=0.7, seed=3)
        to_layer = model.features[:3]
        to_head = lambda x: model.features(x).mean((2, 3))
        acu = lambda: nn.Conv2d(8, 6, 3, padding=1).double()
        x, y = _data((10, 1, 16, 16), 5, dtype=D)
    else:
        model = _mlp().double()
        mac = MAC(model, "2", 6, lr=0.3, acu_lr=0.7, seed=3)
        to_layer, to_head = model[:2], model[:4]
        acu = lambda: nn.Linear(12, 6).double()
        x, y = _data((10, 6), 4, dtype=D)
    return model, mac, (lambda p: Reference(to_layer, to_head, acu(), p)), x, y


@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_one_inner_step_gradients_equal_a_reference_built_by_hand(kind):
    model, mac, reference, x, y = _reference_case(kind)
    params = mac.init(episode=2)
    g = torch.Generator().manual_seed(9)
    params["head.acu_columns"] = torch.randn(params["head.acu_columns"].shape, generator=g, dtype=D)  # ACU grads != 0
    params["acu.bias"] = 0.1 * torch.randn(params["acu.bias"].shape, generator=g, dtype=D)
    p = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    loss = F.cross_entropy(mac.forward(p, *mac.capture(x)), y)
    got = dict(zip(p, torch.autograd.grad(loss, list(p.values()))))
    ref = reference(params)
    ref_loss = F.cross_entropy(ref(x), y)
    ref_loss.backward()
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=1e-12)
    close = {"rtol": 0, "atol": 1e-12}
    torch.testing.assert_close(got["acu.weight"], ref.acu.weight.grad, **close)
    torch.testing.assert_close(got["acu.bias"], ref.acu.bias.grad, **close)
    torch.testing.assert_close(MAC.head_weight(got), ref.head.weight.grad, **close)
    torch.testing.assert_close(got["head.bias"], ref.head.bias.grad, **close)
    assert got["acu.weight"].abs().sum() > 1e-3 and got["head.acu_columns"].abs().sum() > 1e-3
    assert all(p.grad is None for p in model.parameters())  # the base is frozen


@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_a_whole_adaptation_equals_the_references_sgd_steps(kind):
    _, mac, reference, x, y = _reference_case(kind)
    steps = 4
    got = mac.adapt(x, y, steps, episode=5)
    start = mac.init(5)
    ref = reference(start)
    opt = torch.optim.SGD([{"params": list(ref.acu.parameters()), "lr": 0.7},
                           {"params": list(ref.head.parameters()), "lr": 0.3}], lr=0.3)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(ref(x), y).backward()
        opt.step()
    close = {"rtol": 0, "atol": 1e-12}
    torch.testing.assert_close(got["acu.weight"], ref.acu.weight.detach(), **close)
    torch.testing.assert_close(got["acu.bias"], ref.acu.bias.detach(), **close)
    torch.testing.assert_close(MAC.head_weight(got), ref.head.weight.detach(), **close)
    torch.testing.assert_close(got["head.bias"], ref.head.bias.detach(), **close)
    with torch.no_grad():
        torch.testing.assert_close(mac.logits(got, x), ref(x), **close)
    assert (got["acu.weight"] - start["acu.weight"]).abs().max() > 1e-6  # the ACUs learned (from step 2 on)
    one = mac.adapt(x, y, 1, episode=5)  # the first step cannot move them: the head's new columns start at zero
    assert torch.equal(one["acu.weight"], start["acu.weight"]) and torch.equal(one["acu.bias"], start["acu.bias"])


def test_dead_acus_reduce_mac_to_anil_bit_for_bit():
    model, mac, _, x, y = _reference_case("conv")
    params = mac.init(0)
    params["acu.bias"] = torch.full_like(params["acu.bias"], -1e6)  # ReLU outputs 0: the new features are zero
    got = mac.adapt(x, y, 3, params=params)
    anil = MetaLearner(model, "anil", inner_steps=3, inner_lr=0.3).adapt(x, y, train=False)
    assert torch.equal(got["head.weight"], anil["classifier.weight"])
    assert torch.equal(got["head.bias"], anil["classifier.bias"])
    assert not got["head.acu_columns"].any()


def test_init_is_he_normal_or_uniform_seeded_per_episode():
    model, mac, _, _, _ = _reference_case("conv")
    a, b = mac.init(7), mac.init(7)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["acu.weight"], mac.init(8)["acu.weight"])
    assert not torch.equal(a["acu.weight"], MAC(model, "features.3.0", 6, seed=4).init(7)["acu.weight"])
    assert len({episode_seed(s, e) for s in range(20) for e in range(600)}) == 20 * 600  # distinct streams
    fan_in = 8 * 3 * 3
    gen = torch.Generator().manual_seed(episode_seed(3, 7))
    want = torch.randn((6, 8, 3, 3), generator=gen, dtype=D) * (math.sqrt(2) / math.sqrt(fan_in))  # He et al. 2015
    assert torch.equal(a["acu.weight"], want) and not a["acu.bias"].any()
    uni = MAC(model, "features.3.0", 400, init="kaiming_uniform").init(0)["acu.weight"]
    bound = math.sqrt(6 / fan_in)
    assert uni.abs().max() <= bound and abs(float(uni.std()) - math.sqrt(2 / fan_in)) < 0.02 * math.sqrt(2 / fan_in)


def test_evaluation_changes_nothing_of_the_users_model_and_reports_a_confidence_interval():
    torch.manual_seed(0)
    data = load_data("digits", "train", normalize="dataset")  # 8x8
    episodes = Episodes(data, classes=[5, 6, 7, 8, 9], ways=5, shots=2, queries=3)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))  # BN tracks running statistics
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [p.requires_grad for p in model.parameters()]
    learner = MetaLearner(model, "mac", inner_steps=3, inner_lr=0.2, acu_layer="3", n_acu=4)
    r = learner.evaluate(episodes, n=8, seed=1)
    assert 0 <= r["accuracy"] <= 1 and r["ci95"] > 0 and r["episodes"] == 8
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert all(before[k].dtype == after[k].dtype for k in before)
    assert [p.requires_grad for p in model.parameters()] == flags and all(p.grad is None for p in model.parameters())
    assert model.training
    assert learner.evaluate(episodes, n=8, seed=1) == r  # reproducible: episodes and ACU inits seeded


def test_macnet_is_the_widened_network_as_a_module_and_measure_runs_on_it():
    model = _conv4()
    x, y = _data((10, 1, 16, 16), 5)
    mac = MAC(model, "features.3.0", 4, lr=0.1)
    params = mac.adapt(x, y, 2)
    net = MACNet(mac, params)
    with torch.no_grad():
        assert torch.equal(net(x), mac.logits(params, x))
    model.requires_grad_(False)
    m = et.measure(net, (x, y), optimizer=torch.optim.SGD([p for p in net.adapted.parameters()], lr=0.1), repeats=1)
    assert m.grad_bytes == sum(p.numel() * 4 for p in net.adapted.parameters())


# --------------------------------------------------------------------------------------------- refusals
class TwiceHead(FunctionalReLU):
    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.fc2(F.relu(self.fc1(x))))
        return self.out(h) + self.out(h)


class TwiceLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc, self.out = nn.Linear(6, 6), nn.Linear(6, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.fc(F.relu(self.fc(x))))


class LayerAfterHead(FunctionalReLU):
    def __init__(self) -> None:
        super().__init__()
        self.aux = nn.Linear(6, 2)
        self.classifier_name = "out"  # the head (edgetrain.meta._head), not the last-registered aux

    def forward(self, x: Tensor) -> Tensor:
        logits = self.out(F.relu(self.fc2(F.relu(self.fc1(x)))))
        self.aux(x)
        return logits


class NotTheLogits(FunctionalReLU):
    def forward(self, x: Tensor) -> Tensor:
        return 2 * super().forward(x)


def _one_line(match: str, fn: Callable[[], object]) -> None:
    with pytest.raises(et.ConfigError, match=match) as e:
        fn()
    assert "\n" not in str(e.value), str(e.value)


def test_each_refusal_is_one_line():
    model, x6 = FunctionalReLU(), torch.randn(4, 6)
    mac = lambda m, layer, **kw: MetaLearner(m, "mac", acu_layer=layer, **kw)
    _one_line(r"no module 'fc3'; did you mean fc2, fc1\?", lambda: mac(model, "fc3"))
    _one_line(r"no module 'zzz'; its Conv2d/Linear layers include fc1, fc2, out", lambda: mac(model, "zzz"))
    _one_line(r"'features.3.1' is a BatchNorm2d, not an nn.Conv2d or nn.Linear", lambda: mac(_conv4(), "features.3.1"))
    for bad in (0, 2.5, True, "8"):
        _one_line("n_acu: must be an int >= 1", lambda bad=bad: mac(model, "fc2", n_acu=bad))
    _one_line("acu_layer is needed", lambda: MetaLearner(model, "mac"))
    _one_line("inner_exclude does not apply", lambda: mac(model, "fc2", inner_exclude=("out.bias",)))
    _one_line("applies to algorithm 'mac' only", lambda: MetaLearner(model, "anil", acu_layer="fc2"))
    _one_line("acu_init 'xavier': choose one of", lambda: mac(model, "fc2", acu_init="xavier"))
    _one_line("acu_seed: must be an int", lambda: mac(model, "fc2", acu_seed=-1))
    _one_line("head 'out' was called 2 times", lambda: mac(TwiceHead(), "fc2").adapt(x6, torch.zeros(4).long()))
    _one_line("layer 'fc' was called 2 times", lambda: mac(TwiceLayer(), "fc").adapt(x6, torch.zeros(4).long()))
    _one_line("'aux' runs after the head 'out'", lambda: mac(LayerAfterHead(), "aux").adapt(x6, torch.zeros(4).long()))
    _one_line("output is not its head 'out'", lambda: mac(NotTheLogits(), "fc2").adapt(x6, torch.zeros(4).long()))
    learner = mac(model, "fc2")
    data = load_data("digits", "train", normalize="dataset")
    _one_line("MAC is a meta-test procedure", lambda: meta_train(learner, Episodes(data, [0, 1, 2], ways=3), 1,
                                                                         progress=False))
    _one_line("MAC is a meta-test procedure", lambda: learner.meta_loss(x6, torch.zeros(4).long(), x6,
                                                                        torch.zeros(4).long()))
