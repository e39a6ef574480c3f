"""The budget planner: what to train, and how, so that a training step fits a memory budget.

Following the Tiny Training Engine (Lin et al., NeurIPS 2022, arXiv:2206.15472, §2.2; specs/algorithms_A.md
§6.3-6.4):

1. **Contribution analysis** (measured, cached): short fine-tuning runs on the training data give the accuracy
   gain of updating the biases of the last ``k`` convs over classifier-only training (``bias[k]``, for a grid
   of k), and the extra gain of also updating conv ``i``'s weights for a ratio ``r`` of its input channels
   (``weights[i][r]``, on top of the biases of the last ``k_ref`` convs, the same baseline for every i),
   scored on a held-out fifth of the training split.
2. **Memory** of each choice from the cost model (:mod:`edgetrain.cost`): ``bias_memory[k]`` is the estimated
   trainable state + saved activations of ``SparseUpdate(bias_last_k=k)``; a weight slice adds its weights,
   gradients and optimizer state and its kept input channels (closed form, tested against the estimate).
3. **Search**: maximise ``bias[k] + Σ_i weights[i][r_i]`` subject to ``bias_memory[k] + Σ_i m(i, r_i) ≤
   budget``. The gains are additive by assumption (as in TTE), so for each k this is a multiple-choice knapsack,
   solved exactly by dynamic programming over Pareto-optimal (bytes, gain) states. TTE used evolutionary
   search on the same additive objective; the DP finds its exact optimum with no population or mutation
   settings to tune, and the space (≤ 5 ratios for a few dozen convs) is small enough for it.

The budget counts trainable weights, their gradients and optimizer state, and the activations saved for
backward (what grows with training); frozen weights (flash on an MCU) and the forward's transient buffers
are reported beside it, not inside it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edgetrain.cost import OPT_COPIES, CostTable, PeakEstimate, estimate
from edgetrain.devices import format_size
from edgetrain.errors import BudgetError, ConfigError
from edgetrain.recipe import Execution, Recipe
from edgetrain.techniques.sparse_update import SparseUpdate, n_keep

RATIOS = (0.125, 0.25, 0.5, 1.0)  # TTE's weight_update_ratio choices (specs §6.4: r in {0, 1/8, 1/4, 1/2, 1})
ANALYSIS_VERSION = 2  # 2: scored on a held-out part of the training split


# --------------------------------------------------------------------------------------------- contribution
@dataclasses.dataclass
class Contribution:
    """Measured accuracy gains (fractions, e.g. 0.012 = +1.2 points)."""

    baseline: float  # classifier-only accuracy
    bias: dict[int, float]  # k -> gain of biases of the last k convs (+ classifier) over classifier-only
    weights: dict[str, dict[float, float]]  # conv -> ratio -> extra gain over bias_last_k = k_ref
    k_ref: int
    meta: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {"baseline": self.baseline, "bias": {str(k): v for k, v in self.bias.items()},
                "weights": {c: {str(r): g for r, g in d.items()} for c, d in self.weights.items()},
                "k_ref": self.k_ref, "meta": self.meta}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Contribution:
        return cls(d["baseline"], {int(k): v for k, v in d["bias"].items()},
                   {c: {float(r): g for r, g in w.items()} for c, w in d["weights"].items()}, d["k_ref"], d["meta"])


def structure_of(model: nn.Module, input_shape: tuple[int, ...] | None = None):  # noqa: ANN201
    """The model's structure (:mod:`edgetrain.structure`), traced on a zero input of ``input_shape`` (default: the
    model's own input size)."""
    from edgetrain.inputs import example_for
    from edgetrain.structure import analyze

    example = torch.zeros((2, *input_shape)) if input_shape is not None else example_for(model)
    if example is None:
        raise ConfigError(f"plan: give the input shape of {type(model).__name__}")
    return analyze(model, example)


def conv_names(model: nn.Module, input_shape: tuple[int, ...] | None = None) -> list[str]:
    """The layers sparse update counts (:func:`edgetrain.techniques.sparse_update.layers`), in call order."""
    from edgetrain.techniques.sparse_update import layers

    return layers(structure_of(model, input_shape))


def default_grid(n_convs: int) -> list[int]:
    """k values for the bias analysis: 0, then roughly doubling up to all convs."""
    ks, k = [0], 1
    while k < n_convs:
        ks.append(k)
        k = k * 2 if k < 4 else int(k * 1.5)
    return sorted(set(ks + [n_convs]))


def weight_candidates(model: nn.Module, last: int, input_shape: tuple[int, ...] | None = None) -> list[str]:
    """Convs whose weights the analysis tries: the non-depthwise convs among the last ``last`` (TTE found
    depthwise and early layers contribute about nothing, specs §6.4)."""
    modules = dict(model.named_modules())
    convs = conv_names(model, input_shape)[-last:]
    return [c for c in convs if getattr(modules[c], "groups", 1) == 1]


def holdout_split(data, fraction: float = 0.2, max_holdout: int = 2000, seed: int = 0):
    """(fit, holdout): a fixed random ``fraction`` of the training split (at most ``max_holdout`` samples) is held
    out to score the analysis runs, so that plans are never chosen on the test split."""
    n = len(data)
    k = max(1, min(max_holdout, int(n * fraction)))
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 7919))
    hold, fit = order[:k].sort().values, order[k:].sort().values

    def part(index: torch.Tensor, tag: str):
        return dataclasses.replace(data, images=data.images[index], labels=data.labels[index],
                                   name=f"{data.name}[{tag} {len(index)}]")

    return part(fit, "analysis-fit"), part(hold, "analysis-holdout")


def cache_dir() -> Path:
    return Path(os.environ.get("EDGETRAIN_CACHE", Path.home() / ".cache" / "edgetrain")) / "contribution"


def analyze(workload, *, steps: int = 100, lr: float = 0.01, ks: list[int] | None = None, weight_last: int = 12,
            ratios: tuple[float, ...] = (0.25, 0.5, 1.0), threads: int = 2, progress: bool = True,
            cache: Path | None = None) -> Contribution:
    """Run (or load from the cache) the contribution analysis for ``workload`` (an :class:`edgetrain.Workload`).

    Each run fine-tunes a fresh copy of the model for ``steps`` SGD steps (momentum 0.9, cosine, ``lr``) under
    one sparse-update scheme on 80% of the training split and is scored on the held-out 20% (at most 2,000
    samples; the test split is never used). Runs are cached one by one, so an
    interrupted analysis resumes and a repeated one is instant.
    """
    from tqdm import tqdm

    from edgetrain.train import TrainConfig, evaluate, train

    torch.set_num_threads(threads)
    train_data, eval_data = holdout_split(workload.load_data("train"), seed=workload.seed)
    probe = workload.build_model(train_data.num_classes)
    shape = None if workload.images() else tuple(train_data.images.shape[1:])  # images: the model's own size
    convs = conv_names(probe, shape)
    ks = ks or default_grid(len(convs))
    if any(k < 0 or k > len(convs) for k in ks):
        raise ConfigError(f"analysis: bias k values must be in [0, {len(convs)}], got {ks}")
    cands = weight_candidates(probe, weight_last, shape)
    k_ref = max(len(convs) - convs.index(cands[0]), 1) if cands else 0
    # only what the runs use: the resolved data name (not the workload's ``data=None``), so that the same data hits
    # the same cache; not the test split (eval_subset) nor the workload's batch size (the runs train at the
    # TrainConfig default and score on the held-out part of the training split)
    used = {k: v for k, v in dataclasses.asdict(workload).items() if k not in ("eval_subset", "batch_size")
            and not (k == "data_args" and not v)}  # no data_args: the key of the caches written before they existed
    key = {"version": ANALYSIS_VERSION, "workload": {**used, "data": train_data.name}, "steps": steps, "lr": lr}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = (cache or cache_dir()) / f"{workload.model}-{digest}.json"
    runs: dict[str, float] = {}
    if path.exists():
        try:
            runs = json.loads(path.read_text())["runs"]
        except (ValueError, KeyError):
            runs = {}  # a damaged cache is recomputed, not trusted
    todo = [SparseUpdate(bias_last_k=k) for k in sorted(set(ks) | {k_ref})]
    todo += [SparseUpdate(bias_last_k=k_ref, weights={c: r}) for c in cands for r in ratios]
    cfg = TrainConfig(steps=steps, lr=lr, optimizer="sgd", momentum=0.9, schedule="cosine", threads=threads)
    tty = sys.stderr.isatty()  # a bar in a terminal; in a log, one line per finished run
    bar = tqdm(todo, desc="contribution analysis", disable=not progress or not tty, unit="run")
    t0 = time.perf_counter()
    for i, su in enumerate(bar, 1):
        name = json.dumps(su.to_dict(), sort_keys=True)
        if name in runs:
            continue
        model = workload.build_model(train_data.num_classes)
        t_run = time.perf_counter()
        train(model, train_data, None, cfg, recipe=su, progress=False)
        runs[name] = evaluate(model, eval_data)
        if progress and not tty:
            print(f"contribution analysis: run {i}/{len(todo)} (biases of the last {su.bias_last_k} convs, weights {su.weights or 'none'}): {100 * runs[name]:.1f}% "
                  f"({time.perf_counter() - t_run:.0f} s)", file=sys.stderr, flush=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"key": key, "runs": runs}, indent=1))
        tmp.replace(path)

    def acc(su: SparseUpdate) -> float:
        return runs[json.dumps(su.to_dict(), sort_keys=True)]

    base = acc(SparseUpdate(bias_last_k=0))
    ref = acc(SparseUpdate(bias_last_k=k_ref))
    return Contribution(
        baseline=base,
        bias={k: acc(SparseUpdate(bias_last_k=k)) - base for k in sorted(set(ks) | {k_ref})},
        weights={c: {r: acc(SparseUpdate(bias_last_k=k_ref, weights={c: r})) - ref for r in ratios} for c in cands},
        k_ref=k_ref,
        meta={"cache": str(path), "steps": steps, "lr": lr, "runs": len(runs),
              "seconds": round(time.perf_counter() - t0, 1), "fit_size": len(train_data),
              "holdout_size": len(eval_data)},
    )


# --------------------------------------------------------------------------------------------- memory
def weight_memory(model: nn.Module, table: CostTable, conv: str, ratio: float, precision: str = "fp32") -> int:
    """Extra trainable state + saved bytes of updating ``ratio`` of ``conv``'s input channels (closed form).

    ``precision="int8"`` (ratio 1 only): the conv keeps its input as int8 (:class:`~edgetrain.Int8`) plus two
    scalars; its fp32 master weight, gradient and optimizer state are as in fp32.
    """
    m = dict(model.named_modules())[conv]
    in_shape = table.shapes[conv][0]
    if ratio >= 1:
        params, saved = m.weight.numel(), math.prod(in_shape)
    else:
        keep = n_keep(m, ratio)
        per_channel = m.weight[:, 0].numel() if getattr(m, "groups", 1) == 1 else m.weight[0].numel()
        params, saved = keep * per_channel, keep * math.prod(in_shape[1:])
    state = params * 4 * (2 + OPT_COPIES[table.optimizer])
    if precision == "int8":
        return state + saved * table.batch_size + 8
    return state + saved * 4 * table.batch_size


# --------------------------------------------------------------------------------------------- search
@dataclasses.dataclass
class Plan:
    recipe: Recipe
    budget: int
    predicted: CostTable
    gain: float  # predicted accuracy gain over classifier-only (additive model)
    bias_last_k: int
    weights: dict[str, float]
    contribution: Contribution
    peak: PeakEstimate | None = None  # the step's predicted peak (the budget bounds its RAM part)
    flash: int | None = None  # the device's flash for frozen weights (None: frozen weights are RAM)

    @property
    def predicted_bytes(self) -> int:
        """What the budget bounds: the step's peak RAM (frozen weights in flash when they fit it)."""
        return ram_of(self.peak, self.flash) if self.peak is not None else self.predicted.train_bytes


def ram_of(peak: PeakEstimate, flash: int | None) -> int:
    """The RAM part of a predicted peak: frozen weights live in ``flash`` when the device has it and they fit."""
    return peak.ram(flash=flash is not None and peak.split.get("weights_frozen", 0) <= flash)


def search(contribution: Contribution, bias_memory: dict[int, int], weight_cost: dict[tuple[str, float], int],
           convs: list[str], budget: int) -> tuple[int, dict[str, float], float]:
    """The (k, {conv: ratio}, gain) maximising the additive gain within ``budget``.

    For each k: a multiple-choice knapsack (one ratio or none per conv of the region), solved exactly by dynamic
    programming over the Pareto front of (bytes, gain) states: a state survives only if no other state has
    fewer or equal bytes and a larger or equal gain. Exact in bytes (no rounding), and small here: a few dozen
    convs with at most 5 choices each.
    """
    best: tuple[float, int, int, dict[str, float]] | None = None
    for k, mem_k in sorted(bias_memory.items()):
        cap = budget - mem_k
        if cap < 0:
            continue
        region = set(convs[len(convs) - k:]) if k else set()
        front: list[tuple[int, float, dict[str, float]]] = [(0, 0.0, {})]
        for conv, options in contribution.weights.items():
            if conv not in region:
                continue
            grown = list(front)
            for r, g in options.items():
                cost = weight_cost[(conv, r)]
                grown += [(b + cost, v + g, {**ch, conv: r}) for b, v, ch in front if g > 0 and b + cost <= cap]
            grown.sort(key=lambda t: (t[0], -t[1]))
            front, top = [], float("-inf")
            for state in grown:
                if state[1] > top:
                    front.append(state)
                    top = state[1]
        used, gain, choice = front[-1]  # the front's last state has the largest gain
        total = contribution.bias.get(k, 0.0) + gain
        if best is None or total > best[0] + 1e-12 or (abs(total - best[0]) <= 1e-12 and mem_k + used < best[1]):
            best = (total, mem_k + used, k, choice)
    if best is None:
        raise BudgetError("no plan fits")  # the caller turns this into the one-line message with the minimum
    return best[2], best[3], best[0]


PRECISIONS = ("fp32", "int8")
FROZEN = ("fp32", "int8")
#: PatchExecute (blocks, patches) settings tried, in order, when no execution fits without it: the configurations
#: measured in docs/techniques.md (mcunet_tiny 64x64 batch 1, classifier only: (4, 3) gives the smallest peak)
PATCHES = ((4, 2), (4, 3), (6, 3))


def executions(batch_size: int) -> list[Execution]:
    """The execution settings the planner tries, cheapest first: the fused optimizer step (no cost, always), then
    micro-batches of halving size (each costs step time, none changes what is computed: the planned BatchNorms are
    frozen)."""
    out = [Execution(fused_step=True, bn="frozen")]
    m = 2
    while m <= batch_size:
        out.append(Execution(micro_batches=m, fused_step=True, bn="frozen"))
        m *= 2
    return out


def plan(model: nn.Module, contribution: Contribution, budget: int, input_shape: tuple[int, ...], batch_size: int,
         optimizer: str = "sgd_momentum", name: str | None = None, precision: str = "fp32", *,
         flash: int | None = None, frozen: str = "fp32", example: Any = None) -> Plan:
    """Choose the sparse-update scheme with the largest measured gain, and how to run it, so that the step's
    predicted peak RAM fits ``budget``.

    The budget is the step's peak RAM (:func:`edgetrain.cost.predict_peak`: weights, gradients, optimizer state,
    saved activations, the batch, technique state and transient buffers), less the frozen weights when the device
    has ``flash`` bytes for them and they fit. Schemes are searched as before (the exact knapsack over the additive
    gains, on their trainable state + saved activations); each candidate is then run as a recipe with the frozen
    part as inference (:class:`~edgetrain.techniques.FrozenInference`), frozen weights as ``frozen`` (``int8``:
    :class:`~edgetrain.techniques.Int8Frozen`), the fused optimizer step, then the frozen first blocks in as few
    batch chunks as fit (:class:`~edgetrain.techniques.FrozenChunks`, exact), then as few micro-batches as fit, and only
    if nothing fits so, the first frozen blocks in patches (:class:`~edgetrain.techniques.PatchExecute`, the
    settings of :data:`PATCHES`, where the model and scheme allow it); its peak
    is predicted, and an overshoot narrows the search. ``precision="int8"`` trains the chosen weights as int8 with
    QAS (whole weights only; the gains are the fp32 analysis's: on T1, int8 with QAS matched fp32, 88.6% vs 88.5%,
    docs/planner.md). An infeasible budget names the smallest reachable peak and what dominates it, in one line.
    """
    from edgetrain.techniques import FrozenChunks, FrozenInference, Int8, Int8Frozen, PatchExecute

    if precision not in PRECISIONS:
        raise ConfigError(f"plan: precision must be one of {PRECISIONS}, got {precision!r}")
    if frozen not in FROZEN:
        raise ConfigError(f"plan: frozen must be one of {FROZEN}, got {frozen!r}")
    if precision == "int8":
        contribution = dataclasses.replace(contribution, weights={c: {r: g for r, g in d.items() if r >= 1}
                                                                  for c, d in contribution.weights.items()})
    if example is None:
        example = torch.zeros((2, *input_shape))
    convs = conv_names(model, input_shape)
    base = estimate(model, None, input_shape, batch_size, optimizer)  # shapes of every conv
    bias_memory = {k: estimate(model, SparseUpdate(bias_last_k=k), input_shape, batch_size, optimizer).train_bytes
                   for k in contribution.bias}
    weight_cost = {(c, r): weight_memory(model, base, c, r, precision) for c, d in contribution.weights.items()
                   for r in d}
    suffix = "-int8" if precision == "int8" else ""
    name = name or f"plan-{format_size(budget).replace(' ', '')}{suffix}"
    def techniques_for(cfg: SparseUpdate, patch: tuple[int, int] | None) -> list | None:
        """The scheme with the frozen part as inference (and in patches); None when ``patch`` does not apply."""
        from edgetrain.apply import apply_

        techniques = [cfg] + ([Int8(qas=True)] if precision == "int8" and cfg.weights else [])
        for extra in [FrozenInference()] + ([Int8Frozen()] if frozen == "int8" else []):
            try:  # nothing frozen to fold or quantise for this scheme (e.g. every BatchNorm trains): left out
                apply_(model, [*techniques, extra], example).remove()
                techniques.append(extra)
            except ConfigError:
                pass
        if patch is not None:
            extra = PatchExecute(blocks=patch[0], patches=patch[1])
            try:  # refused: blocks that train, a model it cannot tile (docs/techniques.md)
                apply_(model, [*techniques, extra], example).remove()
            except ConfigError:
                return None
            techniques.append(extra)
        return techniques

    def chunked(techniques: list) -> list[list]:
        """The scheme with its frozen first blocks in 2, 4, ... batch chunks (exact), where FrozenChunks applies."""
        from edgetrain.apply import apply_

        sizes = [c for c in (2 ** i for i in range(1, 12)) if c <= batch_size]
        try:  # refused: nothing frozen before the first trained op, batch 1
            if not sizes:
                return []
            apply_(model, [*techniques, FrozenChunks(chunks=2)], example).remove()
        except ConfigError:
            return []
        return [[*techniques, FrozenChunks(chunks=c)] for c in sizes]

    def run(cfg: SparseUpdate) -> tuple[Recipe, CostTable, int]:
        """The cheapest execution that fits (patch execution only when none fits without it), or the one with the
        smallest peak RAM: the fused step, then the frozen first blocks in batch chunks, then micro-batches."""
        best = None
        for patch in (None, *PATCHES):
            techniques = techniques_for(cfg, patch)
            if techniques is None:
                continue
            fused, *micro = executions(batch_size)
            tries = [(techniques, fused)] + [(t, fused) for t in (chunked(techniques) if patch is None else [])]
            for t, ex in tries + [(techniques, ex) for ex in micro]:
                recipe = Recipe(t, name=name, execution=ex)
                table = estimate(model, recipe, batch_size=batch_size, optimizer=optimizer, example=example,
                                 peak=True)
                ram = ram_of(table.peak, flash)
                if ram <= budget:
                    return recipe, table, ram
                if best is None or ram < best[2]:
                    best = (recipe, table, ram)
        return best

    smallest = run(SparseUpdate(bias_last_k=0))
    if smallest[2] > budget:
        split = smallest[1].peak.split
        flash_note = " (frozen weights in flash)" if flash is not None and split.get("weights_frozen", 0) <= flash \
            else ""
        top = max((c for c in split if not (flash_note and c == "weights_frozen")), key=split.get)
        m = smallest[0].execution.micro_batches
        tiles = next((f", {t.patches}x{t.patches} patches of the first {t.blocks} blocks"
                      for t in smallest[0].techniques if isinstance(t, PatchExecute)), "")
        tiles += next((f", frozen first blocks in {t.chunks} batch chunks"
                       for t in smallest[0].techniques if isinstance(t, FrozenChunks)), "")
        raise BudgetError(f"budget {format_size(budget)} ({budget} B) is infeasible: the smallest reachable peak is "
                          f"{format_size(smallest[2])} ({smallest[2]} B, classifier only, "
                          f"{m} micro-batch{'es' if m > 1 else ''}{tiles}, fused optimizer step{flash_note}, "
                          f"batch {batch_size}); its largest part is {top.replace('_', ' ')}: {format_size(split[top])}")
    overhead = smallest[2] - smallest[1].train_bytes  # what the peak holds beyond trainable state + saved
    target = budget - max(overhead, 0)
    for _ in range(6):  # the knapsack is on trainable state + saved bytes: check each scheme's peak and narrow
        k, weights, gain = search(contribution, bias_memory, weight_cost, convs, max(target, min(bias_memory.values())))
        cfg = SparseUpdate(bias_last_k=k, weights=dict(sorted(weights.items())))
        recipe, table, ram = run(cfg)
        if ram <= budget:
            return Plan(recipe, budget, table, gain, k, cfg.weights, contribution, table.peak, flash)
        target -= ram - budget
    recipe, table, ram = smallest
    return Plan(recipe, budget, table, contribution.bias.get(0, 0.0), 0, {}, contribution, table.peak, flash)


def format_plan(p: Plan, model: nn.Module) -> str:
    """Per-layer table (what is updated, precision, bytes) and the predicted total."""
    from edgetrain.apply import under
    from edgetrain.techniques.sparse_update import bias_of, region

    t = p.predicted
    b = t.batch_size
    opt = OPT_COPIES[t.optimizer]
    cfg = p.recipe.techniques[0]
    structure = structure_of(model, t.input_shape)
    bias_rows = {}  # module holding the bias -> the layer it biases
    for layer in region(structure, cfg):
        bias = bias_of(structure, layer)
        if bias is not None:
            bias_rows[bias.rpartition(".")[0]] = layer
    head = structure.classifier
    lines = [f"{'layer':30s} {'update':34s} {'precision':9s} {'trainable+grad+opt':>18s} {'saved':>11s}",
             "-" * 106]
    for name, row in t.layers.items():
        state = row.trainable_bytes * (2 + opt)
        saved = row.saved(b)
        if not state and not saved:
            continue
        if under(name, [head]):
            what = "classifier"
        elif name in cfg.weights:
            what = f"weight {cfg.weights[name]:g} of C_in"
        elif name in bias_rows:
            what = "bias" if bias_rows[name] == name else f"bias (of {bias_rows[name]})"
        elif name == "(loss)":
            what = "loss"
        else:
            what = "1-bit mask" if row.masked else "(gradient path)"
        prec = "int8" if name in cfg.weights and "int8" in p.recipe.technique_names else "fp32"
        lines.append(f"{name:30.30s} {what:34.34s} {prec:9s} {format_size(state):>18s} {format_size(saved):>11s}")
    lines.append("-" * 106)
    if p.peak is not None:
        ex = p.recipe.execution
        lines.append(f"predicted peak RAM: {format_size(p.predicted_bytes)} of {format_size(p.budget)} budget "
                     f"(the whole step's peak {format_size(p.peak.bytes)}, in the {p.peak.phase}"
                     + (f"; frozen weights {format_size(p.peak.split.get('weights_frozen', 0))} in flash"
                        if p.predicted_bytes < p.peak.bytes else "") + ")")
        parts = ", ".join(f"{k.replace('_', ' ')} {format_size(v)}" for k, v in p.peak.split.items() if v)
        lines.append(f"  it holds: {parts}")
        lines.append(f"  run as: {', '.join(t.name for t in p.recipe.techniques)}; {ex.micro_batches} micro-batch"
                     f"{'es' if ex.micro_batches > 1 else ''} of {b // ex.micro_batches}, "
                     f"{'fused' if ex.fused_step else 'ordinary'} optimizer step, BatchNorm {ex.bn}")
    lines.append(f"trainable state + saved activations: {format_size(t.train_bytes)} (trainable weights "
                 f"{format_size(t.grad_bytes)}, gradients {format_size(t.grad_bytes)}, optimizer "
                 f"{format_size(t.optimizer_bytes)}, saved activations {format_size(t.saved_bytes)}); batch {b}")
    lines.append(f"scheme: biases of the last {p.bias_last_k} layers, weights {p.weights or 'none'}, classifier; "
                 f"predicted gain over classifier-only {100 * p.gain:+.1f} points "
                 f"(classifier-only {100 * p.contribution.baseline:.1f}% after "
                 f"{p.contribution.meta.get('steps')} analysis steps)")
    return "\n".join(lines)
