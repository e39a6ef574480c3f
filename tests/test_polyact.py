"""PolyMPCNet's trainable polynomial activations and the 2PC cost model (edgetrain.hardware.polyact)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from edgetrain import ops
from edgetrain.errors import ConfigError
from edgetrain.hardware.polyact import MPCCost, PolyActivations, PolyFn, _key, poly, relu_fit

torch.set_num_threads(1)


def _tiny() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(64, 5), nn.ReLU())


class FuncNet(nn.Module):
    """ReLUs as functional calls in every spelling, plus one nn.ReLU inside a Sequential; ``skip`` lists the calls
    (0..3 in the body, 4 the module) that compute the identity instead, as a hand-written reference."""

    def __init__(self, skip: frozenset[int] = frozenset()) -> None:
        super().__init__()
        self.skip = skip
        self.a, self.b = nn.Linear(6, 6), nn.Linear(6, 6)
        self.body = nn.Sequential(nn.Linear(6, 6), nn.Identity() if 4 in skip else nn.ReLU(), nn.Linear(6, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.a(x)
        x = x if 0 in self.skip else F.relu(x)
        h = self.b(x)
        x = h if 1 in self.skip else torch.relu(h)
        x = x if 2 in self.skip else x.relu()
        x = x + 1.0
        x = x if 3 in self.skip else F.relu(x, inplace=True)
        return self.body(x)


def _resnet10t() -> nn.Module:
    from edgetrain.models.foreign import ensure_torchvision

    ensure_torchvision()
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    return timm.create_model("resnet10t", pretrained=False, num_classes=10)


def _identity_coeffs(p: PolyActivations) -> None:
    with torch.no_grad():
        for w in p.coeffs.values():
            w.zero_()
            w[1] = 1.0


# ------------------------------------------------------------------------------------------- the polynomial
@pytest.mark.parametrize("per_channel", [False, True])
def test_poly_forward_and_gradients_match_the_hand_formula(per_channel):
    torch.manual_seed(1)
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 3, dtype=torch.float64) if per_channel else torch.randn(4, dtype=torch.float64)
    w.requires_grad_(True)
    s = 0.3
    y = poly(x, w, s)
    wb = w[:, None, :, None, None] if per_channel else w[:, None, None, None, None]  # (4, 1, C|1, 1, 1)
    ref = wb[0] + wb[1] * x + s * wb[2] * x**2 + s * wb[3] * x**3
    torch.testing.assert_close(y, ref, rtol=1e-13, atol=1e-13)
    g = torch.randn_like(y)
    gx, gw = torch.autograd.grad(y, (x, w), g)
    torch.testing.assert_close(gx, g * (wb[1] + 2 * s * wb[2] * x + 3 * s * wb[3] * x**2), rtol=1e-12, atol=1e-12)
    dims = (0, 2, 3) if per_channel else (0, 1, 2, 3)
    ref_w = torch.stack([(g * x**k).sum(dims) * (s if k >= 2 else 1.0) for k in range(4)])
    torch.testing.assert_close(gw, ref_w, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(lambda a, b: PolyFn.apply(a, b, s), (x, w))


def test_relu_fit_is_the_least_squares_fit():
    r = 2.5
    assert relu_fit(2, r) == pytest.approx([3 * r / 32, 0.5, 15 / (32 * r)], rel=1e-12, abs=1e-14)  # Legendre, by hand
    assert relu_fit(1, r) == pytest.approx([r / 4, 0.5], rel=1e-12, abs=1e-14)  # mean of |x|/2, and x/2
    p = PolyActivations(_tiny(), torch.randn(2, 1, 4, 4), init="relu_fit", fit_range=r, scale=2.0)
    assert p.coeffs["1:0"].tolist() == pytest.approx([3 * r / 32, 0.5, 15 / (32 * r) / 2.0], rel=1e-6)  # w2 = fit / s
    q = PolyActivations(_tiny(), torch.randn(2, 1, 4, 4), degree=3)
    assert q.coeffs["4:0"].tolist() == pytest.approx([0.0, 1.0, 0.005, 0.0])  # PASNet code's straight-through init


# ------------------------------------------------------------------------------------------- replacement
@pytest.mark.parametrize("k", [1, 4, 11])
def test_replaces_the_first_k_module_relus_of_a_timm_resnet(k):
    model = _resnet10t().eval()
    reference = copy.deepcopy(model)
    x = torch.randn(2, 3, 32, 32)
    p = PolyActivations(model, x, k)
    relus = [n for n, m in reference.named_modules() if isinstance(m, nn.ReLU)]  # definition order = call order here
    assert [s.name for s in p.sites] == [f"{n}:0" for n in relus] and len(relus) == 11
    assert p.sites[0].shape == (2, 24, 16, 16) and p.sites[0].elements == 24 * 16 * 16
    for n in relus[:k]:
        reference.set_submodule(n, nn.Identity())
    _identity_coeffs(p)  # the polynomial x: the replaced sites compute the identity, exactly
    with torch.no_grad():
        assert torch.equal(model(x), reference(x))
    assert p.replaced() == [f"{n}:0" for n in relus[:k]]
    model(x).sum().backward()
    assert all(w.grad is not None for w in p.coeffs.values())  # (timm zero-inits each block's last BN: some are 0)
    assert p.coeffs[_key(p.sites[0].name)].grad.abs().sum() > 0


def test_replaces_functional_relus_by_name():
    torch.manual_seed(0)
    model = FuncNet()
    x = torch.randn(5, 6)
    p = PolyActivations(model, x, [":1", ":3", "body.1:0"])
    assert [s.name for s in p.sites] == [":0", ":1", ":2", ":3", "body.1:0"]  # the root's own body is ""
    reference = FuncNet(skip=frozenset({1, 3, 4}))
    reference.load_state_dict(model.state_dict())
    _identity_coeffs(p)
    assert torch.equal(model(x), reference(x))
    with torch.no_grad():  # a real polynomial: site :1 computes 0.5 + 2 b(x) - 0.25 b(x)^2 (straight from the formula)
        p.coeffs[":1"].copy_(torch.tensor([0.5, 2.0, -0.25]))
    h = model.b(F.relu(model.a(x)))
    y = (0.5 + 2 * h - 0.25 * h**2).relu() + 1.0
    torch.testing.assert_close(model(x), reference.body(y), rtol=0, atol=1e-6)
    assert torch.equal(model.body(y), reference.body(y))  # a submodule called on its own: its sites are its own


def test_zero_replacements_and_remove_compute_exactly_what_the_model_did():
    model = _resnet10t().train()
    reference = copy.deepcopy(model)
    x = torch.randn(2, 3, 32, 32)
    p = PolyActivations(model, x, 0)
    assert len(p.sites) == 11 and p.replaced() == [] and not list(p.parameters())
    for m in (model, reference):
        m(x).square().sum().backward()
    assert torch.equal(model(x), reference(x))
    for (n, a), (_, b) in zip(model.named_parameters(), reference.named_parameters(), strict=True):
        assert torch.equal(a.grad, b.grad), n
    q = PolyActivations(model, x, "all")
    q.remove()
    p.remove()
    assert model not in ops._DISPATCHERS  # nothing of ours left on the model
    assert torch.equal(model(x), reference(x))


# ------------------------------------------------------------------------------------------- cost model
def test_cost_model_on_a_hand_computed_network():
    x = torch.randn(2, 1, 4, 4)
    # sites: 4 x 4 x 4 = 64 and 5 elements per sample. Latency (PASNet units): ReLU 13.6 n + 0.4, poly 0.03 n + 0.2.
    # Bits: ReLU 3 * 32 AND gates * 256 + 32 OTs * 128 = 28672 per element; degree-2 poly 4 * 32 = 128.
    full = PolyActivations(_tiny(), x, 0).network_cost()
    assert full["latency"] == pytest.approx(13.6 * 64 + 0.4 + 13.6 * 5 + 0.4) and full["comm_bits"] == 69 * 28672
    one = PolyActivations(_tiny(), x, 1).network_cost()
    assert one["latency"] == pytest.approx(0.03 * 64 + 0.2 + 13.6 * 5 + 0.4)
    assert one["comm_bits"] == 64 * 128 + 5 * 28672 == 151552
    assert (one["relus_kept"], one["relus_replaced"], one["sites_replaced"]) == (5, 64, 1)
    cubic = PolyActivations(_tiny(), x, "all", degree=3).network_cost()  # x^2 and x^3: two multiplications
    assert cubic["latency"] == pytest.approx(2 * (0.03 * 69 + 0.4)) and cubic["comm_bits"] == 69 * 256
    linear = PolyActivations(_tiny(), x, "all", degree=1).network_cost()  # public-coefficient affine: local, free
    assert linear["latency"] == 0 and linear["comm_bits"] == 0
    custom = MPCCost(relu_per_element=2.0, relu_per_site=1.0, ring_bits=8, kappa=16, and_gates_per_bit=1)
    c = PolyActivations(_tiny(), x, 0, cost=custom).network_cost()
    assert c["latency"] == pytest.approx(2 * 69 + 2) and c["comm_bits"] == 69 * (8 * 32 + 8 * 16)


def test_gate_mixes_relu_and_poly_and_its_cost_loss_has_the_hand_gradient():
    model = _tiny()
    x = torch.randn(3, 1, 4, 4)
    p = PolyActivations(model, x, "gate")
    lr, lp = [13.6 * 64 + 0.4, 13.6 * 5 + 0.4], [0.03 * 64 + 0.2, 0.03 * 5 + 0.2]
    loss = p.cost_loss(normalize=False)
    assert float(loss.detach()) == pytest.approx(0.5 * (sum(lr) + sum(lp)))
    loss.backward()  # d/d alpha_1 of c0 L_r + c1 L_p at alpha = 0: c0 c1 (L_p - L_r) = (L_p - L_r) / 4
    assert p.alphas["1:0"].grad.tolist() == pytest.approx([(lr[0] - lp[0]) / 4, (lp[0] - lr[0]) / 4])
    assert float(p.cost_loss().detach()) == pytest.approx(0.5 * (sum(lr) + sum(lp)) / sum(lr))
    with torch.no_grad():
        p.alphas["1:0"].copy_(torch.tensor([0.0, math.log(3.0)]))  # c = (1/4, 3/4)
        p.coeffs["1:0"].copy_(torch.tensor([0.1, 0.7, 0.2]))
        p.alphas["4:0"].copy_(torch.tensor([1.0, 0.0]))
        h = model[0](x)
        mixed = 0.25 * h.relu() + 0.75 * (0.1 + 0.7 * h + 0.2 * h * h)
        out = model(x)
    assert p.replaced() == ["1:0"]
    c4 = torch.softmax(torch.tensor([1.0, 0.0]), 0)
    z = model[3](mixed.flatten(1))
    torch.testing.assert_close(out, c4[0] * z.relu() + c4[1] * (0.005 * z * z + z), rtol=0, atol=1e-6)
    assert p.harden() == ["1:0"] and list(p.coeffs.keys()) == ["1:0"] and not list(p.alphas.keys())
    with torch.no_grad():  # hardened: site 1:0 is the polynomial alone, site 4:0 the stock ReLU
        ref = model[3]((0.1 + 0.7 * h + 0.2 * h * h).flatten(1)).relu()
        torch.testing.assert_close(model(x), ref, rtol=0, atol=1e-6)
    assert p.network_cost()["latency"] == pytest.approx(lp[0] + lr[1])


# ------------------------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("kwargs, needle", [
    ({"degree": 0}, "degree: must be an int in 1..8, got 0"),
    ({"degree": 9}, "degree: must be an int in 1..8, got 9"),
    ({"degree": 2.0}, "degree: must be an int in 1..8, got 2.0"),
    ({"degree": True}, "degree: must be an int in 1..8, got True"),
    ({"replace": 3}, "3 sites asked, the model has 2 relu sites"),
    ({"replace": ["1:1"]}, "no relu site '1:1'; did you mean"),
    ({"replace": "some"}, "'all', 'gate', an int or a list of site names, got 'some'"),
    ({"init": "xavier"}, "init 'xavier': choose one of straight_through, relu_fit"),
    ({"scale": 0.0}, "scale: must be a finite number > 0, got 0.0"),
    ({"init": "relu_fit", "fit_range": -1.0}, "fit_range: must be a finite number > 0, got -1.0"),
])
def test_bad_options_are_one_line_errors_and_leave_the_model_alone(kwargs, needle):
    model = _tiny()
    x = torch.randn(2, 1, 4, 4)
    before = model(x)
    with pytest.raises(ConfigError) as e:
        PolyActivations(model, x, **kwargs)
    assert needle in str(e.value) and "\n" not in str(e.value)
    assert model not in ops._DISPATCHERS and torch.equal(model(x), before)


@pytest.mark.parametrize("field, value", [("relu_per_element", 0.0), ("poly_per_site", -0.2),
                                          ("ring_bits", 0), ("kappa", float("nan")), ("relu_per_site", True)])
def test_non_positive_cost_constants_are_refused(field, value):
    with pytest.raises(ConfigError, match=f"MPCCost {field}: must be a finite number > 0, got {value!r}"):
        MPCCost(**{field: value})


def test_a_model_without_relu_is_refused():
    model = nn.Sequential(nn.Linear(4, 4), nn.GELU(), nn.Linear(4, 2))
    with pytest.raises(ConfigError, match="Sequential makes no relu call in its forward"):
        PolyActivations(model, torch.randn(2, 4))
    assert model not in ops._DISPATCHERS


def test_a_forward_that_fails_while_tracing_leaves_nothing_behind():
    class Broken(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.relu(x) @ torch.ones(3, 3)  # x has 4 columns: a shape error after the relu call

    model = Broken()
    with pytest.raises(RuntimeError):
        PolyActivations(model, torch.randn(2, 4))
    assert model not in ops._DISPATCHERS and not model._forward_pre_hooks
