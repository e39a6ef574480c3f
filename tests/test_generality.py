"""The reproductions of the generality issue, as regression tests: techniques act on the ops a model calls, so
subclasses with their own forward, functional activations, ModuleList blocks and transformer layers are covered,
and a technique that cannot act refuses in one line."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import edgetrain as et
from edgetrain.cost import estimate
from edgetrain.measure import SavedTensorMeter
from edgetrain.techniques import ActNN, ApproxMultiply, BNNEdge, MobileTL
from edgetrain.testing.zoo import ZOO, FunctionalNet, PadSameConv2d, _seeded


def _same_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(PadSameConv2d(3, 8, 3, stride=2), nn.Conv2d(8, 8, 1))


@pytest.mark.parametrize("cfg", [et.Freeze(targets=["1"]), et.BiasOnly(), et.SparseUpdate(bias_last_k=1),
                                 et.Int8(), et.GradientFilter(last_n_convs=1), ApproxMultiply()], ids=repr)
def test_a_conv_subclass_keeps_its_own_padding(cfg):
    """Root 1: SameConv pads in its forward; re-implementing the conv from its attributes gave 31x31, not 32x32."""
    m, x = _same_net(), torch.randn(2, 3, 64, 64)
    ref = m[0](x)
    et.apply_(m, cfg, x)
    out = m[0](x.requires_grad_())
    assert out.shape == ref.shape == (2, 8, 32, 32)
    m(x).sum().backward()  # trains through it


def test_blocks_in_a_module_list_are_found_and_checkpointed():
    """Root 2: a ModuleList of blocks is never called itself; its blocks are."""
    model, x = _seeded(FunctionalNet()), torch.randn(4, 3, 32, 32)
    handle = et.apply_(model, et.Checkpoint(), x)
    part = handle.parts[0][1]
    assert handle.structure.blocks == ["stem", "stem_bn", "blocks.0", "blocks.1", "blocks.2"]
    hits = part.hits
    with SavedTensorMeter(model) as ckpt:
        model(x).sum()
    assert part.hits - hits == 5  # every block ran checkpointed
    handle.remove()
    with SavedTensorMeter(model) as plain:
        model(x).sum()
    assert ckpt.total_bytes < plain.total_bytes / 3
    with et.apply_(model, et.Freeze(last_k_blocks=2), x):
        trained = {n.split(".")[0] + "." + n.split(".")[1] for n, p in model.named_parameters()
                   if p.requires_grad and n.startswith("blocks")}
        assert trained == {"blocks.1", "blocks.2"}


class ConvBNAct(nn.Module):
    def __init__(self, functional: bool) -> None:
        super().__init__()
        self.conv, self.bn, self.functional = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), functional
        self.act = nn.ReLU6()

    def forward(self, x):
        y = self.bn(self.conv(x))
        return F.relu6(y) if self.functional else self.act(y)


def test_functional_activations_are_masked_like_modules():
    """Root 3: ActNN saved 82 KB with nn.ReLU6 modules and 336 KB with F.relu6 on the same net."""
    x = torch.randn(8, 8, 16, 16)
    saved = {}
    for functional in (False, True):
        torch.manual_seed(0)
        m = nn.Sequential(ConvBNAct(functional), ConvBNAct(functional), nn.Flatten(), nn.Linear(8 * 256, 4))
        et.apply_(m, ActNN(), x)
        with SavedTensorMeter(m) as meter:
            m(x)
        saved[functional] = meter.total_bytes
    assert saved[True] == saved[False]


def test_actnn_compresses_a_transformers_bert():
    """Root 3: on a BERT-style encoder ActNN left 117.6 of 129 MiB of saved activations uncompressed (GELU
    classes, functional softmax and dropout); now every op's saved tensors are seen."""
    pytest.importorskip("transformers")
    z = ZOO["bert"]
    model, (inputs, target) = z.build(), z.batch(8)
    with SavedTensorMeter(model) as plain:
        model(**inputs).logits.sum()
    et.apply_(model, ActNN(), inputs)
    with SavedTensorMeter(model) as packed:
        model(**inputs).logits.sum()
    assert packed.total_bytes < 0.25 * plain.total_bytes


def test_cost_model_books_functional_ops_to_their_module_and_takes_token_inputs():
    """Root 4: functional ops inside non-leaf modules went to the root row; integer token inputs failed."""
    model, x = _seeded(FunctionalNet()), torch.randn(4, 3, 32, 32)
    table = estimate(model, None, batch_size=4, example=x)
    # the block's own forward calls F.relu6 (keeps its input) and F.gelu (keeps its input): its row, not the root's
    relu6_in = 4 * 32 * 16 * 16 * 4
    gelu_in = 4 * 16 * 16 * 16 * 4
    assert table.layers["blocks.0"].saved(4) == relu6_in + gelu_in
    pytest.importorskip("transformers")
    z = ZOO["bert"]
    bert, (inputs, target) = z.build(), z.batch(8)
    m = et.measure(bert, (inputs, target), warmup=1, repeats=1)
    t = estimate(bert, None, batch_size=8, example=inputs)  # attention mask + dropout: the math SDPA path
    assert t.saved_bytes == m.saved_bytes


def test_bnn_edge_refuses_a_network_that_is_not_binary():
    """Root 5: it converted all 49 BatchNorms of a CNN to l1-BN (NaN gradients), and patched nothing on a
    transformer while reporting success."""
    model, x = _seeded(FunctionalNet()), torch.randn(2, 3, 32, 32)
    with pytest.raises(et.ConfigError, match="not a binary network"):
        et.apply_(model, BNNEdge(), x)
    assert all("forward" not in m.__dict__ for m in model.modules())


def test_approx_multiply_default_targets_include_conv_subclasses():
    """Root 6: its default targets included Conv2d subclasses that its check then refused."""
    m, x = _same_net(), torch.randn(2, 3, 16, 16)
    handle = et.apply_(m, ApproxMultiply(), x)
    hits = handle.parts[0][1].hits
    m(x)
    assert handle.parts[0][1].hits - hits == 2


def test_sparse_update_and_int8_reach_transformer_linears():
    """Root 7: sparse update could train only the head of a transformer."""
    pytest.importorskip("transformers")
    z = ZOO["bert"]
    model, (inputs, target) = z.build(), z.batch(4)
    dense = "bert.encoder.layer.1.output.dense"
    handle = et.apply_(model, et.SparseUpdate(bias_last_k=3, weights={dense: 0.25}), inputs)
    layer = model.get_submodule(dense)
    assert layer.weight_part.shape == (64, 32) and layer.bias.requires_grad and not layer.weight.requires_grad
    handle.remove()
    with et.apply_(model, et.Int8(targets=["bert.encoder.*"]), inputs) as h:
        assert h.parts[0][1].changes == 12  # q, k, v, attention output, intermediate and output of two layers


def test_measure_counts_the_batch_not_the_dataset_it_is_sliced_from():
    """Root 8: a batch that is a view into the whole dataset counted the dataset's storage (+12.6 MiB)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    data, labels = torch.randn(10_000, 1, 8, 8), torch.randint(0, 10, (10_000,))
    view = et.measure(model, (data[:32], labels[:32]), repeats=1)
    copy = et.measure(model, (data[:32].clone(), labels[:32].clone()), repeats=1)
    assert view.peak_bytes == copy.peak_bytes and view.saved_bytes == copy.saved_bytes


def test_measure_takes_dict_inputs_and_a_loss_on_the_outputs():
    pytest.importorskip("transformers")
    z = ZOO["bert"]
    model, (inputs, target) = z.build(), z.batch(4)
    own = et.measure(model, {**inputs, "labels": target}, repeats=1)  # the model computes its own loss
    ours = et.measure(model, (inputs, target), repeats=1)
    custom = et.measure(model, (inputs, target), loss_fn=lambda out, y: F.cross_entropy(out.logits, y), repeats=1)
    assert own.saved_bytes > 0 and ours.grad_bytes == own.grad_bytes == custom.grad_bytes


def test_mobiletl_refuses_activations_it_cannot_mask_in_one_line():
    model, x = _seeded(FunctionalNet()), torch.randn(2, 3, 32, 32)
    with pytest.raises(et.ConfigError, match="calls gelu") as e:
        et.apply_(model, MobileTL(), x)
    assert "\n" not in str(e.value)
