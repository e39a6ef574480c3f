"""edgetrain.prune_transformer: exact masks, importance against an independent gradient, exact budgets, refusals."""

from __future__ import annotations

import random

import pytest
import torch
from torch import nn

from edgetrain import prune_transformer as pt
from edgetrain.errors import ConfigError
from edgetrain.models import create_model


def tiny(**kw) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = create_model("tiny_transformer", num_classes=10, in_channels=1, **kw).eval()
    return model, torch.randn(3, 1, 28, 28)


def bert(dtype: torch.dtype = torch.float32) -> tuple[nn.Module, dict]:
    pytest.importorskip("transformers")
    from edgetrain.models.foreign import ensure_torchvision

    ensure_torchvision()
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=48,
                     max_position_embeddings=16, num_labels=3)
    model = BertForSequenceClassification(cfg).to(dtype).eval()
    ids = torch.randint(1, 50, (2, 10), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    return model, {"input_ids": ids, "attention_mask": mask}


def test_finds_layers_by_structure():
    model, x = tiny(depth=3, heads=8)
    got = [(t.qkv, t.out, t.up, t.down, t.heads, t.head_dim, t.neurons) for t in pt.find_layers(model, x)]
    assert got == [([f"blocks.{i}.attn.qkv"], f"blocks.{i}.attn.proj", f"blocks.{i}.mlp.fc1", f"blocks.{i}.mlp.fc2",
                     8, 8, 128) for i in range(3)]
    model, x = bert()
    t = pt.find_layers(model, x)[1]
    pre = "bert.encoder.layer.1."
    assert (t.qkv, t.out, t.up, t.down, t.heads, t.head_dim, t.neurons) == (
        [pre + "attention.self.query", pre + "attention.self.key", pre + "attention.self.value"],
        pre + "attention.output.dense", pre + "intermediate.dense", pre + "output.dense", 4, 8, 48)


@pytest.mark.parametrize("build", [tiny, bert])
def test_masks_of_ones_change_nothing(build):
    model, x = build()
    ref = pt.forward(model, x)
    pruner = pt.Pruner(model, x)
    assert torch.equal(pt.forward(model, x), ref)  # tolerance 0
    pruner.apply(pruner.kept(), ([torch.rand(t.heads) for t in pruner.layers],
                                 [torch.rand(t.neurons) for t in pruner.layers]))  # keep all: still ones
    assert torch.equal(pt.forward(model, x), ref)
    pruner.head_masks[0][1] = 0.0
    assert not torch.equal(pt.forward(model, x), ref)
    pruner.remove()
    assert torch.equal(pt.forward(model, x), ref)


@pytest.mark.parametrize("build", [tiny, bert])
def test_masked_head_equals_zeroed_weights(build):
    model, x = build()
    pruner = pt.Pruner(model, x)
    t = pruner.layers[1]
    seen = {}
    out = dict(model.named_modules())[t.out]
    h = out.register_forward_pre_hook(lambda m, i: seen.__setitem__("x", i[0]))
    pruner.head_masks[1][2] = 0.0
    pruner.neuron_masks[0][[0, 5]] = 0.0
    masked = pt.forward(model, x)
    h.remove()
    cols = slice(2 * t.head_dim, 3 * t.head_dim)
    assert seen["x"][..., cols].abs().max() == 0
    assert seen["x"][..., :2 * t.head_dim].abs().max() > 0
    pruner.remove()
    with torch.no_grad():  # the same pruning by zeroing weights: the head's output-projection columns, the neurons'
        out.weight[:, cols] = 0.0
        dict(model.named_modules())[pruner.layers[0].down].weight[:, [0, 5]] = 0.0
    assert torch.equal(pt.forward(model, x), masked)  # tolerance 0


def test_sliced_bert_equals_masked_and_counts_parameters():
    model, x = bert(torch.float64)
    pruner = pt.Pruner(model, x)
    scores = ([torch.arange(4.0).flip(0)] * 3, [torch.arange(48.0)] * 3)
    pruner.apply(((1, 4, 2), (10, 48, 3)), scores)
    masked = pt.forward(model, x)
    small = pt.sliced(pruner)
    assert torch.allclose(pt.forward(small, x), masked, rtol=0, atol=1e-12)
    removed = (3 + 0 + 2) * (8 * (3 * 33) + 8 * 32) + (38 + 0 + 45) * (33 + 32)  # q/k/v rows+bias, out cols; up, down
    assert sum(p.numel() for p in small.parameters()) == sum(p.numel() for p in model.parameters()) - removed
    assert small.bert.encoder.layer[0].attention.self.num_attention_heads == 1
    assert torch.equal(pt.forward(model, x), masked)  # the original is untouched


def test_sliced_tiny_neurons_only():
    model, x = tiny()
    pruner = pt.Pruner(model, x)
    pruner.apply(((2, 3), (5, 100)), ([torch.rand(4)] * 2, [torch.rand(128)] * 2))
    small = pt.sliced(pruner, heads=False)
    assert [b.mlp.fc1.out_features for b in small.blocks] == [5, 100]
    assert torch.allclose(small(x), model(x), rtol=0, atol=1e-5)


def test_importance_matches_weight_gradient():
    """dL/dm_h for a mask on the projection input equals sum over the head's columns of W * dL/dW (no hooks)."""
    model, x = tiny()
    model.double()
    x = x.double()
    y = torch.tensor([1, 4, 7])
    loss_fn = lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1])
    pruner = pt.Pruner(model, x)
    heads, neurons = pt.importance(pruner, [(x, y), (x.flip(0), y)], loss_fn)
    pruner.remove()
    ref_h, ref_n = [], []
    for t in pruner.layers:
        mods = dict(model.named_modules())
        acc_h, acc_n = torch.zeros(t.heads, dtype=torch.float64), torch.zeros(t.neurons, dtype=torch.float64)
        for b in [(x, y), (x.flip(0), y)]:
            model.zero_grad()
            loss_fn(model, b).backward()
            w, d = mods[t.out].weight, mods[t.down].weight
            acc_h += (w * w.grad).sum(0).view(t.heads, t.head_dim).sum(1).abs()
            acc_n += (d * d.grad).sum(0).abs()
        ref_h.append(acc_h / acc_h.norm())
        ref_n.append(acc_n / acc_n.norm())
    for got, ref in zip(heads + neurons, ref_h + ref_n):
        assert torch.allclose(got.double(), ref, rtol=1e-6, atol=1e-9)


def test_budget_and_uniform_by_hand():
    model, x = tiny()  # 2 layers x 4 heads, 128 neurons
    p = pt.Pruner(model, x)
    assert pt.uniform_allocation(p, 0.5) == ((2, 2), (64, 64))
    assert pt.uniform_allocation(p, 0.7) == ((1, 1), (39, 38))  # round(5.6) = 6 heads, round(179.2) = 179 neurons pruned
    assert pt.uniform_allocation(p, 0.0) == ((4, 4), (128, 128))
    assert pt._spread([4, 4, 4], 7) == (3, 2, 2)


def test_global_allocation_by_hand():
    model, x = tiny()
    p = pt.Pruner(model, x)
    scores = ([torch.tensor([0.9, 0.8, 0.7, 0.6]), torch.tensor([0.1, 0.05, 0.01, 0.0])],
              [torch.linspace(1, 2, 128), torch.linspace(0, 1, 128)])
    got = pt.global_allocation(p, 0.5, scores)  # keep 4 heads: best of each layer, then 0.8, 0.7 of layer 0
    assert got[0] == (3, 1)
    assert got[1] == (127, 1)  # keep 128 neurons: layer 1's are all below layer 0's (except its best, kept)


@pytest.mark.parametrize("ratio", [0.3, 0.5, 0.7, 0.85])
def test_search_respects_the_ratio_exactly(ratio):
    model, x = tiny(depth=4, heads=8)
    p = pt.Pruner(model, x)
    scores = ([torch.rand(8) for _ in range(4)], [torch.rand(128) for _ in range(4)])
    rng = random.Random(1)
    best, history = pt.search(p, ratio, scores, lambda a: rng.random(), population=6, generations=3)
    kh, kn = 32 - int(ratio * 32 + 0.5), 512 - int(ratio * 512 + 0.5)
    assert len(history) > 6
    for h in history:
        assert sum(h["heads"]) == kh and sum(h["neurons"]) == kn
        assert all(1 <= k <= 8 for k in h["heads"]) and all(1 <= k <= 128 for k in h["neurons"])
    assert min(h["score"] for h in history) == next(h["score"] for h in history
                                                    if (tuple(h["heads"]), tuple(h["neurons"])) == best)
    p.apply(best, scores)
    assert p.kept() == best


def test_search_finds_a_planted_optimum():
    """A score that only the allocation (4, 1, 1, 2) heads minimises: the search must reach it from its population."""
    model, x = tiny(depth=4, heads=4)
    p = pt.Pruner(model, x)
    scores = ([torch.rand(4) for _ in range(4)], [torch.rand(128) for _ in range(4)])
    target = (4, 1, 1, 2)
    best, _ = pt.search(p, 0.5, scores, lambda a: sum(abs(i - j) for i, j in zip(a[0], target)), 8, 6)
    assert best[0] == target


def test_refusals_are_one_line():
    model, x = tiny()
    p = pt.Pruner(model, x)
    for bad, words in [(-0.1, "outside [0, 1)"), (1.0, "outside [0, 1)"), ("0.5", "outside [0, 1)"),
                       (0.9, "keeps 1 of 8 heads over 2 layers")]:
        with pytest.raises(ConfigError, match=r"pruning ratio") as e:
            pt.uniform_allocation(p, bad)
        assert words in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="keeps 1 of 256 neurons"):
        pt.budget([128, 128], 0.995, "neurons")
    with pytest.raises(ConfigError, match="no attention found in Sequential"):
        pt.Pruner(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 4)), torch.randn(2, 4))
    with pytest.raises(ConfigError, match="population 1"):
        pt.search(p, 0.5, ([torch.rand(4)] * 2, [torch.rand(128)] * 2), lambda a: 0.0, population=1)
