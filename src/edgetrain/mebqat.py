"""MEBQAT training: one model for every bit width, by treating bit widths as meta-learning tasks.

Youn, Song, Kim, Bahk, *Bitwidth-Adaptive Quantization-Aware Neural Network Training: A Meta-Learning Approach*,
ECCV 2022, arXiv:2207.10188; the non-few-shot variant as the official code runs it
(``code/non_few_shot/mebqat_nonfewshot/phase1.py``, spec algorithms_B §4.2). The model is quantized by the
:class:`~edgetrain.techniques.mebqat.MEBQAT` technique; per minibatch ``(x, y)`` (one outer step):

    subtasks: S = 4 bit-width pairs (w, a): first the guaranteed (FP, FP) and (low, low) -- low = 1 for dorefa, the
              lowest candidate for LSQ (config "kd32&1") -- then pairs drawn uniformly from the candidates x
              candidates (FP included) under w = FP => a = FP, w = 1 => a in {1, FP}, a = 1 => w = 1 (the code
              redraws both until the pair is allowed: uniform over the allowed pairs)
    loss_t:   CE(f_t(x), y) + SoftCE(f_t(x), softmax(f_FP(x)).detach())    (self-distillation; CE alone at (FP, FP))
    gradient: sum_t grad(loss_t) / S, then clamped element-wise to [-10, 10]; then the optimizer step

There is no inner-loop update in the non-few-shot case, so the "meta-gradient" is the mean of the per-bit-width
gradients (spec §4.2): multi-bit-width training with random bit widths and self-distillation. Deviations, stated:
the code divides each parameter's summed gradient by the number of subtasks it appeared in, we divide by S (the same
for every parameter used in every subtask; LSQ steps, absent at (FP, FP), get a smaller gradient); the teacher is
the (FP, FP) subtask's own output (the code runs the same full-precision forward again per subtask: identical with
batch-statistics BatchNorm and no dropout), run without a graph when a step has no (FP, FP) subtask.

Two ways to run it, with the same gradient (``tests/test_mebqat.py``):

* :meth:`MEBQATTraining.step`: the Python loop's step, one backward per subtask (one subtask's graph alive at a
  time, as the spec plans: accumulate ``(loss_t / S).backward()``).
* :class:`MEBQATTraining` as a training mode (like :class:`edgetrain.distill.OnlineDistillation`): in training mode
  its forward runs the S subtasks and returns their logits, :meth:`~MEBQATTraining.training_loss` is the mean loss
  and :meth:`~MEBQATTraining.clip_gradients` the clamp, which :func:`edgetrain.train` calls before each optimizer
  step; so ``et.train``, ``edgetrain train --model edgetrain.mebqat:model`` and the meter run it. Its one backward
  keeps all S subtasks' graphs at once (S times the saved activations).

BatchNorm (spec §4.5): the paper's models use batch statistics at test time too ("transductive"): results then
depend on the evaluation batch. :func:`evaluate_bitwidths` reports that (``bn="batch"``) and the deployable mode
(``bn="recalibrate"``): per bit width, the running statistics are re-estimated on training batches at that bit
width (cumulative average), as a device would store one set of statistics per bit width.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from edgetrain.errors import ConfigError
from edgetrain.lowp.fakequant import FP, bit_state, quantizers, restore_bits, set_bits

SUBTASKS = 4  #: INNER_Q_SUBTASKS of the paper's example configs
CLAMP = 10.0  #: element-wise gradient clamp of phase1.py (``torch.clamp(..., min=-10.0, max=10.0)``)
EVAL_BITS = (1, 2, 3, 4, 5, 6, 7, 8, 16, FP)  #: phase 2 evaluates each uniform bit width

__all__ = ["CLAMP", "EVAL_BITS", "SUBTASKS", "MEBQATTraining", "allowed", "batch_statistics", "calibrate",
           "evaluate_bitwidths", "model", "recalibrate_bn", "sample_subtasks", "subtask_loss"]


def allowed(w: int, a: int) -> bool:
    """MEBQAT's constraint on a (weight, input) bit-width pair: w = FP => a = FP, w = 1 => a in {1, FP},
    a = 1 => w = 1."""
    return not ((w == FP and a != FP) or (w == 1 and a not in (1, FP)) or (w != 1 and a == 1))


def sample_subtasks(candidates: Sequence[int], n: int = SUBTASKS, generator: torch.Generator | None = None,
                    guaranteed: Sequence[tuple[int, int]] | None = None) -> list[tuple[int, int]]:
    """``n`` (w, a) pairs: the ``guaranteed`` ones (default (FP, FP) and (lowest, lowest)) first, then pairs drawn
    uniformly from the allowed pairs of ``candidates`` (FP added), with ``generator`` (default: torch's global RNG,
    which :func:`edgetrain.train` seeds and checkpoints, so a resumed run draws what an uninterrupted one would)."""
    bits = sorted(set(candidates) | {FP})
    low = bits[0]
    fixed = list(guaranteed) if guaranteed is not None else [(FP, FP), (low, low)]
    bad = [p for p in fixed if p[0] not in bits or p[1] not in bits or not allowed(*p)]
    if bad:
        raise ConfigError(f"MEBQAT: guaranteed subtask {bad[0]} is not an allowed pair of the candidates {bits}")
    if not isinstance(n, int) or n < len(fixed):
        raise ConfigError(f"MEBQAT: subtasks must be an int >= {len(fixed)} (the guaranteed pairs), got {n!r}")
    pool = [(w, a) for w in bits for a in bits if allowed(w, a)]
    picks = torch.randint(len(pool), (n - len(fixed),), generator=generator).tolist()
    return fixed + [pool[i] for i in picks]


def soft_cross_entropy(logits: Tensor, target_probs: Tensor) -> Tensor:
    """``mean_i -sum_c p_ic log softmax(z_i)_c`` (the code's ``CrossEntropyLossSoft``)."""
    return -(target_probs * F.log_softmax(logits, 1)).sum(1).mean()


def subtask_loss(logits: Tensor, y: Tensor, teacher: Tensor | None) -> Tensor:
    """CE, plus soft CE to the detached teacher probabilities when given."""
    loss = F.cross_entropy(logits, y)
    return loss if teacher is None else loss + soft_cross_entropy(logits, teacher)


class MEBQATTraining(nn.Module):
    """MEBQAT's outer loop around a model quantized by the MEBQAT technique (module docstring).

    Args:
        net: the model (apply :class:`~edgetrain.MEBQAT` to it, or to this wrapper, before training).
        subtasks: S, bit-width subtasks per step (4).
        kd: self-distillation from the full-precision pass (True, the "kd32" configs).
        clamp: element-wise gradient clamp (10; ``None``: none).
        guaranteed: the pairs every step contains (default (FP, FP) and (lowest, lowest)).

    Subtasks are drawn with torch's global RNG (seed it: ``torch.manual_seed``; :func:`edgetrain.train` does).
    Eval mode: ``forward`` is ``net`` at its current bit widths.
    """

    def __init__(self, net: nn.Module, subtasks: int = SUBTASKS, kd: bool = True, clamp: float | None = CLAMP,
                 guaranteed: Sequence[tuple[int, int]] | None = None) -> None:
        super().__init__()
        if clamp is not None and not clamp > 0:
            raise ConfigError(f"MEBQAT: clamp must be > 0 or None, got {clamp!r}")
        self.net, self.subtasks, self.kd, self.clamp = net, subtasks, bool(kd), clamp
        self.guaranteed = None if guaranteed is None else [tuple(p) for p in guaranteed]
        fixed = 2 if guaranteed is None else len(self.guaranteed)
        if not isinstance(subtasks, int) or isinstance(subtasks, bool) or subtasks < fixed:
            raise ConfigError(f"MEBQAT: subtasks must be an int >= {fixed} (the guaranteed pairs), got {subtasks!r}")
        self.last_subtasks: list[tuple[int, int]] = []
        for attr in ("block_names", "classifier_name"):  # the structure edgetrain derives, in the wrapper's names
            value = getattr(net, attr, None)
            if value is not None:
                setattr(self, attr, [f"net.{b}" for b in value] if isinstance(value, list) else f"net.{value}")
        for attr in ("default_input_size", "in_channels"):
            if hasattr(net, attr):
                setattr(self, attr, getattr(net, attr))

    def sample(self) -> list[tuple[int, int]]:
        """This step's subtasks (the net's quantizers give the candidates)."""
        qs = quantizers(self.net)
        if not qs:
            raise ConfigError(f"MEBQAT training: {type(self.net).__name__} has no MEBQAT quantizers; apply "
                              "edgetrain.MEBQAT(...) to it first")
        self.last_subtasks = sample_subtasks(qs[0].candidates, self.subtasks, None, self.guaranteed)
        return self.last_subtasks

    @contextlib.contextmanager
    def _restoring_bits(self) -> Iterator[None]:
        before = bit_state(self.net)  # each quantizer's own width (a per-layer setting survives the step)
        try:
            yield
        finally:
            restore_bits(before)

    def _teacher(self, x: Tensor, tasks: list[tuple[int, int]], fp_logits: Tensor | None) -> Tensor | None:
        if not self.kd or all(t == (FP, FP) for t in tasks):
            return None
        if fp_logits is None:  # no (FP, FP) subtask this step: a full-precision pass without a graph
            set_bits(self.net, FP, FP)
            with torch.no_grad(), batch_statistics(self.net):  # a target, not a training pass: running stats kept
                fp_logits = self.net(x)
        return F.softmax(fp_logits.detach(), 1)

    def forward(self, x: Tensor) -> Any:
        if not self.training:
            return self.net(x)
        tasks = self.sample()
        outs = []
        with self._restoring_bits():
            for w, a in tasks:
                set_bits(self.net, w, a)
                outs.append(self.net(x))  # (N, classes)
            fp = next((o for t, o in zip(tasks, outs) if t == (FP, FP)), None)
            teacher = self._teacher(x, tasks, fp)
        return outs, tasks, teacher

    def training_loss(self, out: tuple[list[Tensor], list[tuple[int, int]], Tensor | None], y: Tensor) -> Tensor:
        """``sum_t loss_t / S`` (the distillation target detached)."""
        outs, tasks, teacher = out
        return sum(subtask_loss(o, y, None if t == (FP, FP) else teacher) for o, t in zip(outs, tasks)) / len(outs)

    def clip_gradients(self) -> None:
        """Clamp every gradient element to ``[-clamp, clamp]`` (called by :func:`edgetrain.train` before a step)."""
        if self.clamp is None:
            return
        for p in self.parameters():
            if p.grad is not None:
                p.grad.clamp_(-self.clamp, self.clamp)

    def step(self, x: Tensor, y: Tensor, optimizer: torch.optim.Optimizer) -> float:
        """One outer step in a Python loop, one backward per subtask; returns the mean subtask loss. Runs in train
        mode and leaves every module in the mode it had."""
        modes = {m: m.training for m in self.modules()}
        try:
            self.train()
            return self._step(x, y, optimizer)
        finally:
            for m, mode in modes.items():
                m.training = mode

    def _step(self, x: Tensor, y: Tensor, optimizer: torch.optim.Optimizer) -> float:
        optimizer.zero_grad(set_to_none=True)
        tasks = self.sample()
        total = 0.0
        with self._restoring_bits():
            teacher = None
            if self.kd and tasks[0] != (FP, FP) and any(t != (FP, FP) for t in tasks):
                teacher = self._teacher(x, tasks, None)
            for w, a in tasks:
                set_bits(self.net, w, a)
                logits = self.net(x)
                if (w, a) == (FP, FP) and self.kd and teacher is None:
                    teacher = F.softmax(logits.detach(), 1)
                loss = subtask_loss(logits, y, None if (w, a) == (FP, FP) else teacher) / len(tasks)
                loss.backward()
                total += float(loss.detach())
        self.clip_gradients()
        optimizer.step()
        return total


def model(num_classes: int = 10, in_channels: int = 3, base: str = "small_cnn", subtasks: int = SUBTASKS,
          kd: bool = True, clamp: float | None = CLAMP, channels: int | None = None,
          **base_args: Any) -> MEBQATTraining:
    """The ``package.module:factory`` model ``edgetrain.mebqat:model``: a freshly initialised ``base``
    (:func:`edgetrain.models.create_model`) in MEBQAT's training mode. Give the recipe a
    :class:`~edgetrain.MEBQAT` technique (its default targets are the base's layers but the first and last).
    ``channels`` overrides ``in_channels`` (the command line passes a factory ``--model-arg channels=1``: it sets no
    ``in_channels`` for foreign models)."""
    from edgetrain.models import create_model

    in_channels = in_channels if channels is None else channels
    net = create_model(base, num_classes=num_classes, in_channels=in_channels, **base_args)
    return MEBQATTraining(net, subtasks, kd, clamp)


# ------------------------------------------------------------------------------------------------ evaluation
def _bns(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


@contextlib.contextmanager
def batch_statistics(model: nn.Module) -> Iterator[None]:
    """Every BatchNorm normalises with the batch's own statistics (the paper's "transductive" test); running
    statistics and modes are put back afterwards."""
    bns = _bns(model)
    saved = [(m.training, {k: v.clone() for k, v in m._buffers.items() if v is not None}) for m in bns]
    for m in bns:
        m.train()
    try:
        yield
    finally:
        with torch.no_grad():
            for m, (mode, bufs) in zip(bns, saved):
                m.train(mode)
                for k, v in bufs.items():
                    m._buffers[k].copy_(v)


@torch.no_grad()
def recalibrate_bn(model: nn.Module, batches: Sequence[Tensor] | Iterator[Tensor]) -> int:
    """Re-estimate every BatchNorm's running statistics at the model's current bit widths: reset, then the
    cumulative average (``momentum=None``) over ``batches`` (inputs), with only the BatchNorms in train mode.
    Returns the number of batches used."""
    bns = _bns(model)
    modes = {m: m.training for m in model.modules()}
    momenta = [m.momentum for m in bns]
    n = 0
    try:
        model.eval()
        for m in bns:
            m.reset_running_stats()
            m.momentum = None
            m.train()
        for x in batches:
            model(x)
            n += 1
    finally:
        for m, mom in zip(bns, momenta):
            m.momentum = mom
        for m, mode in modes.items():
            m.training = mode
    return n


@torch.no_grad()
def accuracy(model: nn.Module, data, batch_size: int = 256, limit: int | None = None) -> float:  # noqa: ANN001
    """Top-1 accuracy on ``data`` (the first ``limit`` samples), in the model's current modes."""
    correct = total = 0
    for x, y in data.batches(batch_size, shuffle=False, drop_last=False):
        if limit is not None and total >= limit:
            break
        if limit is not None and total + len(y) > limit:
            x, y = x[: limit - total], y[: limit - total]
        correct += int((model(x).argmax(1) == y).sum())
        total += len(y)
    return correct / max(total, 1)


def evaluate_bitwidths(model: nn.Module, data, bits: Sequence[int] = EVAL_BITS, bn: str = "recalibrate",  # noqa: ANN001
                       calib_data=None, calib_batches: int = 20, batch_size: int = 256,  # noqa: ANN001
                       limit: int | None = None) -> dict[int, float | None]:
    """Accuracy at each uniform bit width ``(b, b)`` (``None`` where ``b`` is not a candidate, e.g. 1 bit for
    LSQ). ``bn``: ``"recalibrate"`` (per bit width, running statistics re-estimated on ``calib_batches`` batches of
    ``calib_data``; the model's own statistics are put back afterwards), ``"batch"`` (batch statistics of each
    evaluation batch of ``batch_size``: the paper's test) or ``"running"`` (the statistics training left)."""
    if bn not in ("recalibrate", "batch", "running"):
        raise ConfigError(f"evaluate_bitwidths: bn must be recalibrate, batch or running, got {bn!r}")
    if bn == "recalibrate" and calib_data is None:
        raise ConfigError("evaluate_bitwidths: bn='recalibrate' needs calib_data (training samples)")
    net = model.net if isinstance(model, MEBQATTraining) else model
    cands = set(quantizers(net)[0].candidates) | {FP} if quantizers(net) else {FP}
    before_bits = bit_state(net)
    state = {k: v.clone() for k, v in net.state_dict().items()}
    modes = {m: m.training for m in net.modules()}
    out: dict[int, float | None] = {}
    try:
        net.eval()
        for b in bits:
            if b not in cands:
                out[b] = None
                continue
            if quantizers(net):
                set_bits(net, b, b)
            if bn == "recalibrate":
                calibrate(net, calib_data, calib_batches, batch_size)
            ctx = batch_statistics(net) if bn == "batch" else contextlib.nullcontext()
            with ctx:
                out[b] = accuracy(net, data, batch_size, limit)
    finally:
        net.load_state_dict(state)
        for m, mode in modes.items():
            m.training = mode
        restore_bits(before_bits)
    return out


def calibrate(net: nn.Module, data, batches: int = 20, batch_size: int = 256, seed: int = 1) -> int:  # noqa: ANN001
    """:func:`recalibrate_bn` on the first ``batches`` shuffled batches of ``data`` (training samples)."""
    def inputs():  # noqa: ANN202
        for i, (x, _) in enumerate(data.batches(batch_size, seed=seed, drop_last=False)):
            if i >= batches:
                break
            yield x

    n = recalibrate_bn(net, inputs())
    if n == 0:
        raise ConfigError("MEBQAT: BatchNorm recalibration got no batch (empty calibration data)")
    return n
