"""COMET: error-bounded lossy compression of saved activations with adaptive per-layer error bounds.

Jin, Zhang, Guo, Tian, Di, Cappello, et al., *COMET: A Novel Memory-Efficient Deep Learning Training
Framework by Using Error-Bounded Lossy Compression*, PVLDB 15(4) 2022, arXiv:2111.09562 (spec
algorithms_A §5; no public code).

Every tensor a targeted conv / linear / BatchNorm layer saves for backward is stored with an absolute error
bound ``eb`` (:class:`edgetrain.compress.error_bounded.ErrorBoundedCodec`: power-of-two bins of width
<= 2 eb, 1-D Lorenzo residuals packed in 2/4/8 bits plus an escape list). Exact zeros stay exact. ReLU /
ReLU6 save exact 1-bit masks and Dropout a 1-bit mask (as in :mod:`.actnn`), so activation masks are exact.

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

from edgetrain.apply import Undo, patch_forward
from edgetrain.compress.codec import SavedCompressor, hooked_forward
from edgetrain.compress.error_bounded import ErrorBoundedCodec, SZ3Codec
from edgetrain.compress.masks import dropout_forward, masked_forward
from edgetrain.registry import TechniqueInfo, register
from edgetrain.technique import Technique, check

COMPRESSED_LAYERS: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Linear, nn.modules.batchnorm._BatchNorm)
MASK_LAYERS = (nn.ReLU, nn.ReLU6)
LAYER_TYPES = COMPRESSED_LAYERS + MASK_LAYERS + (nn.Dropout,)
_BN = nn.modules.batchnorm._BatchNorm
BACKENDS = {"torch": ErrorBoundedCodec, "sz3": SZ3Codec}


def _positive(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0


@dataclasses.dataclass(frozen=True, kw_only=True)
class Comet(Technique):
    """Error-bounded compression of saved activations.

    Args:
        targets: layers to compress (default: every conv, linear and BatchNorm; ReLU/ReLU6/Dropout masks).
        eb: absolute error bound (initial one if ``adaptive``); 0 = no compression (exactly plain).
            Larger -> fewer bits per residual, more gradient noise (std linear in eb).
        adaptive: update per-layer bounds from gradient statistics (see module docstring).
        alpha: target ratio of compression-induced gradient-error std to the mean |weight gradient|.
        update_every: forwards between bound updates (T); each update costs two tensor hooks on one step.
        warmup: forwards at ``eb`` before the first update.
        eb_min, eb_max: clamp of adaptive bounds.
        compress_bn: also compress BatchNorm inputs (their error reaches the input gradient, §5.3).
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
    """Removable change; ``codecs`` maps layer name -> its codec (``.eb``), ``history`` logs bound updates
    as ``(layer, forward_count, eb)``, ``compressor`` holds encode totals (``payload_bytes / encoded_bytes``)."""

    def __init__(self, compressor: SavedCompressor) -> None:
        super().__init__()
        self.compressor = compressor
        self.codecs: dict[str, ErrorBoundedCodec] = {}
        self.history: list[tuple[str, int, float]] = []


def new_bound(cfg: Comet, grad_out: Tensor, weight_grad: Tensor, input_scale: float = 1.0) -> float:
    """``eb = alpha * mean|G_W| * sqrt(3 / S) * input_scale`` clamped; ``S = mean_j sum_k Delta_kj^2``."""
    energy = float(grad_out.detach().double().square().transpose(0, 1).reshape(grad_out.shape[1], -1).sum(1).mean()) \
        if grad_out.dim() > 1 else float(grad_out.detach().double().square().sum())
    g = float(weight_grad.detach().abs().mean())
    if energy <= 0 or g <= 0 or not math.isfinite(energy * g):
        return cfg.eb_max
    eb = cfg.alpha * g * math.sqrt(3 / energy) * input_scale
    return min(max(eb, cfg.eb_min), cfg.eb_max)


def _adaptive_forward(name: str, m: nn.Module, cfg: Comet, handle: CometHandle, inner: Any) -> Any:
    codec = handle.codecs[name]
    count = [0]
    bn = isinstance(m, nn.modules.batchnorm._BatchNorm)

    def forward(x: Tensor, *args: Any, **kwargs: Any) -> Any:
        out = inner(x, *args, **kwargs)
        if not (m.training and torch.is_grad_enabled() and out.requires_grad):
            return out
        count[0] += 1
        n = count[0] - cfg.warmup
        if n < 0 or n % cfg.update_every or m.weight is None or not m.weight.requires_grad:
            return out
        box: dict[str, Tensor] = {}
        scale = float(torch.sqrt(m.running_var + m.eps).mean()) if bn and m.running_var is not None else 1.0

        def on_out(g: Tensor) -> None:
            box["delta"] = g

        def on_weight(g: Tensor) -> None:
            hw.remove()
            if "delta" in box:
                codec.eb = new_bound(cfg, box["delta"], g, scale)
                handle.history.append((name, count[0], codec.eb))

        out.register_hook(on_out)
        hw = m.weight.register_hook(on_weight)
        return out

    return forward


def _apply(model: nn.Module, cfg: Comet, targets: list[str]) -> CometHandle:
    modules = dict(model.named_modules())
    compressor = SavedCompressor(lambda: [*model.parameters(), *model.buffers()], cfg.min_bytes)
    handle = CometHandle(compressor)
    for name in targets:
        m = modules[name]
        if "forward" in m.__dict__:
            continue  # already changed by another technique
        if type(m) is nn.Dropout:
            patch_forward(m, dropout_forward(m), handle)
        elif type(m) in MASK_LAYERS:
            patch_forward(m, masked_forward(m), handle)
        elif isinstance(m, COMPRESSED_LAYERS) and (cfg.compress_bn or not isinstance(m, _BN)):
            codec = handle.codecs[name] = BACKENDS[cfg.backend](cfg.eb)
            inner = hooked_forward(m, compressor, lambda c=codec: c)
            patch_forward(m, _adaptive_forward(name, m, cfg, handle, inner) if cfg.adaptive else inner, handle)
    return handle


register(
    TechniqueInfo(
        config=Comet,
        apply=_apply,
        summary="error-bounded lossy compression of saved activations (|x - x_hat| <= eb), adaptive per-layer bounds",
        paper="Jin et al., COMET: A Novel Memory-Efficient Deep Learning Training Framework by Using Error-Bounded "
              "Lossy Compression, PVLDB 15(4) 2022, arXiv:2111.09562",
        reduces=frozenset({"activations"}),
        layer_types=LAYER_TYPES,
        exact=False,
        grad_tolerance=0.0,
        examples=(Comet(), Comet(eb=0.01, adaptive=False, compress_bn=False), Comet(eb=0.0, adaptive=False)),
    )
)
