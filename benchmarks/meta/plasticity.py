"""Feedback alignment against FA with a meta-learned plasticity rule, online 5-way tasks from Fashion-MNIST.

The paper's setup (spec algorithms_B §8.2, the authors' code) on the data available here: an MLP
784-170-130-100-70-5 (bias-free, softplus beta 10), re-initialised every episode; 5 classes drawn from the 10, 50
training images per class shown one at a time (250 updates), 10 query images per class, pixels in [0, 1]. Meta-training
(Adam, lr 1e-3, theta0 from 1e-3: the authors' defaults; theta2 kept >= 0 and each episode's meta-gradient norm
clipped to 100: ours, edgetrain.plasticity) runs ``--episodes`` tasks of the training split; the reported
accuracy is over ``--test-episodes`` tasks of the test split with the final rule (mean and 95% CI). Rows:

* FA with the fixed rule theta = (1e-3, 0, 0);
* FA with theta0 meta-learned: the paper's FA baseline (the authors' code meta-learns theta0 in every run);
* FA + the rule (pseudo-gradient, error-Hebbian, Oja) meta-learned;
* the same with the authors' meta-optimisation as released: theta2 free and no clipping (it collapses: see the docs);
* symmetric feedback (backprop's gradient), fixed and with theta0 meta-learned: the control.

    OMP_NUM_THREADS=1 python benchmarks/meta/plasticity.py --out benchmarks/results --name plasticity-2026-12-07 --threads 1
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import time

import torch

from edgetrain import smoke
from edgetrain.bench import provenance, result_paths
from edgetrain.data import load_data
from edgetrain.errors import ConfigError
from edgetrain.plasticity import CLIP, OnlineTasks, PlasticMLP, meta_train_rule, run_episode
from edgetrain.report import run_main, write_report

#: (name, feedback, terms, meta-learned, ours: theta2 >= 0 and the meta-gradient clipped; else the authors' as released)
ROWS = [("fa", "fa", 1, False, True), ("fa+theta0", "fa", 1, True, True), ("fa+rule", "fa", 3, True, True),
        ("fa+rule, authors' meta-optimisation", "fa", 3, True, False), ("backprop", "sym", 1, False, True),
        ("backprop+theta0", "sym", 1, True, True)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--name", required=True)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--episodes", type=int, default=200, help="meta-training episodes (the paper: 600; ours: 200 "
                                                               "fits ~10 minutes on one thread)")
    ap.add_argument("--test-episodes", type=int, default=100)
    ap.add_argument("--lr", type=float, default=1e-3, help="Adam's meta learning rate (the authors' default)")
    ap.add_argument("--inputs", choices=["unit", "standard"], default="unit",
                    help="pixels in [0, 1] (the paper's) or standardised with each split's statistics (the rule "
                         "diverges: NaN within 5-11 episodes, theta2 |y|^2 > 2)")
    ap.add_argument("--force", action="store_true")
    a = ap.parse_args(argv)
    paths = result_paths(a.out, f"fashion-{a.name}", force=a.force)
    torch.set_num_threads(a.threads)
    prov = provenance(a.threads)
    per_class, queries = smoke.cap(50, 2), smoke.cap(10, 1)
    episodes, n_test = smoke.cap(a.episodes, 2), smoke.cap(a.test_episodes, 2)
    normalize = "none" if a.inputs == "unit" else "dataset"
    train = load_data("fashion-mnist", "train", channels=1, normalize=normalize)
    test = load_data("fashion-mnist", "test", channels=1, normalize=normalize)
    classes = list(range(train.num_classes))
    tasks = OnlineTasks(train, classes, 5, per_class, queries)
    test_tasks = OnlineTasks(test, classes, 5, per_class, queries)
    size = train.batch(torch.tensor([0]))[0][0].numel()
    rows = []
    for name, feedback, terms, learn, ours in ROWS:
        net = PlasticMLP((size, 170, 130, 100, 70, 5), feedback)
        row = {"name": name, "feedback": feedback, "terms": terms, "learned": learn, "theta2_nonneg": ours,
               "clip": CLIP if ours else None}
        t0 = time.perf_counter()
        try:
            theta, accs = meta_train_rule(net, tasks, terms, episodes if learn else 0, lr=a.lr, learn=learn,
                                          oja_nonneg=ours, clip=row["clip"])
        except ConfigError as e:  # a diverging meta-training is a result
            rows.append({**row, "diverged": str(e)})
            print(f"[plasticity] {name}: diverged: {e}", file=sys.stderr, flush=True)
            continue
        seconds = time.perf_counter() - t0
        rng, test_accs = random.Random(7), []
        with torch.no_grad():  # the same test tasks and initialisations for every row
            for ep in range(n_test):
                task = test_tasks.sample(rng)
                test_accs.append(float((run_episode(net, theta, task, seed=10**6 + ep).argmax(1) == task[3])
                                       .double().mean()))
        mean = sum(test_accs) / n_test
        sd = math.sqrt(sum((v - mean) ** 2 for v in test_accs) / max(n_test - 1, 1))
        last = accs[-50:]
        rows.append({**row, "theta": theta.tolist(), "accuracy": mean, "ci95": 1.96 * sd / math.sqrt(n_test),
                     "test_episodes": n_test, "meta_train_last50": sum(last) / len(last) if last else None,
                     "meta_train_seconds": round(seconds, 1)})
        print(f"[plasticity] {name}: {100 * mean:.2f} +- {100 * rows[-1]['ci95']:.2f}% (theta {theta.tolist()}, "
              f"{seconds:.0f} s)", file=sys.stderr, flush=True)
    prov.update(finished=provenance(a.threads)["date"], inputs=a.inputs, episodes=episodes, meta_lr=a.lr,
                train_per_class=per_class, query_per_class=queries, ways=5, sizes=[size, 170, 130, 100, 70, 5])
    cols = ["rule", "feedback", "learned terms", "meta-optimisation fixes", "theta", "test accuracy (95% CI)",
            "meta-train s"]
    lines = ["| " + " | ".join(cols) + " |", "|---|---|---|---|---|---:|---:|"]
    for r in rows:
        cells = [r["name"], r["feedback"], str(r["terms"] if r["learned"] else 0),
                 "-" if not r["learned"] else "none (the authors')" if r["clip"] is None else
                 "theta2 >= 0, clip" if r["terms"] == 3 else "clip"]
        if "diverged" in r:
            cells += ["diverged", r["diverged"], ""]
        else:
            cells += [", ".join(f"{v:.3g}" for v in r["theta"]), f"{100 * r['accuracy']:.2f} +- {100 * r['ci95']:.2f}%",
                      f"{r['meta_train_seconds']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    write_report(paths[0], {"provenance": prov, "rows": rows}, paths[2], lines)
    return 0


if __name__ == "__main__":
    run_main(main, "plasticity")
