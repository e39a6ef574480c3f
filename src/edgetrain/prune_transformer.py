"""Automatic structured pruning of a transformer's attention heads and MLP neurons under an overall ratio.

The idea is AE-BERT's: Huang, Liu, Liang, Peng, Li, Xu, Xie, Ding, *An Automatic and Efficient BERT Pruning for Edge
AI Systems*, ISQED 2022, arXiv:2206.10461: given an overall pruning ratio, search sub-network candidates (a pruning
pattern over the layers) with a cheap evaluation, keep the best, fine-tune it -- instead of a hand-set ratio per
layer. Only the abstract was retrieved; what is below is our reading of it (see ``docs/transformer_pruning.md``).
Importance scores follow Michel, Levy, Neubig, *Are Sixteen Heads Really Better than One?*, NeurIPS 2019,
arXiv:1905.10650: the head importance is ``|dL/d xi_h|`` for a head mask ``xi_h`` (all ones), normalised per layer.

What is implemented (our assumptions, marked):

* Discovery is by structure, not class (:func:`find_layers`): one forward records the order in which ``nn.Linear``
  layers run; an attention block is a fused projection (``out = 3 * in``) or three projections with one parent and
  one shape (q, k, v), then the output projection (its input width is the heads' width), then an MLP up and down
  projection (down's input width = up's output width). The head count is the nearest ancestor's ``num_heads`` /
  ``heads`` / ``num_attention_heads`` / ``n_heads`` / ``n_head`` attribute, else ``model.config.num_attention_heads``.
* Pruning is by masks (:class:`Pruner`): forward pre-hooks multiply the output projection's input by the head mask
  (each head's ``head_dim`` columns) and the MLP down projection's input by the neuron mask. A mask of ones
  multiplies by exactly 1.0: the outputs are bit-for-bit unchanged. :func:`sliced` removes the pruned units
  physically (a copy of the model) where the architecture's forward allows it, to measure the parameter count.
* The ratio ``r`` applies to heads and to neurons separately (our assumption): ``round(r * H)`` of the ``H`` heads
  and ``round(r * N)`` of the ``N`` neurons are pruned, every layer keeps at least one of each.
* Within a layer the kept units are the most important ones; an allocation (kept heads and neurons per layer) is
  the pattern searched. :func:`search` is a small evolutionary search (our assumption, AE-BERT's exact search was not
  retrieved): an initial population of the uniform allocation, the global-importance allocation and random ones, then
  generations of mutations that move units between layers; a candidate's score is given by the caller (the
  benchmark: validation loss after a few fine-tuning steps from the same weights).
"""

from __future__ import annotations

import copy
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from edgetrain.errors import ConfigError

__all__ = ["Allocation", "Pruner", "TLayer", "budget", "find_layers", "global_allocation", "importance", "search",
           "sliced", "uniform_allocation"]

HEAD_ATTRS = ("num_heads", "heads", "num_attention_heads", "n_heads", "n_head")  # torch, timm/ours, HF BERT, GPT-2


@dataclass
class TLayer:
    """One transformer layer's prunable structure (module names as in ``model.named_modules()``)."""

    qkv: list[str]  # one fused projection or three (q, k, v)
    out: str  # attention output projection: its input is the concatenated heads
    up: str  # MLP up projection (intermediate)
    down: str  # MLP down projection: its input is the neurons
    heads: int
    head_dim: int
    neurons: int


Allocation = tuple[tuple[int, ...], tuple[int, ...]]  # (kept heads per layer, kept neurons per layer)


def forward(model: nn.Module, x: Tensor | dict) -> Tensor:
    """The model's logits: ``model(**x)`` for a dict of inputs (Hugging Face), ``.logits`` if it returns an object."""
    out = model(**x) if isinstance(x, dict) else model(x)
    return out.logits if hasattr(out, "logits") else out


def _head_count(model: nn.Module, names: list[str]) -> int | None:
    mods = dict(model.named_modules())
    parts = names[0].split(".")
    for i in range(len(parts) - 1, -1, -1):
        mod = mods[".".join(parts[:i])]
        for a in HEAD_ATTRS:
            if isinstance(getattr(mod, a, None), int):
                return getattr(mod, a)
    n = getattr(getattr(model, "config", None), "num_attention_heads", None)
    return n if isinstance(n, int) else None


def find_layers(model: nn.Module, example: Tensor | dict) -> list[TLayer]:
    """The model's attention + MLP layers, in execution order (see the module docstring for the rule).

    Raises:
        ConfigError: no attention block is found, or its head count is missing or does not divide its width.
    """
    order: list[tuple[str, nn.Linear]] = []
    seen: set[str] = set()

    def hook(name: str) -> Callable:
        def rec(mod: nn.Module, _inp: tuple) -> None:
            if name not in seen:
                seen.add(name)
                order.append((name, mod))
        return rec

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    try:
        with torch.no_grad():
            was = model.training
            model.eval()
            forward(model, example)
            model.train(was)
    finally:
        for h in handles:
            h.remove()
    layers, i = [], 0
    parent = lambda n: n.rsplit(".", 1)[0] if "." in n else ""
    while i < len(order):
        (n0, l0), rest = order[i], order[i + 1:]
        if l0.out_features == 3 * l0.in_features and rest and rest[0][1].in_features == l0.in_features:
            qkv, width, j = [n0], l0.in_features, i + 1
        elif len(rest) >= 2 and all(parent(n) == parent(n0) and lin.weight.shape == l0.weight.shape
                                    for n, lin in rest[:2]):
            qkv, width, j = [n0, rest[0][0], rest[1][0]], l0.out_features, i + 3
        else:
            i += 1
            continue
        tail = order[j:j + 3]
        if len(tail) < 3 or tail[0][1].in_features != width or tail[2][1].in_features != tail[1][1].out_features:
            i += 1
            continue
        heads = _head_count(model, qkv)
        if heads is None or heads < 1 or width % heads:
            raise ConfigError(f"attention at {qkv[0]!r}: head count {heads} not found or does not divide its width "
                              f"{width} (looked for {', '.join(HEAD_ATTRS)} and config.num_attention_heads)")
        layers.append(TLayer(qkv, tail[0][0], tail[1][0], tail[2][0], heads, width // heads, tail[1][1].out_features))
        i = j + 3
    if not layers:
        raise ConfigError(f"no attention found in {type(model).__name__}: pruning needs q/k/v (or fused qkv) "
                          "projections followed by an output projection and an MLP, all nn.Linear")
    return layers


class Pruner:
    """Head and neuron masks on a model's transformer layers, applied by forward pre-hooks (see module docstring).

    Args:
        model: any model :func:`find_layers` recognises; it is not copied (hooks are added; :meth:`remove` them).
        example: one input batch (a tensor, or a dict of tensors for Hugging Face models).
    """

    def __init__(self, model: nn.Module, example: Tensor | dict) -> None:
        self.model = model
        self.layers = find_layers(model, example)
        self.head_masks = [torch.ones(t.heads) for t in self.layers]
        self.neuron_masks = [torch.ones(t.neurons) for t in self.layers]
        mods = dict(model.named_modules())
        self._heads = [mods[t.out].register_forward_pre_hook(self._mul(i, True)) for i, t in enumerate(self.layers)]
        self._neurons = [mods[t.down].register_forward_pre_hook(self._mul(i, False)) for i, t in enumerate(self.layers)]

    def _mul(self, i: int, heads: bool) -> Callable:
        def pre(_mod: nn.Module, inp: tuple) -> tuple:
            m = self.head_masks[i].repeat_interleave(self.layers[i].head_dim) if heads else self.neuron_masks[i]
            return (inp[0] * m.to(inp[0].dtype),) + inp[1:]
        return pre

    def remove(self) -> None:
        """Remove the hooks: the model computes unmasked again."""
        for h in self._heads + self._neurons:
            h.remove()
        self._heads, self._neurons = [], []

    def sizes(self) -> tuple[list[int], list[int]]:
        """Heads and neurons per layer."""
        return [t.heads for t in self.layers], [t.neurons for t in self.layers]

    def reset(self) -> None:
        """All masks back to ones."""
        self.head_masks = [torch.ones(t.heads) for t in self.layers]
        self.neuron_masks = [torch.ones(t.neurons) for t in self.layers]

    def apply(self, alloc: Allocation, scores: tuple[list[Tensor], list[Tensor]]) -> None:
        """Keep, in each layer, the ``alloc`` most important heads and neurons (by ``scores``); mask the rest."""
        for masks, keep, sc in ((self.head_masks, alloc[0], scores[0]), (self.neuron_masks, alloc[1], scores[1])):
            for i, k in enumerate(keep):
                m = torch.zeros_like(masks[i])
                m[torch.argsort(sc[i], descending=True, stable=True)[:k]] = 1.0
                masks[i] = m

    def kept(self) -> Allocation:
        """Kept heads and neurons per layer under the current masks."""
        return (tuple(int(m.sum()) for m in self.head_masks), tuple(int(m.sum()) for m in self.neuron_masks))


def importance(pruner: Pruner, batches: Sequence[tuple], loss_fn: Callable[[nn.Module, tuple], Tensor]
               ) -> tuple[list[Tensor], list[Tensor]]:
    """Michel et al. 2019: ``sum over batches |dL/dmask|`` for every head and neuron at the current masks,
    normalised by its layer's L2 norm (their per-layer normalisation). Per batch, not per example (our assumption)."""
    heads = [torch.zeros(t.heads) for t in pruner.layers]
    neurons = [torch.zeros(t.neurons) for t in pruner.layers]
    saved = pruner.head_masks, pruner.neuron_masks
    pruner.head_masks = [m.clone().requires_grad_() for m in saved[0]]
    pruner.neuron_masks = [m.clone().requires_grad_() for m in saved[1]]
    try:
        for batch in batches:
            grads = torch.autograd.grad(loss_fn(pruner.model, batch), pruner.head_masks + pruner.neuron_masks)
            for acc, g in zip(heads + neurons, grads):
                acc += g.abs()
    finally:
        pruner.head_masks, pruner.neuron_masks = saved
    return ([h / h.norm().clamp_min(1e-12) for h in heads], [n / n.norm().clamp_min(1e-12) for n in neurons])


def budget(sizes: Sequence[int], ratio: float, what: str) -> int:
    """Units kept in total: ``sum(sizes) - round(ratio * sum(sizes))`` (half away from zero).

    Raises:
        ConfigError: ``ratio`` outside [0, 1), or it would leave a layer with no unit.
    """
    if not isinstance(ratio, (int, float)) or not 0.0 <= ratio < 1.0:
        raise ConfigError(f"pruning ratio {ratio!r} is outside [0, 1)")
    total = sum(sizes)
    keep = total - int(ratio * total + 0.5)
    if keep < len(sizes):
        raise ConfigError(f"pruning ratio {ratio} keeps {keep} of {total} {what} over {len(sizes)} layers: every "
                          f"layer needs at least one (ratio at most {(total - len(sizes)) / total:.4f} allowed)")
    return keep


def _spread(sizes: Sequence[int], keep: int) -> tuple[int, ...]:
    """``keep`` units in proportion to ``sizes`` (largest remainder, ties to the earlier layer), at least 1 each."""
    total = sum(sizes)
    exact = [keep * s / total for s in sizes]
    out = [max(1, int(e)) for e in exact]
    order = sorted(range(len(sizes)), key=lambda i: (-(exact[i] - int(exact[i])), i))
    k = 0
    while sum(out) < keep:
        i = order[k % len(order)]
        if out[i] < sizes[i]:
            out[i] += 1
        k += 1
    while sum(out) > keep:  # only when the minimum of one forced more than the share
        i = max(range(len(out)), key=lambda j: (out[j] - exact[j], j))
        out[i] -= 1
    return tuple(out)


def uniform_allocation(pruner: Pruner, ratio: float) -> Allocation:
    """The same ratio in every layer (equal-sized layers get equal counts), with exactly :func:`budget`'s totals."""
    hs, ns = pruner.sizes()
    return _spread(hs, budget(hs, ratio, "heads")), _spread(ns, budget(ns, ratio, "neurons"))


def global_allocation(pruner: Pruner, ratio: float, scores: tuple[list[Tensor], list[Tensor]]) -> Allocation:
    """The most important units over all layers (normalised scores), each layer keeping at least its best one."""
    out = []
    hs, ns = pruner.sizes()
    for sizes, sc, what in ((hs, scores[0], "heads"), (ns, scores[1], "neurons")):
        keep = budget(sizes, ratio, what)
        counts = [1] * len(sizes)
        rest = sorted(((float(v), i) for i, s in enumerate(sc) for v in torch.sort(s, descending=True).values[1:]),
                      key=lambda p: (-p[0], p[1]))
        for _, i in rest[:keep - len(sizes)]:
            counts[i] += 1
        out.append(tuple(counts))
    return out[0], out[1]


def _random(sizes: Sequence[int], keep: int, rng: random.Random) -> tuple[int, ...]:
    counts = [1] * len(sizes)
    slots = [i for i, s in enumerate(sizes) for _ in range(s - 1)]
    for i in rng.sample(slots, keep - len(sizes)):
        counts[i] += 1
    return tuple(counts)


def _mutate(counts: tuple[int, ...], sizes: Sequence[int], rng: random.Random) -> tuple[int, ...]:
    """Move a random number of units (up to a quarter of a layer) from one layer to another, within [1, size]."""
    c = list(counts)
    src = [i for i in range(len(c)) if c[i] > 1]
    if not src:
        return counts
    a = rng.choice(src)
    dst = [i for i in range(len(c)) if i != a and c[i] < sizes[i]]
    if not dst:
        return counts
    b = rng.choice(dst)
    n = rng.randint(1, max(1, min(c[a] - 1, sizes[b] - c[b], max(1, sizes[a] // 4))))
    c[a] -= n
    c[b] += n
    return tuple(c)


def search(pruner: Pruner, ratio: float, scores: tuple[list[Tensor], list[Tensor]],
           score_fn: Callable[[Allocation], float], population: int = 8, generations: int = 3, seed: int = 0
           ) -> tuple[Allocation, list[dict]]:
    """Evolutionary search over per-layer allocations with :func:`budget`'s exact totals (lower score is better).

    Population: the uniform and the global-importance allocations plus random ones; each generation mutates the
    best half (one move of heads and one of neurons between layers) and keeps the ``population`` best.

    Returns:
        The best allocation and every scored candidate (``{"heads", "neurons", "score", "generation"}``).
    """
    if population < 2 or generations < 0:
        raise ConfigError(f"search population {population} must be >= 2 and generations {generations} >= 0")
    rng = random.Random(seed)
    hs, ns = pruner.sizes()
    kh, kn = budget(hs, ratio, "heads"), budget(ns, ratio, "neurons")
    cands = [uniform_allocation(pruner, ratio), global_allocation(pruner, ratio, scores)]
    for _ in range(4 * population):
        if len(set(cands)) >= population:
            break
        cands.append((_random(hs, kh, rng), _random(ns, kn, rng)))
    history: list[dict] = []
    scored: dict[Allocation, float] = {}

    def evaluate(cs: list[Allocation], gen: int) -> None:
        for c in cs:
            if c not in scored:
                scored[c] = score_fn(c)
                history.append({"heads": list(c[0]), "neurons": list(c[1]), "score": scored[c], "generation": gen})

    evaluate(list(dict.fromkeys(cands))[:population], 0)
    for gen in range(1, generations + 1):
        best = sorted(scored, key=scored.get)[:max(1, population // 2)]
        evaluate([(_mutate(h, hs, rng), _mutate(n, ns, rng)) for h, n in best for _ in range(2)], gen)
    best = min(scored, key=scored.get)
    assert sum(best[0]) == kh and sum(best[1]) == kn
    return best, history


def sliced(pruner: Pruner, heads: bool = True) -> nn.Module:
    """A copy of the model with the masked neurons (and, if ``heads``, heads) removed from its weights.

    Heads: rows of q/k/v (or the fused qkv's three blocks) and columns of the output projection are dropped and the
    head-count attributes updated; this works when the attention's forward derives the head layout from the
    projection's width (Hugging Face BERT does; ``tiny_transformer`` reads the model width, so pass ``heads=False``).
    """
    model = copy.deepcopy(pruner.model)
    mods = dict(model.named_modules())

    def cut(lin: nn.Linear, keep: Tensor, dim: int) -> None:
        lin.weight = nn.Parameter(lin.weight.detach().index_select(dim, keep).clone())
        if dim == 0 and lin.bias is not None:
            lin.bias = nn.Parameter(lin.bias.detach()[keep].clone())
        lin.out_features, lin.in_features = lin.weight.shape

    for i, t in enumerate(pruner.layers):
        keep_n = torch.nonzero(pruner.neuron_masks[i]).flatten()
        cut(mods[t.up], keep_n, 0)
        cut(mods[t.down], keep_n, 1)
        if not heads:
            continue
        kh = torch.nonzero(pruner.head_masks[i]).flatten()
        cols = (kh[:, None] * t.head_dim + torch.arange(t.head_dim)).flatten()
        if len(t.qkv) == 1:
            width = t.heads * t.head_dim
            cut(mods[t.qkv[0]], torch.cat([cols + j * width for j in range(3)]), 0)
        else:
            for n in t.qkv:
                cut(mods[n], cols, 0)
        cut(mods[t.out], cols, 1)
        parent = mods[t.qkv[0].rsplit(".", 1)[0]] if "." in t.qkv[0] else model
        for a in HEAD_ATTRS:
            if isinstance(getattr(parent, a, None), int):
                setattr(parent, a, len(kh))
        if isinstance(getattr(parent, "all_head_size", None), int):
            parent.all_head_size = len(kh) * t.head_dim
        mods[t.out]._forward_pre_hooks.pop(pruner._heads[i].id, None)  # the copied head mask: its heads are gone
    for i, t in enumerate(pruner.layers):
        mods[t.down]._forward_pre_hooks.pop(pruner._neurons[i].id, None)
    return model
