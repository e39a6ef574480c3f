"""SparseUpdate (TTE sparse update): exact gradients vs plain PyTorch, real savings on the meter, errors."""

from __future__ import annotations

import copy

import pytest
import torch

import edgetrain as et
from edgetrain.cost import estimate
from edgetrain.models import create_model
from edgetrain.testing import frozen_reference, step_grads, tiny_batch, tiny_model
from edgetrain.techniques.sparse_update import PartialWeight


@pytest.mark.parametrize("groups,ratio", [(1, 0.5), (1, 0.25), (8, 0.5)])
def test_partial_weight_conv_gradcheck(groups, ratio):
    torch.manual_seed(0)
    x = torch.randn(2, 8, 6, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(8, 8 // groups, 3, 3, dtype=torch.float64)
    k = int(8 * ratio)
    keep = torch.tensor(sorted(torch.randperm(8)[:k].tolist()))
    part = (w.index_select(1 if groups == 1 else 0, keep) + 0.1).requires_grad_()
    b = torch.randn(8, dtype=torch.float64, requires_grad=True)
    fn = lambda x, part, b: PartialWeight.apply(x, w, part, keep, b, ((2, 2), (1, 1), (1, 1), groups))  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, part, b))


def test_partial_weight_linear_gradcheck():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 8, dtype=torch.float64)
    keep = torch.tensor([1, 4, 6])
    part = (w[:, keep] + 0.1).requires_grad_()
    b = torch.randn(5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, part, b: PartialWeight.apply(x, w, part, keep, b, None), (x, part, b))


def test_gradients_equal_plain_pytorch_on_the_selected_slices():
    original = tiny_model(dtype=torch.float64)
    model = copy.deepcopy(original)
    cfg = et.SparseUpdate(bias_last_k=3, weights={"features.2.0": 0.5, "features.1.0": 0.5})
    handle = et.apply_(model, cfg)
    ref = frozen_reference(original, model)
    for name in cfg.weights:  # the reference trains the whole weight of the partial convs
        ref.get_submodule(name).weight.requires_grad_(True)
    batch = tiny_batch(dtype=torch.float64)
    loss, grads = step_grads(model, batch)
    ref_loss, ref_grads = step_grads(ref, batch)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-10, atol=1e-10)
    for name in cfg.weights:
        conv = model.get_submodule(name)
        dim = 1 if conv.groups == 1 else 0
        torch.testing.assert_close(grads.pop(f"{name}.weight_part"),
                                   ref_grads.pop(f"{name}.weight").index_select(dim, conv.weight_keep), rtol=1e-10, atol=1e-10)
    assert set(grads) == set(ref_grads) == {n for n, p in model.named_parameters() if p.requires_grad} - {
        f"{n}.weight_part" for n in cfg.weights}
    for n in grads:
        torch.testing.assert_close(grads[n], ref_grads[n], rtol=1e-10, atol=1e-10, msg=n)
    handle.remove()


def test_selection_is_by_largest_input_channel_norm_and_remove_writes_back():
    model = tiny_model()
    conv = model.get_submodule("features.2.0")
    norms = conv.weight.detach().pow(2).sum((0, 2, 3))
    h = et.apply_(model, et.SparseUpdate(bias_last_k=1, weights={"features.2.0": 0.25}))
    assert set(conv.weight_keep.tolist()) == set(torch.topk(norms, len(conv.weight_keep)).indices.tolist())
    with torch.no_grad():
        conv.weight_part.add_(1.0)
    keep = conv.weight_keep.clone()
    before = conv.weight.detach().clone()
    h.remove()
    assert not hasattr(conv, "weight_part")
    torch.testing.assert_close(conv.weight[:, keep], before[:, keep] + 1.0)


def test_meter_shows_the_saving_the_estimate_predicts():
    """Updating only the last k biases saves far less than a plain step, by the amount the estimate says."""
    torch.manual_seed(0)
    model = create_model("mobilenet_v2", num_classes=10, width_mult=0.35)
    batch = (torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,)))
    plain = et.measure(model, batch, warmup=1, repeats=1)
    for cfg in (et.SparseUpdate(bias_last_k=6), et.SparseUpdate(bias_last_k=10, weights={"features.16.conv.0.0": 0.25,
                                                                                          "features.17.conv.0.0": 0.5})):
        m = et.measure(model, batch, recipe=cfg, warmup=1, repeats=1)
        est = estimate(model, cfg, (3, 32, 32), 4)
        assert m.saved_bytes < plain.saved_bytes / 5
        saving, predicted = plain.saved_bytes - m.saved_bytes, plain.saved_bytes - est.saved_bytes
        assert abs(saving - predicted) <= 0.10 * saving
        assert abs(est.saved_bytes - m.saved_bytes) <= 0.10 * m.saved_bytes
        assert est.grad_bytes == m.grad_bytes < plain.grad_bytes


def test_partial_weights_cut_gradient_and_optimizer_bytes():
    model = create_model("mobilenet_v2", num_classes=10, width_mult=0.35)
    batch = (torch.randn(2, 3, 32, 32), torch.randint(0, 10, (2,)))
    full = et.measure(model, batch, recipe=et.SparseUpdate(bias_last_k=4, weights={"features.17.conv.0.0": 1.0}),
                      warmup=1, repeats=1)
    part = et.measure(model, batch, recipe=et.SparseUpdate(bias_last_k=4, weights={"features.17.conv.0.0": 0.25}),
                      warmup=1, repeats=1)
    w = model.get_submodule("features.17.conv.0.0").weight
    assert full.grad_bytes - part.grad_bytes == w.numel() * 4 * 3 // 4
    assert part.saved_bytes < full.saved_bytes


def test_errors():
    with pytest.raises(et.ConfigError, match="ratio must be in"):
        et.SparseUpdate(bias_last_k=1, weights={"x": 1.5})
    with pytest.raises(et.ConfigError, match="nothing would train"):
        et.SparseUpdate(bias_last_k=0, classifier=False)
    with pytest.raises(et.ConfigError, match="is not a conv/linear layer"):
        et.apply_(tiny_model(), et.SparseUpdate(bias_last_k=1, weights={"classifier": 0.5}))
    with pytest.raises(et.ConfigError, match="lies below"):
        et.apply_(tiny_model(), et.SparseUpdate(bias_last_k=1, weights={"features.0.0": 0.5}))
    with pytest.raises(et.ConfigError, match="> the model's 3 conv/linear layers"):
        et.apply_(tiny_model(), et.SparseUpdate(bias_last_k=4))


def test_recipe_round_trip_with_weights():
    r = et.Recipe([et.SparseUpdate(bias_last_k=2, weights={"a.b": 0.125})], name="s")
    assert et.Recipe.from_yaml(r.to_yaml()) == r == et.Recipe.from_json(r.to_json())
