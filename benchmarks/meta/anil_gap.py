"""Why ANIL is far below MAML in fewshot.py: too few inner steps, or features that do not carry to new classes?

ANIL (Raghu et al., ICLR 2020) adapts only the head on features the body learnt in meta-training; it matches MAML when
the meta-learnt features carry over to the test classes (feature reuse). Here (benchmarks/meta/fewshot.py's setup:
Conv4 width 32, 300 meta-iterations on Fashion-MNIST classes 0-4, 5 inner steps) the model is meta-trained with ANIL
at each ``--inner-lrs`` and evaluated 5-way on the unseen test classes 5-9 with ``--test-steps`` inner steps, and on
the test images of the meta-training classes 0-4 (the same features, on classes they were learnt on). Writes
``<out>/fashion-<name>.json`` and ``.md``.

    OMP_NUM_THREADS=1 python benchmarks/meta/anil_gap.py --out benchmarks/results --name anil-gap-2026-12-07 --threads 1
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from edgetrain import smoke
from edgetrain.bench import provenance, result_paths
from edgetrain.data import load_data
from edgetrain.meta import Conv4, Episodes, MetaLearner, meta_train
from edgetrain.report import run_main, write_report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--name", required=True)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--iterations", type=int, default=300)
    ap.add_argument("--episodes", type=int, default=600)
    ap.add_argument("--inner-lrs", default="0.1,0.5")
    ap.add_argument("--test-steps", default="5,25,100")
    ap.add_argument("--force", action="store_true")
    a = ap.parse_args(argv)
    paths = result_paths(a.out, f"fashion-{a.name}", force=a.force)
    torch.set_num_threads(a.threads)
    prov = provenance(a.threads)
    iterations, n_test, queries = smoke.cap(a.iterations, smoke.STEPS), smoke.cap(a.episodes, 10), smoke.cap(10, 1)
    train = load_data("fashion-mnist", "train", channels=1, normalize="dataset")
    test = load_data("fashion-mnist", "test", channels=1, normalize="dataset")
    rows = []
    for shots in ((1,) if smoke.active() else (1, 5)):
        for lr in (float(x) for x in a.inner_lrs.split(",")):
            torch.manual_seed(0)
            learner = MetaLearner(Conv4(ways=5, in_channels=1, width=32), "anil", inner_steps=5, inner_lr=lr)
            t0 = time.perf_counter()
            meta_train(learner, Episodes(train, [0, 1, 2, 3, 4], 5, shots, queries), iterations, 2, progress=False)
            for classes in ([5, 6, 7, 8, 9], [0, 1, 2, 3, 4]):
                for steps in (int(s) for s in a.test_steps.split(",")):
                    r = learner.evaluate(Episodes(test, classes, 5, shots, queries), n=n_test, seed=1, steps=steps)
                    rows.append({"shots": shots, "inner_lr": lr, "classes": classes, "test_steps": steps, **r})
                    print(f"[anil-gap] {shots}-shot lr {lr} classes {classes} {steps} steps: "
                          f"{100 * r['accuracy']:.2f} +- {100 * r['ci95']:.2f}% ({time.perf_counter() - t0:.0f} s)",
                          file=sys.stderr, flush=True)
    prov.update(iterations=iterations, meta_batch=2, meta_inner_steps=5, backbone="Conv4 width 32")
    lines = ["| 5-way | ANIL inner lr | test classes | test inner steps | accuracy (95% CI) |", "|---|---|---|---|---:|"]
    lines += [f"| {r['shots']}-shot | {r['inner_lr']} | {'unseen 5-9' if r['classes'][0] == 5 else 'meta-train 0-4'} "
              f"| {r['test_steps']} | {100 * r['accuracy']:.2f} +- {100 * r['ci95']:.2f}% |" for r in rows]
    write_report(paths[0], {"provenance": prov, "rows": rows}, paths[2], lines)
    return 0


if __name__ == "__main__":
    run_main(main, "anil-gap")
