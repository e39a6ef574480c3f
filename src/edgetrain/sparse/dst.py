"""Dynamic sparse training: SET, RigL and DST-EE as one controller over layers stored sparse.

* SET: Mocanu et al., "Scalable training of artificial neural networks with adaptive sparse connectivity inspired
  by network science", Nature Communications 2018, arXiv 1707.04780: drop by magnitude, grow at random.
* RigL: Evci et al., "Rigging the Lottery: Making All Tickets Winners", ICML 2020, arXiv 1911.11134: drop by
  magnitude, grow by the dense gradient magnitude; ERK densities; cosine drop fraction; regrown weights start at 0.
* DST-EE: Huang et al., "Dynamic Sparse Training via Balancing the Exploration-Exploitation Trade-off", DAC 2023,
  arXiv 2211.16667 (spec algorithms_B §3): grow by ``|g| + c * sqrt(ln t / (N + eps))``, ``N`` the number of steps
  the connection has been active (its coverage); RigL is ``c = 0``. The paper's full text was not retrieved: the
  form of the bonus and its constants are the spec's recollection ([MEM]), not checked against the PDF.

The schedule (RigL §3): topology updates after steps ``t = delta_t, 2 delta_t, ...`` while ``t < t_end_frac *
total_steps``; each drops ``k = round(zeta_t * nnz)`` weights of a layer, ``zeta_t = zeta0 / 2 * (1 + cos(pi t /
T_end))``, and grows ``k``, so nnz stays fixed. Drop: the ``k`` active weights of smallest ``|w|``. Grow: the top
``k`` by score among the positions not kept (inactive ones and the ``k`` just dropped: RigL allows regrowing
those; they restart at 0). New weights are 0 and their optimizer state (momentum, Adam moments) is zeroed; the state
of kept weights is permuted with them (CSR order changes); the parameter's size never changes.

The dense gradient (RigL, DST-EE) is made on the update steps only: the controller arms the layers before the
update step's backward, and each layer's backward hands ``(dY, X)`` to :meth:`DynamicSparse._score`, which forms
``|dY @ X^T|`` (out, K) for that one layer, scores it, keeps the top ``k`` inactive candidates and the active
positions' scores (nnz), and frees the dense tensor before the next layer's backward. Its cost at that step: one
dense (out, K) float tensor (plus a bool mask) at a time, measured in ``benchmarks/sparse/dst.py``.

Coverage counters (DST-EE only): one integer per position of each sparse layer (dense-sized: what DST-EE's
exploration term needs), counted in update intervals (int16 while ``T_end / delta_t < 2**15``, else int32): the
mask is constant between updates, so ``N = delta_t * intervals`` is the step count exactly.

Constants: ``delta_t = 100``, ``zeta0 = 0.3``, ``t_end_frac = 0.75`` (RigL's CIFAR/ImageNet settings, spec §3.2);
``c = 1.0``, ``eps = 1.0`` and the per-layer normalisation of ``|g|`` by its mean (spec §3.4) are our assumptions.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from edgetrain.errors import ConfigError
from edgetrain.sparse.density import DISTRIBUTIONS, check_density, layer_densities
from edgetrain.sparse.layers import SparseMixin, sparse_from_dense, unsupported

__all__ = ["METHODS", "DynamicSparse"]

METHODS = ("set", "rigl", "dst_ee")
BONUSES = ("sqrt", "linear")


def _check(cond: bool, what: str, allowed: str, got: object) -> None:
    if not cond:
        raise ConfigError(f"DynamicSparse {what}: must be {allowed}, got {got!r}")


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


class DynamicSparse:
    """Convert the chosen layers of ``model`` to sparse storage and drive their topology during training.

    Usage: build it before the optimizer (the layers' parameters are new), then per step ``loss.backward();
    optimizer.step(); ds.step(optimizer)``.

    Args:
        model: any ``nn.Module``; converted in place.
        density: the global kept fraction of the target layers' weights, in (0, 1].
        method: ``"set"``, ``"rigl"`` or ``"dst_ee"``.
        total_steps: the training run's optimizer steps (sets ``T_end``).
        distribution: ``"erk"`` or ``"uniform"`` per-layer densities; a layer at density 1 stays a dense layer.
        layers: module names to make sparse; default every ``nn.Linear`` and ``nn.Conv2d`` (exact types).
        delta_t, zeta0, t_end_frac: the update interval, initial drop fraction, and the fraction of training after
            which the topology is fixed.
        c, eps, normalize_grad: DST-EE's exploration coefficient and ``eps``; divide ``|g|`` by its layer mean.
        bonus: DST-EE's exploration term: ``"sqrt"`` ``c * sqrt(ln t / (N + eps))`` (the spec's UCB form) or
            ``"linear"`` ``c * ln t / (N + eps)`` (the issue's wording); which one the paper uses was not checked.
        seed: the initial patterns draw from a generator seeded ``seed``; SET's growth from one seeded ``seed + 1``
            (one ``rand(numel)`` in the layer's dtype per layer per update, layers in model order).
    """

    def __init__(self, model: nn.Module, density: float, method: str = "rigl", *, total_steps: int,
                 distribution: str = "erk", layers: list[str] | None = None, delta_t: int = 100, zeta0: float = 0.3,
                 t_end_frac: float = 0.75, c: float = 1.0, eps: float = 1.0, normalize_grad: bool = True,
                 bonus: str = "sqrt", seed: int = 0) -> None:
        density = check_density(density, "DynamicSparse density")
        _check(method in METHODS, "method", f"one of {', '.join(METHODS)}", method)
        _check(distribution in DISTRIBUTIONS, "distribution", f"one of {', '.join(DISTRIBUTIONS)}", distribution)
        _check(_is_int(total_steps) and total_steps >= 1, "total_steps", "an int >= 1", total_steps)
        _check(_is_int(delta_t) and delta_t >= 1, "delta_t", "an int >= 1", delta_t)
        _check(isinstance(zeta0, (int, float)) and 0 < zeta0 <= 1, "zeta0", "in (0, 1]", zeta0)
        _check(isinstance(t_end_frac, (int, float)) and 0 < t_end_frac <= 1, "t_end_frac", "in (0, 1]", t_end_frac)
        _check(isinstance(c, (int, float)) and c >= 0 and math.isfinite(c), "c", "a finite number >= 0", c)
        _check(isinstance(eps, (int, float)) and eps > 0 and math.isfinite(eps), "eps", "a finite number > 0", eps)
        _check(bonus in BONUSES, "bonus", f"one of {', '.join(BONUSES)}", bonus)
        _check(_is_int(seed) and seed >= 0, "seed", "an int >= 0", seed)
        self.method, self.density, self.distribution = method, density, distribution
        self.total_steps, self.delta_t, self.zeta0, self.t_end = total_steps, delta_t, float(zeta0), t_end_frac * total_steps
        self.c, self.eps, self.normalize_grad, self.bonus_form = float(c), float(eps), normalize_grad, bonus
        targets = self._targets(model, layers)
        shapes = {n: tuple(m.weight.shape) for n, m in targets.items()}
        densities = layer_densities(shapes, density, distribution)
        gen = torch.Generator().manual_seed(seed)
        self.layers: dict[str, SparseMixin] = {}
        for name, module in targets.items():
            if densities[name] >= 1.0:
                continue  # ERK gave it all its weights: it stays a dense layer
            sparse = sparse_from_dense(module, densities[name], gen)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, sparse)
            self.layers[name] = sparse
        self.densities = {n: (self.layers[n].density if n in self.layers else 1.0) for n in targets}
        intervals = math.ceil(self.t_end / delta_t)
        count_dtype = torch.int16 if intervals < 2**15 else torch.int32
        for layer in self.layers.values():
            if method == "dst_ee":
                layer.register_buffer("coverage", torch.zeros(math.prod(layer.shape2d), dtype=count_dtype))
        self.grow_gen = torch.Generator().manual_seed(seed + 1)
        self.t = 0
        self.history: list[dict] = []
        self._cand: dict[int, tuple[Tensor, Tensor, Tensor]] = {}
        self._arm()

    # ------------------------------------------------------------------------------------------- set-up
    @staticmethod
    def _targets(model: nn.Module, layers: list[str] | None) -> dict[str, nn.Module]:
        modules = dict(model.named_modules())
        if layers is None:
            found = {n: m for n, m in modules.items() if n and unsupported(m) is None}
            if not found:
                raise ConfigError(f"DynamicSparse: {type(model).__name__} has no supported layer (nn.Linear, or "
                                  f"nn.Conv2d with groups=1 and zero padding) to make sparse")
            return found
        if isinstance(layers, str) or not layers:
            raise ConfigError(f"DynamicSparse layers: must be a non-empty list of module names, got {layers!r}")
        out = {}
        for name in layers:
            if name not in modules or not name:
                raise ConfigError(f"DynamicSparse layers: {type(model).__name__} has no module {name!r}")
            why = unsupported(modules[name])
            if why is not None:
                raise ConfigError(f"DynamicSparse layers: {name!r} is {why}; the sparse path supports nn.Linear and "
                                  f"nn.Conv2d (groups=1, zero padding)")
            out[name] = modules[name]
        return out

    # ------------------------------------------------------------------------------------------- schedule
    def is_update(self, t: int) -> bool:
        """Whether the topology changes after step ``t`` (1-based)."""
        return t % self.delta_t == 0 and t < self.t_end

    def drop_fraction(self, t: int) -> float:
        """RigL's cosine decay: ``zeta0 / 2 * (1 + cos(pi t / T_end))``."""
        return self.zeta0 / 2 * (1 + math.cos(math.pi * t / self.t_end))

    def _k(self, layer: SparseMixin, t: int) -> int:
        return min(layer.nnz, round(self.drop_fraction(t) * layer.nnz))

    def _arm(self) -> None:
        """Arm the layers' dense-gradient capture for the next step if it is a gradient-growth update step."""
        armed = self.method != "set" and self.is_update(self.t + 1)
        for layer in self.layers.values():
            layer.capture = self._score if armed else None

    # ------------------------------------------------------------------------------------------- scores
    def bonus(self, layer: SparseMixin, t: int) -> Tensor | None:
        """DST-EE's exploration term per position (flat), ``c * sqrt(ln max(t, 2) / (N + eps))`` (or without the
        square root: ``bonus="linear"``) with ``N`` the steps active so far; ``None`` for SET and RigL."""
        if self.method != "dst_ee" or self.c == 0:
            return None
        b = layer.coverage.to(layer.values.dtype)  # one dense float transient, then in place
        b.mul_(self.delta_t).add_(self.eps).reciprocal_().mul_(math.log(max(t, 2)))
        return (b.sqrt_() if self.bonus_form == "sqrt" else b).mul_(self.c)

    @torch.no_grad()
    def _score(self, layer: SparseMixin, gy: Tensor, xm: Tensor) -> None:
        """The update step's backward hook: score every position from the dense gradient ``dY @ X^T`` and keep only
        the top ``k`` inactive candidates and the active positions' scores."""
        t = self.t + 1
        if id(layer) in self._cand:
            raise ConfigError(f"DynamicSparse: a second backward through the model at update step {t}; gradient "
                              f"growth needs one backward per step there (micro-batching is not supported)")
        score = (gy @ xm.t()).abs_().reshape(-1)  # the one dense (out, K) tensor, in the layer's dtype
        if self.normalize_grad:
            mean = score.mean()
            if mean > 0:
                score /= mean
        flat = layer.flat_indices()
        if self.method == "dst_ee":
            layer.coverage[flat] += 1  # the interval ending with this step: N counts it
            b = self.bonus(layer, t)
            if b is not None:
                score += b
                del b
        active = score[flat].clone()
        score[flat] = -math.inf
        k = min(self._k(layer, t), score.numel() - flat.numel())
        top = torch.topk(score, k)
        self._cand[id(layer)] = (top.indices, top.values, active)

    # ------------------------------------------------------------------------------------------- the update
    @torch.no_grad()
    def step(self, optimizer: torch.optim.Optimizer | None = None) -> dict | None:
        """Call after every ``optimizer.step()``. On an update step, drop and grow in every sparse layer and reset
        the optimizer state of the grown weights; returns that update's record (else ``None``)."""
        self.t += 1
        t = self.t
        record = None
        if self.is_update(t):
            record = {"t": t, "drop_fraction": self.drop_fraction(t), "layers": {}}
            for name, layer in self.layers.items():
                record["layers"][name] = self._update(layer, t, optimizer)
            self.history.append(record)
        self._arm()
        return record

    def _update(self, layer: SparseMixin, t: int, optimizer: torch.optim.Optimizer | None) -> dict:
        k = self._k(layer, t)
        flat = layer.flat_indices()
        numel = math.prod(layer.shape2d)
        if self.method == "set":
            cand = None
        else:
            cand = self._cand.pop(id(layer), None)
            if cand is None:
                raise ConfigError(f"DynamicSparse: no dense gradient for the update at step {t} (call loss.backward() "
                                  f"through the model before optimizer.step() and ds.step() on every step)")
        if k == 0 or layer.nnz == numel:
            return {"k": 0, "regrown": 0}
        vals = layer.values.detach()
        drop = torch.topk(vals.abs(), k, largest=False).indices  # positions in the nnz array
        keep = torch.ones(layer.nnz, dtype=torch.bool)
        keep[drop] = False
        if cand is None:  # SET: uniform random among the positions not kept
            score = torch.rand(numel, generator=self.grow_gen, dtype=vals.dtype)
            score[flat[keep]] = -math.inf
            grow = torch.topk(score, k).indices
        else:
            idx, sc, active = cand
            pool_idx, pool_sc = torch.cat([idx, flat[drop]]), torch.cat([sc, active[drop]])
            grow = pool_idx[torch.topk(pool_sc, k).indices]
        new_flat, order = torch.cat([flat[keep], grow]).sort()
        new_vals = torch.cat([vals[keep], vals.new_zeros(k)])[order]
        if optimizer is not None:
            for s in optimizer.state.get(layer.values, {}).values():
                if isinstance(s, Tensor) and s.shape == vals.shape:
                    s.copy_(torch.cat([s[keep], s.new_zeros(k)])[order])
        layer.set_pattern(new_flat, new_vals)
        layer.values.grad = None  # it was in the old order
        regrown = int(torch.isin(grow, flat[drop]).sum())
        rec = {"k": k, "regrown": regrown}
        if self.method == "dst_ee":
            rec["coverage"] = float(((layer.coverage > 0) | layer.mask().view(-1)).double().mean())
        return rec

    # ------------------------------------------------------------------------------------------- state
    def coverage(self) -> dict[str, float]:
        """DST-EE: per layer, the fraction of positions that have ever been active (empty for SET and RigL)."""
        if self.method != "dst_ee":
            return {}
        return {n: float(((m.coverage > 0) | m.mask().view(-1)).double().mean()) for n, m in self.layers.items()}

    def state_dict(self) -> dict:
        """The schedule's position and SET's generator (patterns and coverage are in the model's state dict)."""
        return {"t": self.t, "grow_gen": self.grow_gen.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.t = int(state["t"])
        self.grow_gen.set_state(state["grow_gen"])
        self._arm()
