"""Export equivalence on T1: a sparse-update plan trained, then exported to safetensors, ONNX and ExecuTorch.

T1 (ImageNet MobileNetV2 on Fashion-MNIST at 64x64, batch 32): the planner's scheme for a 32 MiB budget (the
analysis of benchmarks/federated/fashion.yaml: 50 steps per run, bias grid to 13, weights of the last 2 convs), trained
``--steps`` steps with ``edgetrain train``, then ``edgetrain export --training-program``: the exported model's
predictions on the 2,000 test samples from onnxruntime and ExecuTorch against PyTorch's, and one ExecuTorch training
step against PyTorch's. Writes ``<out>/t1-<name>.json`` (provenance, export.json) and ``.md``.

    python benchmarks/export/equivalence.py --name export-2026-12-02 --threads 2
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from edgetrain.bench import provenance, result_paths
from edgetrain.cli import main as cli
from edgetrain.devices import format_size, parse_size
from edgetrain.export import export
from edgetrain.plan import analyze, plan
from edgetrain.report import run_main, write_report
from edgetrain.workload import Workload


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--name", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--budget", default="32MiB")
    ap.add_argument("--force", action="store_true")
    a = ap.parse_args(argv)
    stem = f"t1-{a.name}"
    paths = result_paths(a.out, stem, force=a.force)
    prov = provenance(a.threads)
    torch.set_num_threads(a.threads)
    wl = Workload(model="mobilenet_v2", data="fashion-mnist", image_size=64, channels=3, batch_size=32,
                  eval_subset=2000)
    contribution = analyze(wl, steps=50, ks=[0, 1, 2, 4, 6, 9, 13], weight_last=2, threads=a.threads, progress=False)
    model = wl.build_model(wl.load_data("train").num_classes)
    p = plan(model, contribution, parse_size(a.budget), (3, 64, 64), 32, "sgd_momentum")
    work = Path("runs") / stem
    work.mkdir(parents=True, exist_ok=True)
    p.recipe.save(work / "plan.json")
    args = ["train", "--model", "mobilenet_v2", "--data", "fashion-mnist", "--eval-subset", "2000", "--steps",
            str(a.steps), "--lr", "0.01", "--recipe", str(work / "plan.json"), "--out", str(work / "run"), "--force",
            "--threads", str(a.threads), "--no-progress"]
    if cli(args) != 0:
        return 1
    info = export(work / "run", work / "export", training_program=True, force=True)
    result = {"provenance": prov, "budget": parse_size(a.budget), "recipe": p.recipe.to_dict(),
              "predicted_peak": p.predicted_bytes, "steps": a.steps, "export": info}
    o, e, t = info["onnx"], info["executorch"], info["executorch_training"]
    lines = [f"# Export equivalence, T1 under the {a.budget} plan ({prov.get('commit', '?')}, {prov.get('date', '?')})",
             "", f"Plan: {', '.join(x['type'] for x in p.recipe.to_dict()['techniques'])}; trained {a.steps} steps.", "",
             "| format | file | prediction agreement | max abs logit diff | max abs logit |", "|---|---|---|---|---|",
             f"| safetensors | {format_size(info['safetensors']['bytes'])} | (the weights) | - | - |"]
    for name, r in (("ONNX (onnxruntime)", o), ("ExecuTorch (XNNPACK)", e)):
        lines.append(f"| {name} | {format_size(r['bytes'])} | {100 * r['prediction_agreement']:.2f}% of "
                     f"{r['eval_samples']} | {r['max_abs_logit_difference']:.3g} | {r['max_abs_logit']:.3g} |")
    lines += ["", f"Training program (train.pte, {format_size(t['bytes'])}): {t['trainable_elements']} trainable "
              f"elements in {len(t['trainable'])} tensors; one SGD step (lr {t['lr']}, batch {t['batch']}): loss "
              f"{t['loss_pytorch']:.6f} (PyTorch) vs {t['loss_executorch']:.6f} (ExecuTorch), max gradient difference "
              f"{t['max_abs_gradient_difference']:.3g}, max parameter difference after the step "
              f"{t['max_abs_parameter_difference_after_step']:.3g} (the step moved parameters by up to "
              f"{t['max_abs_parameter_change']:.3g}).", "", "```json", json.dumps(t["trainable"]), "```"]
    write_report(paths[0], result, paths[2], lines)
    return 0


if __name__ == "__main__":
    run_main(main, "export")
