"""Logic Shrinkage vs fixed-K LUTNet vs the plain and pruned residual BNN on Fashion-MNIST (a binarised MLP).

Wang, Zhang, Cheung, Constantinides, Davis, *Logic Shrinkage: Learned FPGA Netlist Sparsity for Efficient Neural
Network Inference*, FPGA 2022, arXiv:2112.02346; LUTNet: FCCM 2019, arXiv:1904.00938. Pipeline
(:mod:`edgetrain.lut.pipeline`, the public code's stages with optimizer steps for epochs):

* ``bnn``: the residual BNN ``784-H-H-10`` (2-level residual sign, BatchNorm), ``--bnn-steps``;
* ``bnn-pruned``: its layers after the first magnitude-pruned to node sparsity ``--theta``, retrained
  ``--prune-steps`` (the public code: 0.94 on CIFAR-10's conv6, 50 epochs);
* ``lutnet-k<K>``: logic expansion of the pruned BNN to K-LUTs in those layers, ``--lut-fp-steps`` with
  full-precision (clipped) coefficients, then ``--lut-bin-steps`` binarised (public code: 50 + 200 epochs);
* ``ls-d<delta>``: from the same full-precision LUTNet, shrink to ``0.33 delta``, retrain ``--shrink-steps``,
  ``0.67 delta``, retrain, ``delta``, then ``--lut-fp-steps`` full precision and ``--lut-bin-steps`` binarised
  (public code: 20 epochs per retrain). It trains ``2 * --shrink-steps`` more steps than the LUTNet row.

Adam (lr ``--lr``, the public code's 0.01; cosine per stage: ours), batch 100 (public code), seed 0, dataset mean/std
normalisation, no augmentation. Metrics on the 10,000 test images: accuracy; LUT count (unpruned K-LUTs, one per
connection of the LUT layers); parameter count ``sum 2**K_i * levels``; the learned-K histogram; for the BNN rows,
the unpruned connections (one XNOR, one weight bit each). No FPGA synthesis: LUT counts are logical K-input LUTs,
not the post-synthesis 6-LUT counts the paper reports. Writes ``<out>/fashion-<name>.{json,md,png}``.

    OMP_NUM_THREADS=1 python benchmarks/lut/logic_shrinkage.py --out benchmarks/results --name logic-shrink-demo --threads 1
"""

from __future__ import annotations

import argparse
import copy
import subprocess

import torch

from edgetrain import smoke
from edgetrain.bench import plain_log_ticks, provenance, result_paths
from edgetrain.data import load_t2
from edgetrain.lut.pipeline import (
    LUTMLP,
    STAGE_FRACTIONS,
    evaluate,
    expand,
    magnitude_prune_,
    model_stats,
    set_binary,
    shrink_model_,
    train_steps,
)
from edgetrain.lut.shrink import check_delta
from edgetrain.report import run_main, write_report

CLAIM = ("Logic Shrinkage (FPGA 2022, abstract): on CNV/CIFAR-10, 1.54x area and 1.31x energy efficiency of the best "
         "LUTNet at matched accuracy; 2.71x the area efficiency of an equally accurate heavily pruned BNN. Public "
         "code README: MNIST MLP 97.47% top-1 with 63,928 LUTs (post-synthesis)")


def log(text: str) -> None:
    print(f"[logic-shrink] {text}", flush=True)


def row(name: str, model: LUTMLP, test_data, steps: int, seconds: float, **extra) -> dict:
    acc = evaluate(model, test_data)
    stats = model_stats(model)
    log(f"{name}: accuracy {100 * acc:.2f}% {stats.get('luts', stats.get('xnors'))} "
        f"{'LUTs' if 'luts' in stats else 'XNORs'}, params {stats['params']:,}")
    return {"name": name, "accuracy": acc, "train_steps": steps, "train_seconds": round(seconds, 1), **stats, **extra}


def figure(rows: list[dict], k: int):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    luts = [r for r in rows if "k_hist" in r]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.4))
    width = 0.8 / max(1, len(luts))
    for n, r in enumerate(luts):
        xs = [kk + (n - (len(luts) - 1) / 2) * width for kk in range(1, k + 1)]
        axes[0].bar(xs, [r["k_hist"][str(kk)] for kk in range(1, k + 1)], width, label=r["name"])
    axes[0].set(title="learned fan-in K per unpruned LUT (both LUT layers)", xlabel="K_i (inputs kept)",
                ylabel="LUTs", xticks=range(1, k + 1))
    axes[0].legend(fontsize=8)
    for r in rows:
        axes[1].scatter(r["params"], 100 * r["accuracy"], s=30)
        axes[1].annotate(r["name"], (r["params"], 100 * r["accuracy"]), fontsize=8, xytext=(4, 2),
                         textcoords="offset points")
    axes[1].set(xscale="log", title="test accuracy vs parameter count of the LUT layers",
                xlabel="sum 2^K_i * levels (BNN: unpruned 1-bit weights)", ylabel="test accuracy %")
    plain_log_ticks(axes[1].xaxis)
    axes[1].grid(alpha=0.3)
    fig.tight_layout()
    return fig


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--name", required=True)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--theta", type=float, default=0.75, help="BNN node sparsity of the LUT target layers")
    ap.add_argument("--deltas", default="0.5,0.75", help="Logic Shrinkage input sparsities")
    ap.add_argument("--bnn-steps", type=int, default=1000)
    ap.add_argument("--prune-steps", type=int, default=200)
    ap.add_argument("--lut-fp-steps", type=int, default=300)
    ap.add_argument("--shrink-steps", type=int, default=100)
    ap.add_argument("--lut-bin-steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=100)
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--seed", type=int, default=0, help="init, batch order and the LUTs' random extra inputs")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--force", action="store_true")
    a = ap.parse_args(argv)
    deltas = [check_delta(float(d)) for d in a.deltas.split(",")]
    for f in ("bnn_steps", "prune_steps", "lut_fp_steps", "shrink_steps", "lut_bin_steps"):
        setattr(a, f, smoke.cap(getattr(a, f), smoke.STEPS))  # EDGETRAIN_SMOKE=1: a command check, not a result
    a.batch_size = smoke.cap(a.batch_size, smoke.BATCH)
    a.hidden = smoke.cap(a.hidden, 32)
    paths = result_paths(a.out, f"fashion-{a.name}", force=a.force)
    torch.set_num_threads(a.threads)
    prov = provenance(a.threads)
    train_data, test_data = load_t2()
    fit = {"lr": a.lr, "batch_size": a.batch_size, "log": log, "seed": a.seed}
    torch.manual_seed(a.seed)
    sizes = (784, a.hidden, a.hidden, 10)
    bnn = LUTMLP(sizes)
    r = train_steps(bnn, train_data, a.bnn_steps, label="bnn", **fit)
    rows = [row("bnn", bnn, test_data, r["steps"], r["seconds"])]
    pruned = copy.deepcopy(bnn)
    magnitude_prune_(pruned, a.theta)
    acc0 = evaluate(pruned, test_data)
    r2 = train_steps(pruned, train_data, a.prune_steps, label="bnn-pruned", **fit)
    steps, secs = r["steps"] + r2["steps"], r["seconds"] + r2["seconds"]
    rows.append(row(f"bnn-pruned-{a.theta:g}", pruned, test_data, steps, secs, accuracy_after_prune=acc0))
    lut = expand(pruned, a.k, seed=a.seed)
    set_binary(lut, False)
    acc0 = evaluate(lut, test_data)
    r3 = train_steps(lut, train_data, a.lut_fp_steps, label=f"lutnet-k{a.k} fp", **fit)
    steps, secs = steps + r3["steps"], secs + r3["seconds"]
    lut_fp = copy.deepcopy(lut)
    fp_acc = evaluate(lut_fp, test_data)
    set_binary(lut, True)
    r4 = train_steps(lut, train_data, a.lut_bin_steps, label=f"lutnet-k{a.k} bin", **fit)
    rows.append(row(f"lutnet-k{a.k}", lut, test_data, steps + r4["steps"], secs + r4["seconds"],
                    accuracy_after_expansion_fp=acc0, accuracy_fp_coefficients=fp_acc))
    for delta in deltas:
        ls = copy.deepcopy(lut_fp)
        ls_steps, ls_secs, stages = steps, secs, []
        for n, frac in enumerate(STAGE_FRACTIONS):
            per_layer = shrink_model_(ls, delta * frac)
            stage = {"delta": round(delta * frac, 4), "accuracy_after_shrink": evaluate(ls, test_data),
                     "luts": sum(p["luts"] for p in per_layer), "params": sum(p["params"] for p in per_layer)}
            n_steps = a.shrink_steps if n < len(STAGE_FRACTIONS) - 1 else a.lut_fp_steps
            rs = train_steps(ls, train_data, n_steps, label=f"ls-d{delta:g} stage {n + 1} fp", **fit)
            stage["accuracy_after_retrain"] = evaluate(ls, test_data)
            stages.append(stage)
            ls_steps, ls_secs = ls_steps + rs["steps"], ls_secs + rs["seconds"]
            log(f"ls-d{delta:g} stage {n + 1}: {stage}")
        set_binary(ls, True)
        rb = train_steps(ls, train_data, a.lut_bin_steps, label=f"ls-d{delta:g} bin", **fit)
        rows.append(row(f"ls-d{delta:g}", ls, test_data, ls_steps + rb["steps"], ls_secs + rb["seconds"],
                        delta=delta, stages=stages))
    for r in rows:
        r["paper_claim"] = CLAIM if r["name"].startswith("ls-") else None
    load = subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()
    prov.update(finished=provenance(a.threads)["date"], load=load,
                dataset="fashion-mnist 60k/10k, 28x28 flattened, dataset mean/std, no augmentation",
                model=f"residual BNN {'-'.join(map(str, sizes))}, 2 residual levels, BatchNorm after every layer; "
                      f"LUT rows: K={a.k} LUTs in the layers after the first (one per connection)",
                schedule={"bnn": a.bnn_steps, "prune_retrain": a.prune_steps, "lut_fp": a.lut_fp_steps,
                          "shrink_retrain": a.shrink_steps, "lut_bin": a.lut_bin_steps, "batch": a.batch_size,
                          "optimizer": f"Adam lr {a.lr}, cosine per stage", "seed": a.seed, "theta": a.theta, "deltas": deltas,
                          "stage_fractions": list(STAGE_FRACTIONS)},
                paper_schedule="epochs at batch 100: BNN 200, pruned retrain 50, LUT fp 50, shrink retrain 20 "
                               "(x2), LUT fp 50, LUT binarised 200; theta 0.94 (CIFAR-10 conv6), delta 0.75, K 4")
    result = {"provenance": prov, "rows": rows}
    setup = (f"K={a.k}, theta={a.theta:g}, Adam lr {a.lr}; steps: BNN {a.bnn_steps}, pruned retrain {a.prune_steps}, "
             f"LUT fp {a.lut_fp_steps}, shrink retrain {a.shrink_steps} (x2), LUT binarised {a.lut_bin_steps}; "
             f"batch {a.batch_size}; seed {a.seed}. LUT counts are logical K-LUTs of the two LUT layers (no synthesis).")
    head = ("| row | test acc % | LUTs (BNN: XNORs) | params sum 2^K_i*levels | K_i histogram (1..K) | "
            "K_i=1 reading the anchor | train steps | train s |")
    lines = [f"# Logic Shrinkage vs LUTNet vs BNN, Fashion-MNIST MLP {'-'.join(map(str, sizes))}", "", setup, "",
             head, "|---|---:|---:|---:|---|---:|---:|---:|"]
    for r in rows:
        hist = " / ".join(str(r["k_hist"][str(kk)]) for kk in range(1, a.k + 1)) if "k_hist" in r else "-"
        anchor = f"{r['k1_anchor_only']:,}" if "k_hist" in r else "-"
        lines.append(f"| {r['name']} | {100 * r['accuracy']:.2f} | {r.get('luts', r.get('xnors')):,} | "
                     f"{r['params']:,} | {hist} | {anchor} | {r['train_steps']} | {r['train_seconds']} |")
    staged = ("Staged shrinkage (accuracy with full-precision coefficients, right after each shrink and after its "
              "retraining):")
    lines += ["", staged, "", "| row | stage delta | LUTs | params | acc after shrink % | acc after retrain % |",
              "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        for s in r.get("stages", []):
            lines.append(f"| {r['name']} | {s['delta']} | {s['luts']:,} | {s['params']:,} | "
                         f"{100 * s['accuracy_after_shrink']:.2f} | {100 * s['accuracy_after_retrain']:.2f} |")
    write_report(paths[0], result, paths[2], lines)
    import matplotlib.pyplot as plt

    fig = figure(rows, a.k)
    fig.savefig(paths[3], dpi=110)
    plt.close(fig)
    print(paths[3])
    return 0


if __name__ == "__main__":
    run_main(main, "logic_shrinkage")
