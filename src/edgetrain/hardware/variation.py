"""NVM device variation in compute-in-memory (CiM) accelerators: expected and worst-case accuracy, and training for it.

Yan, Hu, Shi, *Computing-In-Memory Neural Network Accelerators for Safety-Critical Systems: Can Small Device
Variations Be Disastrous?*, ICCAD 2022, arXiv:2207.07626, and its journal version *Compute-in-Memory based Neural
Network Accelerators for Safety-Critical Systems: Worst-Case Scenarios and Protections*, arXiv:2312.06137 (A-TRICE):
the accuracy of a network under the *worst* combination of device deviations within a bound is far below its
average accuracy, and methods that improve the average do little for the worst case. Models and constants
(docs/nvm_variation.md):

* Mapping (our assumption, stated): each conv/linear weight matrix is held by differential pairs of devices whose
  conductance is proportional to ``|w|`` (ideal on/off ratio, ``G_min = 0``); with ``levels = N`` conductance
  levels per device the nominal weight is ``q(w) = round(w / D) * D``, ``D = max|W| / (N - 1)`` per tensor
  (``2N - 1`` signed values); ``levels=None`` keeps the weights analog (unquantized). Biases and every other
  parameter stay digital (unperturbed).
* Device-to-device (D2D, programming) variation: log-normal, multiplicative on the conductance, so on the weight:
  ``w = q(w) * exp(theta)``, ``theta ~ N(0, d2d**2)`` per weight, drawn once per chip. (Log-normal conductance
  variation: e.g. "Device quantization policy in variation-aware in-memory computing design", Sci. Rep. 2022,
  doi:10.1038/s41598-021-04159-x, which normalizes sigma to ln(G_H / G_L); no mean correction:
  ``E[exp(theta)] = exp(d2d**2 / 2)``.)
* Cycle-to-cycle (C2C, read) noise: additive Gaussian proportional to the tensor's largest nominal weight,
  ``w += c2c * max|q(W)| * eps``, ``eps ~ N(0, 1)`` per weight, drawn anew at every forward call (one draw per
  batch: our simplification of "per inference"). Our assumption; for scale, IBM aihwkit's ``PCMLikeNoiseModel``
  (Nandakumar et al., ICECS 2019) programs with additive Gaussian noise of sigma
  ``(0.26348 + 1.9650 g/g_max - 1.1731 (g/g_max)**2) * g_max / 25``, 1.05% (g = 0) to 4.2% (g = g_max) of ``g_max``.
* Worst case: the perturbation ``(theta, delta)`` with ``|theta| <= k * d2d`` and ``|delta| <= k * c2c * max|q(W)|``
  element-wise that maximizes the cross-entropy on the search data, by projected sign-gradient ascent (PGD; Madry
  et al., ICLR 2018, arXiv:1706.06083: random start in the box, step ``2.5 * bound / steps``), keeping the iterate
  with the lowest search accuracy. Yan et al. search the device deviations within a bound the same way in spirit
  (their exact search was not retrieved); ``k = 3`` (our default: 99.7% of Gaussian draws fall inside).
* Variation-aware training (:func:`variation_step`): ``"noise"``: a fresh chip per step in the forward (noise
  injection, the average-case baseline of both papers); ``"adversarial"``: PGD from a sampled chip, then the step
  at the worst perturbation found (adversarial weight perturbation, in the spirit of A-TRICE's adversarial part;
  its right-censored noise is not reproduced). Gradients reach the nominal weights through the perturbation.

Every evaluation is functional (:func:`torch.func.functional_call` with the perturbed weights): the model's own
parameters and buffers are never written, so they are bit for bit what they were.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from edgetrain.errors import ConfigError

__all__ = ["MODES", "Chip", "Variation", "accuracy", "expected_accuracy", "mean_ci", "nominal", "quantize",
           "targets", "variation_step", "worst_case"]

MODES = ("plain", "noise", "adversarial")
K_DEFAULT = 3.0  # bound in sigmas (our assumption: 3 sigma holds 99.7% of a Gaussian's draws)
PGD_STEP = 2.5  # step = 2.5 * bound / steps (Madry et al., ICLR 2018, arXiv:1706.06083, section 5)
Batches = Iterable[tuple[Tensor, Tensor]]


def _real(name: str, value: object, *, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0 or \
            (positive and value == 0):
        raise ConfigError(f"{name} must be a finite number {'> 0' if positive else '>= 0'}, got {value!r}")
    return float(value)


def _count(name: str, value: object, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{name} must be an int >= {low}, got {value!r}")
    return value


@dataclass(frozen=True)
class Variation:
    """A device variation model (module docstring for the equations).

    Attributes:
        d2d: sigma of the log-normal device-to-device factor ``exp(theta)``, ``theta ~ N(0, d2d**2)``; 0 = none.
        c2c: sigma of the additive read noise, as a fraction of each tensor's largest nominal ``|w|``; 0 = none.
        levels: conductance levels per device (>= 2) the weights are quantized to; ``None`` = analog.
    """

    d2d: float = 0.0
    c2c: float = 0.0
    levels: int | None = None

    def __post_init__(self) -> None:
        _real("Variation d2d", self.d2d)
        _real("Variation c2c", self.c2c)
        if self.d2d == 0 and self.c2c == 0:
            raise ConfigError("Variation: d2d and c2c are both 0; at least one sigma must be > 0")
        if self.levels is not None:
            _count("Variation levels", self.levels, 2)


def targets(model: nn.Module) -> dict[str, Tensor]:
    """The weights held in NVM crossbars: ``{name: parameter}`` of every conv and linear layer's weight."""
    found = {f"{m}.weight" if m else "weight": mod.weight for m, mod in model.named_modules()
             if isinstance(mod, (nn.Linear, nn.modules.conv._ConvNd)) and isinstance(mod.weight, nn.Parameter)}
    if not found:
        raise ConfigError(f"{type(model).__name__} has no nn.Linear or nn.Conv*d weight to map onto NVM devices")
    return found


def quantize(w: Tensor, levels: int | None) -> Tensor:
    """``round(w / D) * D`` with ``D = max|w| / (levels - 1)`` (``w`` itself when ``levels`` is ``None``); the
    gradient passes straight through (Bengio et al. 2013, arXiv:1308.3432)."""
    if levels is None:
        return w
    top = w.detach().abs().max()
    if top == 0:
        return w
    step = top / (levels - 1)
    return w + (torch.round(w.detach() / step) * step - w.detach())


def nominal(model: nn.Module, variation: Variation, *, grad: bool = False) -> dict[str, Tensor]:
    """The programmed (quantized) weights; attached to the model's graph when ``grad``."""
    return {n: quantize(w if grad else w.detach(), variation.levels) for n, w in targets(model).items()}


def _bounds(base: dict[str, Tensor], variation: Variation, k: float) -> tuple[float, dict[str, float]]:
    """The element-wise bounds: ``k * d2d`` on theta, ``k * c2c * max|q(W)|`` per tensor on delta."""
    return k * variation.d2d, {n: k * variation.c2c * float(w.detach().abs().max()) for n, w in base.items()}


def _apply(base: dict[str, Tensor], theta: dict[str, Tensor] | None, delta: dict[str, Tensor] | None) -> dict:
    out = {}
    for n, w in base.items():
        if theta is not None:
            w = w * torch.exp(theta[n])
        if delta is not None:
            w = w + delta[n]
        out[n] = w
    return out


class Chip:
    """One chip: its D2D deviations drawn once (``seed``), its C2C noise drawn anew at every call.

    Draw order (for reproduction): one ``torch.Generator`` seeded with ``seed``; for each target weight in
    :func:`targets` order, ``theta = d2d * randn(shape)`` (when ``d2d > 0``); then, per call, for each target weight
    ``eps = randn(shape)`` (when ``c2c > 0``).
    """

    def __init__(self, model: nn.Module, variation: Variation, seed: int = 0) -> None:
        self.model, self.variation = model, variation
        self.generator = torch.Generator().manual_seed(_count("Chip seed", seed, 0))
        base = targets(model)
        self.theta = {n: variation.d2d * torch.randn(w.shape, generator=self.generator, dtype=w.dtype)
                      for n, w in base.items()} if variation.d2d > 0 else None

    def weights(self, base: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
        """The weights this chip reads now: ``q(w) * exp(theta) + c2c * max|q(W)| * eps`` (fresh ``eps``)."""
        base = nominal(self.model, self.variation) if base is None else base
        delta = None
        if self.variation.c2c > 0:
            delta = {n: self.variation.c2c * w.detach().abs().max()
                     * torch.randn(w.shape, generator=self.generator, dtype=w.dtype) for n, w in base.items()}
        return _apply(base, self.theta, delta)

    def __call__(self, x: Tensor) -> Tensor:
        """The model's output on this chip (one C2C draw for the whole batch)."""
        return functional_call(self.model, self.weights(), (x,), strict=False)


@contextlib.contextmanager
def _eval(model: nn.Module) -> Iterator[None]:
    """Eval mode inside; every module's own train/eval flag put back after."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, flag in flags:
            m.train(flag)


@torch.no_grad()
def accuracy(model: nn.Module, batches: Batches, weights: dict[str, Tensor] | Chip | None = None) -> float:
    """Top-1 accuracy with the given weights (a fixed dict, a :class:`Chip`, or ``None``: the model's own)."""
    right = total = 0
    for x, y in batches:
        if weights is None:
            out = model(x)
        elif isinstance(weights, Chip):
            out = weights(x)
        else:
            out = functional_call(model, weights, (x,), strict=False)
        right += int((out.argmax(1) == y).sum())
        total += len(y)
    if total == 0:
        raise ConfigError("accuracy: the data has no samples")
    return right / total


def mean_ci(values: list[float], confidence: float = 0.95) -> tuple[float, float]:
    """Mean and the half-width of its Student-t confidence interval, ``t_{(1+c)/2, n-1} * s / sqrt(n)``."""
    from scipy.stats import t  # scikit-learn's dependency

    if not 0 < confidence < 1:
        raise ConfigError(f"confidence must be in (0, 1), got {confidence!r}")
    _count("number of chips", len(values), 2)
    v = torch.tensor(values, dtype=torch.float64)
    return float(v.mean()), float(t.ppf((1 + confidence) / 2, len(v) - 1) * v.std() / math.sqrt(len(v)))


def expected_accuracy(model: nn.Module, batches: Batches, variation: Variation, *, chips: int = 100, seed: int = 0,
                      confidence: float = 0.95) -> dict:
    """Monte Carlo over ``chips`` chips (seeds ``seed .. seed + chips - 1``): mean accuracy, its confidence
    interval, the worst and best chip, and every chip's accuracy."""
    _count("chips", chips, 2)
    batches = list(batches)
    with _eval(model):
        per_chip = [accuracy(model, batches, Chip(model, variation, seed + i)) for i in range(chips)]
    mean, half = mean_ci(per_chip, confidence)
    return {"mean": mean, "ci_half_width": half, "confidence": confidence, "worst": min(per_chip),
            "best": max(per_chip), "chips": chips, "per_chip": per_chip}


def _pgd(model: nn.Module, base: dict[str, Tensor], batches: list, variation: Variation, k: float, steps: int,
         generator: torch.Generator, start: str) -> tuple[dict, dict, list[tuple[float, float]]]:
    """Projected sign-gradient ascent on the summed cross-entropy; returns the iterate with the lowest accuracy
    (ties: the higher loss), its delta, and (accuracy, loss) per iterate."""
    b_theta, b_delta = _bounds(base, variation, k)
    frozen = {n: w.detach() for n, w in base.items()}

    def init(w: Tensor, sigma: float, bound: float) -> Tensor:
        if start == "uniform":
            return (2 * torch.rand(w.shape, generator=generator, dtype=w.dtype) - 1) * bound
        return (sigma * torch.randn(w.shape, generator=generator, dtype=w.dtype)).clamp(-bound, bound)

    theta = {n: init(w, variation.d2d, b_theta) for n, w in frozen.items()} if variation.d2d > 0 else None
    delta = {n: init(w, b_delta[n] / k, b_delta[n]) for n, w in frozen.items()} if variation.c2c > 0 else None
    boxes = [(t, b_theta) for t in (theta or {}).values()] + [(t, b_delta[n]) for n, t in (delta or {}).items()]
    leaves = [t.requires_grad_(True) for t, _ in boxes]
    best, curve = None, []
    for i in range(steps + 1):
        grads, loss, right, total = [torch.zeros_like(t) for t in leaves], 0.0, 0, 0
        for x, y in batches:
            out = functional_call(model, _apply(frozen, theta, delta), (x,), strict=False)
            ce = F.cross_entropy(out, y, reduction="sum")
            for g, d in zip(grads, torch.autograd.grad(ce, leaves)):
                g += d
            loss, right, total = loss + float(ce.detach()), right + int((out.argmax(1) == y).sum()), total + len(y)
        acc = right / total
        curve.append((acc, loss / total))
        if best is None or (acc, -loss) < (best[0], -best[1]):
            best = (acc, loss, {n: t.detach().clone() for n, t in (theta or {}).items()} or None,
                    {n: t.detach().clone() for n, t in (delta or {}).items()} or None)
        if i == steps:
            break
        with torch.no_grad():
            for (t, bound), g in zip(boxes, grads):
                t.copy_((t + PGD_STEP * bound / steps * g.sign()).clamp(-bound, bound))
    return best[2], best[3], curve


def worst_case(model: nn.Module, search: Batches, variation: Variation, *, k: float = K_DEFAULT, steps: int = 20,
               evaluate: Batches | None = None, seed: int = 0, start: str = "uniform") -> dict:
    """The most damaging perturbation within ``k`` sigmas per weight, by PGD on the ``search`` data.

    Args:
        model: the trained model (evaluated in eval mode; not modified).
        search: the batches whose cross-entropy the search maximizes (held in memory).
        variation: the variation model; its sigmas set the bounds (``levels`` the nominal weights).
        k: the bound in sigmas (> 0).
        steps: PGD steps (>= 1).
        evaluate: the batches the found perturbation is scored on (default: ``search``).
        seed: the random start's generator seed.
        start: ``"uniform"`` in the box, or ``"gaussian"`` (a sampled chip, clipped to the box).

    Returns:
        ``accuracy`` on ``evaluate``, ``search_accuracy``, ``theta`` and ``delta`` (dicts or ``None``), the bounds,
        and ``curve`` (search accuracy and mean loss per iterate, iterate 0 = the random start).
    """
    k = _real("k", k, positive=True)
    _count("steps", steps, 1)
    if start not in ("uniform", "gaussian"):
        raise ConfigError(f"start must be 'uniform' or 'gaussian', got {start!r}")
    search = list(search)
    if not search:
        raise ConfigError("worst_case: the search data has no batches")
    with _eval(model):
        base = nominal(model, variation)
        theta, delta, curve = _pgd(model, base, search, variation, k, steps, torch.Generator().manual_seed(seed),
                                   start)
        weights = _apply(base, theta, delta)
        acc = accuracy(model, search if evaluate is None else evaluate, weights)
    b_theta, b_delta = _bounds(base, variation, k)
    return {"accuracy": acc,
            "search_accuracy": min(a for a, _ in curve), "theta": theta, "delta": delta,
            "theta_bound": b_theta, "delta_bound": b_delta, "k": k, "steps": steps, "curve": curve}


def variation_step(model: nn.Module, x: Tensor, y: Tensor, opt: torch.optim.Optimizer, variation: Variation,
                   mode: str, *, generator: torch.Generator, k: float = K_DEFAULT, adv_steps: int = 1) -> float:
    """One optimizer step; ``mode``: ``"plain"`` (the nominal, quantized weights), ``"noise"`` (a fresh chip drawn
    from ``generator``) or ``"adversarial"`` (``adv_steps`` PGD steps on the batch from a sampled chip clipped to
    ``k`` sigmas, then the step at that perturbation). Buffers (BatchNorm statistics) are put back after the PGD
    passes, so only the final forward updates them. Returns the loss of the step."""
    if mode not in MODES:
        raise ConfigError(f"mode must be one of {MODES}, got {mode!r}")
    k = _real("k", k, positive=True)
    _count("adv_steps", adv_steps, 1)
    model.train()
    theta = delta = None
    if mode == "adversarial":
        saved = {n: b.clone() for n, b in model.named_buffers()}
        theta, delta, _ = _pgd(model, nominal(model, variation), [(x, y)], variation, k, adv_steps, generator,
                               "gaussian")
        with torch.no_grad():
            for n, b in model.named_buffers():
                b.copy_(saved[n])
    base = nominal(model, variation, grad=True)
    if mode == "noise":
        if variation.d2d > 0:
            theta = {n: variation.d2d * torch.randn(w.shape, generator=generator, dtype=w.dtype)
                     for n, w in base.items()}
        if variation.c2c > 0:
            delta = {n: variation.c2c * w.detach().abs().max()
                     * torch.randn(w.shape, generator=generator, dtype=w.dtype) for n, w in base.items()}
    opt.zero_grad(set_to_none=True)
    loss = F.cross_entropy(functional_call(model, _apply(base, theta, delta), (x,), strict=False), y)
    loss.backward()
    opt.step()
    return float(loss.detach())
