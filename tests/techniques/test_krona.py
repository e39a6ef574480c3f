"""KronA and KronA^B(_res): the product without the Kronecker matrix against torch.kron in float64 (linear and conv,
every stride/padding/dilation), factor shapes, the block variant's gradients against a reference that forms
kron(A, B), transformers models, refusals, and what it saves (gradients and merge of KronA with LoRA's:
tests/techniques/test_adapters.py)."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import edgetrain as et
from edgetrain.models import create_model
from edgetrain.techniques import KronA, KronABlock
from edgetrain.techniques._adapter import Conv
from edgetrain.techniques.krona import factor_pair, kron_apply, shapes
from edgetrain.testing import frozen_reference, kron_block_reference, tiny_batch
from edgetrain.testing.patch_net import patch_net

D = torch.float64


@settings(max_examples=40, deadline=None)
@given(a1=st.integers(1, 4), a2=st.integers(1, 4), b1=st.integers(1, 4), b2=st.integers(1, 4),
       lead=st.lists(st.integers(1, 3), min_size=1, max_size=3), seed=st.integers(0, 2**16))
def test_the_linear_product_equals_torch_kron(a1, a2, b1, b2, lead, seed):
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(a1, a2, generator=g, dtype=D), torch.randn(b1, b2, generator=g, dtype=D)
    x = torch.randn(*lead, a2 * b2, generator=g, dtype=D)
    torch.testing.assert_close(kron_apply(a, b, x), x @ torch.kron(a, b).T, rtol=1e-12, atol=1e-12)
    moved = x.movedim(-1, 0)  # features in another dimension
    torch.testing.assert_close(kron_apply(a, b, moved, dim=0), (x @ torch.kron(a, b).T).movedim(-1, 0), rtol=1e-12,
                               atol=1e-12)


@pytest.mark.parametrize("stride,padding,dilation,k", [(1, 1, 1, 3), (2, 1, 1, 3), (1, 0, 2, 3), (2, 0, 1, 1),
                                                       ((1, 2), (2, 0), (1, 2), 3)])
def test_the_conv_product_equals_a_conv_with_the_kron_kernel(stride, padding, dilation, k):
    torch.manual_seed(0)
    a, b = torch.randn(3, 2, dtype=D), torch.randn(2, 4, k, k, dtype=D)  # out 6, in 8
    x = torch.randn(2, 8, 9, 10, dtype=D)
    pad = padding if isinstance(padding, tuple) else (padding, padding)
    got = kron_apply(a, b, x, Conv(stride, pad, dilation))
    kernel = torch.kron(a[:, :, None, None], b)
    assert kernel.shape == (6, 8, k, k)
    ref = nn.functional.conv2d(x, kernel, None, stride, padding, dilation)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)


def test_factor_shapes_by_default_and_when_given():
    assert factor_pair(768) == (24, 32) and factor_pair(13) == (1, 13) and factor_pair(1) == (1, 1)
    assert shapes(768, 768, None, "x") == (32, 24, 24, 32)  # A 32 x 24, B 24 x 32 (spec algorithms_B §5.2)
    assert shapes(12, 8, (4, 2), "x") == (4, 2, 3, 4)
    with pytest.raises(et.ConfigError, match=r"factors \[5, 2\] do not divide .*\(12, 8\)"):
        shapes(12, 8, (5, 2), "x")


def test_parameters_are_a1_a2_plus_b1_b2_k_k_and_factors_that_do_not_divide_change_nothing():
    model = create_model("mobilenet_v2", num_classes=10, width_mult=0.35)
    x = torch.randn(2, 3, 32, 32)
    with et.apply_(model, KronA(classifier=False), x):
        for n, m in model.named_modules():
            if "krona_A" in m._parameters:
                (a1, a2), (b1, b2, *k) = m.krona_A.shape, m.krona_B.shape
                assert (a1 * b1, a2 * b2, *k) == tuple(m.weight.shape), n
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(et.ConfigError, match="do not divide") as e:
        et.apply_(model, KronA(factors=(7, 1)), x)
    assert "\n" not in str(e.value) and all(p.requires_grad for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()) and before.keys() == \
        model.state_dict().keys()


@pytest.mark.parametrize("cfg", [KronABlock(), KronABlock(residual=True, scale=0.5, classifier=False)], ids=str)
def test_block_gradients_equal_a_reference_that_forms_the_kronecker_matrix(cfg):
    """Reference: the original model whose blocks add s * x @ kron(A, B)^T (+ lambda x) by forward hooks."""
    torch.manual_seed(0)
    base = patch_net(D).train()
    x, y = tiny_batch(6, dtype=D)
    model = copy.deepcopy(base)
    with et.apply_(model, cfg, x):
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in (p for n, p in model.named_parameters() if ".krona_" in n):
                p.copy_(torch.randn(p.shape, generator=g, dtype=D) * 0.5)
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        got = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        ref = frozen_reference(base, model)
        kron_block_reference(ref, model)
    wrt = {n: p for n, p in ref.named_parameters() if n in got or ".krona_" in n}
    ref_loss = nn.functional.cross_entropy(ref(x), y)
    grads = dict(zip(wrt, torch.autograd.grad(ref_loss, list(wrt.values()))))
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=0)
    assert set(got) == set(wrt) and any(n.endswith("krona_lambda") for n in got) == cfg.residual
    for n in got:
        torch.testing.assert_close(got[n], grads[n], rtol=1e-10, atol=1e-12, msg=n)


def _bert():  # noqa: ANN202
    from edgetrain.models.foreign import ensure_torchvision

    transformers = pytest.importorskip("transformers")
    ensure_torchvision()
    config = transformers.BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=16, num_labels=3)
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(config).train()


def test_transformers_linears_by_glob_and_layers_with_a_residual():
    ids = torch.randint(0, 64, (2, 8))
    model = _bert()
    recipe = et.Recipe([KronA()], name="bert-krona", targets=["*attention.self.query", "*attention.self.value",
                                                                "*intermediate.dense"])
    with et.apply_(model, recipe, {"input_ids": ids}):
        names = sorted(n for n, m in model.named_modules() if "krona_A" in m._parameters)
        assert len(names) == 6 and all(n.endswith(("query", "value", "intermediate.dense")) for n in names)
        model(input_ids=ids, labels=torch.tensor([0, 1])).loss.backward()
        assert all(p.grad is not None for n, p in model.named_parameters() if ".krona_" in n)
    model = _bert()
    with et.apply_(model, KronABlock(residual=True, targets=["bert.encoder.layer.*"]), {"input_ids": ids}):
        blocks = [n for n, m in model.named_modules() if "krona_lambda" in m._parameters]
        assert blocks == ["bert.encoder.layer.0", "bert.encoder.layer.1"]
        model(input_ids=ids, labels=torch.tensor([0, 1])).loss.backward()
        grads = [model.get_submodule(b).krona_A.grad for b in blocks]
        assert all(g is not None and g.abs().sum() > 0 for g in grads)


def test_block_refusals_are_one_line_and_change_nothing():
    x, _ = tiny_batch(4)
    model = patch_net(torch.float32)
    cases = [(KronABlock(targets=["features.1"]), "changes the shape around its features"),
             (KronABlock(residual=True, targets=["features.0"]), "residual=true needs them equal"),
             (KronABlock(factors=(3, 3), targets=["features.2"]), "do not divide")]
    for cfg, match in cases:
        with pytest.raises(et.ConfigError, match=match) as e:
            et.apply_(model, cfg, x)
        assert "\n" not in str(e.value)
        assert not any("krona" in k for k in model.state_dict()) and all(
            p.requires_grad == (not n.startswith(("features.0", "features.1", "features.2")))
            for n, p in model.named_parameters())
    for bad in ({"factors": (0, 2)}, {"scale": 0}, {"residual": "yes"}):
        with pytest.raises(et.ConfigError):
            KronABlock(**bad)
    for bad in ({"factors": (2,)}, {"scale": -1}, {"dropout": 1.0}, {"classifier": 1}):
        with pytest.raises(et.ConfigError):
            KronA(**bad)


def test_mobilenet_v2_saves_less_than_plain_with_far_fewer_trainable_parameters_than_lora():
    torch.manual_seed(0)
    model = create_model("mobilenet_v2", num_classes=10, width_mult=0.35).train()
    batch = (torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,)))
    plain = et.measure(model, batch, repeats=0)
    counts = {}
    for cfg in (KronA(classifier=False), et.LoRA(rank=4, classifier=False)):
        with et.apply_(model, cfg, batch[0]):
            counts[cfg.name] = sum(p.numel() for p in model.parameters() if p.requires_grad)
        m = et.measure(model, batch, recipe=cfg, repeats=0)
        assert m.saved_bytes < plain.saved_bytes and m.grad_bytes < plain.grad_bytes, cfg
    assert counts["krona"] < counts["lora"] / 2, counts


def test_review_findings_twice_assign_inplace_inputs_and_output_containers():
    """Adapting a layer twice is refused; load_state_dict(assign=True) keeps the adapters working; a block that
    changes its input in place does not change the branch's input; named tuples and mappings keep their type."""
    import collections

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4))
    x = torch.randn(3, 6)
    with et.apply_(model, KronA(classifier=False, targets=["0"]), x):
        with pytest.raises(et.ConfigError, match="already has an adapter"):
            et.apply_(model, KronA(classifier=False, targets=["0"]), x)
        with torch.no_grad():
            model[0].krona_A.normal_()
            before = model(x)
            model.load_state_dict({k: v.clone() for k, v in model.state_dict().items()}, assign=True)
            assert torch.equal(model(x), before)  # the handler finds the layer by its new weight

    class Block(nn.Module):
        def __init__(self, kind: str) -> None:
            super().__init__()
            self.kind, self.act, self.fc = kind, nn.ReLU(inplace=True), nn.Linear(4, 4)

        def forward(self, x):  # noqa: ANN001, ANN202
            y = self.fc(self.act(x))  # the input changed in place first
            if self.kind == "named":
                return collections.namedtuple("Out", "h extra")(y, 1)
            return {"h": y, "n": 2} if self.kind == "dict" else y

    class Net(nn.Module):
        def __init__(self, kind: str) -> None:
            super().__init__()
            self.pre, self.block, self.head = nn.Linear(4, 4), Block(kind), nn.Linear(4, 2)

        def forward(self, x):  # noqa: ANN001, ANN202
            out = self.block(self.pre(x))
            h = out.h if hasattr(out, "h") else out["h"] if isinstance(out, dict) else out
            return self.head(h)

    xb = torch.randn(5, 4)
    for kind in ("plain", "named", "dict"):
        net = Net(kind)
        with et.apply_(net, KronABlock(residual=True, classifier=False, targets=["block"]), xb):
            with torch.no_grad():
                net.block.krona_lambda.fill_(0.5)
                got = net(xb)
                net.block.krona_lambda.zero_()
                base_pre = net.pre(xb)
                ref = net.head(net.block.fc(torch.relu(base_pre)) + 0.5 * base_pre)  # lambda * the unchanged input
            torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6, msg=kind)
