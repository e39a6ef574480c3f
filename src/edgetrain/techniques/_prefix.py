"""The frozen first part of a network as a run of consecutive children of one ``nn.Sequential``: what
:mod:`.patch_execute` (spatial tiles) and :mod:`.frozen_chunks` (batch chunks) run differently.

Both wrap that Sequential's own forward (never re-implement it): the children before the run, the run executed
their way under ``no_grad``, the children after it. Both need the run to be frozen, with nothing before it that
trains (no gradient flows through it), and both refuse at run time what would make the pieces differ from the
whole: a BatchNorm normalising with batch statistics, an op that draws random numbers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from edgetrain.apply import Undo
from edgetrain.errors import ConfigError
from edgetrain.ops import Call
from edgetrain.structure import Structure

#: ops that draw random numbers: refused inside the run at run time
RANDOM_OPS = ("rand", "rand_like", "randn", "randn_like", "randint", "randint_like", "randperm", "bernoulli",
              "bernoulli_", "uniform_", "normal_", "normal", "multinomial", "dropout", "dropout_", "dropout1d",
              "dropout2d", "dropout3d", "feature_dropout", "alpha_dropout", "feature_alpha_dropout", "rrelu", "rrelu_")


def span(model: nn.Module, names: list[str], who: str) -> tuple[str, nn.Sequential, int, int]:
    """The Sequential holding ``names`` as consecutive children: its name, itself, their first and last index."""
    parents = {n.rpartition(".")[0] for n in names}
    parent = model.get_submodule(next(iter(parents))) if len(parents) == 1 else None
    keys = list(parent._modules) if isinstance(parent, nn.Sequential) else []
    idx = sorted(keys.index(n.rpartition(".")[2]) for n in names if n.rpartition(".")[2] in keys)
    if not idx or len(idx) != len(names) or idx != list(range(idx[0], idx[0] + len(idx))):
        where = type(parent).__name__ if parent is not None else "different modules"
        raise ConfigError(f"{who}: blocks {names} are not consecutive children of one nn.Sequential (they sit "
                          f"in {where}); it wraps that Sequential's forward")
    if type(parent).forward is not nn.Sequential.forward:
        raise ConfigError(f"{who}: {type(parent).__name__} holding blocks {names} has its own forward; it wraps a "
                          "stock nn.Sequential's")
    return next(iter(parents)), parent, idx[0], idx[-1]


def check_frozen(model: nn.Module, structure: Structure, first_op: int, names: list[str], who: str) -> None:
    """Nothing in the blocks, or before them, trains: no gradient flows through them."""
    params = dict(model.named_parameters())
    training = [n for n in names if any(p.requires_grad for p in model.get_submodule(n).parameters())]
    if training:
        raise ConfigError(f"{who}: blocks {training} train; it runs only where no gradient flows (apply it after "
                          "the technique that freezes them)")
    before = sorted({p for op in structure.ops[:first_op] for p in op.params if params[p].requires_grad})
    if before:
        raise ConfigError(f"{who}: {before[0].rpartition('.')[0]} runs before blocks {names} and trains; it runs "
                          "only where no gradient flows")


class Region:
    """The wrapped Sequential: the children before the run, the run by :meth:`pieces`, the rest, in order.
    Subclasses define ``pieces(x)`` (the run's output computed their way) and ``what`` (for messages)."""

    who = "Region"
    what = "pieces"

    def __init__(self, parent: nn.Sequential, first: int, last: int, undo: Undo) -> None:
        kids = list(parent)
        self.before, self.inner, self.after = kids[:first], kids[first:last + 1], kids[last + 1:]
        self.params = [p for m in self.inner for p in m.parameters()]
        self.undo = undo
        self.active = False  # inside the pieces: the guard refuses batch statistics and random numbers

    def run(self, x: Tensor) -> Tensor:
        """The run as the model defines it, whole."""
        for m in self.inner:
            x = m(x)
        return x

    def pieces(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        raise NotImplementedError

    def split(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        """:meth:`pieces` under ``no_grad``, with the guard armed."""
        self.active = True
        try:
            with torch.no_grad():
                return self.pieces(x, *args, **kwargs)
        finally:
            self.active = False

    def check_input(self, x: Tensor) -> None:
        if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.params)):
            raise ConfigError(f"{self.who}: the input or parameters of the blocks it runs require grad; it runs "
                              "only where no gradient flows (freeze them, and everything before them)")

    def probe_split(self, x: Tensor) -> Tensor:
        """The pieces as :func:`probe` runs them."""
        return self.split(x)

    def probe_whole(self, x: Tensor) -> Tensor:
        """The whole run as :func:`probe` runs it."""
        return self.run(x)

    def wrapped(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        self.check_input(x)
        self.undo.hits += 1
        return self.split(x, *args, **kwargs)

    def forward(self, x: Tensor) -> Tensor:
        for m in self.before:
            x = m(x)
        x = self.wrapped(x)
        for m in self.after:
            x = m(x)
        return x

    def guard(self, call: Call) -> object:
        """Inside the pieces: a ``batch_norm`` call that no earlier handler froze and that uses batch statistics, or
        an op that draws random numbers (train-mode only ops the eval-mode trace did not see, e.g. drop-path)."""
        if not self.active:
            return NotImplemented
        if call.name == "batch_norm":
            if call.arg(5, "training", False):
                raise ConfigError(f"{self.who}: {call.module} normalises with batch statistics (train-mode "
                                  f"BatchNorm); {self.what} would change them: freeze it first (Freeze runs frozen "
                                  "BatchNorms on running statistics) or keep it in eval mode")
            return NotImplemented
        if "dropout" in call.name and (call.arg(1, "p", 0.5) == 0 or not call.arg(2, "training", True)):
            return NotImplemented  # p=0 or eval mode: draws nothing (torch returns the input)
        raise ConfigError(f"{self.who}: {call.module} calls {call.name} in train mode (draws random numbers); "
                          f"{self.what} would draw different ones")


def probe(region: Region, x: Tensor) -> float:
    """The relative difference of the pieces from the whole on ``x`` in the modules' current modes (buffers and RNG
    put back); a one-line ConfigError when the blocks do not run in pieces, or leave their buffers (running
    statistics of a norm the guard does not see) other than the whole run leaves them."""
    buffers = [(b, b.clone()) for m in region.inner for b in m.buffers()]
    rng = torch.get_rng_state()

    def once(fn: Callable[[Tensor], Tensor]) -> tuple[Tensor, list[Tensor]]:
        try:
            with torch.no_grad():
                out = fn(x)
                return out, [b.clone() for b, _ in buffers]
        finally:
            with torch.no_grad():
                for b, v in buffers:
                    b.copy_(v)
            torch.set_rng_state(rng)

    try:
        (split, after_split), (whole, after_whole) = once(region.probe_split), once(region.probe_whole)
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001  (whatever the blocks raise on a piece: one line)
        raise ConfigError(f"{region.who}: the blocks do not run in {region.what} ({type(e).__name__}: "
                          f"{str(e).splitlines()[0][:160] if str(e) else ''})") from None
    if any(not torch.equal(a, b) for a, b in zip(after_split, after_whole)):
        raise ConfigError(f"{region.who}: the blocks update their buffers (running statistics) differently in "
                          f"{region.what} than whole; not applied")
    try:
        if not (isinstance(split, Tensor) and isinstance(whole, Tensor) and split.shape == whole.shape):
            return float("inf")
        return float((split.double() - whole.double()).abs().max()) / max(float(whole.double().abs().max()), 1e-30)
    except Exception:  # noqa: BLE001  (an output that does not subtract: not comparable, so not applied)
        return float("inf")
