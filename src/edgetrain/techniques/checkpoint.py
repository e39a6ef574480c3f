"""Checkpoint: activation (gradient) checkpointing of selected blocks.

Chen, Xu, Zhang, Guestrin, *Training Deep Nets with Sublinear Memory Cost*, arXiv:1604.06174 (2016);
the standard peer baseline, via :func:`torch.utils.checkpoint.checkpoint` (non-reentrant). A
checkpointed block saves only its inputs during forward and recomputes its internals during backward:
less saved memory for about one extra forward of those blocks.

BatchNorm running statistics are restored after the recomputation, so a checkpointed step updates them
exactly once, as a plain step does (stock ``checkpoint`` would update them twice). Dropout masks are
reproduced: the CPU RNG state at each block's forward is kept (5,056 bytes per block for torch's Mersenne Twister,
counted by the meter as saved) and restored around its recomputation, so gradients equal plain PyTorch's.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from edgetrain.apply import Undo, patch_forward
from edgetrain.measure import account_saved
from edgetrain.registry import TechniqueInfo, register
from edgetrain.structure import Structure
from edgetrain.technique import Technique


@dataclasses.dataclass(frozen=True, kw_only=True)
class Checkpoint(Technique):
    """Recompute the targeted blocks in backward instead of storing their activations.

    Args:
        targets: blocks to checkpoint (default: every block of the model, as :mod:`edgetrain.structure` derives
            them or ``model.block_names``). Each block then saves only its input(s); larger blocks save more per
            recompute.
    """

    name = "checkpoint"


@contextlib.contextmanager
def _rng_at(state: torch.Tensor) -> Iterator[None]:
    """Run with the CPU RNG at ``state`` (the block's forward), then put the current state back."""
    current = torch.get_rng_state()
    torch.set_rng_state(state)
    try:
        yield
    finally:
        torch.set_rng_state(current)


@contextlib.contextmanager
def _recompute(block: nn.Module, rng: torch.Tensor) -> Iterator[None]:
    with _rng_at(rng), _keep_bn_stats(block):
        yield


@contextlib.contextmanager
def _keep_bn_stats(block: nn.Module) -> Iterator[None]:
    """Restore the BatchNorm buffers of ``block`` after the recomputation pass."""
    bns = [m for m in block.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    saved = [[b.clone() for b in (m.running_mean, m.running_var, m.num_batches_tracked)] for m in bns]
    try:
        yield
    finally:
        with torch.no_grad():
            for m, (mean, var, n) in zip(bns, saved):
                m.running_mean.copy_(mean)
                m.running_var.copy_(var)
                m.num_batches_tracked.copy_(n)


def _checkpointed(block: nn.Module, undo: Undo):
    plain_forward = block.forward

    def forward(*args, **kwargs):
        if not torch.is_grad_enabled():
            return plain_forward(*args, **kwargs)
        undo.hits += 1
        rng = torch.get_rng_state()  # kept for the recomputation (preserve_rng_state would keep it unseen)
        # checkpoint keeps the block's inputs alive for the recomputation; its own saved-tensor hooks hide them
        # from the meter, so report them and the RNG state (each storage counts once).
        account_saved(*(a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), rng)
        return checkpoint(
            plain_forward, *args, use_reentrant=False, preserve_rng_state=False,
            context_fn=lambda: (contextlib.nullcontext(), _recompute(block, rng)), **kwargs,
        )

    return forward


def _apply(model: nn.Module, cfg: Checkpoint, targets: list[str], structure: Structure) -> Undo:
    modules = dict(model.named_modules())
    undo = Undo()
    for name in targets:
        patch_forward(modules[name], _checkpointed(modules[name], undo), undo)
    return undo


register(
    TechniqueInfo(
        config=Checkpoint,
        apply=_apply,
        summary="activation checkpointing of blocks (torch.utils.checkpoint): save block inputs, recompute the rest",
        paper="Chen et al., Training Deep Nets with Sublinear Memory Cost, arXiv:1604.06174",
        reduces=frozenset({"activations"}),
        default_targets=lambda model, structure: list(structure.blocks),
        looks_for="blocks that run in the forward",
        limits='not with actnn/comet',
        examples=(Checkpoint(),),
    )
)
