"""Meta-learned plasticity rules with fixed random feedback: online learning without backprop on the device.

Shervani-Tabar & Rosenbaum, *Meta-learning biologically plausible plasticity rules with random feedback pathways*,
Nat. Commun. 2023, arXiv:2210.16414 (spec algorithms_B §8, from the authors' released code
NeuralDynamicsAndComputing/MetaLearning-Plasticity @ 13aefa8, ``optim.py`` and ``main.py``; read, not copied).
A bias-free MLP with softplus (beta = 10) hidden layers learns one sample at a time. Errors travel back through fixed
random matrices ``B_l`` (feedback alignment, FA), not the transposed weights, down to the input (``e_0``):

    e_L = softmax(z_L) - onehot(y);   e_l = (e_{l+1} B_{l+1}) * g'(y_l),   g'(y) = 1 - exp(-beta y),  l = L-1 .. 0

and each forward weight (layer l = 1..L, ``y_0`` the input) changes by a rule with meta-learned coefficients ``theta``:

    dW_l = - theta0 e_l y_{l-1}^T  - theta1 e_l e_{l-1}^T  + theta2 (y_l y_{l-1}^T - y_l (y_l^T W_l))

(the pseudo-gradient, the error-Hebbian and Oja's terms; for the output layer ``y_L`` is the softmax; ``e_0`` is the
authors' too, so the first layer has the error-Hebbian term). FA alone is ``theta = (a, 0, 0)``, a = 1e-3. Weights
and feedback are Xavier-uniform re-initialised every episode; only ``theta`` is meta-learned, by Adam on the query
cross-entropy backpropagated through the whole online trajectory (the updates are pure functions of tensors). With
``feedback="sym"`` (``B_l = W_l``) the first term is backprop's gradient step (tested).

Why meta-training diverged (measured; docs/adaptation.md) and what ``meta_train_rule`` does about it (ours: the
authors' code constrains and clips nothing). At the initial rule the query loss is 90-210 times more sensitive to
theta2 than to theta0, and Adam's first step moves every coefficient by its learning rate, 1e-3, whatever the
gradient's size. A negative theta2 is not Oja's rule: its Hebbian part turns anti-Hebbian and its decay a growth.
With non-negative activities (pixels in [0, 1], softplus) it silences every unit within one episode, a state with no
meta-gradient back; with standardised pixels (|x|^2 five times larger) the rule blows up to NaN even for a positive
theta2 (the decay is stable only while ``theta2 |y_l|^2 < 2``). ``meta_train_rule`` keeps theta2 >= 0 after every
step. Separately, trajectories near their stability edge give meta-gradient spikes (1e3 up to 1e18, against a median
of 10-300) that wreck Adam's moments: each episode's meta-gradient norm is clipped to :data:`CLIP`. Neither guard
stops theta0 from drifting, at Adam's lr 1e-3, to where the output layer's step is unstable (NaN at episode 182 of
200 in the 2026-12-07 benchmark); lr 3e-4 stayed stable in the one 200-episode run tried.
"""

from __future__ import annotations

import dataclasses
import math
import random

import torch
import torch.nn.functional as F
from torch import Tensor

from edgetrain.errors import ConfigError

BETA = 10.0  # softplus beta of the hidden layers (the authors' code)
TERMS = ("pseudo_grad", "error_hebb", "oja")
#: bound on the norm of one episode's meta-gradient (ours: on Fashion-MNIST its median is 10-300 per episode, with
#: spikes of 1e3 and more when a trajectory nears its stability edge; one spike fills Adam's moments, drives theta0
#: down for tens of episodes and then freezes it; the authors' code does not clip)
CLIP = 100.0


@dataclasses.dataclass
class PlasticMLP:
    """Layer sizes ``sizes`` (input first, classes last), bias-free; ``feedback`` "fa" (fixed random) or "sym"."""

    sizes: tuple[int, ...] = (784, 170, 130, 100, 70, 5)
    feedback: str = "fa"

    def __post_init__(self) -> None:
        if self.feedback not in ("fa", "sym"):
            raise ConfigError(f"plasticity feedback {self.feedback!r}: choose 'fa' or 'sym'")
        if len(self.sizes) < 2 or any(not isinstance(s, int) or s < 1 for s in self.sizes):
            raise ConfigError(f"plasticity sizes: need two or more positive ints, got {self.sizes!r}")

    def init(self, generator: torch.Generator, dtype: torch.dtype = torch.float32) -> tuple[list[Tensor], list[Tensor]]:
        """Fresh Xavier-uniform forward weights and feedback matrices (out x in each)."""

        def xavier(out: int, inp: int) -> Tensor:
            bound = math.sqrt(6.0 / (inp + out))
            return (torch.rand(out, inp, generator=generator, dtype=dtype) * 2 - 1) * bound

        ws = [xavier(o, i) for i, o in zip(self.sizes[:-1], self.sizes[1:])]
        bs = [xavier(o, i) for i, o in zip(self.sizes[:-1], self.sizes[1:])]
        return ws, bs

    @staticmethod
    def forward(ws: list[Tensor], x: Tensor) -> list[Tensor]:
        """Activities ``[x, y_1, ..., y_{L-1}, z_L]`` (hidden: softplus(beta); the last: logits)."""
        ys = [x]
        for i, w in enumerate(ws):
            z = ys[-1] @ w.T
            ys.append(F.softplus(z, beta=BETA) if i < len(ws) - 1 else z)
        return ys

    def errors(self, ws: list[Tensor], bs: list[Tensor], ys: list[Tensor], y: Tensor) -> list[Tensor]:
        """The modulatory signals ``[e_0, e_1, ..., e_L]`` without backprop (through ``B``, or ``W`` for "sym");
        ``e_0`` is at the input (the authors' ``optim.py`` computes it too, for the first layer's error-Hebbian
        term)."""
        back = ws if self.feedback == "sym" else bs
        e = [torch.softmax(ys[-1], 1) - F.one_hot(y, self.sizes[-1]).to(ys[-1].dtype)]
        for i in range(len(ws) - 1, -1, -1):
            e.insert(0, (e[0] @ back[i]) * (1 - torch.exp(-BETA * ys[i])))
        return e


def plastic_step(net: PlasticMLP, ws: list[Tensor], bs: list[Tensor], x: Tensor, y: Tensor,
                 theta: Tensor) -> list[Tensor]:
    """New forward weights after one sample (or mean over a batch) under the rule with coefficients ``theta``."""
    ys = net.forward(ws, x)
    es = net.errors(ws, bs, ys, y)
    n = x.shape[0]
    out = []
    for i, w in enumerate(ws):
        post = torch.softmax(ys[-1], 1) if i == len(ws) - 1 else ys[i + 1]
        pre = ys[i]
        dw = -theta[0] * es[i + 1].T @ pre / n
        if theta.numel() > 1:
            dw = dw - theta[1] * es[i + 1].T @ es[i] / n
        if theta.numel() > 2:  # (y y^T) W as y (y^T W): the same product, out x in work instead of out^2 x in (ours)
            dw = dw + theta[2] * (post.T @ pre - post.T @ (post @ w)) / n
        out.append(w + dw)
    return out


@dataclasses.dataclass
class OnlineTasks:
    """M-way tasks from an :class:`edgetrain.data.ImageData`: K training samples per class shown one at a time
    (shuffled), Q query samples per class; images flattened, labels renumbered 0..M-1."""

    data: object
    classes: list[int]
    ways: int = 5
    train_per_class: int = 50
    query_per_class: int = 10

    def __post_init__(self) -> None:
        from edgetrain.meta import Episodes  # the same sampling and checks as the meta-learning episodes

        self.episodes = Episodes(self.data, self.classes, self.ways, self.train_per_class, self.query_per_class)

    def sample(self, rng: random.Random) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        xs, ys, xq, yq = self.episodes.sample(rng)
        order = torch.randperm(len(ys), generator=torch.Generator().manual_seed(rng.randrange(2**31)))
        return xs.flatten(1)[order], ys[order], xq.flatten(1), yq


def run_episode(net: PlasticMLP, theta: Tensor, task: tuple[Tensor, Tensor, Tensor, Tensor], seed: int) -> Tensor:
    """Query logits after learning the task's training samples online from a fresh initialisation."""
    xs, ys, xq, _ = task
    ws, bs = net.init(torch.Generator().manual_seed(seed), xs.dtype)
    for i in range(len(ys)):
        ws = plastic_step(net, ws, bs, xs[i:i + 1], ys[i:i + 1], theta)
    return net.forward(ws, xq)[-1]


def meta_train_rule(net: PlasticMLP, tasks: OnlineTasks, terms: int = 3, episodes: int = 600, lr: float = 1e-3,
                    a: float = 1e-3, seed: int = 0, learn: bool = True, oja_nonneg: bool = True,
                    clip: float | None = CLIP) -> tuple[Tensor, list[float]]:
    """``theta`` (``terms`` coefficients, theta0 = ``a``, the rest 0; the authors' defaults: a = 1e-3, Adam lr 1e-3,
    600 episodes) meta-trained by Adam on the query loss of ``episodes`` tasks; ``learn=False`` returns the fixed rule
    (the FA baseline). ``oja_nonneg`` projects theta2 onto >= 0 after every step and ``clip`` bounds the norm of each
    episode's meta-gradient (both ours, see the module docstring; ``oja_nonneg=False, clip=None`` is the authors'
    meta-optimisation). Returns theta and query accuracies per episode (before each update). A non-finite query loss
    or meta-gradient raises :class:`ConfigError` (the authors' code has no guard)."""
    if terms not in (1, 2, 3):
        raise ConfigError(f"plasticity terms: 1 (FA), 2 (+error-Hebbian) or 3 (+Oja), got {terms!r}")
    theta = torch.zeros(terms)
    theta[0] = a
    theta.requires_grad_(learn)
    opt = torch.optim.Adam([theta], lr=lr) if learn else None
    rng, accs = random.Random(seed), []
    for ep in range(episodes):
        task = tasks.sample(rng)
        logits = run_episode(net, theta, task, seed=seed * 100003 + ep)
        loss = F.cross_entropy(logits, task[3])
        if not torch.isfinite(loss):
            raise ConfigError(f"the query loss became {float(loss.detach())} at episode {ep + 1} (theta "
                              f"{theta.detach().tolist()})")
        accs.append(float((logits.argmax(1) == task[3]).double().mean()))
        if opt is not None:
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if not torch.isfinite(theta.grad).all():
                raise ConfigError(f"the meta-gradient became {theta.grad.tolist()} at episode {ep + 1} (theta "
                                  f"{theta.detach().tolist()})")
            if clip is not None:
                torch.nn.utils.clip_grad_norm_([theta], clip)
            opt.step()
            if oja_nonneg and terms == 3:
                with torch.no_grad():
                    theta[2].clamp_(min=0.0)
    return theta.detach(), accs
