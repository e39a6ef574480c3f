"""SmartDeal on T1: SED of the ImageNet-pretrained MobileNetV2 per layer, storage in bits, and short fine-tuning runs.

Chen et al., *SmartDeal: Re-Modeling Deep Network Weights for Efficient Inference and Training*, IEEE TNNLS 2022,
arXiv:2101.01163 (spec algorithms_B section 2; :mod:`edgetrain.techniques.smartdeal`). Three parts, one results file:

1. SED of every 3x3/1x1 conv and linear weight of T1's model (pretrained MobileNetV2, fresh 10-way head) at each
   ``--thresholds`` value: per layer the relative Frobenius error ``||W - CeB|| / ||W||``, the density of ``Ce``, its
   storage in bits (non-zeros as sign + exponent, a 1-bit mask over every entry, ``B`` in fp32) against fp32 and int8
   (per-output-channel fp32 scale), the rebuild's shift-add count (3 per non-zero: one shifted basis row added per
   coefficient) and the change of the eval output on a test batch;
2. T1 fine-tuning (Fashion-MNIST 64x64x3, batch 32, SGD momentum 0.9, cosine lr, the same seed and batch order for
   every row) for ``--steps`` steps: ``plain`` (dense), ``plain+SED`` (the fine-tuned dense model projected by SED
   afterwards, not retrained: SmartDeal's inference setting), ``sd-ste`` (SmartDeal form trained with the STE, SGD on
   the latent Ce, B and the rest) and ``sd-switch`` (bucket-switch update of Ce, SGD on B and the rest);
3. energy only as proxies: bytes of weights read per forward (storage) and shift-adds per forward; never joules.

    OMP_NUM_THREADS=1 python benchmarks/smartdeal/t1_smartdeal.py --out benchmarks/results --name smartdeal-2026-12-07
"""

from __future__ import annotations

import argparse
import subprocess
import time

import torch
import torch.nn.functional as F
from torch import nn

import edgetrain as et
from edgetrain import smoke
from edgetrain.bench import provenance, result_paths
from edgetrain.report import run_main, write_report
from edgetrain.techniques import smartdeal as sd
from edgetrain.train import TrainConfig, evaluate, lr_at
from edgetrain.workload import Workload

CLAIM = ("SmartDeal (abstract): training in SD form gives 10.56x storage reduction and 4.48x training-energy reduction "
         "with negligible accuracy loss; up to 2.44x inference energy efficiency (on the authors' hardware)")


def decompose(model: nn.Module, threshold: float, iterations: int, x: torch.Tensor) -> tuple[object, dict]:
    """Apply SmartDeal; per-layer error/density/storage and the eval-output change on ``x``."""
    originals = {n: m.weight.detach().clone() for n, m in model.named_modules() if hasattr(m, "weight")}
    model.eval()
    with torch.no_grad():
        before = model(x)
    t0 = time.perf_counter()
    handle = et.apply_(model, sd.SmartDeal(threshold=threshold, iterations=iterations), x[:2])
    seconds = time.perf_counter() - t0
    model.eval()
    with torch.no_grad():
        after = model(x)
    layers = []
    for name, bits in sd.storage(model).items():
        layer = model.get_submodule(name)
        with torch.no_grad():
            w, ref = sd.rebuilt_weight(layer), originals[name]
        valid = sd._LAYOUTS[layer].to_blocks(torch.ones_like(ref)).ne(0).sum()  # Ce entries that are not padding
        layers.append({"layer": name, "shape": list(ref.shape), "groups": getattr(layer, "groups", 1),
                       "rel_error": float((w - ref).norm() / ref.norm()), "density": bits["nnz"] / int(valid),
                       "shift_adds": 3 * bits["nnz"], **bits})
    return handle, {"threshold": threshold, "iterations": iterations, "sed_seconds": round(seconds, 1),
                    "output_change": float((after - before).norm() / before.norm()), "layers": layers,
                    **totals(layers)}


def totals(layers: list[dict]) -> dict:
    t = {k: sum(r[k] for r in layers) for k in ("total", "fp32", "int8", "nnz", "shift_adds", "basis_bits",
                                                 "coefficient_bits", "mask_bits")}
    return {"bits": t, "ratio_fp32": t["fp32"] / t["total"], "ratio_int8": t["int8"] / t["total"],
            "weight_bytes_per_forward": {"sd": t["total"] / 8, "fp32": t["fp32"] / 8, "int8": t["int8"] / 8}}


def train(model: nn.Module, data, a, switch: bool, label: str) -> dict:
    """``a.steps`` SGD steps (momentum 0.9, cosine); ``switch``: sd_C by BucketSwitch, the rest by SGD."""
    cfg = TrainConfig(steps=a.steps, batch_size=a.batch, optimizer="sgd", lr=a.lr, schedule="cosine")
    cs = {id(m.sd_C) for m in sd.sd_layers(model).values()} if switch else set()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad and id(p) not in cs], lr=a.lr,
                          momentum=0.9)
    bucket = sd.BucketSwitch(model, lr=a.lr, momentum=0.9, weight_decay=0.0, switch_bar=a.switch_bar) if switch \
        else None
    step, t0, curve, running = 0, time.perf_counter(), [], None
    while step < a.steps:
        for x, y in data.batches(a.batch, seed=0, epoch=step // data.steps_per_epoch(a.batch)):
            for g in [*opt.param_groups, *(bucket.param_groups if bucket else [])]:
                g["lr"] = lr_at(step, cfg, a.steps)
            model.train()
            opt.zero_grad(set_to_none=True)
            if bucket:
                bucket.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            if bucket:
                bucket.step()
            step += 1
            value = float(loss.detach())
            running = value if running is None else 0.95 * running + 0.05 * value
            if step % 25 == 0 or step == a.steps:
                curve.append((step, round(running, 4)))
                print(f"[smartdeal] {label} step {step}/{a.steps} loss {running:.4f} "
                      f"({time.perf_counter() - t0:.0f}s)", flush=True)
            if step >= a.steps:
                break
    seconds = time.perf_counter() - t0
    return {"train_seconds": round(seconds, 1), "step_seconds": round(seconds / step, 4), "final_train_loss": running,
            "loss_curve": curve}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--name", required=True)
    ap.add_argument("--steps", type=int, default=250)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--thresholds", default="4e-3,1e-3", help="SED thresholds of part 1; the first one trains")
    ap.add_argument("--iterations", type=int, default=30)
    ap.add_argument("--switch-bar", type=int, default=1, help="bucket-switch counter bar (upstream default 1)")
    ap.add_argument("--rows", default="plain,sd-ste,sd-switch",
                    help="training rows: plain (also gives plain+SED), plain+sd-ste, sd-ste, sd-switch")
    ap.add_argument("--post-steps", type=int, default=100, help="plain+sd-ste: SD steps after the dense ones")
    ap.add_argument("--train-subset", type=int, default=19200)
    ap.add_argument("--eval-subset", type=int, default=2000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--force", action="store_true")
    a = ap.parse_args(argv)
    a.steps = smoke.cap(a.steps, smoke.STEPS)  # EDGETRAIN_SMOKE=1: a command check, not a result
    a.batch = smoke.cap(a.batch, smoke.BATCH)
    a.iterations = smoke.cap(a.iterations, 1)
    thresholds = [float(t) for t in a.thresholds.split(",")][: 1 if smoke.active() else None]
    paths = result_paths(a.out, f"t1-{a.name}", force=a.force)
    torch.set_num_threads(a.threads)
    prov = provenance(a.threads)
    work = Workload(model="mobilenet_v2", data="fashion-mnist", image_size=smoke.cap(64, smoke.IMAGE_SIZE),
                    channels=3, batch_size=a.batch, train_subset=a.train_subset, eval_subset=a.eval_subset)
    train_data, test_data = work.load_data("train"), work.load_data("test")
    x_probe = test_data.batch(torch.arange(min(16, len(test_data))))[0]
    sed_rows = []
    for th in thresholds:
        model = work.build_model(10)
        _, res = decompose(model, th, a.iterations, x_probe)
        sed_rows.append(res)
        print(f"[smartdeal] SED theta {th:g}: output change {res['output_change']:.3f}, storage "
              f"{res['ratio_fp32']:.2f}x vs fp32, {res['ratio_int8']:.2f}x vs int8 ({res['sed_seconds']}s)", flush=True)
    theta = thresholds[0]
    rows, chosen = [], a.rows.split(",")
    if "plain" in chosen or "plain+sd-ste" in chosen:
        plain = work.build_model(10)
        rows.append({"name": "plain", **train(plain, train_data, a, False, "plain"),
                     "accuracy": evaluate(plain, test_data)})
        handle, res = decompose(plain, theta, a.iterations, x_probe)
        rows.append({"name": "plain+SED", "accuracy": evaluate(plain, test_data), "note": "fine-tuned dense, then "
                     "SED (not retrained)", "output_change": res["output_change"], **totals(res["layers"])})
        if "plain+sd-ste" in chosen:  # then trained on in SD form (STE) for --post-steps more steps
            post = argparse.Namespace(**{**vars(a), "steps": smoke.cap(a.post_steps, smoke.STEPS)})
            row = {"name": "plain+sd-ste", **train(plain, train_data, post, False, "plain+sd-ste"),
                   "accuracy": evaluate(plain, test_data), "note": f"plain's {a.steps} dense steps, SED, then "
                   f"{post.steps} steps in SD form (STE, the same cosine schedule restarted)"}
            rows.append({**row, **totals([{**b, "shift_adds": 3 * b["nnz"]} for b in sd.storage(plain).values()])})
        handle.remove()
    for name, switch in [(n, n == "sd-switch") for n in ("sd-ste", "sd-switch") if n in chosen]:
        model = work.build_model(10)
        handle, res = decompose(model, theta, a.iterations, x_probe)
        start = {n: (m.sd_C.detach() * m.sd_mask).clone() for n, m in sd.sd_layers(model).items()}
        row = {"name": name, **train(model, train_data, a, switch, name), "accuracy": evaluate(model, test_data),
               "paper_claim": CLAIM if name == "sd-switch" else None}
        layers = sd.sd_layers(model)
        changed = sum(int((sd.pow2_quantize(m.sd_C.detach(), theta) * m.sd_mask != start[n]).sum())
                      for n, m in layers.items())
        row["ce_changed_fraction"] = changed / sum(int(s.numel()) for s in start.values())
        bits = sd.storage(model)
        row.update(totals([{**b, "shift_adds": 3 * b["nnz"]} for b in bits.values()]))
        model.eval()
        with torch.no_grad():
            sd_pred = torch.cat([model(xb).argmax(1) for xb, _ in test_data.batches(256, shuffle=False,
                                                                                   drop_last=False)])
        sd.merge(model)  # the export: dense rebuilt weights
        handle.remove()
        with torch.no_grad():
            dense_pred = torch.cat([model(xb).argmax(1) for xb, _ in test_data.batches(256, shuffle=False,
                                                                                      drop_last=False)])
        row["merged_agreement"] = float((sd_pred == dense_pred).double().mean())
        rows.append(row)
        print(f"[smartdeal] {name}: accuracy {100 * row['accuracy']:.2f}%", flush=True)
    load = subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()
    prov.update(finished=provenance(a.threads)["date"], load=load, work="T1 (shortened)",
                workload={"model": "mobilenet_v2 (ImageNet weights, fresh 10-way head)", "data": "fashion-mnist",
                          "image_size": work.image_size, "batch": a.batch, "train_subset": a.train_subset,
                          "eval_subset": a.eval_subset, "seed": work.seed},
                schedule=f"{a.steps} SGD steps (momentum 0.9, lr {a.lr}, cosine, no weight decay), same batch order",
                smartdeal={"threshold": theta, "iterations": a.iterations, "switch_bar": a.switch_bar,
                           "storage": "nnz x (1 sign + exponent bits of the layer's range) + 1 mask bit per Ce entry "
                                      "+ B in fp32; int8 = 8 bits per weight + one fp32 scale per output channel",
                           "proxies": "weight bytes read per forward = storage; rebuild shift-adds = 3 per non-zero"})
    result = {"provenance": prov, "sed": sed_rows, "rows": rows}
    write_report(paths[0], result, paths[2], report_lines(sed_rows, rows, a))
    return 0


def report_lines(sed_rows: list[dict], rows: list[dict], a) -> list[str]:
    lines = ["# SmartDeal on T1's pretrained MobileNetV2", "",
             ("SED of the pretrained weights (all 3x3/1x1 conv and linear layers; storage against the same layers in "
              "fp32 / int8):"), "",
             ("| theta | output change | mean layer error | max layer error | Ce density | storage vs fp32 | vs int8 | "
              "shift-adds/forward | SED s |"), "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for s in sed_rows:
        errs = [r["rel_error"] for r in s["layers"]]
        dens = s["bits"]["nnz"] / sum(r["nnz"] / r["density"] for r in s["layers"] if r["density"] > 0)
        lines.append(f"| {s['threshold']:g} | {s['output_change']:.3f} | {sum(errs) / len(errs):.3f} | "
                     f"{max(errs):.3f} | {dens:.3f} | {s['ratio_fp32']:.2f}x | {s['ratio_int8']:.2f}x | "
                     f"{s['bits']['shift_adds']:,} | {s['sed_seconds']} |")
    first = sed_rows[0]
    lines += ["", f"Per layer at theta {first['threshold']:g}:", "",
              "| layer | shape | groups | rel. error | Ce density | SD bits | fp32 bits | int8 bits |",
              "|---|---|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['layer']} | {'x'.join(map(str, r['shape']))} | {r['groups']} | {r['rel_error']:.3f} | "
              f"{r['density']:.3f} | {r['total']:,} | {r['fp32']:,} | {r['int8']:,} |" for r in first["layers"]]
    lines += ["", (f"T1 fine-tuning, {a.steps} SGD steps x batch {a.batch} (shortened from 600), accuracy on the "
                   f"{a.eval_subset}-image test subset:"), "",
              ("| row | accuracy % | s/step | storage vs fp32 | weight KB/forward | shift-adds/forward | Ce changed | "
               "merged = SD |"), "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        kb = r["weight_bytes_per_forward"]["sd"] / 1024 if "bits" in r else None
        lines.append(f"| {r['name']} | {100 * r['accuracy']:.2f} | {r.get('step_seconds', '')} | "
                     f"{r['ratio_fp32']:.2f}x | {kb:,.0f} | {r['bits']['shift_adds']:,} | "
                     f"{100 * r.get('ce_changed_fraction', 0):.1f}% | {r.get('merged_agreement', '')} |"
                     if kb is not None else f"| {r['name']} | {100 * r['accuracy']:.2f} | {r['step_seconds']} | 1x "
                     f"(fp32) | {first['weight_bytes_per_forward']['fp32'] / 1024:,.0f} | 0 | | |")
    return lines


if __name__ == "__main__":
    run_main(main, "smartdeal")
