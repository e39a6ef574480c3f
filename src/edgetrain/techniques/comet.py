"""COMET: error-bounded lossy compression of saved activations with adaptive per-layer error bounds.

Jin, Zhang, Guo, Tian, Di, Cappello, et al., *COMET: A Novel Memory-Efficient Deep Learning Training
Framework by Using Error-Bounded Lossy Compression*, PVLDB 15(4) 2022, arXiv:2111.09562 (spec
algorithms_A §5; no public code).

Every floating-point tensor an op inside the targeted modules (default: the whole model) saves for backward is
stored with an absolute error bound ``eb`` (:class:`edgetrain.compress.error_bounded.ErrorBoundedCodec`:
power-of-two bins of width <= 2 eb, 1-D Lorenzo residuals packed in 2/4/8 bits plus an escape list). Exact zeros
stay exact. Each layer (a module whose weight feeds a conv / linear / norm op, whatever its class) has its own
codec and bound; other ops (GELU, attention, ...) share one at ``eb``. ReLU-family calls save exact 1-bit masks
and dropout a 1-bit mask (as in :mod:`.actnn`). Not combinable with ``checkpoint``.

Adaptive error bound (spec §5.4, our formulation; the paper's constants could not be checked). After
``warmup`` training forwards at ``eb``, and then every ``update_every`` forwards, each layer l with a
weight records from that step:

    S_l = mean_j sum_k Delta_kj^2     (output gradient energy per output channel j)
    g_l = mean |dL/dW_l|
    eb_l = alpha * g_l * sqrt(3 / S_l) * s_l,   clamped to [eb_min, eb_max]

so the weight-gradient error std caused by compression, ``eb_l * sqrt(S_l / 3)`` (uniform error of
variance eb^2/3 per element, §5.3), is ``alpha`` times the typical gradient. ``s_l = 1`` for conv/linear;
for BatchNorm, whose gamma gradient sees ``x_hat = (x - mu) / sigma``, ``s_l`` is the mean running std.
Choices where the spec is unsure: alpha 0.05, update every 100 forwards after 100 warm-up forwards at
eb 1e-3, no EMA, steps counted per layer inside the technique (the bench runner does not call step hooks).

Stored for backward: per compressed tensor, ``b/8`` bytes per element (b in 2/4/8) plus 8 bytes per escape;
tensors whose bins would exceed 2^24 and all tensors at ``eb = 0`` stay raw.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
from torch import Tensor, nn

from edgetrain.compress.codec import IdentityCodec, SavedCompressor, compress_scopes
from edgetrain.compress.error_bounded import ErrorBoundedCodec, SZ3Codec
from edgetrain.compress.masks import mask_dropout, mask_ops
from edgetrain.ops import Call, Undo, intercept
from edgetrain.registry import TechniqueInfo, register
from edgetrain.structure import NORM_OPS, WEIGHT_OPS, Structure
from edgetrain.technique import Technique, check

LAYER_OPS = tuple(WEIGHT_OPS | NORM_OPS)
BACKENDS = {"torch": ErrorBoundedCodec, "sz3": SZ3Codec}


def _positive(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0


@dataclasses.dataclass(frozen=True, kw_only=True)
class Comet(Technique):
    """Error-bounded compression of saved activations.

    Args:
        targets: modules whose ops' saved tensors are compressed (default: the whole model).
        eb: absolute error bound (initial one if ``adaptive``); 0 = no compression (exactly plain).
            Larger -> fewer bits per residual, more gradient noise (std linear in eb).
        adaptive: update per-layer bounds from gradient statistics (see module docstring).
        alpha: target ratio of compression-induced gradient-error std to the mean |weight gradient|.
        update_every: forwards between bound updates (T); each update costs two tensor hooks on one step.
        warmup: forwards at ``eb`` before the first update.
        eb_min, eb_max: clamp of adaptive bounds.
        compress_bn: also compress what normalisation ops save (their error reaches the input gradient, §5.3).
        min_bytes: smaller saved tensors stay raw.
        backend: ``torch`` (dual quantisation + Lorenzo, fixed-rate packing; any device) or ``sz3`` (the real
            SZ3 via the optional ``pysz`` package; CPU round trip, entropy coded: higher ratios, slower).
    """

    name = "comet"
    eb: float = 1e-3
    adaptive: bool = True
    alpha: float = 0.05
    update_every: int = 100
    warmup: int = 100
    eb_min: float = 1e-4
    eb_max: float = 0.5
    compress_bn: bool = True
    min_bytes: int = 4096
    backend: str = "torch"

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.eb == 0 or _positive(self.eb), Comet, "eb", f"must be a finite number >= 0, got {self.eb!r}")
        check(isinstance(self.adaptive, bool), Comet, "adaptive", f"must be true/false, got {self.adaptive!r}")
        check(_positive(self.alpha), Comet, "alpha", f"must be a positive number, got {self.alpha!r}")
        for f in ("update_every", "warmup", "min_bytes"):
            v = getattr(self, f)
            check(isinstance(v, int) and not isinstance(v, bool) and v >= (1 if f == "update_every" else 0),
                  Comet, f, f"must be an int >= {1 if f == 'update_every' else 0}, got {v!r}")
        check(_positive(self.eb_min) and _positive(self.eb_max) and self.eb_min <= self.eb_max, Comet, "eb_min",
              f"need 0 < eb_min <= eb_max, got {self.eb_min!r}, {self.eb_max!r}")
        check(self.backend in BACKENDS, Comet, "backend", f"must be one of {list(BACKENDS)}, got {self.backend!r}")
        check(isinstance(self.compress_bn, bool), Comet, "compress_bn", f"must be true/false, got {self.compress_bn!r}")


class CometHandle(Undo):
    """Removable change; ``codecs`` maps layer name -> its codec (``.eb``), ``forwards`` counts each layer's
    training forwards, ``history`` logs bound updates as ``(layer, forward_count, eb)``, ``compressor`` holds encode totals (``payload_bytes / encoded_bytes``)."""

    def __init__(self, compressor: SavedCompressor) -> None:
        super().__init__()
        self.compressor = compressor
        self.codecs: dict[str, ErrorBoundedCodec] = {}
        self.history: list[tuple[str, int, float]] = []
        self.forwards: dict[str, int] = {}  # training forwards per layer: they time the bound updates

    def state_dict(self) -> dict:
        """Each layer's current error bound, the forward counts that time the next updates, and the update log."""
        return {"eb": {name: c.state_dict()["eb"] for name, c in self.codecs.items()},
                "forwards": dict(self.forwards), "history": [list(h) for h in self.history]}

    def load_state_dict(self, state: dict) -> None:
        for name, eb in state["eb"].items():
            self.codecs.setdefault(name, type(self.compressor.codec)(eb)).load_state_dict({"eb": eb})
        self.forwards.clear()
        self.forwards.update({str(k): int(v) for k, v in state["forwards"].items()})
        self.history[:] = [(str(n), int(i), float(eb)) for n, i, eb in state["history"]]


def new_bound(cfg: Comet, grad_out: Tensor, weight_grad: Tensor, input_scale: float = 1.0) -> float:
    """``eb = alpha * mean|G_W| * sqrt(3 / S) * input_scale`` clamped; ``S = mean_j sum_k Delta_kj^2``."""
    energy = float(grad_out.detach().double().square().transpose(0, 1).reshape(grad_out.shape[1], -1).sum(1).mean()) \
        if grad_out.dim() > 1 else float(grad_out.detach().double().square().sum())
    g = float(weight_grad.detach().abs().mean())
    if energy <= 0 or g <= 0 or not math.isfinite(energy * g):
        return cfg.eb_max
    eb = cfg.alpha * g * math.sqrt(3 / energy) * input_scale
    return min(max(eb, cfg.eb_min), cfg.eb_max)


def _layer_handler(cfg: Comet, handle: CometHandle, owner: dict[int, str], modules: dict[str, nn.Module]):
    """Per-layer codec for the op of each layer and, when adaptive, its bound updates from that op's gradients."""
    counts = handle.forwards
    raw = IdentityCodec()

    def handle_call(call: Call) -> Any:
        name = next((owner[id(a)] for a in call.args[1:6] if isinstance(a, Tensor) and id(a) in owner), None)
        if name is None:
            return NotImplemented
        norm = call.name in NORM_OPS
        codec = handle.codecs.setdefault(name, BACKENDS[cfg.backend](cfg.eb)) if cfg.compress_bn or not norm else raw
        prev, handle.compressor.override = handle.compressor.override, codec
        try:
            out = call.proceed()
        finally:
            handle.compressor.override = prev
        weight = call.arg(3, "weight") if call.name == "batch_norm" else call.arg(1, "weight")
        if codec is raw or not cfg.adaptive or not modules[call.module].training or not isinstance(out, Tensor) \
                or not out.requires_grad or not isinstance(weight, nn.Parameter) or not weight.requires_grad:
            return out
        counts[name] = n = counts.get(name, 0) + 1  # training forwards of this layer
        if n < cfg.warmup or (n - cfg.warmup) % cfg.update_every:
            return out
        var = call.arg(2, "running_var") if call.name == "batch_norm" else None
        scale = float(torch.sqrt(var + call.arg(7, "eps", 1e-5)).mean()) if var is not None else 1.0
        box: dict[str, Tensor] = {}

        def on_weight(g: Tensor) -> None:
            hw.remove()
            if "delta" in box:
                codec.eb = new_bound(cfg, box["delta"], g, scale)
                handle.history.append((name, n, codec.eb))

        out.register_hook(lambda g: box.__setitem__("delta", g))
        hw = weight.register_hook(on_weight)
        return out

    return handle_call


def _apply(model: nn.Module, cfg: Comet, targets: list[str], structure: Structure) -> CometHandle:
    compressor = SavedCompressor(lambda: [*model.parameters(), *model.buffers()], cfg.min_bytes,
                                 BACKENDS[cfg.backend](cfg.eb))
    handle = CometHandle(compressor)
    compressor.owner = handle
    scopes = compress_scopes(model, compressor, targets, handle)
    scope = None if scopes == [""] else (lambda name: structure.within(name, scopes))
    mask_ops(model, handle, scope)
    mask_dropout(model, handle, scope)
    params = dict(model.named_parameters())
    owner = {id(params[p]): lay.name for lay in structure.layers.values() for p in lay.params
             if scope is None or scope(lay.name)}
    intercept(model, LAYER_OPS, _layer_handler(cfg, handle, owner, dict(model.named_modules())), handle, count=False,
              first=True)
    return handle


register(
    TechniqueInfo(
        config=Comet,
        apply=_apply,
        summary="error-bounded lossy compression of saved activations (|x - x_hat| <= eb), adaptive per-layer bounds",
        paper="Jin et al., COMET: A Novel Memory-Efficient Deep Learning Training Framework by Using Error-Bounded "
              "Lossy Compression, PVLDB 15(4) 2022, arXiv:2111.09562",
        reduces=frozenset({"activations"}),
        default_targets=lambda model, structure: [""],
        looks_for="saved floating-point activations",
        limits='no cost model (payload sizes depend on the data); not with checkpoint',
        conflicts=frozenset({"checkpoint"}),
        traceable=False,  # payload sizes depend on the data (Lorenzo residuals, escapes)
        exact=False,
        grad_tolerance=0.0,
        grad_cosine=0.999,  # eb=1e-3 (measured > 0.9999)
        examples=(Comet(), Comet(eb=0.01, adaptive=False, compress_bn=False), Comet(eb=0.0, adaptive=False)),
    )
)
