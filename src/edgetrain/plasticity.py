"""Meta-learned plasticity rules with fixed random feedback: online learning without backprop on the device.

Shervani-Tabar & Rosenbaum, *Meta-learning biologically plausible plasticity rules with random feedback pathways*,
Nat. Commun. 2023, arXiv:2210.16414 (spec algorithms_B §8, from the authors' released code; read, not copied).
A bias-free MLP with softplus (beta = 10) hidden layers learns one sample at a time. Errors travel back through fixed
random matrices ``B_l`` (feedback alignment, FA), not the transposed weights:

    e_L = softmax(z_L) - onehot(y);   e_l = (e_{l+1} B_{l+1}) * g'(z_l),   g'(z) = 1 - exp(-beta y_l)

and each forward weight changes by a rule with meta-learned coefficients ``theta``:

    dW_l = - theta0 e_l y_{l-1}^T  - theta1 e_l e_{l-1}^T  + theta2 (y_l y_{l-1}^T - (y_l y_l^T) W_l)

(the pseudo-gradient, the error-Hebbian and Oja's terms; for the output layer ``y_L`` is the softmax). FA alone is
``theta = (a, 0, 0)``, a = 1e-3. Weights and feedback are Xavier-uniform re-initialised every episode; only
``theta`` is meta-learned, by Adam on the query cross-entropy backpropagated through the whole online trajectory
(the updates are pure functions of tensors: no in-place change). On the device the rule is fixed: an update needs
no weight transport and no stored graph. With ``feedback="sym"`` (``B_l = W_l``) the first term is backprop's
gradient step (tested).
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
        """The modulatory signals ``[e_1, ..., e_L]`` without backprop (through ``B``, or ``W`` for "sym")."""
        back = ws if self.feedback == "sym" else bs
        e = [torch.softmax(ys[-1], 1) - F.one_hot(y, self.sizes[-1]).to(ys[-1].dtype)]
        for i in range(len(ws) - 1, 0, -1):
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
        dw = -theta[0] * es[i].T @ pre / n
        if theta.numel() > 1 and i > 0:
            dw = dw - theta[1] * es[i].T @ es[i - 1] / n
        if theta.numel() > 2:
            dw = dw + theta[2] * (post.T @ pre - (post.T @ post) @ w) / n
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
                    a: float = 1e-3, seed: int = 0, learn: bool = True) -> tuple[Tensor, list[float]]:
    """``theta`` (``terms`` coefficients, theta0 = ``a``, the rest 0) meta-trained by Adam on the query loss of
    ``episodes`` tasks; ``learn=False`` returns the fixed rule (the FA baseline). Returns theta and query accuracies
    per episode (before each update)."""
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
                              f"{theta.detach().tolist()}); lower lr")
        accs.append(float((logits.argmax(1) == task[3]).double().mean()))
        if opt is not None:
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return theta.detach(), accs
