"""How a training step runs: the optimizer fused into backward, and micro-batches (training options).

Neither changes what a step computes where the docs say exact (tests/test_execution.py holds them to the ordinary
step bit for bit); both change what it holds at its peak:

* :class:`FusedStep` updates each parameter as soon as its gradient is complete in the backward and frees that
  gradient at once (the Tiny Training Engine's in-place update, Lin et al., NeurIPS 2022, arXiv:2206.15472, §2.3:
  "we update the weights as soon as the gradient is computed ... so the gradient buffers are freed"), through
  ``Tensor.register_post_accumulate_grad_hook``. The peak then holds at most the gradients the backward is
  computing, not all of them. It runs the wrapped optimizer's own update for one parameter at a time, so an SGD
  (momentum, weight decay) or AdamW step is the same arithmetic as ``optimizer.step()``. It refuses what needs all
  gradients at once: gradient clipping by global norm. Over micro-batches it updates on the last one only (the
  earlier ones accumulate, as without it).
* :func:`run_step` runs one optimizer step over ``micro`` micro-batches (gradient accumulation): the loss of each
  slice is weighted by its share of the batch, so with a mean-reduced loss the accumulated gradient equals the full
  batch's. Saved activations and transient buffers then scale with the micro-batch. BatchNorm policy, stated: a
  BatchNorm in train mode normalises each micro-batch by its own statistics (``bn="micro"``, the default: not the
  full batch's, so not exact); ``bn="frozen"`` runs every BatchNorm on its running statistics (exact against the
  full batch with the same policy, and what frozen BatchNorms do anyway); a model with GroupNorm/LayerNorm is
  unaffected.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from edgetrain.errors import ConfigError
from edgetrain.inputs import batch_size, call_model, map_tensors

BN_POLICIES = ("micro", "frozen")
FUSABLE = (torch.optim.SGD, torch.optim.AdamW, torch.optim.Adam)
_OWNER = "_edgetrain_fused_step"  # a parameter's attribute: a weak reference to the FusedStep whose hook updates it


class FusedStep:
    """Wrap an optimizer so that each parameter is updated during the backward, as soon as its gradient is
    accumulated, and its gradient freed. ``step()`` then only checks that every parameter with a gradient was
    updated; ``zero_grad``, ``state``, ``param_groups`` and ``state_dict`` are the wrapped optimizer's."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        if not isinstance(optimizer, FUSABLE):
            raise ConfigError(f"FusedStep: {type(optimizer).__name__} is not supported (SGD, Adam, AdamW)")
        for group in optimizer.param_groups:
            for p in group["params"]:
                owner = getattr(p, _OWNER, lambda: None)()
                if owner is not None and owner._hooks:  # its hook would step the parameter too
                    raise ConfigError(f"FusedStep: a parameter of shape {tuple(p.shape)} is already updated by another "
                                      "FusedStep; call that one's remove() first")
        self.inner = optimizer
        self.armed = True  # False while earlier micro-batches accumulate
        self._hooks = []
        self._group = {}
        for group in optimizer.param_groups:
            for p in group["params"]:
                self._group[p] = group
                self._hooks.append(p.register_post_accumulate_grad_hook(self._update))
                setattr(p, _OWNER, weakref.ref(self))

    def _update(self, p: Tensor) -> None:
        if not self.armed or p.grad is None:
            return
        group = self._group[p]
        others = [(g, g["params"]) for g in self.inner.param_groups]
        try:
            for g in self.inner.param_groups:
                g["params"] = [p] if g is group else []
            with torch.no_grad():
                self.inner.step()  # the optimizer's own arithmetic, for this one parameter
        finally:
            for g, params in others:
                g["params"] = params
        p.grad = None

    # the optimizer protocol the training loop and the meter use
    def step(self) -> None:
        left = [p for p in self._group if p.grad is not None]
        if self.armed and left:
            raise RuntimeError(f"FusedStep: {len(left)} parameters have a gradient but were not updated in backward")

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.inner.zero_grad(set_to_none=set_to_none)

    @property
    def state(self) -> Any:
        return self.inner.state

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.inner.param_groups

    def state_dict(self) -> dict[str, Any]:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.inner.load_state_dict(state)

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        for p in self._group:
            if getattr(p, _OWNER, lambda: None)() is self:
                delattr(p, _OWNER)


def slices(inputs: Any, target: Any, micro: int) -> Iterator[tuple[Any, Any, float]]:
    """``micro`` consecutive slices of a batch, with each one's share of the batch."""
    n = batch_size(inputs)
    if not isinstance(micro, int) or micro < 1 or micro > n:
        raise ConfigError(f"micro-batches: need an int in 1..{n} (the batch size), got {micro!r}")
    bounds = [round(i * n / micro) for i in range(micro + 1)]
    for a, b in zip(bounds, bounds[1:]):
        def cut(t: Tensor, a: int = a, b: int = b) -> Tensor:
            return t[a:b] if t.dim() and t.shape[0] == n else t

        yield map_tensors(inputs, cut), (map_tensors(target, cut) if target is not None else None), (b - a) / n


@contextlib.contextmanager
def bn_policy(model: nn.Module, policy: str) -> Iterator[None]:
    """``frozen``: every BatchNorm runs on its running statistics for the duration (its mode is put back)."""
    if policy not in BN_POLICIES:
        raise ConfigError(f"bn policy must be one of {BN_POLICIES}, got {policy!r}")
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)] if policy == "frozen" else []
    modes = [m.training for m in bns]
    for m in bns:
        m.eval()
    try:
        yield
    finally:
        for m, mode in zip(bns, modes):
            m.train(mode)


def run_step(model: nn.Module, inputs: Any, target: Any, loss_fn: Callable[[Any, Any], Tensor],
             optimizer: Any, micro: int = 1, bn: str = "micro",
             before_step: Callable[[], None] | None = None) -> Tensor:
    """One optimizer step over ``micro`` micro-batches; returns the batch loss (detached). ``before_step`` runs
    between the last backward and ``optimizer.step()`` (gradient clipping, divergence checks)."""
    optimizer.zero_grad(set_to_none=True)
    fused = isinstance(optimizer, FusedStep)
    total = torch.zeros(())
    parts = list(slices(inputs, target, micro))
    with bn_policy(model, bn):
        for i, (x, y, share) in enumerate(parts):
            if fused:
                optimizer.armed = i == len(parts) - 1
            loss = loss_fn(call_model(model, x), y)
            (loss * share if micro > 1 else loss).backward()
            total = total + loss.detach() * share
    if before_step is not None:
        before_step()
    optimizer.step()
    return total if micro > 1 else loss.detach()
