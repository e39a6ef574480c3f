"""Few-shot adaptation on the device: MAML, FOMAML and ANIL, 5-way 1-shot and 5-shot, on Fashion-MNIST classes.

Meta-train on episodes of classes 0-4, meta-test on 600 episodes of the unseen classes 5-9 (Fashion-MNIST has 10
classes, so every 5-way test task uses all five test classes in a random order: a small task distribution, stated in
docs/adaptation.md). Backbone: MAML's Conv4 (width 32, batch-statistics BatchNorm) on 28x28 images. Per row: the
query accuracy with its 95% confidence interval, and one adaptation step on the support set as the device runs it,
metered by ``edgetrain.measure``: all parameters for MAML/FOMAML, the head only for ANIL (``Freeze(classifier)``:
the body's convs save nothing for weight gradients).

    OMP_NUM_THREADS=1 python benchmarks/meta/fewshot.py --out benchmarks/results --name fewshot-2026-12-02 --threads 1
"""

from __future__ import annotations

import argparse
import random
import sys
import time

import torch

import edgetrain as et
from edgetrain import smoke
from edgetrain.bench import provenance, result_paths
from edgetrain.data import load_data
from edgetrain.meta import Conv4, Episodes, MetaLearner, meta_train
from edgetrain.report import run_main, write_report

KiB = 1024


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--name", required=True)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--iterations", type=int, default=300)
    ap.add_argument("--meta-batch", type=int, default=2)
    ap.add_argument("--episodes", type=int, default=600)
    ap.add_argument("--inner-steps", type=int, default=5)
    ap.add_argument("--inner-lr", type=float, default=0.1)
    ap.add_argument("--algorithms", default="maml,fomaml,anil")
    ap.add_argument("--force", action="store_true")
    a = ap.parse_args(argv)
    paths = result_paths(a.out, f"fashion-{a.name}", force=a.force)
    torch.set_num_threads(a.threads)
    prov = provenance(a.threads)
    iterations = smoke.cap(a.iterations, smoke.STEPS)
    n_test = smoke.cap(a.episodes, 10)
    train = load_data("fashion-mnist", "train", channels=1, normalize="dataset")
    test = load_data("fashion-mnist", "test", channels=1, normalize="dataset")
    rows = []
    for shots in ((1,) if smoke.active() else (1, 5)):  # smoke mode's 64 samples hold too few per class for 5
        queries = smoke.cap(10, 1)
        meta_tr = Episodes(train, [0, 1, 2, 3, 4], ways=5, shots=shots, queries=queries)
        meta_te = Episodes(test, [5, 6, 7, 8, 9], ways=5, shots=shots, queries=queries)
        for alg in a.algorithms.split(","):
            torch.manual_seed(0)
            model = Conv4(ways=5, in_channels=1, width=32)
            learner = MetaLearner(model, alg, inner_steps=a.inner_steps, inner_lr=a.inner_lr)
            t0 = time.perf_counter()
            losses = meta_train(learner, meta_tr, iterations, a.meta_batch, progress=True)
            seconds = time.perf_counter() - t0
            result = learner.evaluate(meta_te, n=n_test, seed=1)
            xs, ys, _, _ = meta_te.sample(random.Random(2))
            recipe = et.Freeze(classifier=True) if alg == "anil" else None  # the device's inner step
            model.zero_grad(set_to_none=True)  # the meta-optimizer's last gradients are not the device's
            m = et.measure(model, (xs, ys), recipe=recipe, repeats=1,
                           optimizer=torch.optim.SGD([p for p in model.parameters()], lr=a.inner_lr)
                           if recipe is None else None)
            row = {"algorithm": alg, "ways": 5, "shots": shots, "queries": queries, **result,
                   "meta_train_seconds": round(seconds, 1), "final_meta_loss": losses[-1],
                   "adapt_peak_bytes": m.peak_bytes, "adapt_saved_bytes": m.saved_bytes,
                   "adapt_grad_bytes": m.grad_bytes}
            print(f"[fewshot] {alg} 5-way {shots}-shot: {100 * result['accuracy']:.2f} +- "
                  f"{100 * result['ci95']:.2f}%, adaptation step peak {m.peak_bytes / KiB:.0f} KiB",
                  file=sys.stderr, flush=True)
            rows.append(row)
    prov.update(finished=provenance(a.threads)["date"], iterations=iterations, meta_batch=a.meta_batch,
                inner_steps=a.inner_steps, inner_lr=a.inner_lr, meta_lr=1e-3, backbone="Conv4 width 32",
                meta_train_classes=[0, 1, 2, 3, 4], meta_test_classes=[5, 6, 7, 8, 9])
    lines = ["| algorithm | 5-way | accuracy (95% CI) | adaptation step peak KiB | saved KiB | grads KiB | meta-train s |",
             "|---|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['algorithm']} | {r['shots']}-shot | {100 * r['accuracy']:.2f} +- {100 * r['ci95']:.2f}% | "
              f"{r['adapt_peak_bytes'] / KiB:.0f} | {r['adapt_saved_bytes'] / KiB:.0f} | {r['adapt_grad_bytes'] / KiB:.1f} "
              f"| {r['meta_train_seconds']:.0f} |" for r in rows]
    write_report(paths[0], {"provenance": prov, "rows": rows}, paths[2], lines)
    return 0


if __name__ == "__main__":
    run_main(main, "fewshot")
