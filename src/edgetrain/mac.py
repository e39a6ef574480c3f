"""MAC: added computational units (ACUs) learned at meta-test time, for few-shot tasks from a shifted distribution.

Tiwari, Gogoi, Verma, Singh, "MAC: A Meta-Learning Approach for Feature Learning and Recombination", arXiv 2209.09613
(Pattern Analysis and Applications 2024); spec algorithms_B §7.3. ANIL's view is that meta-test adaptation only
reuses features; MAC argues that a task from a *non-similar* distribution also needs new ones. It widens the
meta-trained network at meta-test time with new hidden units (ACUs) whose features are learned on the support set
while the meta-trained base stays frozen; the new features are recombined with the old ones in the last layer.
Claim: about +13% over ANIL in 5-shot on non-similar task distributions (+12% in the journal version).

What is assumed here (the paper's placement, init and learning rate were not retrieved; spec §7.3 "Spec [OURS]",
made generic and configurable):

* The ACUs sit beside one layer L of the model (its name; an ``nn.Conv2d`` or ``nn.Linear``) and read L's input:
  a conv L gets ``Conv2d(L.in_channels -> n_acu)`` with L's kernel size, stride, padding (and padding mode) and
  dilation, ``groups=1``, then ReLU and a global average pool to one value per unit; a linear L gets
  ``Linear(L.in_features -> n_acu)`` then ReLU (averaged over any dims between batch and features). A subclass of
  Conv2d that pads in its own ``forward`` is not imitated: the ACUs use L's stored geometry.
* The head is the model's last ``nn.Linear`` (:func:`edgetrain.meta._head`), called once, and the model's output is
  the head's output. The ACU outputs are concatenated to the head's input and the head gets ``n_acu`` new input
  columns, zero-initialised, so that before adaptation the predictions are the base model's, bit for bit (the
  logits are computed as ``head(features) + acu @ columns.T``: the base head's own call plus an exact zero).
* ACU weights: He (Kaiming) init for ReLU, fan-in mode (He et al., ICCV 2015: std ``sqrt(2 / fan_in)``; or the
  uniform form with the same variance), drawn from a ``torch.Generator`` seeded per episode; biases zero.
* The base is frozen: L's input and the head's input are captured with forward pre-hooks in one forward under
  ``no_grad`` (once per task, as ANIL computes its features once), with the buffers copied, so the model is
  bitwise unchanged. The inner loop (plain SGD, no graph kept: meta-test only) runs the ACU branch and the extended
  head only, updating the ACU parameters (``acu_lr``) and the whole head, new columns and bias included (``lr``).
  With zero new columns the first step's ACU gradient is exactly zero (the head reads none of it yet): the ACUs
  move from the second step on.

This is functional (no ``ACUWrapper`` module swapped into the model, unlike spec §7.4's sketch): nothing of the
user's model is copied or changed. :class:`MACNet` wraps the widened network as a module, for :func:`edgetrain.measure`.
"""

from __future__ import annotations

import difflib
import hashlib
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from edgetrain.errors import ConfigError
from edgetrain.meta import _head

__all__ = ["INITS", "MAC", "MACNet", "episode_seed"]

#: ACU weight inits: He et al. 2015 (arXiv 1502.01852) for ReLU, fan-in mode, normal or uniform with the same variance
INITS = ("kaiming_normal", "kaiming_uniform")
GAIN = math.sqrt(2.0)  # He et al. 2015, eq. 10: Var[w] = 2 / fan_in for ReLU units


def episode_seed(seed: int, episode: int) -> int:
    """The ACU init's generator seed for ``(seed, episode)``: 32 bits of a BLAKE2b hash, because torch's CPU generator
    (mt19937) keeps only the low 32 bits of its seed (checked: seeds ``5`` and ``5 + 2**32`` give the same stream)."""
    return int.from_bytes(hashlib.blake2b(f"{seed}:{episode}".encode(), digest_size=4).digest(), "little")


def _find_layer(model: nn.Module, name: str) -> nn.Conv2d | nn.Linear:
    if not isinstance(name, str):
        raise ConfigError(f"MAC acu_layer: must be a module name (str), got {name!r}")
    modules = dict(model.named_modules())
    if name not in modules:
        layers = [n for n, m in modules.items() if isinstance(m, (nn.Conv2d, nn.Linear))]
        close = difflib.get_close_matches(name, layers, n=3, cutoff=0.5)
        hint = (f"did you mean {', '.join(close)}?" if close else
                f"its Conv2d/Linear layers include {', '.join(layers[:5]) or 'none'}")
        raise ConfigError(f"MAC acu_layer: {type(model).__name__} has no module {name!r}; {hint}")
    layer = modules[name]
    if not isinstance(layer, (nn.Conv2d, nn.Linear)):
        raise ConfigError(f"MAC acu_layer: {name!r} is a {type(layer).__name__}, not an nn.Conv2d or nn.Linear")
    return layer


class MAC:
    """ACUs beside the layer ``layer`` of a (meta-trained) ``model``: :meth:`init` draws an episode's parameters,
    :meth:`adapt` runs the inner loop on a support set, :meth:`logits` predicts with the widened network.

    Parameters are a dict: ``acu.weight``, ``acu.bias`` (the new units), ``head.weight``, ``head.bias`` (the
    head's own, if it has a bias) and ``head.acu_columns`` (its ``n_acu`` new input columns, (out, n_acu));
    :meth:`head_weight` gives the extended head's weight, (out, in + n_acu)."""

    def __init__(self, model: nn.Module, layer: str, n_acu: int = 8, *, lr: float = 0.01, acu_lr: float | None = None,
                 seed: int = 0, init: str = "kaiming_normal") -> None:
        if isinstance(n_acu, bool) or not isinstance(n_acu, int) or n_acu < 1:
            raise ConfigError(f"MAC n_acu: must be an int >= 1, got {n_acu!r}")
        if not lr > 0:
            raise ConfigError(f"MAC lr: must be > 0, got {lr!r}")
        if acu_lr is not None and not acu_lr >= 0:
            raise ConfigError(f"MAC acu_lr: must be >= 0 (0 keeps the ACUs at their init) or None, got {acu_lr!r}")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ConfigError(f"MAC acu_seed: must be an int >= 0, got {seed!r}")
        if init not in INITS:
            raise ConfigError(f"MAC acu_init {init!r}: choose one of {', '.join(INITS)}")
        self.model, self.layer_name, self.n_acu, self.seed, self.init_kind = model, layer, n_acu, seed, init
        self.lr, self.acu_lr = lr, lr if acu_lr is None else acu_lr
        self.layer = _find_layer(model, layer)
        try:
            self.head_name, self.head = _head(model)
        except ConfigError as e:
            raise ConfigError(f"MAC: {str(e).removeprefix('ANIL: ')}") from None

    # ------------------------------------------------------------------------------------------- parameters
    def init(self, episode: int = 0) -> dict[str, Tensor]:
        """An episode's starting parameters: ACU weights drawn from a generator seeded with ``(seed, episode)``
        (reproducible), ACU biases and the head's new columns zero, the head's own weight and bias copied."""
        if isinstance(episode, bool) or not isinstance(episode, int) or episode < 0:
            raise ConfigError(f"MAC episode: must be an int >= 0, got {episode!r}")
        gen = torch.Generator().manual_seed(episode_seed(self.seed, episode))  # one stream per (seed, episode)
        w = self.layer.weight
        shape = ((self.n_acu, self.layer.in_channels, *self.layer.kernel_size) if isinstance(self.layer, nn.Conv2d)
                 else (self.n_acu, self.layer.in_features))
        std = GAIN / math.sqrt(math.prod(shape[1:]))  # He et al. 2015: fan_in = in_channels * kh * kw (or in_features)
        if self.init_kind == "kaiming_normal":
            acu = torch.randn(shape, generator=gen, dtype=w.dtype) * std
        else:  # uniform on [-b, b] has variance b^2 / 3: b = sqrt(3) * std
            acu = (torch.rand(shape, generator=gen, dtype=w.dtype) * 2 - 1) * (math.sqrt(3.0) * std)
        hw = self.head.weight.detach()
        params = {"acu.weight": acu.to(w.device), "acu.bias": torch.zeros(self.n_acu, dtype=w.dtype, device=w.device),
                  "head.weight": hw.clone(), "head.acu_columns": torch.zeros(hw.shape[0], self.n_acu, dtype=hw.dtype,
                                                                             device=hw.device)}
        if self.head.bias is not None:
            params["head.bias"] = self.head.bias.detach().clone()
        return params

    @staticmethod
    def head_weight(params: dict[str, Tensor]) -> Tensor:
        """The extended head's weight: its own columns then the ACUs' (out, in + n_acu)."""
        return torch.cat([params["head.weight"], params["head.acu_columns"]], 1)

    # ------------------------------------------------------------------------------------------- forward
    def capture(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(L's input, the head's input)`` from one forward of the frozen base under ``no_grad`` (buffers copied:
        BatchNorm running statistics are not moved). Refuses models MAC cannot widen, in one line."""
        order: list[str] = []
        got: dict[str, Tensor] = {}

        def pre(tag: str) -> Callable[[nn.Module, tuple], None]:
            def hook(_m: nn.Module, args: tuple) -> None:
                order.append(tag)
                if args and isinstance(args[0], Tensor):
                    got.setdefault(tag, args[0])
            return hook

        head_out: list[Tensor] = []
        handles = [self.layer.register_forward_pre_hook(pre("layer")), self.head.register_forward_pre_hook(pre("head")),
                   self.head.register_forward_hook(lambda _m, _a, out: head_out.append(out))]
        try:
            with torch.no_grad():
                buffers = {k: b.clone() for k, b in self.model.named_buffers()}
                out = functional_call(self.model, buffers, (x,), strict=False)
        finally:
            for h in handles:
                h.remove()
        where = f"{type(self.model).__name__}"
        for tag, name in (("layer", self.layer_name), ("head", self.head_name)):
            if order.count(tag) != 1:
                raise ConfigError(f"MAC: {where}'s {'head' if tag == 'head' else 'layer'} {name!r} was called "
                                  f"{order.count(tag)} times in one forward (once is needed)")
            if tag not in got:
                raise ConfigError(f"MAC: {where}'s module {name!r} was called without a positional tensor input")
        if order.index("layer") > order.index("head"):
            raise ConfigError(f"MAC: the layer {self.layer_name!r} runs after the head {self.head_name!r}; the ACUs' "
                              "features must reach the head, so choose a layer before it")
        if not (out is head_out[0] or isinstance(out, Tensor) and out.shape == head_out[0].shape
                and torch.equal(out, head_out[0])):
            raise ConfigError(f"MAC: {where}'s output is not its head {self.head_name!r}'s output; MAC recombines "
                              "features in the head, which must give the logits")
        layer_in, head_in = got["layer"], got["head"]
        if head_in.ndim != 2:
            raise ConfigError(f"MAC: the head {self.head_name!r} reads a {tuple(head_in.shape)} input; (batch, "
                              "features) is needed to append the ACUs' features")
        if isinstance(self.layer, nn.Conv2d) and layer_in.ndim != 4:
            raise ConfigError(f"MAC: the conv {self.layer_name!r} reads a {tuple(layer_in.shape)} input; (N, C, H, "
                              "W) is needed")
        if layer_in.shape[0] != head_in.shape[0]:
            raise ConfigError(f"MAC: the layer {self.layer_name!r} sees a batch of {layer_in.shape[0]}, the head "
                              f"{head_in.shape[0]}; the ACUs need one feature vector per sample")
        return layer_in, head_in

    def branch(self, params: dict[str, Tensor], layer_in: Tensor) -> Tensor:
        """The ACUs' features (N, n_acu) from L's input."""
        w, b, layer = params["acu.weight"], params["acu.bias"], self.layer
        if isinstance(layer, nn.Conv2d):
            pad = layer.padding
            if layer.padding_mode != "zeros":  # as nn.Conv2d does it
                layer_in, pad = F.pad(layer_in, layer._reversed_padding_repeated_twice, mode=layer.padding_mode), 0
            a = F.relu(F.conv2d(layer_in, w, b, layer.stride, pad, layer.dilation))  # (N, n_acu, H', W')
            return a.mean((2, 3))  # global average pool: (N, n_acu)
        a = F.relu(F.linear(layer_in, w, b))  # (N, ..., n_acu)
        return a.mean(tuple(range(1, a.ndim - 1))) if a.ndim > 2 else a

    def forward(self, params: dict[str, Tensor], layer_in: Tensor, head_in: Tensor) -> Tensor:
        """Logits of the widened network from captured inputs: the head's own forward (with its adapted weight and
        bias) plus the new columns times the ACUs' features."""
        own = {k.removeprefix("head."): params[k] for k in ("head.weight", "head.bias") if k in params}
        base = functional_call(self.head, own, (head_in,), strict=False)  # (N, out): the model's own head call
        return base + F.linear(self.branch(params, layer_in), params["head.acu_columns"])

    def logits(self, params: dict[str, Tensor], x: Tensor) -> Tensor:
        """The widened network's logits on ``x``."""
        return self.forward(params, *self.capture(x))

    # ------------------------------------------------------------------------------------------- inner loop
    def adapt(self, xs: Tensor, ys: Tensor, steps: int, *, episode: int = 0,
              params: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
        """``steps`` SGD steps of the cross-entropy on the support set ``(xs, ys)`` from ``params`` (default
        :meth:`init` of ``episode``): ACU parameters at ``acu_lr``, the head at ``lr``. The base's features are
        computed once; no graph is kept between steps (meta-test only)."""
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ConfigError(f"MAC steps: must be an int >= 0, got {steps!r}")
        p = {k: v.detach().requires_grad_(True) for k, v in (self.init(episode) if params is None else params).items()}
        layer_in, head_in = self.capture(xs)
        with torch.enable_grad():
            for _ in range(steps):
                loss = F.cross_entropy(self.forward(p, layer_in, head_in), ys)
                grads = torch.autograd.grad(loss, list(p.values()))
                p = {k: (v - (self.acu_lr if k.startswith("acu.") else self.lr) * g).detach().requires_grad_(True)
                     for (k, v), g in zip(p.items(), grads)}
        return {k: v.detach() for k, v in p.items()}


class MACNet(nn.Module):
    """The widened network as a module (to meter one adaptation step with :func:`edgetrain.measure`, or to run it):
    ``params`` become its own parameters, the base is registered as ``base`` (its state is the device's too) and
    runs under ``no_grad``. Freeze the base's parameters to have them counted as frozen."""

    def __init__(self, mac: MAC, params: dict[str, Tensor]) -> None:
        super().__init__()
        self.base, self._mac = mac.model, mac
        self.adapted = nn.ParameterDict({k.replace(".", "_"): nn.Parameter(v.detach().clone())
                                         for k, v in params.items()})

    def forward(self, x: Tensor) -> Tensor:
        params = {k: self.adapted[k.replace(".", "_")] for k in ("acu.weight", "acu.bias", "head.weight",
                                                                  "head.acu_columns", "head.bias")
                  if k.replace(".", "_") in self.adapted}
        return self._mac.logits(params, x)
