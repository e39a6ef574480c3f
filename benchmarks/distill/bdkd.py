"""BD-KD against DML, fixed-teacher KD and the student alone, on one teacher/student pair and schedule.

Rows (same data, schedule and seed): ``teacher`` (the teacher alone, cross-entropy: the fixed teacher of ``kd``),
``student`` (alone), ``kd``, ``dml`` and ``bdkd`` (:mod:`edgetrain.distill`). Each row: one metered training step of
everything it trains (both networks for dml/bdkd), then the run; then the student's (and the online teacher's)
accuracy, ECE (15 bins), NLL and Brier on the eval set, no temperature scaling. Writes ``<out>/<stem>.json``
(provenance, rows, reliability data), ``.md`` and a reliability-diagram ``.png`` of the students.

    OMP_NUM_THREADS=1 python benchmarks/distill/bdkd.py --out benchmarks/results --name bdkd-2026-12-02 --threads 1
"""

from __future__ import annotations

import argparse
import copy
import sys

import torch

import edgetrain as et
from edgetrain.bench import provenance, result_paths
from edgetrain.calibration import metrics, predict, reliability, reliability_plot
from edgetrain.distill import OnlineDistillation
from edgetrain.models import create_model
from edgetrain.report import run_main, write_report
from edgetrain.train import TrainConfig, build_optimizer
from edgetrain.workload import Workload

MiB = 2**20


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--name", required=True)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--teacher", default="mobilenet_v2")
    ap.add_argument("--student", default="small_cnn")
    ap.add_argument("--force", action="store_true")
    a = ap.parse_args(argv)
    stem = f"t1-{a.name}"
    paths = result_paths(a.out, stem, force=a.force)
    torch.set_num_threads(a.threads)
    prov = provenance(a.threads)
    wl = Workload(model=a.teacher, data="fashion-mnist", image_size=64, channels=3, batch_size=32,
                  train_subset=12800, eval_subset=2000, seed=0)
    train_data, eval_data = wl.load_data("train"), wl.load_data("test")
    batch = wl.example_batch(train_data)
    cfg = TrainConfig(steps=a.steps, batch_size=32, optimizer="sgd", lr=0.01, momentum=0.9, schedule="cosine",
                      seed=0, threads=a.threads)
    k = train_data.num_classes

    def student() -> torch.nn.Module:
        torch.manual_seed(1)
        return create_model(a.student, num_classes=k, in_channels=3)

    teacher0 = wl.build_model(k)  # ImageNet weights, fresh head (seeded)
    rows, curves, trained_teacher = [], {}, None
    for name in ("teacher", "student", "kd", "dml", "bdkd"):
        if name == "teacher":
            model = copy.deepcopy(teacher0)
        elif name == "student":
            model = student()
        else:
            t = copy.deepcopy(trained_teacher if name == "kd" else teacher0)
            model = OnlineDistillation(t, student(), name)
        print(f"[bdkd] {name}: metering one step, then {a.steps} steps", file=sys.stderr, flush=True)
        m = et.measure(model, batch, optimizer=build_optimizer(model, cfg), warmup=1, repeats=1)
        result = et.train(model, train_data, eval_data, cfg, recipe=et.Recipe(name=name))
        net = model.student if isinstance(model, OnlineDistillation) else model
        probs, labels = predict(net, eval_data)
        row = {"name": name, "accuracy": result.accuracy, **metrics(probs, labels), "saved_bytes": m.saved_bytes,
               "peak_bytes": m.peak_bytes, "grad_bytes": m.grad_bytes, "step_seconds": m.step_seconds,
               "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad)}
        if isinstance(model, OnlineDistillation) and name != "kd":
            row["teacher"] = metrics(*predict(model.teacher, eval_data))
        curves[name] = reliability(probs, labels)
        rows.append(row)
        if name == "teacher":
            trained_teacher = model
    prov.update(finished=provenance(a.threads)["date"], workload=wl.to_dict(), train=cfg.__dict__,
                teacher=a.teacher, student=a.student, losses="edgetrain.distill defaults: tau 4, delta 2, gamma 1")
    out = {"provenance": prov, "rows": rows, "reliability": curves}
    lines = ["| row | student acc | ECE % | NLL | Brier | teacher acc | teacher ECE % | peak MiB | saved MiB | step s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        t = r.get("teacher") or {}
        lines.append(f"| {r['name']} | {100 * r['accuracy']:.2f}% | {100 * r['ece']:.2f} | {r['nll']:.3f} | "
                     f"{r['brier']:.3f} | {100 * t['accuracy']:.2f}% | {100 * t['ece']:.2f} | " if t else
                     f"| {r['name']} | {100 * r['accuracy']:.2f}% | {100 * r['ece']:.2f} | {r['nll']:.3f} | "
                     f"{r['brier']:.3f} | | | ")
        lines[-1] += f"{r['peak_bytes'] / MiB:.1f} | {r['saved_bytes'] / MiB:.1f} | {r['step_seconds']:.3f} |"
    write_report(paths[0], out, paths[2], lines)
    reliability_plot({n: c for n, c in curves.items() if n != "teacher"}, paths[3],
                     f"{a.student} student on Fashion-MNIST ({a.teacher} teacher), {a.steps} steps")
    print(paths[3])
    return 0


if __name__ == "__main__":
    run_main(main, "bdkd")
