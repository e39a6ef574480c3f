"""edgetrain.gnn: the normalisation against a hand-computed 3-node graph; the GCN layer's and the 2-layer model's
forward and gradients against a dense float64 reference (dense Â) and gradcheck of the symmetric sparse product; the
model made sparse by the DST controller computes what the masked dense model computes; train-then-prune keeps exactly
the controller's per-layer nonzeros and the fine-tune keeps the pruned weights at zero; the MAC count by hand; the
generated graph's structure; refusals in one line."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.utils import prune

from edgetrain.errors import ConfigError
from edgetrain.gnn import (
    GCN,
    GCNConv,
    _SymSpMM,
    accuracy,
    layer_macs,
    normalize_adjacency,
    prune_to,
    sbm_graph,
    step_macs,
    train_gcn,
)
from edgetrain.sparse import DynamicSparse

D = torch.float64
PATH3 = torch.tensor([[0.0, 1, 0], [1, 0, 1], [0, 1, 0]], dtype=D)  # the path 0 - 1 - 2


def _dense_hat(a: Tensor) -> Tensor:
    """The dense reference: D^-1/2 (A + I) D^-1/2 with D the row sums of A + I."""
    at = a + torch.eye(a.shape[0], dtype=a.dtype)
    dinv = at.sum(1).pow(-0.5)
    return dinv[:, None] * at * dinv[None, :]


def _random_graph(n: int, p: float, seed: int) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    upper = (torch.rand(n, n, generator=g) < p).triu(1).to(D)
    return upper + upper.t()


# ------------------------------------------------------------------------------------------- normalisation
def test_normalization_by_hand_on_three_nodes() -> None:
    # A + I of the path: degrees 2, 3, 2; Â_ij = 1 / sqrt(d_i d_j) on the edges and the diagonal, 0 between 0 and 2
    s6 = 1 / math.sqrt(6)
    want = torch.tensor([[1 / 2, s6, 0], [s6, 1 / 3, s6], [0, s6, 1 / 2]], dtype=D)
    got = normalize_adjacency(PATH3)
    assert got.layout == torch.sparse_csr and got.crow_indices().dtype == torch.int32
    assert got.values().numel() == 7  # 4 edge entries + 3 self-loops; (0, 2) is not stored
    torch.testing.assert_close(got.to_dense(), want, rtol=0, atol=4e-16)  # a few ulp: rsqrt products
    # a sparse input gives the same; an existing self-loop is kept and I added on top (Ã = A + I)
    torch.testing.assert_close(normalize_adjacency(PATH3.to_sparse()).to_dense(), got.to_dense(), rtol=0, atol=0)
    loop = PATH3.clone()
    loop[0, 0] = 1.0  # Ã_00 = 2, degrees 3, 3, 2
    torch.testing.assert_close(normalize_adjacency(loop).to_dense()[0, :2], torch.tensor([2 / 3, 1 / 3], dtype=D),
                               rtol=0, atol=4e-16)


# ------------------------------------------------------------------------------------------- exactness
def test_layer_forward_and_gradients_equal_dense_reference() -> None:
    torch.manual_seed(0)
    a = _random_graph(9, 0.35, 1)
    conv = GCNConv(6, 4).double()
    with torch.no_grad():
        conv.bias.normal_()
    h = torch.randn(9, 6, dtype=D, requires_grad=True)
    got = conv(h, normalize_adjacency(a))
    w = conv.lin.weight
    ref = _dense_hat(a) @ (h @ w.t()) + conv.bias
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-13)
    gout = torch.randn_like(ref)
    g_got = torch.autograd.grad(got, (h, w, conv.bias), gout)
    g_ref = torch.autograd.grad(ref, (h, w, conv.bias), gout)
    for x, y in zip(g_got, g_ref):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-13)


def test_symmetric_product_gradcheck() -> None:
    a = normalize_adjacency(_random_graph(6, 0.5, 2))
    z = torch.randn(6, 3, dtype=D, requires_grad=True)
    assert torch.autograd.gradcheck(lambda z: _SymSpMM.apply(a.crow_indices(), a.col_indices(), a.values(), z), (z,))


def test_model_equals_dense_two_layer_reference() -> None:
    torch.manual_seed(1)
    a = _random_graph(10, 0.3, 3)
    model = GCN(a, 5, 3, hidden=4).double().eval()  # eval: dropout off
    x = torch.randn(10, 5, dtype=D)
    hat = _dense_hat(a)
    c1, c2 = model.conv1, model.conv2
    ref = hat @ (F.relu(hat @ (x @ c1.lin.weight.t()) + c1.bias) @ c2.lin.weight.t()) + c2.bias
    torch.testing.assert_close(model(x), ref, rtol=0, atol=1e-13)


def test_sparse_model_equals_masked_dense_model() -> None:
    """The DST controller converts both GCN weights; the sparse model computes the masked dense one (and grads)."""
    torch.manual_seed(2)
    a = _random_graph(12, 0.3, 4)
    model = GCN(a, 20, 3, hidden=8).double().eval()
    dense = GCN(a, 20, 3, hidden=8).double().eval()
    ds = DynamicSparse(model, 0.3, "rigl", total_steps=10, distribution="uniform")
    assert set(ds.layers) == {"conv1.lin", "conv2.lin"}
    with torch.no_grad():
        for c, d in ((model.conv1, dense.conv1), (model.conv2, dense.conv2)):
            d.lin.weight.copy_(c.lin.dense_weight())
            d.bias.copy_(c.bias)
    x = torch.randn(12, 20, dtype=D)
    out, ref = model(x), dense(x)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-13)
    gout = torch.randn_like(out)
    (gv,) = torch.autograd.grad(out, model.conv2.lin.values, gout)
    (gw,) = torch.autograd.grad(ref, dense.conv2.lin.weight, gout)
    torch.testing.assert_close(gv, gw.reshape(-1)[model.conv2.lin.flat_indices()], rtol=0, atol=1e-13)


# ------------------------------------------------------------------------------------------- train then prune
@pytest.mark.parametrize("sparsity", [0.8, 0.9, 0.98])
@pytest.mark.parametrize("distribution", ["erk", "uniform"])
def test_prune_keeps_the_controllers_nonzeros(sparsity: float, distribution: str) -> None:
    a = _random_graph(30, 0.2, 5)
    torch.manual_seed(3)
    model = GCN(a, 100, 5, hidden=40)
    twin = GCN(a, 100, 5, hidden=40)
    ds = DynamicSparse(twin, 1 - sparsity, "set", total_steps=10, distribution=distribution)
    kept = prune_to(model, sparsity, distribution)
    for name in ("conv1.lin", "conv2.lin"):
        w = model.get_submodule(name).weight
        want = ds.layers[name].nnz if name in ds.layers else w.numel()
        assert kept[name] == want and int((w != 0).sum()) == want
    total = sum(model.get_submodule(n).weight.numel() for n in kept)
    assert abs(1 - sum(kept.values()) / total - sparsity) < 1 / total + 1e-12  # the asked sparsity, to one weight
    if distribution == "uniform" and sparsity in (0.8, 0.9):  # 4000 and 200 weights: the counts are whole numbers
        assert sum(kept.values()) == round((1 - sparsity) * total)


def test_pruned_weights_stay_zero_while_fine_tuning() -> None:
    g = sbm_graph(blocks=2, block_size=800, features=30, seed=1)
    torch.manual_seed(4)
    model = GCN(g.adj, 30, 2, hidden=16)
    train_gcn(model, g, 5)
    prune_to(model, 0.9)
    before = {n: model.get_submodule(n).weight.detach().clone() for n in ("conv1.lin", "conv2.lin")}
    train_gcn(model, g, 5)
    for n, w0 in before.items():
        w = model.get_submodule(n).weight
        assert torch.equal(w == 0, w0 == 0)  # the mask is fixed: zeros stay zero exactly, nothing new is zero
        assert not torch.equal(w, w0)  # and the kept weights did train
        prune.remove(model.get_submodule(n), "weight")
    assert 0.0 <= accuracy(model, g, g.test) <= 1.0


# ------------------------------------------------------------------------------------------- MACs, graph
def test_macs_by_hand() -> None:
    # 3-node path: nnz(Â) = 7; in 4, hidden 2, classes 3. Layer 1: XW 3*8, ÂZ 7*2, Â dY 7*2, dW 3*8, no dX = 76;
    # layer 2: 3*6 + 7*3 + 7*3 + 3*6 + 3*6 = 96
    assert sum(layer_macs(3, 7, 4, 2, 8, input_grad=False).values()) == 76
    model = GCN(PATH3.float(), 4, 3, hidden=2)
    assert step_macs(model) == 76 + 96
    # sparse: each weight product counts nonzeros only (uniform density 0.5: 4 of 8, 3 of 6)
    DynamicSparse(model, 0.5, "set", total_steps=5, distribution="uniform")
    assert step_macs(model) == (3 * 4 + 14 + 14 + 3 * 4) + (3 * 3 + 21 + 21 + 3 * 3 + 3 * 3)


def test_sbm_graph_structure() -> None:
    g = sbm_graph(blocks=3, block_size=600, p_in=0.02, p_out=0.002, features=7, seed=5)
    a = g.adj.to_dense()
    assert torch.equal(a, a.t()) and a.diagonal().sum() == 0 and set(a.unique().tolist()) <= {0.0, 1.0}
    same = g.y[:, None] == g.y[None, :]
    pairs_in = (same.sum() - 1800) / 2
    pairs_out = (~same).sum() / 2
    for p, pairs, edges in ((0.02, pairs_in, a[same].sum() / 2), (0.002, pairs_out, a[~same].sum() / 2)):
        assert abs(edges - p * pairs) < 5 * math.sqrt(p * pairs)  # binomial: within 5 sigma
    split = torch.cat([g.train, g.val, g.test])
    assert split.unique().numel() == 60 + 500 + 1000
    assert torch.equal(torch.bincount(g.y[g.train]), torch.tensor([20, 20, 20]))
    g2 = sbm_graph(blocks=3, block_size=600, p_in=0.02, p_out=0.002, features=7, seed=5)
    assert torch.equal(g2.x, g.x) and torch.equal(g2.adj.indices(), g.adj.indices())
    assert (g.targets() != -100).sum() == 60


# ------------------------------------------------------------------------------------------- refusals
def _one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_refusals_are_one_line() -> None:
    with pytest.raises(ConfigError, match=r"square \(n, n\) matrix, got \(3, 4\)") as e:
        normalize_adjacency(torch.zeros(3, 4))
    _one_line(e)
    with pytest.raises(ConfigError, match="square") as e:
        GCN(torch.zeros(2, 3), 4, 2)
    _one_line(e)
    with pytest.raises(ConfigError, match="not symmetric") as e:
        normalize_adjacency(torch.tensor([[0.0, 1], [0, 0]]))
    _one_line(e)
    with pytest.raises(ConfigError, match=">= 0") as e:
        normalize_adjacency(torch.tensor([[0.0, -1], [-1, 0]]))
    _one_line(e)
    model = GCN(PATH3.float(), 4, 2)
    with pytest.raises(ConfigError, match=r"one row per node \(n = 3\), got \(5, 4\)") as e:
        model(torch.zeros(5, 4))
    _one_line(e)
    with pytest.raises(ConfigError, match=r"n = 3 nodes, got \(2, 4\)") as e:
        model.conv1(torch.zeros(2, 4), model.adjacency())
    _one_line(e)
    for bad in (1.0, -0.1, 1.5, True, "0.9"):
        with pytest.raises(ConfigError, match=r"must be a number in \[0, 1\)") as e:
            prune_to(model, bad)
        _one_line(e)
    with pytest.raises(ConfigError, match="p_in") as e:
        sbm_graph(p_in=1.5)
    _one_line(e)
