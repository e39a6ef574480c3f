"""Few-shot MEBQAT (MEBQAT-MAML) against first-order MAML at full precision, 5-way 1-shot on Fashion-MNIST classes.

Youn et al., ECCV 2022, arXiv:2207.10188, §3.3 (spec algorithms_B §4.3). Both rows: MAML's Conv4 (width 32,
batch-statistics BatchNorm) with MEBQAT's LSQ quantizers on every conv/linear but the first and the last, meta-trained
on episodes of classes 0-4 (``--iterations`` iterations of ``--meta-batch`` tasks, Adam, gradients clamped to +-10,
5 inner SGD steps leaving BN's beta as it is) and meta-tested on 600 episodes of the unseen classes 5-9 after 10
inner steps, at each uniform bit width (the same episodes at every width):

* ``fomaml-fp``: every task at full precision; at a low bit width the meta-learned model is quantized after training;
* ``mebqat-maml``: every task at a bit-width pair drawn from MEBQAT's allowed pairs of {2..8, 16, 32}.

Schedule (ours, stated): 300 iterations, meta lr 1e-3, inner lr 0.1, the schedule of ``benchmarks/meta/fewshot.py``
(the paper: 75 epochs x 800 iterations, meta lr 1e-4, inner lr 0.01). Writes ``<out>/fashion-<name>.{json,md}``.

    OMP_NUM_THREADS=1 python benchmarks/lowp/mebqat_fewshot.py --out benchmarks/results --name mebqat-fewshot-2026-12-07 --threads 1
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
from edgetrain.lowp.fakequant import FP
from edgetrain.mebqat_fewshot import evaluate_bitwidths, learner, meta_train
from edgetrain.meta import Conv4, Episodes
from edgetrain.report import run_main, write_report

EVAL_BITS = (2, 3, 4, 8, FP)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--name", required=True)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--iterations", type=int, default=300)
    ap.add_argument("--meta-batch", type=int, default=4)
    ap.add_argument("--meta-lr", type=float, default=1e-3)
    ap.add_argument("--inner-lr", type=float, default=0.1)
    ap.add_argument("--episodes", type=int, default=600)
    ap.add_argument("--force", action="store_true")
    a = ap.parse_args(argv)
    paths = result_paths(a.out, f"fashion-{a.name}", force=a.force)
    torch.set_num_threads(a.threads)
    prov = provenance(a.threads)
    iterations, n_test, queries = smoke.cap(a.iterations, smoke.STEPS), smoke.cap(a.episodes, 5), smoke.cap(15, 1)
    train = load_data("fashion-mnist", "train", channels=1, normalize="dataset")
    test = load_data("fashion-mnist", "test", channels=1, normalize="dataset")
    test.transform = train.transform  # the training split's statistics
    meta_tr = Episodes(train, [0, 1, 2, 3, 4], ways=5, shots=1, queries=queries)
    meta_te = Episodes(test, [5, 6, 7, 8, 9], ways=5, shots=1, queries=queries)
    rows = []
    for name in ("fomaml-fp", "mebqat-maml"):
        torch.manual_seed(0)
        model = Conv4(ways=5, in_channels=1, width=32)
        et.apply_(model, et.MEBQAT(method="lsq", weight_bits=None, act_bits=None), meta_tr.sample(random.Random(0))[0])
        meta = learner(model, inner_lr=a.inner_lr)
        t0 = time.perf_counter()
        history = meta_train(meta, meta_tr, iterations, a.meta_batch, lr=a.meta_lr, progress=True,
                             pairs=[(FP, FP)] if name == "fomaml-fp" else None)
        seconds = time.perf_counter() - t0
        if name == "fomaml-fp":  # LSQ's steps are initialised on their first use: at each width, on meta-train data
            for b in EVAL_BITS:
                evaluate_bitwidths(meta, meta_tr, (b,), n=1, steps=0)
        result = evaluate_bitwidths(meta, meta_te, EVAL_BITS, n=n_test, seed=1)
        rows.append({"name": name, "techniques": ["mebqat"], "ways": 5, "shots": 1, "queries": queries,
                     "meta_train_seconds": round(seconds, 1), "final_meta_loss": history[-1][0],
                     "accuracy": {str(b): r["accuracy"] for b, r in result.items()},
                     "ci95": {str(b): r["ci95"] for b, r in result.items()}})
        print(f"[mebqat-fewshot] {name}: " + " ".join(f"{b}:{100 * r['accuracy']:.1f}" for b, r in result.items()),
              file=sys.stderr, flush=True)
    prov.update(finished=provenance(a.threads)["date"], iterations=iterations, meta_batch=a.meta_batch,
                meta_lr=a.meta_lr, inner_lr=a.inner_lr, inner_steps=5, test_steps=10, episodes=n_test,
                backbone="Conv4 width 32, LSQ (shared steps) on the middle convs", meta_train_classes=[0, 1, 2, 3, 4],
                meta_test_classes=[5, 6, 7, 8, 9])
    head = " | ".join(str(b) if b != FP else "fp32" for b in EVAL_BITS)
    lines = ["5-way 1-shot query accuracy % (95% CI) after 10 inner steps at each uniform bit width", "",
             f"| model | {head} | meta-train s |", "|---|" + "---:|" * (len(EVAL_BITS) + 1)]
    lines += [f"| {r['name']} | " + " | ".join(f"{100 * r['accuracy'][str(b)]:.2f} +- {100 * r['ci95'][str(b)]:.2f}"
                                               for b in EVAL_BITS) + f" | {r['meta_train_seconds']:.0f} |"
              for r in rows]
    write_report(paths[0], {"provenance": prov, "rows": rows}, paths[2], lines)
    return 0


if __name__ == "__main__":
    run_main(main, "mebqat_fewshot")
