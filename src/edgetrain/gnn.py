"""A graph convolutional network (GCN) on torch, a generated graph, and its sparse training and pruning.

GCN: Kipf & Welling, "Semi-Supervised Classification with Graph Convolutional Networks", ICLR 2017, arXiv 1609.02907.
A layer is ``H' = Â H W (+ b)`` with ``Â = D^-1/2 (A + I) D^-1/2`` (eq. 2; ``D`` the degrees of ``A + I``); the
model is two layers, ``softmax(Â ReLU(Â X W0) W1)`` (eq. 9), dropout on both layers' inputs, trained full-batch on
the labelled nodes only. The weight product is an ``nn.Linear`` (no bias; the bias is added after propagation)
applied before the propagation (``Â (H W)``: the cheaper order when the layer narrows), so that
:class:`edgetrain.sparse.DynamicSparse` can convert it to a sparse layer like any other.

``Â`` is held as a CSR matrix (int32 indices, float values, three buffers); its product runs in :class:`_SymSpMM`,
whose backward is ``Â @ dY`` because ``Â`` is symmetric: the graph must be undirected (refused otherwise).

The comparison this module serves (edgetrain issue 15, item 3; ``benchmarks/gnn/sparse_gcn.py``, docs/gnn.md):
sparse from scratch (the DST controller: SET, RigL, DST-EE) against dense training followed by magnitude pruning to
the same per-layer nonzero counts and a short fine-tune with the mask fixed (:func:`prune_to`, through
``torch.nn.utils.prune``), as in the train-and-prune baselines of Peng et al., "Towards Sparsification of Graph
Neural Networks", ICCD 2022, arXiv 2209.04766, and the one-shot magnitude pruning of the GNN lottery-ticket work
(Chen et al., "A Unified Lottery Ticket Hypothesis for Graph Neural Networks", ICML 2021, arXiv 2102.06790).

The graph (:func:`sbm_graph`): a stochastic block model (Holland, Laskey, Leinhardt, Social Networks 1983) with
class-dependent Gaussian features; no installed package ships a featured node-classification graph (networkx's
karate club has 34 nodes and no features). :func:`training_macs` counts a step's multiply-accumulates analytically.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import prune

from edgetrain.errors import ConfigError
from edgetrain.sparse.density import layer_densities

__all__ = ["GCN", "GCNConv", "Graph", "accuracy", "check_sparsity", "dense_score_macs", "layer_macs", "normalize_adjacency", "prune_to",
           "sbm_graph", "step_macs", "train_gcn"]

INDEX = torch.int32  # CSR index dtype of Â (our choice, as edgetrain.sparse: 4 bytes per index)
HIDDEN = 16  # Kipf & Welling §5.2: 16 hidden units (Cora, Citeseer, Pubmed); the benchmark widens it, stated there
DROPOUT = 0.5  # Kipf & Welling §5.2
TRAIN_PER_CLASS, VAL, TEST = 20, 500, 1000  # Kipf & Welling §5.1 (Planetoid split): 20 labels per class, 500, 1000


def _sym(what: str, a: Tensor) -> Tensor:
    """``a`` coalesced COO, checked: 2-D square, finite, non-negative, symmetric."""
    if not isinstance(a, Tensor) or a.dim() != 2 or a.shape[0] != a.shape[1]:
        shape = tuple(a.shape) if isinstance(a, Tensor) else type(a).__name__
        raise ConfigError(f"{what}: the adjacency must be a square (n, n) matrix, got {shape}")
    if not a.dtype.is_floating_point:
        a = a.to(torch.get_default_dtype())
    a = (a.to_sparse_coo() if a.layout != torch.strided else a.to_sparse()).coalesce()
    v = a.values()
    if not bool(torch.isfinite(v).all()) or bool((v < 0).any()):
        raise ConfigError(f"{what}: adjacency entries must be finite and >= 0")
    at = a.t().coalesce()
    if not (torch.equal(a.indices(), at.indices()) and torch.equal(a.values(), at.values())):
        raise ConfigError(f"{what}: the adjacency is not symmetric; this GCN takes an undirected graph (A == A^T)")
    return a


def normalize_adjacency(adj: Tensor) -> Tensor:
    """``Â = D^-1/2 (A + I) D^-1/2`` (Kipf & Welling eq. 2) as a CSR tensor with int32 indices.

    Args:
        adj: the (n, n) adjacency, dense or sparse, symmetric, entries >= 0 (weights allowed); any self-loops it has
            are kept and ``I`` is added on top, as the paper's ``Ã = A + I_N``.
    """
    a = _sym("normalize_adjacency", adj)
    n = a.shape[0]
    eye = torch.arange(n)
    idx = torch.cat([a.indices(), torch.stack([eye, eye])], 1)
    val = torch.cat([a.values(), torch.ones(n, dtype=a.dtype)])
    a = torch.sparse_coo_tensor(idx, val, (n, n), check_invariants=False).coalesce()  # duplicates (existing self-loops) are summed
    r, c = a.indices()
    dinv = torch.zeros(n, dtype=a.dtype).index_add_(0, r, a.values()).rsqrt()  # degree >= 1 (the self-loop)
    vals = a.values() * dinv[r] * dinv[c]
    crow = torch.zeros(n + 1, dtype=torch.int64)
    crow[1:] = torch.bincount(r, minlength=n).cumsum(0)
    return torch.sparse_csr_tensor(crow.to(INDEX), c.to(INDEX), vals, (n, n), check_invariants=False)


class _SymSpMM(torch.autograd.Function):
    """``Â @ Z`` for a symmetric CSR ``Â`` given by ``(crow, col, values)``; the gradient is ``Â @ dY``."""

    @staticmethod
    def forward(ctx, crow: Tensor, col: Tensor, values: Tensor, z: Tensor) -> Tensor:
        ctx.save_for_backward(crow, col, values)
        n = crow.numel() - 1
        return torch.sparse_csr_tensor(crow, col, values, (n, n), check_invariants=False) @ z

    @staticmethod
    def backward(ctx, grad: Tensor):
        crow, col, values = ctx.saved_tensors
        n = crow.numel() - 1
        a = torch.sparse_csr_tensor(crow, col, values, (n, n), check_invariants=False)
        return None, None, None, a @ grad  # Â^T = Â


class GCNConv(nn.Module):
    """One GCN layer, ``Â (H W^T) + b``: ``lin`` (an ``nn.Linear`` without bias, swappable for a sparse layer),
    Glorot-uniform weights and a zero bias (Kipf & Welling §5.2, after Glorot & Bengio 2010)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__()
        self.lin = nn.Linear(in_features, out_features, bias=False)
        nn.init.xavier_uniform_(self.lin.weight)
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    def forward(self, h: Tensor, adj: Tensor) -> Tensor:
        """``h`` (n, in) node features, ``adj`` the normalised (n, n) CSR ``Â`` (:func:`normalize_adjacency`)."""
        if h.dim() != 2 or h.shape[0] != adj.shape[0]:
            raise ConfigError(f"GCNConv: features must be (n, in) with n = {adj.shape[0]} nodes, got "
                              f"{tuple(h.shape)}")
        out = _SymSpMM.apply(adj.crow_indices(), adj.col_indices(), adj.values(), self.lin(h))
        return out if self.bias is None else out + self.bias


class GCN(nn.Module):
    """Kipf & Welling's 2-layer GCN for node classification: ``Â ReLU(Â X W0) W1`` (logits), dropout before each
    layer. The graph is part of the model (``Â`` as buffers ``adj_crow``, ``adj_col``, ``adj_values``), so a
    forward takes the node features only: ``model(x)`` -> (n, classes) logits."""

    def __init__(self, adj: Tensor, in_features: int, classes: int, hidden: int = HIDDEN,
                 dropout: float = DROPOUT) -> None:
        super().__init__()
        for what, v in (("in_features", in_features), ("classes", classes), ("hidden", hidden)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"GCN {what}: must be an int >= 1, got {v!r}")
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
            raise ConfigError(f"GCN dropout: must be in [0, 1), got {dropout!r}")
        a = adj if adj.layout == torch.sparse_csr else normalize_adjacency(adj)
        if a.shape[0] != a.shape[1]:
            raise ConfigError(f"GCN: the adjacency must be a square (n, n) matrix, got {tuple(a.shape)}")
        self.register_buffer("adj_crow", a.crow_indices().to(INDEX))
        self.register_buffer("adj_col", a.col_indices().to(INDEX))
        self.register_buffer("adj_values", a.values())  # in the adjacency's dtype (float64 in, float64 out)
        self.num_nodes, self.dropout = a.shape[0], float(dropout)
        self.conv1 = GCNConv(in_features, hidden)
        self.conv2 = GCNConv(hidden, classes)

    def adjacency(self) -> Tensor:
        n = self.num_nodes
        return torch.sparse_csr_tensor(self.adj_crow, self.adj_col, self.adj_values, (n, n), check_invariants=False)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 2 or x.shape[0] != self.num_nodes:
            raise ConfigError(f"GCN: features must be (n, in) with one row per node (n = {self.num_nodes}), got "
                              f"{tuple(x.shape)}")
        a = self.adjacency()
        h = F.relu(self.conv1(F.dropout(x, self.dropout, self.training), a))
        return self.conv2(F.dropout(h, self.dropout, self.training), a)


@dataclasses.dataclass
class Graph:
    """A node-classification graph: adjacency (n, n) (sparse COO, 0/1, symmetric, no self-loops), features x (n, d),
    labels y (n,), and disjoint train/val/test node indices."""

    adj: Tensor
    x: Tensor
    y: Tensor
    train: Tensor
    val: Tensor
    test: Tensor
    meta: dict

    def targets(self) -> Tensor:
        """Labels with every node outside the training split set to -100 (``cross_entropy``'s ignore index)."""
        t = torch.full_like(self.y, -100)
        t[self.train] = self.y[self.train]
        return t


def sbm_graph(blocks: int = 5, block_size: int = 400, p_in: float = 0.015, p_out: float = 0.003,
              features: int = 500, signal: float = 0.1, seed: int = 0) -> Graph:
    """A stochastic block model graph with Gaussian features and the Planetoid-style split.

    Node ``i`` of block ``c`` (its class) links to each other node independently with probability ``p_in`` (same
    block) or ``p_out`` (other block); undirected, no self-loops. Features: ``x_i = mu_c + N(0, I_d)`` with class
    means ``mu_c ~ N(0, signal^2 I_d)`` drawn once. Split: ``TRAIN_PER_CLASS`` nodes per class for training, then
    ``VAL`` and ``TEST`` nodes, all drawn at random. Everything draws from one ``torch.Generator`` seeded ``seed``.
    The default values are our assumptions (a graph in which both the features and the edges carry the class).
    The generator draws one number per node pair (O(n^2) memory: 2,000 nodes take about 60 MB while it runs).
    """
    for what, v, lo in (("blocks", blocks, 2), ("block_size", block_size, 1), ("features", features, 1)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ConfigError(f"sbm_graph {what}: must be an int >= {lo}, got {v!r}")
    for what, v in (("p_in", p_in), ("p_out", p_out)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 1:
            raise ConfigError(f"sbm_graph {what}: must be a probability in [0, 1], got {v!r}")
    n = blocks * block_size
    if n < blocks * TRAIN_PER_CLASS + VAL + TEST:
        raise ConfigError(f"sbm_graph: {n} nodes cannot hold the split ({TRAIN_PER_CLASS} per class + {VAL} + {TEST})")
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(blocks).repeat_interleave(block_size)
    r, c = torch.triu_indices(n, n, 1)
    p = torch.where(y[r] == y[c], float(p_in), float(p_out))
    keep = torch.rand(r.numel(), generator=g, dtype=torch.float64) < p
    r, c = r[keep], c[keep]
    idx = torch.cat([torch.stack([r, c]), torch.stack([c, r])], 1)
    adj = torch.sparse_coo_tensor(idx, torch.ones(idx.shape[1]), (n, n), check_invariants=False).coalesce()
    mu = signal * torch.randn(blocks, features, generator=g)
    x = mu[y] + torch.randn(n, features, generator=g)
    perm = torch.randperm(n, generator=g)
    train = torch.cat([perm[y[perm] == k][:TRAIN_PER_CLASS] for k in range(blocks)]).sort().values
    rest = perm[~torch.isin(perm, train)]
    meta = {"generator": "stochastic block model (edgetrain.gnn.sbm_graph)", "nodes": n, "blocks": blocks,
            "p_in": p_in, "p_out": p_out, "edges": int(r.numel()), "features": features, "signal": signal,
            "seed": seed, "split": f"{TRAIN_PER_CLASS} per class / {VAL} / {TEST}"}
    return Graph(adj, x, y, train, rest[:VAL].sort().values, rest[VAL:VAL + TEST].sort().values, meta)


def check_sparsity(sparsity: float, what: str = "sparsity") -> float:
    """``sparsity`` as a float in [0, 1), else a one-line ConfigError."""
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0 <= sparsity < 1:
        raise ConfigError(f"{what}: must be a number in [0, 1) (the pruned fraction of weights), got {sparsity!r}")
    return float(sparsity)


def _linears(model: nn.Module) -> dict[str, nn.Linear]:
    return {n: m for n, m in model.named_modules() if type(m) is nn.Linear}


def prune_to(model: nn.Module, sparsity: float, distribution: str = "erk") -> dict[str, int]:
    """Magnitude-prune every ``nn.Linear`` of ``model`` in place (``torch.nn.utils.prune.l1_unstructured``: the
    weight becomes ``weight_orig * weight_mask`` and the pruned entries get no gradient).

    Each layer keeps ``max(1, round(d_l * numel))`` weights of largest ``|w|``, ``d_l`` its ERK or uniform density for
    the global density ``1 - sparsity``: exactly the per-layer counts :class:`edgetrain.sparse.DynamicSparse` gives
    the same model, so the two are compared at the same nonzeros, layer by layer. Returns the kept count per layer.
    Call :func:`torch.nn.utils.prune.remove` on each layer to make it permanent.
    """
    density = 1.0 - check_sparsity(sparsity, "prune_to sparsity")
    layers = _linears(model)
    if not layers:
        raise ConfigError(f"prune_to: {type(model).__name__} has no nn.Linear to prune")
    if density == 1.0:
        return {n: m.weight.numel() for n, m in layers.items()}
    densities = layer_densities({n: tuple(m.weight.shape) for n, m in layers.items()}, density, distribution)
    kept = {}
    for name, m in layers.items():
        numel = m.weight.numel()
        keep = max(1, min(numel, round(densities[name] * numel)))  # DynamicSparse's rounding (sparse_from_dense)
        if keep < numel:
            prune.l1_unstructured(m, "weight", amount=numel - keep)
        kept[name] = keep
    return kept


def train_gcn(model: nn.Module, graph: Graph, steps: int, lr: float = 0.01, weight_decay: float = 5e-4,
              controller=None) -> dict:
    """Full-batch Adam training on the training nodes (Kipf & Welling §5.2: Adam, lr 0.01, L2 5e-4); calls
    ``controller.step(opt)`` after each optimizer step. Returns the last loss and the number of steps."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"train_gcn steps: must be an int >= 1, got {steps!r}")
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay)
    target = graph.targets()
    model.train()
    loss = None
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(graph.x), target)
        loss.backward()
        opt.step()
        if controller is not None:
            controller.step(opt)
    return {"steps": steps, "final_loss": float(loss.detach())}


@torch.no_grad()
def accuracy(model: nn.Module, graph: Graph, nodes: Tensor) -> float:
    """Top-1 accuracy on ``nodes`` in eval mode (dropout off); the model's mode is restored."""
    was = model.training
    model.eval()
    try:
        return float((model(graph.x)[nodes].argmax(1) == graph.y[nodes]).double().mean())
    finally:
        model.train(was)


def layer_macs(nodes: int, adj_nnz: int, in_features: int, out_features: int, weight_nnz: int,
               input_grad: bool) -> dict[str, int]:
    """Multiply-accumulates of one GCN layer in one full-batch training step (forward + backward), by product.

    ``H W^T``: ``nodes * weight_nnz`` (a dense weight has ``in * out`` nonzeros); ``Â Z``: ``adj_nnz * out``.
    Backward: ``Â dY`` (``adj_nnz * out``), the weight gradient (``nodes * weight_nnz``: dense, or sampled at the
    nonzeros) and, if the layer's input needs a gradient, ``dZ W`` (``nodes * weight_nnz``). Bias, ReLU, dropout and
    the loss are elementwise and not counted.
    """
    w = nodes * weight_nnz
    a = adj_nnz * out_features
    return {"weight_forward": w, "adj_forward": a, "adj_backward": a, "weight_grad": w,
            "input_grad": w if input_grad else 0}


def step_macs(model: GCN) -> int:
    """MACs of one training step of ``model`` as it runs: a sparse layer (``edgetrain.sparse``) counts its nonzeros;
    an ``nn.Linear``, pruned (masked) or not, every weight, since its products run dense. The sum of
    :func:`layer_macs` over the two layers (the first one's input needs no gradient)."""
    total = 0
    e = model.adj_values.numel()
    for i, conv in enumerate((model.conv1, model.conv2)):
        lin = conv.lin
        if hasattr(lin, "nnz"):
            nnz, (out, k) = lin.nnz, lin.shape2d
        else:
            out, k = lin.weight.shape
            nnz = out * k
        total += sum(layer_macs(model.num_nodes, e, k, out, nnz, input_grad=i > 0).values())
    return total


def dense_score_macs(model: GCN) -> int:
    """The extra MACs of a RigL/DST-EE update step: the dense gradient ``dY X^T`` of each sparse layer."""
    return sum(model.num_nodes * math.prod(c.lin.shape2d) for c in (model.conv1, model.conv2) if hasattr(c.lin, "nnz"))
