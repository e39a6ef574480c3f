"""T2: accuracy under NVM device variation (expected and worst case), plain vs variation-aware training, Fashion-MNIST.

Yan, Hu, Shi, *Computing-In-Memory Neural Network Accelerators for Safety-Critical Systems: Can Small Device
Variations Be Disastrous?*, ICCAD 2022, arXiv:2207.07626; journal version with A-TRICE, arXiv:2312.06137. Models and
constants: :mod:`edgetrain.hardware.variation` and docs/nvm_variation.md.

An MLP (784-h-h-10, ReLU; the crossbar's natural workload, no BatchNorm) is trained from scratch, from the same
seeded initialisation and batch order, with AdamW (lr 1e-3, torch's weight decay 0.01), cosine schedule, batch 128,
``--steps`` steps:

* ``plain``: nominal weights (quantized with a straight-through gradient if ``--levels``; once; evaluated at every
  sigma);
* ``noise`` at each sigma: a fresh chip (D2D draw, and C2C if ``--c2c``) in every forward (noise injection);
* ``adversarial`` at each sigma: ``--adv-steps`` PGD steps on the batch from a sampled chip within ``--k`` sigmas,
  then the step at the perturbation found.

Each model at each of its sigmas: clean accuracy (the nominal weights, quantized to ``--levels`` if given), the mean accuracy over ``--chips`` chips with a
95% Student-t interval and the worst chip (all on the 10,000 test images), and the worst case by PGD within
``--k`` sigmas per weight (``--pgd-steps`` steps maximizing the cross-entropy on the first ``--search`` test images;
the perturbation is scored on all 10,000). Writes ``<out>/fashion-variation-<name>.{json,md}``.

    OMP_NUM_THREADS=1 python benchmarks/hardware/variation.py --out benchmarks/results --name 2026-12-07
"""

from __future__ import annotations

import argparse
import copy
import subprocess
import time

import torch
from torch import nn

import edgetrain as et
from edgetrain import smoke
from edgetrain.bench import provenance, result_paths
from edgetrain.data import load_t2
from edgetrain.hardware.variation import Variation, accuracy, expected_accuracy, nominal, variation_step, worst_case
from edgetrain.report import run_main, write_report
from edgetrain.train import TrainConfig, lr_at

CLAIM = ("Yan et al. 2022/2023: even small device variations can drop the worst-case accuracy drastically, far "
         "below the average; methods for the average barely help the worst case; A-TRICE (adversarial + "
         "right-censored noise-injection training) improves the worst-case accuracy by up to 33% (abstracts; the "
         "papers' tables were not retrieved)")


def mlp(hidden: int = 256, num_classes: int = 10) -> nn.Sequential:
    """784 -> hidden -> hidden -> classes, ReLU."""
    return nn.Sequential(nn.Flatten(), nn.Linear(784, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, num_classes))  # (N, classes)


def train(model: nn.Module, data, variation: Variation | None, mode: str, a, label: str) -> dict:
    """``a.steps`` AdamW steps (cosine) of :func:`variation_step` in ``mode``; the same batch order for every mode."""
    cfg = TrainConfig(steps=a.steps, batch_size=a.batch_size, optimizer="adamw", lr=a.lr, schedule="cosine")
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr)
    gen = torch.Generator().manual_seed(1)  # the chips drawn during training
    var = variation or Variation(d2d=1.0, levels=a.levels)  # plain mode reads no sigma, only the levels
    step, t0, running = 0, time.perf_counter(), None
    while step < a.steps:
        for x, y in data.batches(a.batch_size, seed=0, epoch=step // data.steps_per_epoch(a.batch_size)):
            for g in opt.param_groups:
                g["lr"] = lr_at(step, cfg, a.steps)
            loss = variation_step(model, x, y, opt, var, mode, generator=gen, k=a.k, adv_steps=a.adv_steps)
            step += 1
            running = loss if running is None else 0.98 * running + 0.02 * loss
            if step % 500 == 0 or step == a.steps:
                print(f"[variation] {label} step {step}/{a.steps} loss {running:.4f} "
                      f"({time.perf_counter() - t0:.0f}s)", flush=True)
            if step >= a.steps:
                break
    return {"train_seconds": round(time.perf_counter() - t0, 1), "steps": step, "final_train_loss": running}


def evaluate(model: nn.Module, test: list, search: list, variation: Variation, a) -> dict:
    """Clean, Monte Carlo and worst-case accuracy of ``model`` under ``variation``."""
    t0 = time.perf_counter()
    mc = expected_accuracy(model, test, variation, chips=a.chips, seed=1000)
    wc = worst_case(model, search, variation, k=a.k, steps=a.pgd_steps, evaluate=test, seed=0)
    strong = worst_case(model, search, variation, k=a.k, steps=a.pgd_strong, evaluate=test, seed=1) \
        if a.pgd_strong else None
    return {"d2d": variation.d2d, "c2c": variation.c2c, "levels": variation.levels,
            "clean": accuracy(model, test, nominal(model, variation)), "mean": mc["mean"], "ci_half_width": mc["ci_half_width"],
            "worst_random": mc["worst"], "best_random": mc["best"], "per_chip": mc["per_chip"],
            "worst_case": wc["accuracy"], "worst_case_search_accuracy": wc["search_accuracy"],
            "pgd_curve": wc["curve"], "worst_case_strong": None if strong is None else strong["accuracy"],
            "pgd_strong_curve": None if strong is None else strong["curve"], "eval_seconds": round(time.perf_counter() - t0, 1)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--name", required=True)
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--sigmas", default="0.01,0.03,0.1", help="D2D log-normal sigmas, comma-separated")
    ap.add_argument("--c2c", type=float, default=0.0, help="C2C read-noise sigma (fraction of max |w|)")
    ap.add_argument("--levels", type=int, default=None, help="conductance levels per device (default analog)")
    ap.add_argument("--k", type=float, default=3.0, help="worst-case bound in sigmas per weight")
    ap.add_argument("--chips", type=int, default=100)
    ap.add_argument("--pgd-steps", type=int, default=30)
    ap.add_argument("--pgd-strong", type=int, default=100, help="a second, longer search from another start (0: off)")
    ap.add_argument("--adv-steps", type=int, default=1)
    ap.add_argument("--search", type=int, default=10000, help="test images the worst-case search uses")
    ap.add_argument("--modes", default="plain,noise,adversarial")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--force", action="store_true")
    a = ap.parse_args(argv)
    a.steps = smoke.cap(a.steps, smoke.STEPS)  # EDGETRAIN_SMOKE=1: a command check, not a result
    a.batch_size = smoke.cap(a.batch_size, smoke.BATCH)
    a.chips, a.pgd_steps, a.pgd_strong = smoke.cap(a.chips, 2), smoke.cap(a.pgd_steps, 2), smoke.cap(a.pgd_strong, 2)
    modes = a.modes.split(",")
    bad = sorted(set(modes) - {"plain", "noise", "adversarial"})
    if bad or not modes:
        raise et.ConfigError(f"--modes: unknown mode(s) {bad}; allowed: plain, noise, adversarial")
    try:
        sigmas = [float(s) for s in a.sigmas.split(",")]
    except ValueError:
        raise et.ConfigError(f"--sigmas must be comma-separated numbers, got {a.sigmas!r}") from None
    variations = [Variation(d2d=s, c2c=a.c2c, levels=a.levels) for s in sigmas]  # refuses bad sigmas up front
    if a.search < 1:
        raise et.ConfigError(f"--search must be >= 1 test image, got {a.search}")
    paths = result_paths(a.out, f"fashion-variation-{a.name}", force=a.force)
    torch.set_num_threads(a.threads)
    prov = provenance(a.threads)
    train_data, test_data = load_t2()
    test = list(test_data.batches(1000, shuffle=False, drop_last=False))
    x_all, y_all = torch.cat([x for x, _ in test]), torch.cat([y for _, y in test])
    search = [(x_all[i:i + 1000], y_all[i:i + 1000]) for i in range(0, min(a.search, len(y_all)), 1000)]
    torch.manual_seed(0)
    base = mlp(a.hidden)
    rows = []
    for mode in modes:
        for var in ([None] if mode == "plain" else variations):
            label = mode if var is None else f"{mode}@{var.d2d:g}"
            model = copy.deepcopy(base)
            res = train(model, train_data, var, mode, a, label)
            for ev in (variations if var is None else [var]):
                r = evaluate(model, test, search, ev, a)
                print(f"[variation] {label} at d2d {ev.d2d:g}: clean {100 * r['clean']:.2f} mean "
                      f"{100 * r['mean']:.2f}+-{100 * r['ci_half_width']:.2f} worst chip {100 * r['worst_random']:.2f}"
                      f" worst case {100 * r['worst_case']:.2f} / {r['worst_case_strong']} ({r['eval_seconds']}s)",
                      flush=True)
                rows.append({"name": label, "mode": mode, "train_d2d": None if var is None else var.d2d, **res, **r})
    load = subprocess.run(["uptime"], check=False, capture_output=True, text=True).stdout.strip()
    prov.update(finished=provenance(a.threads)["date"], load=load, work="T2",
                dataset="fashion-mnist 60k/10k, 28x28x1, dataset mean/std, no augmentation",
                model=f"MLP 784-{a.hidden}-{a.hidden}-10 ReLU, all three weight matrices on NVM, biases digital",
                schedule=f"{a.steps} AdamW steps (lr {a.lr}, cosine, weight decay 0.01) x batch {a.batch_size} per "
                         "model, seed 0, same initialisation and batch order",
                variation=f"D2D log-normal sigma in {sigmas}, C2C {a.c2c} x max|w|, levels {a.levels or 'analog'}",
                monte_carlo=f"{a.chips} chips (seeds 1000..), 95% Student-t interval, 10,000 test images each",
                worst_case=f"PGD {a.pgd_steps} steps (seed 0) and {a.pgd_strong} steps (seed 1), |theta| <= {a.k} sigma, uniform random start, "
                           f"search on the first {min(a.search, len(y_all))} test images, scored on all 10,000",
                adversarial_training=f"{a.adv_steps} PGD step(s) per batch within {a.k} sigma from a sampled chip",
                paper_claim=CLAIM)
    extra = (f", C2C {a.c2c:g} x max|w|" if a.c2c else "") + (f", {a.levels} levels" if a.levels else "")
    lines = [f"# Accuracy under NVM device variation (D2D log-normal{extra}), Fashion-MNIST T2", "",
             (f"MLP 784-{a.hidden}-{a.hidden}-10, {a.steps} AdamW steps per model. Test accuracy % (10,000 images): "
              f"mean over {a.chips} chips +- 95% CI, the worst of those chips, and the worst case within "
              f"{a.k:g} sigma per weight by PGD ({a.pgd_steps} steps from a uniform start, and {a.pgd_strong} steps "
              "from another)."), "",
             (f"| model | trained at sigma | eval sigma | clean | mean +- CI | worst chip | worst case (PGD "
              f"{a.pgd_steps}) | worst case (PGD {a.pgd_strong}) |"), "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['mode']} | {'-' if r['train_d2d'] is None else r['train_d2d']} | {r['d2d']:g} | "
                     f"{100 * r['clean']:.2f} | {100 * r['mean']:.2f} +- {100 * r['ci_half_width']:.2f} | "
                     f"{100 * r['worst_random']:.2f} | {100 * r['worst_case']:.2f} | "
                     + ("n/a" if r["worst_case_strong"] is None else f"{100 * r['worst_case_strong']:.2f}") + " |")
    lines += ["", "| model | train s | final train loss |", "|---|---:|---:|"]
    lines += [f"| {r['name']} | {r['train_seconds']} | {r['final_train_loss']:.4f} |" for r in rows
              if r["mode"] != "plain" or r["d2d"] == sigmas[0]]
    write_report(paths[0], {"provenance": prov, "rows": rows}, paths[2], lines)
    return 0


if __name__ == "__main__":
    run_main(main, "variation")
