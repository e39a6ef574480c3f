"""MAC against ANIL at meta-test: 5-way 5-shot and 1-shot on Fashion-MNIST, in distribution and on a perturbed split.

MAC (Tiwari et al., arXiv 2209.09613; spec algorithms_B §7.3; edgetrain.mac) claims about +13% over ANIL in 5-shot on
non-similar (perturbed) task distributions. Here: one model is meta-trained once (``--meta-algorithm``, ANIL by
default; MAML's Conv4 width 32 on 28x28 images, episodes of classes 0-4, benchmarks/meta/fewshot.py's defaults: 300
iterations, meta-batch 2, Adam 1e-3, 5 inner steps at 0.1, 10 queries per class; ``--train-shots`` 5), then
meta-tested on ``--episodes`` (600) episodes of the unseen classes 5-9, 5-way 5-shot and 1-shot, on the test split as
it is and on a perturbed copy (``--perturb``: ``rot90``, the images rotated by 90 degrees, and/or ``invert``, 255 -
pixel; both by default), normalised with the unperturbed test split's statistics. Rows: ANIL (the head adapted on the
frozen features) and MAC with ``--n-acu`` units beside ``--acu-layer`` (default the last conv, ``features.3.0``), the
same inner steps (``--test-steps`` at meta-test, default ``--inner-steps``) and lr (the units' own lr: ``--acu-lr``).
Every row sees the same episodes (seed 1): the rows are paired. 95% confidence intervals are 1.96 standard errors over episodes.

Memory: one adaptation step on a support set as a device runs it, metered by ``edgetrain.measure`` with plain SGD:
ANIL as ``Freeze(classifier)`` on the model, MAC as ``edgetrain.mac.MACNet`` (the base frozen and run under
``no_grad``; the units and the widened head trained).

    OMP_NUM_THREADS=1 python benchmarks/meta/mac.py --out benchmarks/results --name mac-2026-12-07 --threads 1
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import sys
import time
from typing import Any

import torch

import edgetrain as et
from edgetrain import smoke
from edgetrain.bench import provenance, result_paths
from edgetrain.data import load_data
from edgetrain.data.core import ImageData
from edgetrain.errors import ConfigError
from edgetrain.mac import INITS, MACNet
from edgetrain.meta import Conv4, Episodes, MetaLearner, meta_train
from edgetrain.report import run_main, write_report

KiB = 1024
PERTURBATIONS = ("rot90", "invert")
CLAIM = "MAC about +13% over ANIL in 5-shot on non-similar task distributions (arXiv 2209.09613; 12% in the journal)"


def perturb(data: ImageData, kinds: list[str]) -> ImageData:
    """``data`` with its raw images rotated by 90 degrees (``rot90``) and/or intensity-inverted (``invert``); the
    transform (hence the normalisation statistics) is unchanged."""
    images = data.images
    if "rot90" in kinds:
        images = torch.rot90(images, 1, (-2, -1))  # (N, C, W, H): counter-clockwise
    if "invert" in kinds:
        images = 255 - images if images.dtype == torch.uint8 else 1 - images
    return dataclasses.replace(data, images=images.contiguous(), name=f"{data.name}+{'+'.join(kinds)}")


def step_memory(learner: MetaLearner, xs: torch.Tensor, ys: torch.Tensor) -> dict[str, int]:
    """One adaptation step on ``(xs, ys)``, metered: ANIL's head on the frozen model, or MAC's widened network."""
    model = learner.model
    if learner.algorithm == "anil":
        model.zero_grad(set_to_none=True)
        m = et.measure(model, (xs, ys), recipe=et.Freeze(classifier=True), repeats=1,
                       optimizer=torch.optim.SGD(learner.head.parameters(), lr=learner.inner_lr))
    else:
        net = MACNet(learner.mac, learner.mac.init(0))
        flags = [p.requires_grad for p in model.parameters()]
        model.requires_grad_(False)  # the base is frozen: counted as frozen weights
        try:
            m = et.measure(net, (xs, ys), repeats=1, optimizer=torch.optim.SGD(net.adapted.parameters(),
                                                                               lr=learner.inner_lr))
        finally:
            for p, f in zip(model.parameters(), flags):
                p.requires_grad_(f)
    return {"adapt_peak_bytes": m.peak_bytes, "adapt_saved_bytes": m.saved_bytes, "adapt_grad_bytes": m.grad_bytes}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--name", required=True)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--iterations", type=int, default=300)
    ap.add_argument("--meta-batch", type=int, default=2)
    ap.add_argument("--meta-algorithm", default="anil", choices=["anil", "maml", "fomaml"])
    ap.add_argument("--train-shots", type=int, default=5)
    ap.add_argument("--shots", default="5,1")
    ap.add_argument("--episodes", type=int, default=600)
    ap.add_argument("--inner-steps", type=int, default=5)
    ap.add_argument("--inner-lr", type=float, default=0.1)
    ap.add_argument("--test-steps", type=int, default=None,
                    help="inner steps at meta-test, for every row (default: --inner-steps, as in meta-training)")
    ap.add_argument("--acu-lr", type=float, default=None, help="the units' inner lr (default: --inner-lr)")
    ap.add_argument("--n-acu", default="8,32")
    ap.add_argument("--acu-layer", default="features.3.0")
    ap.add_argument("--acu-init", default="kaiming_normal", choices=list(INITS))
    ap.add_argument("--perturb", default="rot90,invert", help=f"comma list of {', '.join(PERTURBATIONS)}")
    ap.add_argument("--force", action="store_true")
    a = ap.parse_args(argv)
    kinds = a.perturb.split(",")
    if not kinds or any(k not in PERTURBATIONS for k in kinds):
        raise ConfigError(f"--perturb {a.perturb!r}: a comma list of {', '.join(PERTURBATIONS)}")
    try:
        n_acus, shots_list = [int(n) for n in a.n_acu.split(",")], [int(s) for s in a.shots.split(",")]
    except ValueError:
        raise ConfigError(f"--n-acu {a.n_acu!r} / --shots {a.shots!r}: comma lists of ints") from None
    paths = result_paths(a.out, f"fashion-{a.name}", force=a.force)
    torch.set_num_threads(a.threads)
    prov = provenance(a.threads)
    iterations = smoke.cap(a.iterations, smoke.STEPS)
    n_test, queries = smoke.cap(a.episodes, 10), smoke.cap(10, 1)
    train_shots = smoke.cap(a.train_shots, 1)  # smoke mode's 64 samples hold too few per class for 5 shots
    shots_list = [smoke.cap(s, 1) for s in shots_list] if smoke.active() else shots_list
    train = load_data("fashion-mnist", "train", channels=1, normalize="dataset")
    test = load_data("fashion-mnist", "test", channels=1, normalize="dataset")
    splits = {"in-distribution": test, f"perturbed ({'+'.join(kinds)})": perturb(test, kinds)}

    torch.manual_seed(0)
    model = Conv4(ways=5, in_channels=1, width=32)
    t0 = time.perf_counter()
    losses = meta_train(MetaLearner(model, a.meta_algorithm, a.inner_steps, a.inner_lr),
                        Episodes(train, [0, 1, 2, 3, 4], ways=5, shots=train_shots, queries=queries), iterations,
                        a.meta_batch, progress=True)
    seconds = time.perf_counter() - t0
    learners = [("anil", 0, MetaLearner(model, "anil", a.inner_steps, a.inner_lr))]
    learners += [("mac", n, MetaLearner(model, "mac", a.inner_steps, a.inner_lr, acu_layer=a.acu_layer, n_acu=n,
                                        acu_lr=a.acu_lr, acu_init=a.acu_init)) for n in n_acus]
    rows: list[dict[str, Any]] = []
    for shots in dict.fromkeys(shots_list):
        xs, ys, _, _ = Episodes(test, [5, 6, 7, 8, 9], ways=5, shots=shots, queries=queries).sample(random.Random(2))
        memory = [step_memory(learner, xs, ys) for _, _, learner in learners]
        for split, data in splits.items():
            episodes = Episodes(data, [5, 6, 7, 8, 9], ways=5, shots=shots, queries=queries)
            anil_acc = None
            for (method, n, learner), mem in zip(learners, memory):
                t0 = time.perf_counter()
                result = learner.evaluate(episodes, n=n_test, seed=1, steps=a.test_steps)
                anil_acc = result["accuracy"] if method == "anil" else anil_acc
                row = {"name": "anil" if method == "anil" else f"mac-{n}", "algorithm": method, "n_acu": n,
                       "split": split, "ways": 5, "shots": shots, "queries": queries, **result,
                       "vs_anil_points": 100 * (result["accuracy"] - anil_acc),
                       "eval_seconds": round(time.perf_counter() - t0, 1), **mem}
                rows.append(row)
                print(f"[mac] {split} 5-way {shots}-shot {row['name']}: {100 * result['accuracy']:.2f} +- "
                      f"{100 * result['ci95']:.2f}% ({row['vs_anil_points']:+.2f} vs ANIL), adaptation step peak "
                      f"{mem['adapt_peak_bytes'] / KiB:.0f} KiB", file=sys.stderr, flush=True)
    prov.update(finished=provenance(a.threads)["date"], meta_algorithm=a.meta_algorithm, iterations=iterations,
                meta_batch=a.meta_batch, meta_lr=1e-3, train_shots=train_shots, final_meta_loss=losses[-1],
                meta_train_seconds=round(seconds, 1), inner_steps=a.inner_steps, inner_lr=a.inner_lr,
                test_steps=a.test_steps if a.test_steps is not None else a.inner_steps,
                acu_lr=a.acu_lr if a.acu_lr is not None else a.inner_lr, acu_layer=a.acu_layer, acu_init=a.acu_init,
                acu_seed=0, perturbation=kinds, backbone="Conv4 width 32", meta_train_classes=[0, 1, 2, 3, 4],
                meta_test_classes=[5, 6, 7, 8, 9], episode_seed=1, paper_claim=CLAIM)
    lines = [f"Paper claim: {CLAIM}.", "",
             ("| split | 5-way | row | accuracy (95% CI) | vs ANIL (points) | adaptation step peak KiB | saved KiB "
              "| grads KiB |"), "|---|---|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['split']} | {r['shots']}-shot | {r['name']} | {100 * r['accuracy']:.2f} +- {100 * r['ci95']:.2f}% "
              f"| {r['vs_anil_points']:+.2f} | {r['adapt_peak_bytes'] / KiB:.0f} | {r['adapt_saved_bytes'] / KiB:.0f} "
              f"| {r['adapt_grad_bytes'] / KiB:.1f} |" for r in rows]
    write_report(paths[0], {"provenance": prov, "rows": rows}, paths[2], lines)
    return 0


if __name__ == "__main__":
    run_main(main, "mac")
