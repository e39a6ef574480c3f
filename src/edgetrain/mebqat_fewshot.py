"""MEBQAT-MAML: few-shot meta-learning in which every task also draws the bit widths it runs at.

Youn et al., ECCV 2022, arXiv:2207.10188, §3.3 (spec algorithms_B §4.3, from the code): first-order MAML where each
task of a meta-batch gets a (weight, input) bit-width pair drawn uniformly; the inner loop (SGD, lr 0.01, 5 steps
in training, 10 at test) adapts at that pair and leaves BatchNorm's beta as it is; BatchNorm uses batch
statistics; the outer loop is Adam (lr 1e-4) on the mean of 4 tasks' query losses, gradients clamped to +-10; LSQ
steps are shared across bit widths. The meta-learned model is then adapted to a new task at whatever bit width the
device runs.

Built on :class:`edgetrain.meta.MetaLearner` (algorithm ``fomaml``, ``inner_exclude`` for the BN betas) and the
MEBQAT technique's quantizers (:func:`edgetrain.lowp.fakequant.set_bits`). Pairs are drawn from the pairs MEBQAT's
constraint allows (:func:`edgetrain.mebqat.allowed`: full-precision weights take full-precision inputs); the code
draws from the whole product (ours, stated). The code divides each LSQ step's summed gradient by the number of tasks
that quantized its layer; here every gradient is divided by the meta-batch size (the same for every parameter a
task at full precision also reaches).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

import torch
from torch import nn

from edgetrain.errors import ConfigError
from edgetrain.lowp.fakequant import FP, bit_state, quantizers, restore_bits, set_bits
from edgetrain.meta import Episodes, MetaLearner
from edgetrain.mebqat import allowed

__all__ = ["bn_betas", "evaluate_bitwidths", "learner", "meta_train", "task_pairs"]

INNER_LR, INNER_STEPS, TEST_STEPS = 0.01, 5, 10  # spec §4.3 (the code's defaults)
OUTER_LR, META_BATCH, CLAMP = 1e-4, 4, 10.0


def bn_betas(model: nn.Module) -> tuple[str, ...]:
    """Names of the BatchNorm biases (beta), which the inner loop leaves as they are."""
    return tuple(f"{n}.bias" for n, m in model.named_modules()
                 if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.bias is not None)


def learner(model: nn.Module, inner_steps: int = INNER_STEPS, inner_lr: float = INNER_LR) -> MetaLearner:
    """A first-order MAML learner on ``model`` (MEBQAT applied) that adapts everything but the BN betas."""
    if not quantizers(model):
        raise ConfigError(f"MEBQAT-MAML: {type(model).__name__} has no MEBQAT quantizers; apply "
                          "edgetrain.MEBQAT(...) to it first")
    return MetaLearner(model, "fomaml", inner_steps, inner_lr, inner_exclude=bn_betas(model))


def task_pairs(model: nn.Module) -> list[tuple[int, int]]:
    """The (weight, input) pairs a task may draw: the allowed pairs of the quantizers' candidates and full precision."""
    bits = sorted(set(quantizers(model)[0].candidates) | {FP})
    return [(w, a) for w in bits for a in bits if allowed(w, a)]


def meta_train(meta: MetaLearner, episodes: Episodes, iterations: int, meta_batch: int = META_BATCH,
               lr: float = OUTER_LR, clamp: float | None = CLAMP, seed: int = 0, progress: bool = True,
               pairs: Sequence[tuple[int, int]] | None = None,
               optimizer: torch.optim.Optimizer | None = None) -> list[tuple[float, list[tuple[int, int]]]]:
    """Adam (or ``optimizer``) on the mean query loss of ``meta_batch`` tasks per iteration, each at a bit-width pair
    drawn from ``pairs`` (default :func:`task_pairs`); gradients clamped element-wise to ``[-clamp, clamp]``.
    Returns each iteration's loss and pairs. The quantizers' bit widths are as they were afterwards."""
    from edgetrain.run import Progress

    model = meta.model
    pool = list(pairs) if pairs is not None else task_pairs(model)
    rng = random.Random(seed)
    opt = optimizer if optimizer is not None else torch.optim.Adam(model.parameters(), lr=lr)
    before, history = bit_state(model), []
    bar = Progress(progress, "meta-train mebqat-maml", iterations, 0)
    try:
        for it in range(iterations):
            opt.zero_grad(set_to_none=True)
            total, drawn = 0.0, [rng.choice(pool) for _ in range(meta_batch)]
            for w, a in drawn:
                set_bits(model, w, a)
                loss = meta.meta_loss(*episodes.sample(rng)) / meta_batch
                loss.backward()
                total += float(loss.detach())
            if not math.isfinite(total):
                raise ConfigError(f"MEBQAT-MAML: the meta-loss became {total} at iteration {it + 1}")
            if clamp is not None:
                for p in model.parameters():
                    if p.grad is not None:
                        p.grad.clamp_(-clamp, clamp)
            opt.step()
            opt.zero_grad(set_to_none=True)
            history.append((total, drawn))
            bar.update(it + 1, total, lr)
    finally:
        restore_bits(before)
        bar.close()
    return history


def evaluate_bitwidths(meta: MetaLearner, episodes: Episodes, bits: Sequence[int], n: int = 600, seed: int = 0,
                       steps: int = TEST_STEPS) -> dict[int, dict[str, float]]:
    """Query accuracy (mean over ``n`` test episodes, 95% CI) after ``steps`` inner steps at each uniform bit width
    ``(b, b)``; the same episodes at every width."""
    before = bit_state(meta.model)
    try:
        out = {}
        for b in bits:
            set_bits(meta.model, b, b)
            out[b] = meta.evaluate(episodes, n=n, seed=seed, steps=steps)
        return out
    finally:
        restore_bits(before)
