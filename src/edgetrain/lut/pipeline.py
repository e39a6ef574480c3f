"""The Logic Shrinkage training pipeline on a binarised MLP: BNN -> pruned BNN -> K-LUTNet -> staged shrinkage.

Wang et al., *Logic Shrinkage*, FPGA 2022, arXiv:2112.02346; spec ``algorithms_B`` section 9.2. Stages as in the
public code (``lutnet_logic_shrinkage.py``), with epochs replaced by optimizer steps (:class:`Schedule`):

1. train the residual BNN; magnitude-prune the LUT target layers to node sparsity ``theta``; retrain;
2. logic expansion to K-LUTs (:meth:`LUTLayer.expand_from`); train with full-precision (clipped) coefficients;
3. shrink to ``0.33 delta`` and retrain, ``0.67 delta`` and retrain, ``delta`` (public code: 20 epochs each retrain,
   full-precision coefficients); train full precision, then with binarised coefficients.

Fixed-K LUTNet is stage 2 followed by the binarised training, without step 3. The model (:class:`LUTMLP`) follows
the public MNIST net (binarised dense layers, BatchNorm, 2-level residual sign) with fewer layers: the first layer
reads real pixels and stays a :class:`BinaryLinear`; every later layer can be a :class:`LUTLayer`.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from edgetrain.errors import ConfigError
from edgetrain.lut.layer import BinaryLinear, LUTLayer, ResidualSign, check_k
from edgetrain.lut.shrink import check_delta, layer_stats, shrink_

__all__ = [
    "LUTMLP",
    "STAGE_FRACTIONS",
    "Schedule",
    "evaluate",
    "expand",
    "magnitude_prune_",
    "model_stats",
    "set_binary",
    "shrink_model_",
    "train_steps",
]

STAGE_FRACTIONS = (0.33, 0.67, 1.0)  # public code: logic_shrinkage(delta * 0.33), (delta * 0.67), (delta)
BN_MOMENTUM = 0.1  # torch default (the public code's Keras batch_norm_alpha was not carried over: our assumption)


class LUTMLP(nn.Module):
    """``in -> BinaryLinear -> BN -> ResidualSign -> [hidden...] -> out -> BN``: a residual-binarised MLP.

    Args:
        sizes: layer widths, e.g. ``(784, 256, 256, 10)``.
        lut_k: ``None`` for a plain BNN, else every layer after the first is a K-input :class:`LUTLayer`.
        levels: residual binarisation levels.
        seed: seed of the LUT layers' random extra inputs (layer ``n`` uses ``seed + n``).
    """

    def __init__(self, sizes: tuple[int, ...] = (784, 256, 256, 10), lut_k: int | None = None, levels: int = 2,
                 seed: int = 0) -> None:
        super().__init__()
        if len(sizes) < 3 or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in sizes):
            raise ConfigError(f"LUTMLP sizes: need >= 3 positive int widths (input, hidden..., classes), got {sizes!r}")
        if lut_k is not None:
            check_k(lut_k)
        self.sizes, self.lut_k, self.levels = tuple(sizes), lut_k, levels
        layers: list[nn.Module] = [BinaryLinear(sizes[0], sizes[1])]
        for n, (a, b) in enumerate(itertools.pairwise(sizes[1:]), start=1):
            layers.append(BinaryLinear(a, b) if lut_k is None else LUTLayer(a, b, lut_k, levels, seed=seed + n))
        self.layers = nn.ModuleList(layers)
        self.norms = nn.ModuleList(nn.BatchNorm1d(s, momentum=BN_MOMENTUM) for s in sizes[1:])
        self.signs = nn.ModuleList(ResidualSign(levels) for _ in sizes[1:-1])

    def forward(self, x: Tensor) -> Tensor:
        x = x.flatten(1)
        for n, (layer, norm) in enumerate(zip(self.layers, self.norms)):
            x = norm(layer(x))
            if n < len(self.signs):
                x = self.signs[n](x)
        return x

    def targets(self) -> list[nn.Module]:
        """The layers after the first: the magnitude-pruning and LUT targets."""
        return list(self.layers[1:])


def set_binary(model: LUTMLP, binary: bool) -> None:
    """Binarised (STE) or full-precision (clipped) coefficients in every layer."""
    for layer in model.layers:
        layer.binary = binary


@torch.no_grad()
def magnitude_prune_(model: LUTMLP, theta: float) -> None:
    """Prune each target layer's connections to node sparsity ``theta`` by latent-weight magnitude (public code's
    ``bnn_pruning``: the ``theta`` fraction with the smallest ``|w|`` get node mask 0)."""
    if isinstance(theta, bool) or not isinstance(theta, (int, float)) or not 0 <= theta < 1:
        raise ConfigError(f"BNN pruning theta: must be a number in [0, 1) (fraction of connections pruned), "
                          f"got {theta!r}")
    for layer in model.targets():
        if not isinstance(layer, BinaryLinear):
            raise ConfigError("magnitude_prune_: prune the BNN before logic expansion (a LUT layer was found)")
        n = layer.weight.numel()
        order = layer.weight.abs().flatten().argsort(stable=True)
        mask = torch.ones(n)
        mask[order[: round(theta * n)]] = 0
        layer.node_mask.copy_(mask.view_as(layer.node_mask))


@torch.no_grad()
def expand(bnn: LUTMLP, k: int, seed: int = 0) -> LUTMLP:
    """Logic expansion: a K-LUT copy of ``bnn`` (first layer, norms and signs copied; LUT tables from the BNN's
    target layers, :meth:`LUTLayer.expand_from`), computing the same function at init."""
    lut = LUTMLP(bnn.sizes, lut_k=k, levels=bnn.levels, seed=seed).to(bnn.layers[0].weight.dtype)
    lut.layers[0].load_state_dict(bnn.layers[0].state_dict())
    lut.norms.load_state_dict(bnn.norms.state_dict())
    lut.signs.load_state_dict(bnn.signs.state_dict())
    for dst, src in zip(lut.targets(), bnn.targets()):
        dst.expand_from(src)
    set_binary(lut, bnn.layers[0].binary)
    return lut


def shrink_model_(model: LUTMLP, delta: float) -> list[dict]:
    """Shrink every LUT layer of ``model`` to input sparsity ``delta`` (global ranking within each layer)."""
    check_delta(delta)
    return [shrink_(layer, delta) for layer in model.targets() if isinstance(layer, LUTLayer)]


def model_stats(model: LUTMLP) -> dict:
    """LUT count, learned-K histogram and parameter count summed over the LUT layers; for a BNN, the number of
    unpruned connections (one XNOR each, 1 bit each) as ``xnors``."""
    if model.lut_k is None:
        return {"xnors": sum(int(layer.node_mask.sum()) for layer in model.targets()),
                "params": sum(int(layer.node_mask.sum()) for layer in model.targets())}
    per = [layer_stats(layer) for layer in model.targets()]
    hist = {k: sum(p["k_hist"][k] for p in per) for k in per[0]["k_hist"]}
    total = {key: sum(p[key] for p in per) for key in ("luts", "params", "inputs", "anchor_kept", "k1_anchor_only")}
    return {**total, "k_hist": hist, "layers": per}


@dataclasses.dataclass(frozen=True)
class Schedule:
    """Optimizer steps per stage (the public code counts epochs: 200 BNN, 50 pruned retrain, 50 FP LUT, 20 per
    shrink retrain, 200 binarised LUT, batch 100)."""

    bnn: int = 1000
    prune_retrain: int = 200
    lut_fp: int = 300
    shrink_retrain: int = 100
    lut_bin: int = 300

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ConfigError(f"Schedule {f.name}: must be an int >= 0 (optimizer steps), got {v!r}")


def train_steps(model: nn.Module, data, steps: int, *, lr: float, batch_size: int, seed: int = 0,
                log: Callable[[str], None] | None = None, label: str = "") -> dict:
    """``steps`` Adam steps (cosine from ``lr``) of cross-entropy on ``data``; batches by ``(seed, epoch)``."""
    if steps == 0:
        return {"steps": 0, "seconds": 0.0, "final_loss": None}
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    model.train()
    step, running, t0 = 0, None, time.perf_counter()
    per_epoch = data.steps_per_epoch(batch_size)
    while step < steps:
        for x, y in data.batches(batch_size, seed=seed, epoch=step // per_epoch):
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            value = loss.item()
            running = value if running is None else 0.98 * running + 0.02 * value
            if log is not None and (step % 100 == 0 or step == steps):
                log(f"{label} step {step}/{steps} loss {running:.4f} ({time.perf_counter() - t0:.0f}s)")
            if step >= steps:
                break
    return {"steps": step, "seconds": round(time.perf_counter() - t0, 1), "final_loss": running}


@torch.no_grad()
def evaluate(model: nn.Module, data, batch_size: int = 500) -> float:
    """Top-1 accuracy on every sample of ``data`` (BatchNorm in eval mode)."""
    model.eval()
    hit = total = 0
    for x, y in data.batches(batch_size, shuffle=False, drop_last=False):
        hit += int((model(x).argmax(1) == y).sum())
        total += len(y)
    return hit / total
