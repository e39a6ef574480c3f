"""Crypto-aware activations: trainable polynomials in place of ReLUs, with the 2PC protocol's cost in the loss.

Peng, Zhou, Luo, Duan, Xu, Ran, Huang, Wang, Geng, Li, Wen, Xu, Ding, *PolyMPCNet: Towards ReLU-free Neural
Architecture Search in Two-party Computation Based Private Inference*, arXiv 2209.09424 (2022); its successor by the
same group, *PASNet*, DAC 2023, arXiv 2306.15513, with public evaluation code (github.com/harveyp123/PASNet-DAC2023,
``models/gate_tmp.py``, ``config.py``), from which the constants below are read (facts, not code). In two-party
computation (2PC) a ReLU needs a secure comparison (garbled circuits or an OT-based comparison protocol), orders of
magnitude dearer than a polynomial, which needs only secure multiplications (Beaver triples). The paper replaces
ReLUs by trainable polynomials and chooses which ones with a differentiable gate whose expected protocol latency is
in the loss:

* the polynomial ("X2act"): ``y = s * w2 * x^2 + w1 * x + w0`` (here any degree d: ``w0 + w1 x + s sum_{k>=2} wk
  x^k``), one set of coefficients per site (or per channel), ``s`` a fixed scale on the higher terms;
  ``init="straight_through"`` is the paper's initialisation (``w2 = 0.005, w1 = 1, w0 = 0``: the site starts as
  nearly the identity, PASNet code); ``init="relu_fit"`` is ours: the least-squares fit of ReLU on ``[-r, r]``
  (degree 2: ``3r/32 + x/2 + 15 x^2 / (32 r)``);
* the gate (DARTS-style, PASNet code): per site ``alpha`` in R^2, ``c = softmax(alpha)``, output
  ``c0 relu(x) + c1 poly(x)``; the loss is ``CE + lambda * sum_i (c0_i L_relu(i) + c1_i L_poly(i))``; after the
  search each site keeps its argmax (:meth:`PolyActivations.harden`) and the network is fine-tuned;
* stabilisation: the straight-through init, the scale ``s``, and gradient-norm clipping at 5 (PASNet
  ``config.py`` ``w_grad_clip``), the last applied by the training loop (benchmarks/hardware/polyact.py).

The replacement acts on the ops (:mod:`edgetrain.ops`): every ``relu``/``relu_`` call the model makes, whether from
an ``nn.ReLU`` module, ``F.relu``, ``torch.relu`` or ``Tensor.relu``. A *site* is one such call in one forward,
named ``<module>:<k>`` (the k-th ReLU call made while ``<module>`` is the innermost running module, counted from
the start of the outermost module call; ``""`` is the root's own body). Sites are found by tracing one forward of an example. Limits (stated): an in-place ReLU whose
return value the model ignores (``x.relu_()`` on its own line) is not replaced in place (the replacement returns a
new tensor); activation checkpointing's recomputation repeats calls and is refused.

The cost model (:class:`MPCCost`) prices each site from its real size (elements per sample, traced):

* latency, the paper's loss term (PASNet code ``GateAct``): ``L_relu = 13.6 n + 0.4``, ``L_poly = 0.03 n + 0.2``
  per degree-2 polynomial, units not stated in the code (the authors' FPGA model); a degree-d polynomial costs
  ``d - 1`` secure multiplications (x^2..x^d; multiplying a share by a public coefficient and adding are local),
  so ``(d - 1) * L_poly`` (ours);
* communication (ours, from sourced building blocks): a ReLU in a garbled circuit on ``l``-bit shares (the
  Gazelle/Delphi circuit: add the shares, take the sign, multiplex, re-mask) has ``3 l`` AND gates (our count) at
  ``2 kappa`` bits each with half-gates (Zahur, Rosulek, Evans, Eurocrypt 2015), plus ``l`` oblivious transfers for
  the evaluator's input labels at ``kappa`` bits each (our assumption for OT extension); a Beaver multiplication
  opens two masked ring elements per party, ``4 l`` bits (Beaver, CRYPTO 1991). ``l = 32``, ``kappa = 128``
  (ours; 128-bit security): 3.5 KiB per ReLU vs 16 B per degree-2 polynomial.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from edgetrain.errors import ConfigError
from edgetrain.ops import Call, Undo, dispatcher, intercept

__all__ = ["MPCCost", "PolyActivations", "PolyFn", "Site", "poly", "relu_fit"]

RELU_OPS = ("relu", "relu_")
INITS = ("straight_through", "relu_fit")
MAX_DEGREE = 8  # ours: beyond 8, fixed-point 2PC overflows l = 32-bit rings (and training is unstable)
#: PASNet-DAC2023 models/gate_tmp.py PolyAct: poly_weight = [0.005, 1] (x^2, x), poly_bias = 0
STRAIGHT_THROUGH = {0: 0.0, 1: 1.0, 2: 0.005}


@dataclasses.dataclass(frozen=True)
class MPCCost:
    """Protocol cost per site of ``n`` elements (per sample). Latency constants: PASNet-DAC2023 ``gate_tmp.py``
    (``lat_act``: ``1360 * 0.01 * n + 0.4`` and ``3 * 0.01 * n + 0.2``); communication: see the module docstring."""

    relu_per_element: float = 13.6  # PASNet code: 1360 * 0.01
    relu_per_site: float = 0.4  # PASNet code
    poly_per_element: float = 0.03  # PASNet code: 3 * 0.01, per multiplication (degree 2)
    poly_per_site: float = 0.2  # PASNet code
    ring_bits: int = 32  # ours: fixed-point shares in Z_{2^32}
    kappa: int = 128  # ours: computational security parameter (128-bit)
    and_gates_per_bit: int = 3  # ours: adder + multiplexer + re-masking subtractor, l AND gates each

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise ConfigError(f"MPCCost {f.name}: must be a finite number > 0, got {v!r}")

    def relu_latency(self, n: int) -> float:
        return self.relu_per_element * n + self.relu_per_site

    def poly_latency(self, n: int, degree: int) -> float:
        return (degree - 1) * (self.poly_per_element * n + self.poly_per_site)

    def relu_bits(self, n: int) -> int:
        """Garbled-circuit ReLU: ``and_gates_per_bit * l`` AND gates at ``2 kappa`` bits plus ``l`` OTs at ``kappa``."""
        return n * (self.and_gates_per_bit * self.ring_bits * 2 * self.kappa + self.ring_bits * self.kappa)

    def poly_bits(self, n: int, degree: int) -> int:
        """``d - 1`` Beaver multiplications at ``4 l`` bits each."""
        return n * (degree - 1) * 4 * self.ring_bits


def relu_fit(degree: int, r: float) -> list[float]:
    """Coefficients ``[w0, ..., wd]`` of the least-squares fit of ReLU on ``[-r, r]`` (uniform weight), solved from
    the exact normal equations: Gram ``int x^(i+j) dx`` and moments ``int_0^r x^(k+1) dx = r^(k+2) / (k+2)``."""
    _check_degree(degree)
    if not (isinstance(r, (int, float)) and not isinstance(r, bool) and math.isfinite(r) and r > 0):
        raise ConfigError(f"PolyActivations fit_range: must be a finite number > 0, got {r!r}")
    k = torch.arange(degree + 1, dtype=torch.float64)
    s = k[:, None] + k[None, :]
    gram = torch.where(s % 2 == 0, 2 * r ** (s + 1) / (s + 1), torch.zeros_like(s))
    moments = r ** (k + 2) / (k + 2)
    return torch.linalg.solve(gram, moments).tolist()


def _check_degree(degree: object) -> None:
    if isinstance(degree, bool) or not isinstance(degree, int) or not 1 <= degree <= MAX_DEGREE:
        raise ConfigError(f"PolyActivations degree: must be an int in 1..{MAX_DEGREE}, got {degree!r}")


class PolyFn(torch.autograd.Function):
    """``y = sum_k e_k x^k`` with ``e_k = w_k`` (k < 2) or ``scale * w_k`` (k >= 2), by Horner. ``w``: (d + 1,) per
    site or (d + 1, C) per channel (channel dim 1 of ``x``). Saves only ``x`` and ``w`` for backward."""

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, scale: float) -> Tensor:  # type: ignore[override]
        e = _effective(w, scale, x.dim())  # (d + 1, 1, C, 1, ...) or (d + 1,)
        y = torch.zeros_like(x) + e[-1]
        for k in range(w.shape[0] - 2, -1, -1):
            y = y * x + e[k]
        ctx.save_for_backward(x, w)
        ctx.scale = scale
        return y

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        x, w = ctx.saved_tensors
        e = _effective(w, ctx.scale, x.dim())
        d = w.shape[0] - 1
        gx = None
        if ctx.needs_input_grad[0]:
            dy = torch.zeros_like(x) + d * e[d]  # derivative sum_k k e_k x^(k-1), by Horner
            for k in range(d - 1, 0, -1):
                dy = dy * x + k * e[k]
            gx = grad * dy
        gw = None
        if ctx.needs_input_grad[1]:
            dims = [i for i in range(x.dim()) if not (w.dim() == 2 and i == 1)]  # sum all but the channel dim
            rows, p = [], torch.ones_like(x)
            for k in range(d + 1):
                rows.append((grad * p).sum(dims) * (ctx.scale if k >= 2 else 1.0))
                p = p * x
            gw = torch.stack(rows)
        return gx, gw, None


def _effective(w: Tensor, scale: float, xdim: int) -> Tensor:
    e = torch.cat([w[:2], w[2:] * scale]) if w.shape[0] > 2 else w
    if w.dim() == 2:  # (d + 1, C) -> broadcast over x's channel dim 1
        e = e.reshape(e.shape[0], 1, e.shape[1], *([1] * (xdim - 2)))
    return e


def poly(x: Tensor, w: Tensor, scale: float = 1.0) -> Tensor:
    """Functional form of :class:`PolyFn`."""
    if w.dim() == 2 and (x.dim() < 2 or x.shape[1] != w.shape[1]):
        raise ConfigError(f"poly: per-channel coefficients for {w.shape[1]} channels, input shape {tuple(x.shape)}")
    return PolyFn.apply(x, w, scale)


@dataclasses.dataclass
class Site:
    """One ReLU call of the traced forward."""

    name: str  # "<module>:<k>"
    order: int  # position among the forward's ReLU calls
    shape: tuple[int, ...]  # of its input, batch included
    elements: int  # per sample (shape without the batch dim)


class PolyActivations(nn.Module):
    """Trainable polynomials in place of (some of) ``model``'s ReLUs; the model is changed in place until
    :meth:`remove`. Its parameters (coefficients, gate logits) are this module's, not the model's: give both to the
    optimizer.

    Args:
        model: any module; its ReLU calls are found by one traced forward of ``example``.
        example: an example input (batch first).
        replace: which sites: ``"all"``, ``"gate"`` (all, each behind a learned gate), an int k (the first k in
            call order), or a list of site names (:attr:`sites`).
        degree: polynomial degree, 1..8 (paper: 2).
        per_channel: coefficients per channel (dim 1) instead of per site.
        init: ``"straight_through"`` (the paper's) or ``"relu_fit"`` (least squares on ``[-fit_range, fit_range]``).
        scale: the fixed factor ``s`` on the terms of degree >= 2 (> 0).
        cost: the protocol cost model.
    """

    def __init__(self, model: nn.Module, example: Tensor, replace: str | int | Sequence[str] = "all", *,
                 degree: int = 2, per_channel: bool = False, init: str = "straight_through", fit_range: float = 4.0,
                 scale: float = 1.0, cost: MPCCost | None = None) -> None:
        super().__init__()
        _check_degree(degree)
        if init not in INITS:
            raise ConfigError(f"PolyActivations init {init!r}: choose one of {', '.join(INITS)}")
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
            raise ConfigError(f"PolyActivations scale: must be a finite number > 0, got {scale!r}")
        self.degree, self.per_channel, self.scale = degree, per_channel, float(scale)
        self.cost = cost if cost is not None else MPCCost()
        coeffs = relu_fit(degree, fit_range) if init == "relu_fit" else \
            [STRAIGHT_THROUGH.get(k, 0.0) for k in range(degree + 1)]
        if init == "relu_fit":  # the fit is of the effective coefficients: undo the scale on k >= 2
            coeffs = [c if k < 2 else c / self.scale for k, c in enumerate(coeffs)]
        self.__dict__["_model"] = model  # not a submodule: the model's parameters stay the model's
        self._undo, self._counts, self._tracing = Undo(), {}, None
        intercept(model, RELU_OPS, self._handle, self._undo)
        disp = dispatcher(model)  # its pre-hooks run before ours: an outermost call has a stack of one
        self._hooks = [m.register_forward_pre_hook(lambda *_: self._counts.clear() if len(disp.stack) <= 1 else None)
                       for m in model.modules()]
        try:
            self.sites = self._trace(example)
        except BaseException:
            self.remove()  # the model's own error, with nothing of ours left on it
            raise
        if not self.sites:
            self.remove()
            raise ConfigError(f"PolyActivations: {type(model).__name__} makes no relu call in its forward "
                              "(nothing to replace)")
        self.gated = replace == "gate"
        chosen = self._choose(replace)
        self.coeffs, self.alphas = nn.ParameterDict(), nn.ParameterDict()
        for s in self.sites:
            if s.name not in chosen:
                continue
            key = _key(s.name)
            c = torch.tensor(coeffs, dtype=torch.float32)
            if per_channel:
                if len(s.shape) < 2:
                    self.remove()
                    raise ConfigError(f"PolyActivations per_channel: site {s.name!r} has input shape {s.shape}, "
                                      "no channel dim")
                c = c[:, None].repeat(1, s.shape[1])
            self.coeffs[key] = nn.Parameter(c)
            if self.gated:
                self.alphas[key] = nn.Parameter(torch.zeros(2))  # PASNet code: alpha_act = [0, 0]

    # ------------------------------------------------------------------------------------------------ sites
    def _trace(self, example: Tensor) -> list[Site]:
        self._tracing = []
        modes = {m: m.training for m in self._model.modules()}
        try:
            self._model.eval()
            with torch.no_grad():
                self._model(example)
        finally:
            for m, mode in modes.items():
                m.training = mode
            found, self._tracing = self._tracing, None
        return found

    def _choose(self, replace: str | int | Sequence[str]) -> set[str]:
        names = [s.name for s in self.sites]
        if replace in ("all", "gate"):
            return set(names)
        if isinstance(replace, int) and not isinstance(replace, bool):
            if not 0 <= replace <= len(names):
                self.remove()
                raise ConfigError(f"PolyActivations replace: {replace} sites asked, the model has {len(names)} "
                                  f"relu sites (0..{len(names)})")
            return set(names[:replace])
        if isinstance(replace, str) or not isinstance(replace, Sequence):
            self.remove()
            raise ConfigError(f"PolyActivations replace: 'all', 'gate', an int or a list of site names, got "
                              f"{replace!r}")
        for n in replace:
            if n not in names:
                close = difflib.get_close_matches(str(n), names, n=3, cutoff=0.4)
                self.remove()
                raise ConfigError(f"PolyActivations replace: no relu site {n!r}; "
                                  + (f"did you mean {', '.join(close)}?" if close else
                                     f"sites are {', '.join(names[:6])}{' ...' if len(names) > 6 else ''}"))
        return set(replace)

    def _handle(self, call: Call) -> object:
        x = call.args[0] if call.args else call.kwargs.get("input")
        if not isinstance(x, Tensor) or not x.is_floating_point():
            return NotImplemented
        k = self._counts.get(call.module, 0)
        self._counts[call.module] = k + 1
        name = f"{call.module}:{k}"
        if self._tracing is not None:
            self._tracing.append(Site(name, len(self._tracing), tuple(x.shape), math.prod(x.shape[1:])))
            return NotImplemented
        key = _key(name)
        if key not in self.coeffs:
            if name not in {s.name for s in self.sites}:
                raise ConfigError(f"PolyActivations: relu call {name!r} was not in the traced forward (recomputation "
                                  "or a data-dependent forward is not supported)")
            return NotImplemented
        w = self.coeffs[key]
        y = poly(x, w.to(x.dtype), self.scale)
        if key in self.alphas:
            c = torch.softmax(self.alphas[key], 0).to(x.dtype)
            y = c[0] * F.relu(x) + c[1] * y
        return y

    # ------------------------------------------------------------------------------------------------ costs
    def replaced(self) -> list[str]:
        """Sites computed by a polynomial (gated sites: where the gate's argmax is the polynomial)."""
        return [s.name for s in self.sites if _key(s.name) in self.coeffs and
                (_key(s.name) not in self.alphas or bool(self.alphas[_key(s.name)].argmax() == 1))]

    def network_cost(self) -> dict[str, float | int]:
        """Per-sample protocol cost of the network as the sites stand (gates at their argmax): latency (PASNet
        units), communication (bits), ReLU elements kept and replaced."""
        poly_sites = set(self.replaced())
        lat, bits, kept, gone = 0.0, 0, 0, 0
        for s in self.sites:
            if s.name in poly_sites:
                lat += self.cost.poly_latency(s.elements, self.degree)
                bits += self.cost.poly_bits(s.elements, self.degree)
                gone += s.elements
            else:
                lat += self.cost.relu_latency(s.elements)
                bits += self.cost.relu_bits(s.elements)
                kept += s.elements
        return {"latency": lat, "comm_bits": bits, "relus_kept": kept, "relus_replaced": gone,
                "sites_replaced": len(poly_sites), "sites": len(self.sites)}

    def cost_loss(self, normalize: bool = True) -> Tensor:
        """The paper's latency term ``sum_i (c0_i L_relu(i) + c1_i L_poly(i))`` over the gated sites plus the fixed
        cost of the others; ``normalize`` divides by the all-ReLU network's latency (ours: lambda then needs no
        rescaling per model). Differentiable in the gate logits."""
        total = torch.zeros(())
        for s in self.sites:
            key, lr = _key(s.name), self.cost.relu_latency(s.elements)
            lp = self.cost.poly_latency(s.elements, self.degree)
            if key in self.alphas:
                c = torch.softmax(self.alphas[key], 0)
                total = total + c[0] * lr + c[1] * lp
            else:
                total = total + (lp if key in self.coeffs else lr)
        if normalize:
            total = total / sum(self.cost.relu_latency(s.elements) for s in self.sites)
        return total

    def harden(self) -> list[str]:
        """End the search: each gated site keeps its argmax (the polynomial or the stock ReLU, exactly); sites
        that keep ReLU lose their coefficients. Returns the replaced sites."""
        if not self.gated:
            return self.replaced()
        keep = set(self.replaced())
        for s in self.sites:
            key = _key(s.name)
            if key in self.coeffs and s.name not in keep:
                del self.coeffs[key]
        self.alphas = nn.ParameterDict()
        self.gated = False
        return self.replaced()

    def remove(self) -> None:
        """Put the model back: its ReLU calls run stock again."""
        self._undo.remove()
        for h in self._hooks:
            h.remove()


def _key(site: str) -> str:
    """A ParameterDict key for a site name (``.`` is not allowed in keys)."""
    return site.replace(".", "/") or ":"
