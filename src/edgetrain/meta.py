"""Few-shot meta-learning for on-device adaptation: MAML, FOMAML and ANIL with ``torch.func``, MAC at meta-test, and
episodic N-way K-shot sampling from any edgetrain dataset.

Specs: algorithms_B §7. MAML (Finn et al., ICML 2017): for each task, ``theta' = theta - alpha grad L_S(theta)``
(``inner_steps`` times) and the meta-update descends ``sum_i L_Q(theta'_i)`` through the inner updates (second
order). FOMAML: the same with the inner gradients treated as constants; here ``theta' = theta - alpha g.detach()``,
whose Jacobian in ``theta`` is the identity, so the outer backward gives ``grad_theta' L_Q(theta')``: exactly the
first-order meta-gradient. ANIL (Raghu et al., ICLR 2020): the inner loop adapts only the head (the model's last
``nn.Linear``, called once); the body's features are computed once per task and stay in the graph, so the outer loop
meta-learns the body (second order through the head only). The model is called with the adapted parameters by
``torch.func.functional_call``; nothing is copied or changed in place.

The model is any ``nn.Module`` whose output is the logits; BatchNorm layers should use batch statistics
(``track_running_stats=False``, as :class:`Conv4` does: running statistics would leak across tasks, spec §7.4).
MAC (§7.3, :mod:`edgetrain.mac`) is a meta-test procedure: meta-train with maml/fomaml/anil, then evaluate with
``MetaLearner(model, "mac", acu_layer=...)``: new units (ACUs) beside that layer and new head columns are learned on
the support set, the base frozen.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
import random
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from edgetrain.errors import ConfigError

ALGORITHMS = ("maml", "fomaml", "anil", "mac")


class Conv4(nn.Module):
    """The MAML backbone (Finn et al. 2017, §5.2): 4 x [3x3 conv, BN, ReLU, 2x2 max-pool] and a linear head.
    BatchNorms use batch statistics (transductive, as in MAML; no running statistics to leak across tasks)."""

    def __init__(self, ways: int = 5, in_channels: int = 1, width: int = 64) -> None:
        super().__init__()

        def block(cin: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, width, 3, padding=1), nn.BatchNorm2d(width, track_running_stats=False),
                                 nn.ReLU(), nn.MaxPool2d(2))

        self.features = nn.Sequential(block(in_channels), block(width), block(width), block(width))
        self.classifier = nn.Linear(width, ways)
        self.block_names = [f"features.{i}" for i in range(4)]
        self.classifier_name = "classifier"

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x).mean((2, 3)))  # (N, ways); 28x28 -> 1x1 after 4 pools


@dataclasses.dataclass
class Episodes:
    """N-way K-shot episodes from the samples of ``classes`` of ``data`` (an :class:`edgetrain.data.ImageData`):
    ``ways`` classes drawn without replacement, ``shots`` support and ``queries`` query samples per class, labels
    renumbered 0..ways-1 in a random order."""

    data: Any
    classes: list[int]
    ways: int = 5
    shots: int = 1
    queries: int = 15

    def __post_init__(self) -> None:
        labels = self.data.labels
        self.index = {c: torch.nonzero(labels == c).flatten().tolist() for c in self.classes}
        if self.ways > len(self.classes):
            raise ConfigError(f"episodes: {self.ways}-way tasks need {self.ways} classes, {self.data.name} gives "
                              f"{len(self.classes)} ({self.classes})")
        need = self.shots + self.queries
        short = [c for c, idx in self.index.items() if len(idx) < need]
        if short:
            raise ConfigError(f"episodes: class {short[0]} of {self.data.name} has {len(self.index[short[0]])} "
                              f"samples, fewer than {self.shots} shots + {self.queries} queries")

    def sample(self, rng: random.Random) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(support x, support y, query x, query y)`` of one episode."""
        chosen = rng.sample(self.classes, self.ways)
        s_idx, s_y, q_idx, q_y = [], [], [], []
        for new, c in enumerate(chosen):
            picked = rng.sample(self.index[c], self.shots + self.queries)
            s_idx += picked[:self.shots]
            q_idx += picked[self.shots:]
            s_y += [new] * self.shots
            q_y += [new] * self.queries
        xs, _ = self.data.batch(torch.tensor(s_idx))
        xq, _ = self.data.batch(torch.tensor(q_idx))
        return xs, torch.tensor(s_y), xq, torch.tensor(q_y)


def _head(model: nn.Module) -> tuple[str, nn.Linear]:
    name = getattr(model, "classifier_name", None)
    if name is None:
        linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        if not linears:
            raise ConfigError(f"ANIL: {type(model).__name__} has no nn.Linear head to adapt")
        name = linears[-1][0]
    head = model.get_submodule(name)
    if not isinstance(head, nn.Linear):
        raise ConfigError(f"ANIL: the head {name!r} is a {type(head).__name__}, not an nn.Linear")
    return name, head


@dataclasses.dataclass
class MetaLearner:
    """MAML / FOMAML / ANIL / MAC on ``model``: :meth:`adapt` runs the inner loop on a support set, :meth:`meta_loss`
    the query loss of the adapted parameters (its backward is the meta-gradient; not for MAC, a meta-test procedure).
    The ``acu_*`` and ``n_acu`` fields configure MAC (:class:`edgetrain.mac.MAC`; ``acu_lr`` None: ``inner_lr``)."""

    model: nn.Module
    algorithm: str = "maml"
    inner_steps: int = 5
    inner_lr: float = 0.01
    inner_exclude: tuple[str, ...] = ()  # globs of parameters the inner loop leaves as they are (the outer trains them)
    acu_layer: str | None = None  # MAC: the nn.Conv2d / nn.Linear the added units sit beside (read its input)
    n_acu: int = 8  # MAC: added units (ours; the paper's numbers were not retrieved, spec §7.3)
    acu_lr: float | None = None  # MAC: the units' inner lr (the head's is inner_lr)
    acu_seed: int = 0  # MAC: the units' init is seeded by (acu_seed, episode)
    acu_init: str = "kaiming_normal"  # MAC: edgetrain.mac.INITS

    def __post_init__(self) -> None:
        if self.algorithm not in ALGORITHMS:
            raise ConfigError(f"meta-learning algorithm {self.algorithm!r}: choose one of {', '.join(ALGORITHMS)}")
        if not isinstance(self.inner_steps, int) or self.inner_steps < 1:
            raise ConfigError(f"meta-learning inner_steps: must be an int >= 1, got {self.inner_steps!r}")
        if not self.inner_lr > 0:
            raise ConfigError(f"meta-learning inner_lr: must be > 0, got {self.inner_lr!r}")
        if self.algorithm == "anil":
            self.head_name, self.head = _head(self.model)
        if self.algorithm == "mac":
            if self.acu_layer is None:
                raise ConfigError("MAC: acu_layer is needed (the nn.Conv2d or nn.Linear to add units beside)")
            if self.inner_exclude:
                raise ConfigError("MAC: inner_exclude does not apply (the base is frozen; units and head adapt)")
            from edgetrain.mac import MAC  # here: edgetrain.mac imports this module

            self.mac = MAC(self.model, self.acu_layer, self.n_acu, lr=self.inner_lr, acu_lr=self.acu_lr,
                           seed=self.acu_seed, init=self.acu_init)
        elif self.acu_layer is not None:
            raise ConfigError(f"meta-learning acu_layer {self.acu_layer!r}: applies to algorithm 'mac' only, not "
                              f"{self.algorithm!r}")

    def _features(self, x: Tensor) -> Tensor:
        """The head's input (ANIL), with the body in the graph."""
        got: list[Tensor] = []
        handle = self.head.register_forward_pre_hook(lambda _m, args: got.append(args[0]))
        try:
            self.logits({}, x)  # the model's own parameters, its buffers copied
        finally:
            handle.remove()
        if len(got) != 1:
            raise ConfigError(f"ANIL: the head {self.head_name!r} was called {len(got)} times (once is needed)")
        return got[0]

    def adapt(self, xs: Tensor, ys: Tensor, *, steps: int | None = None, train: bool = True,
              episode: int = 0) -> dict[str, Tensor]:
        """The adapted parameters after the inner loop on ``(xs, ys)``. ``train=True`` keeps what the outer loop
        needs (second order for maml/anil); ``False`` (meta-test) keeps no graph beyond one step. MAC keeps none
        (its base is frozen), draws its units' init from ``episode`` and returns :class:`edgetrain.mac.MAC`'s
        parameters."""
        second = train and self.algorithm != "fomaml"
        steps = self.inner_steps if steps is None else steps
        if not isinstance(steps, int) or steps < 0:
            raise ConfigError(f"meta-learning steps: must be an int >= 0, got {steps!r}")
        if self.algorithm == "mac":
            return self.mac.adapt(xs, ys, steps, episode=episode)
        if self.algorithm == "anil":
            feats = self._features(xs) if train else self._features(xs).detach()
            params = {k: p for k, p in (("weight", self.head.weight), ("bias", self.head.bias)) if p is not None}
            for _ in range(steps):
                loss = F.cross_entropy(F.linear(feats, params["weight"], params.get("bias")), ys)
                grads = torch.autograd.grad(loss, list(params.values()), create_graph=second)
                params = {k: p - self.inner_lr * (g if second else g.detach()) for (k, p), g in zip(params.items(),
                                                                                                  grads)}
            return {f"{self.head_name}.{k}": v for k, v in params.items()}
        params = {k: p for k, p in self.model.named_parameters() if p.requires_grad}  # frozen ones stay as they are
        inner = [k for k in params if not any(fnmatch.fnmatchcase(k, g) for g in self.inner_exclude)]
        if not inner:
            raise ConfigError(f"meta-learning inner_exclude {list(self.inner_exclude)} leaves no parameter to adapt")
        for _ in range(steps):
            loss = F.cross_entropy(self.logits(params, xs), ys)
            # allow_unused: a parameter this forward does not read (a quantizer's step at full precision) stays
            grads = torch.autograd.grad(loss, [params[k] for k in inner], create_graph=second, allow_unused=True)
            params = {**params, **{k: params[k] - self.inner_lr * (g if second else g.detach())
                                   for k, g in zip(inner, grads) if g is not None}}
        return params

    def logits(self, params: dict[str, Tensor], x: Tensor) -> Tensor:
        """The model's logits with ``params`` in place of its own; buffers are passed as copies, so BatchNorm
        running statistics are never updated by a task (they would leak across tasks, spec §7.4). MAC: the widened
        network's logits with MAC's parameters."""
        if self.algorithm == "mac":
            return self.mac.logits(params, x)
        buffers = {k: b.clone() for k, b in self.model.named_buffers()}
        return functional_call(self.model, {**params, **buffers}, (x,), strict=False)

    def meta_loss(self, xs: Tensor, ys: Tensor, xq: Tensor, yq: Tensor) -> Tensor:
        """The query loss after adapting on the support set; ``backward()`` of it is the meta-gradient."""
        _no_mac_training(self)
        return F.cross_entropy(self.logits(self.adapt(xs, ys), xq), yq)

    def evaluate(self, episodes: Episodes, n: int = 600, seed: int = 0, steps: int | None = None) -> dict[str, float]:
        """Mean query accuracy over ``n`` test episodes and its 95% confidence interval (1.96 standard errors)."""
        rng, accs = random.Random(seed), []
        for i in range(n):
            xs, ys, xq, yq = episodes.sample(rng)
            params = {k: v.detach() for k, v in self.adapt(xs, ys, steps=steps, train=False, episode=i).items()}
            with torch.no_grad():
                accs.append(float((self.logits(params, xq).argmax(1) == yq).double().mean()))
        mean = sum(accs) / n
        sd = math.sqrt(sum((a - mean) ** 2 for a in accs) / max(n - 1, 1))
        return {"accuracy": mean, "ci95": 1.96 * sd / math.sqrt(n), "episodes": n}


def meta_train(learner: MetaLearner, episodes: Episodes, iterations: int, meta_batch: int = 4, lr: float = 1e-3,
               seed: int = 0, progress: bool = True) -> list[float]:
    """Adam on the meta-loss averaged over ``meta_batch`` episodes per iteration; returns the losses."""
    from edgetrain.run import Progress

    _no_mac_training(learner)
    rng = random.Random(seed)
    opt = torch.optim.Adam(learner.model.parameters(), lr=lr)
    losses = []
    bar = Progress(progress, f"meta-train {learner.algorithm}", iterations, 0)
    for it in range(iterations):
        opt.zero_grad(set_to_none=True)
        total = 0.0
        for _ in range(meta_batch):
            loss = learner.meta_loss(*episodes.sample(rng)) / meta_batch
            loss.backward()
            total += float(loss.detach())
        if not math.isfinite(total):
            raise ConfigError(f"meta-train {learner.algorithm}: the meta-loss became {total} at iteration {it + 1}")
        opt.step()
        opt.zero_grad(set_to_none=True)  # no meta-gradient outlives its step
        losses.append(total)
        bar.update(it + 1, total, lr)
    bar.close()
    return losses


def _no_mac_training(learner: MetaLearner) -> None:
    if learner.algorithm == "mac":
        raise ConfigError("meta-train mac: MAC is a meta-test procedure (spec §7.3); meta-train the model with anil, "
                          "maml or fomaml, then evaluate it with MetaLearner(model, 'mac', acu_layer=...)")
