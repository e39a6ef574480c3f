"""Switchable fake quantizers with straight-through estimators: LSQ and the DoReFa-style "Yu21" quantizer.

Both compute in the input's float dtype on values that lie on a ``b``-bit grid (simulated quantization); the bit
width is a run-time setting (:meth:`FakeQuant.set_bits`, :func:`set_bits` for a whole model), ``32`` (or ``None``)
is full precision: the quantizer is the identity.

**LSQ** (Esser, McKinstry, Bablani, Appuswamy, Modha, *Learned Step Size Quantization*, ICLR 2020,
arXiv:1902.08153, §2). With step size ``s`` and integer bounds ``n < 0 <= p``::

    v_hat = round(clamp(v / s, n, p)) * s
    dv_hat/dv = 1 if n < v/s < p else 0                               (straight-through inside the range)
    dv_hat/ds = round(v/s) - v/s inside,  n if v/s <= n,  p if v/s >= p
    the step's gradient is scaled by g = 1 / sqrt(numel * p)           (§2.2: N_W weights, N_F features)
    initial s = 2 * mean|v| / sqrt(p)                                  (§2.1, on the first tensor quantised)

Weights are signed, ``n = -2^(b-1), p = 2^(b-1) - 1``; activations (layer inputs, after a ReLU in the paper)
unsigned, ``n = 0, p = 2^b - 1``: a faithful ``b``-bit grid. An input quantizer whose first quantised input has
negative values (after a residual sum, a LayerNorm, GELU) uses the signed grid instead (ours: the paper only
quantizes non-negative activations; an unsigned grid would clip their negative half). ``act_grid="upstream"``
uses ``p = 2^b`` for unsigned inputs, as the MEBQAT code does (``quant.py``, ``ActivationQuantizer``:
``self.p = 2.0 ** bits``): ``2^b + 1`` levels, one more than ``b`` bits hold (flagged: an upstream quirk).
``numel`` is the quantised tensor's element count (the batch included for activations, as the MEBQAT code computes
it; the paper's ``N_F`` is "the number of features"). The step is clamped at ``1e-8`` (ours: a step that training
drives through zero would divide by it). LSQ has no 1-bit weights (``p = 0``).

**Yu21** (the quantizer of Yu, Li, Shi, Huang, Hua, *Any-Precision Deep Neural Networks*, AAAI 2021,
arXiv:1911.07346, after DoReFa-Net, Zhou et al., arXiv:1606.06160; the one MEBQAT's CIFAR-10 and SVHN configs
use). With ``K = 2^b - 1`` levels and ``E = mean|w|`` (detached)::

    weights, b = 1:   w_hat = E * sign(w)                       (STE: dw_hat/dw = 1)
    weights, b >= 2:  t = tanh(w) / max|tanh(w)|;  u = round((t + 1) / 2 * K) / K;  w_hat = (2u - 1) * E
                      (STE through the round only: tanh and the max stay in the graph, as DoReFa and MEBQAT's
                      code have it)
    activations:      x_hat = round(clamp(x, 0, 1) * K) / K     (STE through the round; 0 gradient outside [0, 1])

``sign`` here maps 0 to +1 (ours: ``torch.sign(0) = 0`` would be a third level that one bit cannot store).

**Step sizes across bit widths** (LSQ only): ``step_sizes="shared"`` (the default) keeps one step per quantizer for
every bit width, as MEBQAT's code does (its per-subtask models load one ``scale_factor`` per layer from the outer
model): the faithful variant, so a reproduction starts from what the paper ran. ``"per_bitwidth"`` keeps one step
per candidate bit width (our option, spec §4.5: the shared step is a compromise between the range a 2-bit grid needs
and the resolution an 8-bit one wants), each initialised on its own first use. What is stored for backward: LSQ
keeps its input and step (for the step's gradient; for a weight, the parameter itself); Yu21 activations keep a
1-byte mask, Yu21 weights only the weight (the backward recomputes the tanh chain).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import Tensor, nn

from edgetrain.errors import ConfigError

FP = 32  #: "full precision": the quantizer is the identity
METHODS = ("dorefa", "lsq")
KINDS = ("weight", "act")
STEP_SIZES = ("shared", "per_bitwidth")
ACT_GRIDS = ("faithful", "upstream")
#: quantised bit widths a quantizer may be built for (FP is always allowed besides)
ALLOWED_BITS = tuple(range(1, 17))
#: MEBQAT's candidates (``phase1.py``: ``q_bits_cand_list = [2, ..., 8, 16, None]``, 1 prepended for Yu21)
DEFAULT_CANDIDATES = {"dorefa": (1, 2, 3, 4, 5, 6, 7, 8, 16), "lsq": (2, 3, 4, 5, 6, 7, 8, 16)}
MIN_STEP = 1e-8


def as_bits(bits: int | None) -> int:
    """``None`` -> :data:`FP`; anything else unchanged."""
    return FP if bits is None else bits


def ste_round(x: Tensor) -> Tensor:
    """``round(x)`` whose gradient is the identity (straight-through estimator)."""
    return x + (torch.round(x) - x).detach()


class _LSQ(torch.autograd.Function):
    """LSQ's quantiser with its two gradients written out (Esser et al. 2020, §2); keeps ``x`` and ``s``."""

    @staticmethod
    def forward(ctx, x: Tensor, s: Tensor, n: int, p: int, g: float) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(x, s)
        ctx.grid = (n, p, g)
        return torch.clamp(torch.round(x / s), n, p) * s

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        x, s = ctx.saved_tensors
        n, p, g = ctx.grid
        v = x / s
        low, high = v <= n, v >= p
        inside = ~(low | high)
        gx = grad * inside if ctx.needs_input_grad[0] else None
        gs = None
        if ctx.needs_input_grad[1]:
            ds = torch.where(inside, torch.round(v) - v, torch.where(low, float(n), float(p)))  # dv_hat/ds
            gs = (grad * ds).sum().mul(g).reshape(s.shape)
        return gx, gs, None, None, None


class _ClampRound(torch.autograd.Function):
    """Yu21/DoReFa activations: ``round(clamp(x, 0, 1) * K) / K``; keeps a 1-byte mask of ``0 <= x <= 1``."""

    @staticmethod
    def forward(ctx, x: Tensor, levels: int) -> Tensor:  # type: ignore[override]
        inside = (x >= 0) & (x <= 1)
        ctx.save_for_backward(inside)
        return torch.round(torch.clamp(x, 0, 1) * levels) / levels

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        (inside,) = ctx.saved_tensors
        return grad * inside, None


def lsq(x: Tensor, s: Tensor, n: int, p: int, grad_scale: float | None = None) -> Tensor:
    """LSQ fake quantisation of ``x`` with step ``s`` on the integer grid ``[n, p]``; ``grad_scale`` defaults to
    ``1 / sqrt(x.numel() * p)``."""
    g = 1.0 / math.sqrt(x.numel() * p) if grad_scale is None else grad_scale
    return _LSQ.apply(x, s.clamp_min(MIN_STEP), n, p, g)


def lsq_grid(kind: str, bits: int, act_grid: str = "faithful") -> tuple[int, int]:
    """LSQ's integer bounds ``(n, p)`` for ``bits``-bit weights (signed) or activations (unsigned)."""
    if kind == "weight":
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits if act_grid == "upstream" else 2**bits - 1


def _dorefa_weight(w: Tensor, bits: int, ste: bool = True) -> Tensor:
    """The Yu21 weight; ``ste``: as a graph whose gradient is the straight-through one (for the backward), else
    the exact grid values."""
    e = w.detach().abs().mean()  # E, detached (MEBQAT quant.py / Any-Precision)
    if bits == 1:
        value = e * torch.where(w >= 0, 1.0, -1.0).to(w.dtype)
        return w + (value - w).detach() if ste else value  # value E * sign(w), gradient 1
    k = 2**bits - 1
    t = torch.tanh(w)
    t = t / t.abs().max().clamp_min(torch.finfo(t.dtype).tiny)  # [-1, 1]; an all-zero weight stays 0 (not 0/0)
    u = (ste_round if ste else torch.round)((t + 1) / 2 * k) / k  # [0, 1] on K + 1 levels
    return (2 * u - 1) * e


class _DorefaWeight(torch.autograd.Function):
    """:func:`_dorefa_weight` keeping only the weight for backward (a parameter, resident anyway): the backward
    recomputes the tanh chain (autograd through it would keep several weight-sized tensors per layer)."""

    @staticmethod
    def forward(ctx, w: Tensor, bits: int) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(w)
        ctx.bits = bits
        return _dorefa_weight(w, bits, ste=False)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        (w,) = ctx.saved_tensors
        with torch.enable_grad():
            w = w.detach().requires_grad_(True)
            (gw,) = torch.autograd.grad(_dorefa_weight(w, ctx.bits), w, grad)
        return gw, None


def dorefa_weight(w: Tensor, bits: int) -> Tensor:
    """Yu21 weight quantisation (module docstring); ``bits >= 1``."""
    return _DorefaWeight.apply(w, bits)


def dorefa_act(x: Tensor, bits: int) -> Tensor:
    """Yu21 activation quantisation: ``round(clamp(x, 0, 1) * K) / K``."""
    return _ClampRound.apply(x, 2**bits - 1)


class FakeQuant(nn.Module):
    """A switchable fake quantizer of one tensor role (a layer's ``weight`` or its input, ``act``).

    Args:
        method: ``"lsq"`` or ``"dorefa"`` (Yu21).
        kind: ``"weight"`` (signed grid) or ``"act"`` (unsigned; LSQ: signed when its first input has negatives).
        candidates: the quantised bit widths it may be set to (full precision, 32, always may).
        bits: the bit width it starts at.
        step_sizes: LSQ: ``"shared"`` (one step for every bit width: MEBQAT's, the default) or ``"per_bitwidth"``.
        act_grid: LSQ activations: ``"faithful"`` (``p = 2^b - 1``) or ``"upstream"`` (``p = 2^b``, MEBQAT's quirk).
    """

    def __init__(self, method: str, kind: str, candidates: Iterable[int], bits: int | None = FP,
                 step_sizes: str = "shared", act_grid: str = "faithful") -> None:
        super().__init__()
        for what, value, allowed in (("method", method, METHODS), ("kind", kind, KINDS),
                                     ("step_sizes", step_sizes, STEP_SIZES), ("act_grid", act_grid, ACT_GRIDS)):
            if value not in allowed:
                raise ConfigError(f"FakeQuant: {what} must be one of {', '.join(allowed)}, got {value!r}")
        self.method, self.kind, self.step_sizes, self.act_grid = method, kind, step_sizes, act_grid
        self.candidates = tuple(sorted(set(candidates)))
        bad = [b for b in self.candidates if b not in ALLOWED_BITS or (method == "lsq" and b == 1)]
        if bad or not self.candidates:
            raise ConfigError(f"FakeQuant: candidates must be bit widths in 1..16 (2..16 for lsq), got "
                              f"{list(candidates)}")
        self.bits = FP
        self.set_bits(bits)
        self.computed = False  # set when a layer's forward quantizes a weight it computes (not its parameter)
        if method == "lsq":
            slots = 1 if step_sizes == "shared" else len(self.candidates)
            self.step = nn.Parameter(torch.ones(slots))
            self.register_buffer("initialized", torch.zeros(slots, dtype=torch.bool))
            self.register_buffer("signed", torch.tensor(kind == "weight"))  # inputs: decided on first use

    def check_bits(self, bits: int | None) -> int:
        """``bits`` as an int (``None`` -> 32), or a one-line ConfigError outside the candidate set."""
        b = as_bits(bits)
        if not isinstance(b, int) or isinstance(b, bool):
            raise ConfigError(f"a bit width must be an int (or None: full precision), got {bits!r}")
        if b != FP and b not in self.candidates:
            raise ConfigError(f"{b}-bit is not a candidate bit width of this MEBQAT model "
                              f"({', '.join(map(str, self.candidates))} or 32 = full precision)")
        return b

    def set_bits(self, bits: int | None) -> None:
        self.bits = self.check_bits(bits)

    def slot(self, bits: int) -> int:
        """Index of ``bits``'s step in :attr:`step`."""
        return 0 if self.step_sizes == "shared" else self.candidates.index(bits)

    def grid(self, bits: int) -> tuple[int, int]:
        """LSQ's ``(n, p)`` at ``bits`` (signed for weights and for inputs seen to be signed)."""
        return lsq_grid("weight" if bool(self.signed) else "act", bits, self.act_grid)

    def step_at(self, bits: int, x: Tensor | None = None) -> Tensor:
        """The LSQ step used at ``bits`` (initialised from ``x`` on first use: ``2 mean|x| / sqrt(p)``)."""
        i = self.slot(bits)
        if not bool(self.initialized[i]):
            if not bool(self.initialized.any()) and self.kind == "act":
                self.signed.fill_(x is not None and bool((x < 0).any()))
            if x is None:
                raise ConfigError(f"FakeQuant: the {bits}-bit LSQ step has not been initialised (run data through "
                                  "the model at that bit width first)")
            init = (2 * x.detach().abs().mean() / math.sqrt(self.grid(bits)[1])).clamp_min(MIN_STEP)
            # through .data: slot i has never been used, but another slot's view may be saved by a graph still
            # alive (a training mode running several bit widths before one backward): an in-place write to the
            # parameter would fail that backward's version check
            self.step.data[i] = init
            self.initialized[i] = True
        return self.step[i]

    def forward(self, x: Tensor) -> Tensor:
        b = self.bits
        if b == FP:
            return x
        if self.method == "dorefa":
            return dorefa_weight(x, b) if self.kind == "weight" else dorefa_act(x, b)
        step = self.step_at(b, x)  # first: on the first input it decides whether the grid is signed
        n, p = self.grid(b)
        return lsq(x, step, n, p)

    def extra_repr(self) -> str:
        return f"{self.method}, {self.kind}, bits={self.bits}, candidates={self.candidates}"


def quantizers(model: nn.Module) -> list[FakeQuant]:
    """Every :class:`FakeQuant` in ``model``."""
    return [m for m in model.modules() if isinstance(m, FakeQuant)]


def _model(model_or_handle) -> nn.Module:  # noqa: ANN001
    """The model of an :func:`edgetrain.apply_` handle, or the model itself (a module's own ``.model`` attribute,
    e.g. a Hugging Face ``*ForCausalLM``'s, is part of it, not it)."""
    from edgetrain.apply import Applied

    return model_or_handle.model if isinstance(model_or_handle, Applied) else model_or_handle


def set_bits(model_or_handle, w_bits: int | None, a_bits: int | None) -> int:  # noqa: ANN001
    """Set every weight quantizer of a model (or of an :func:`edgetrain.apply_` handle's model) to ``w_bits`` and
    every input quantizer to ``a_bits`` (``None`` or 32: full precision); returns how many were set. A bit width
    outside a quantizer's candidates is a one-line :class:`~edgetrain.ConfigError` and changes nothing."""
    model = _model(model_or_handle)
    qs = quantizers(model)
    if not qs:
        raise ConfigError(f"set_bits: {type(model).__name__} has no fake quantizers (apply MEBQAT first)")
    for q in qs:  # validate all before changing any
        q.check_bits(w_bits if q.kind == "weight" else a_bits)
    for q in qs:
        q.set_bits(w_bits if q.kind == "weight" else a_bits)
    return len(qs)


def get_bits(model: nn.Module) -> tuple[int, int]:
    """``(weight bits, input bits)`` of the model's quantizers (the first of each kind; 32 when none)."""
    qs = quantizers(_model(model))
    w = next((q.bits for q in qs if q.kind == "weight"), FP)
    a = next((q.bits for q in qs if q.kind == "act"), FP)
    return w, a


def bit_state(model: nn.Module) -> dict[FakeQuant, int]:
    """Each quantizer's bit width (a snapshot that :func:`restore_bits` puts back, per-layer widths included)."""
    return {q: q.bits for q in quantizers(_model(model))}


def restore_bits(state: dict[FakeQuant, int]) -> None:
    for q, b in state.items():
        q.bits = b
