"""Sparse GCN training from scratch (SET, RigL, DST-EE) against dense training then magnitude pruning, at matched
final weight sparsity: test accuracy, training memory (the meter) and training MACs (counted analytically).

Papers: GCN (Kipf & Welling, ICLR 2017, arXiv 1609.02907); the comparison as in Peng et al., "Towards Sparsification
of Graph Neural Networks", ICCD 2022, arXiv 2209.04766 (train-and-prune vs sparse training); the DST rules of
:mod:`edgetrain.sparse` (SET arXiv 1707.04780, RigL arXiv 1911.11134, DST-EE arXiv 2211.16667). Module:
:mod:`edgetrain.gnn`; docs/gnn.md.

Graph: :func:`edgetrain.gnn.sbm_graph` with its defaults (5 blocks of 400 nodes, p_in 0.015, p_out 0.003, 500
Gaussian features with class means of std 0.1, 20 labels per class / 500 / 1000; graph seed ``--graph-seed``).
Model: 2-layer GCN 500 -> ``--hidden`` -> 5, dropout 0.5; Adam lr 0.01, L2 5e-4 (Kipf & Welling §5.2), full batch,
``--steps`` steps. Rows, for each seed (initialisation, dropout, sparse patterns; the graph is the same):

* dense: trained ``--steps`` steps;
* prune: that dense model magnitude-pruned to each sparsity with the controller's per-layer nonzero counts (ERK),
  accuracy right after pruning, and after ``--finetune`` more steps with the mask fixed (a fresh Adam);
* set / rigl / dst_ee: the same initialisation made sparse (ERK) and trained ``--steps`` steps with the DST
  controller (update every ``--delta-t`` steps until 75 % of training, zeta0 0.3; DST-EE c 1, eps 1);
* static: the same random ERK pattern as SET's, never updated (static sparse training, the DST rules' baseline).

Memory (``edgetrain.measure``, one full-batch Adam step): dense, masked dense (the pruned model while fine-tuning)
and sparse; plus the peak rise of a RigL/DST-EE update step (profiler, as ``benchmarks/sparse/dst.py``).
MACs: :func:`edgetrain.gnn.step_macs` per step (weight products at their nonzeros for a sparse layer, dense for a
dense or masked one; adjacency products at nnz(Â) x width), plus the dense score of each RigL/DST-EE update step.

    OMP_NUM_THREADS=1 python benchmarks/gnn/sparse_gcn.py --out benchmarks/results --name gnn-sparse-2026-12-07
"""

from __future__ import annotations

import argparse
import copy
import subprocess
import time

import torch
import torch.nn.functional as F

import edgetrain as et
from edgetrain import smoke
from edgetrain.bench import provenance, result_paths
from edgetrain.gnn import GCN, accuracy, check_sparsity, dense_score_macs, prune_to, sbm_graph, step_macs, train_gcn
from edgetrain.measure import PeakMeter
from edgetrain.report import run_main, write_report
from edgetrain.sparse import DynamicSparse

METHODS = ("static", "set", "rigl", "dst_ee")  # static: a random ERK pattern never updated
CLAIMS = {
    "prune": "UGS (Chen et al. ICML 2021): GCN weight tickets at high weight sparsity match the dense GCN on Cora/"
             "Citeseer/PubMed (iterative pruning with rewinding; not what is run here)",
    "sparse": "Peng et al. ICCD 2022: sparse training reaches accuracy comparable to train-and-prune with far fewer "
              "training FLOPs (link prediction), and better accuracy at extreme sparsity (node classification, "
              "less than 1/7 of the FLOPs)",
}


def model_for(g, a, seed: int) -> GCN:
    torch.manual_seed(seed)
    return GCN(g.adj, g.x.shape[1], int(g.y.max()) + 1, hidden=a.hidden)


def controller(model: GCN, method: str, sparsity: float, a, seed: int) -> DynamicSparse:
    """The DST controller; ``static`` is SET's with the topology fixed from the start (no update step before
    ``T_end`` = 1e-9 of training)."""
    if method == "static":
        return DynamicSparse(model, 1 - sparsity, "set", total_steps=a.steps, t_end_frac=1e-9, seed=seed)
    return DynamicSparse(model, 1 - sparsity, method, total_steps=a.steps, delta_t=a.delta_t, seed=seed)


def accs(model: GCN, g) -> dict:
    return {"val_accuracy": accuracy(model, g, g.val), "test_accuracy": accuracy(model, g, g.test)}


def nonzeros(model: GCN) -> int:
    return sum(int(c.lin.nnz) if hasattr(c.lin, "nnz") else int((c.lin.weight != 0).sum())
               for c in (model.conv1, model.conv2))


def adam(model: GCN, a) -> torch.optim.Optimizer:
    return torch.optim.Adam(model.parameters(), lr=a.lr, weight_decay=a.wd)


def meter(model: GCN, g) -> dict:
    m = et.measure(model, (g.x, g.targets()), optimizer=torch.optim.Adam(model.parameters(), lr=0.01),
                   repeats=smoke.cap(10, smoke.REPEATS), warmup=2)
    return {"param_bytes": m.param_bytes, "grad_bytes": m.grad_bytes, "optimizer_bytes": m.optimizer_bytes,
            "buffer_bytes": m.peak_split.get("buffers", 0), "saved_bytes": m.saved_bytes, "peak_bytes": m.peak_bytes,
            "peak_phase": m.peak_phase, "peak_where": m.peak_where, "peak_split": m.peak_split,
            "step_seconds": m.step_seconds}


def update_step_cost(g, method: str, sparsity: float, a) -> dict:
    """Peak live-bytes rise (profiler allocator events) of a plain step and of the first update step."""
    model = model_for(g, a, 0)
    ds = controller(model, method, sparsity, a, 0)
    opt = adam(model, a)
    target = g.targets()

    def one() -> int:
        opt.zero_grad(set_to_none=True)
        with PeakMeter() as pm:
            F.cross_entropy(model(g.x), target).backward()
            opt.step()
            ds.step(opt)
        return pm.peak_delta

    plain = [one() for _ in range(a.delta_t - 1)][-1]
    return {"plain_step_peak_delta": plain, "update_step_peak_delta": one()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--name", required=True)
    ap.add_argument("--steps", type=int, default=200, help="training steps (Kipf & Welling: 200 epochs, full batch)")
    ap.add_argument("--finetune", type=int, default=50, help="fine-tune steps after pruning (our assumption)")
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--wd", type=float, default=5e-4)
    ap.add_argument("--delta-t", type=int, default=10, help="DST update interval (our choice for 200 steps)")
    ap.add_argument("--sparsities", default="0.8,0.9,0.95,0.98")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--seeds", type=int, default=1, help="how many seeds (initialisation, dropout, patterns)")
    ap.add_argument("--first-seed", type=int, default=0, help="seeds first .. first + n - 1")
    ap.add_argument("--graph-seed", type=int, default=0)
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--force", action="store_true")
    a = ap.parse_args(argv)
    try:
        values = [float(s) for s in a.sparsities.split(",")]
    except ValueError:
        raise et.ConfigError(f"--sparsities: a comma-separated list of numbers in [0, 1), got {a.sparsities!r}") from None
    sparsities = [check_sparsity(v, "--sparsities") for v in values]
    methods = a.methods.split(",")
    for m in methods:
        if m not in METHODS:
            raise et.ConfigError(f"--methods: {m!r} is not one of {', '.join(METHODS)}")
    for what, v, lo in (("--steps", a.steps, 1), ("--finetune", a.finetune, 0), ("--hidden", a.hidden, 1),
                        ("--delta-t", a.delta_t, 1), ("--seeds", a.seeds, 1), ("--first-seed", a.first_seed, 0)):
        if v < lo:
            raise et.ConfigError(f"{what}: must be an int >= {lo}, got {v}")
    a.steps, a.finetune = smoke.cap(a.steps, 4), smoke.cap(a.finetune, 2)  # EDGETRAIN_SMOKE=1: a command check
    if smoke.active():
        a.delta_t = min(a.delta_t, 2)
    paths = result_paths(a.out, a.name, force=a.force)
    torch.set_num_threads(a.threads)
    prov = provenance(a.threads)
    g = sbm_graph(seed=a.graph_seed)
    n, e = g.x.shape[0], None
    rows = []

    def add(method: str, sparsity: float, seed: int, model: GCN, macs: int, t0: float, **extra) -> None:
        row = {"method": method, "sparsity": sparsity, "seed": seed, **accs(model, g), "weight_nonzeros":
               nonzeros(model), "train_macs": macs, "seconds": round(time.perf_counter() - t0, 1), **extra}
        rows.append(row)
        print(f"[gnn] {method}@{sparsity:g} seed {seed}: test {100 * row['test_accuracy']:.1f}% "
              f"(val {100 * row['val_accuracy']:.1f}%), nnz {row['weight_nonzeros']}, {macs / 1e9:.2f} GMAC, "
              f"{row['seconds']}s", flush=True)

    for seed in range(a.first_seed, a.first_seed + smoke.cap(a.seeds, 1)):
        t0 = time.perf_counter()
        dense = model_for(g, a, seed)
        e = dense.adj_values.numel()
        dense_macs = step_macs(dense)
        train_gcn(dense, g, a.steps, a.lr, a.wd)
        add("dense", 0.0, seed, dense, a.steps * dense_macs, t0)
        for s in sparsities:
            t0 = time.perf_counter()
            pruned = copy.deepcopy(dense)
            kept = prune_to(pruned, s)
            add("prune (no fine-tune)", s, seed, pruned, a.steps * dense_macs, t0, kept=kept)
            torch.manual_seed(seed + 1000)  # the fine-tune's dropout
            if a.finetune:
                train_gcn(pruned, g, a.finetune, a.lr, a.wd)
            add("prune + fine-tune", s, seed, pruned, (a.steps + a.finetune) * dense_macs, t0, kept=kept,
                finetune_steps=a.finetune)
            for m in methods:
                t0 = time.perf_counter()
                model = model_for(g, a, seed)
                ds = controller(model, m, s, a, seed)
                train_gcn(model, g, a.steps, a.lr, a.wd, controller=ds)
                updates = len(ds.history) if m in ("rigl", "dst_ee") else 0  # the armed (dense-score) steps
                macs = a.steps * step_macs(model) + updates * dense_score_macs(model)
                add(m, s, seed, model, macs, t0, densities=ds.densities, updates=len(ds.history),
                    coverage=ds.coverage() or None)
    mem = []
    if not a.skip_memory:
        mem.append({"kind": "dense", "sparsity": 0.0, **meter(model_for(g, a, 0), g)})
        for s in sparsities:
            masked = model_for(g, a, 0)
            prune_to(masked, s)
            mem.append({"kind": "masked dense (pruned, fine-tuning)", "sparsity": s, **meter(masked, g)})
            for kind in ("rigl", "dst_ee"):
                model = model_for(g, a, 0)
                controller(model, kind, s, a, 0)
                row = {"kind": "sparse SET/RigL" if kind == "rigl" else "sparse DST-EE", "sparsity": s,
                       **meter(model, g), **update_step_cost(g, kind, s, a)}
                mem.append(row)
                print(f"[gnn] memory {row['kind']}@{s:g}: peak {row['peak_bytes']:,} B", flush=True)
    load = subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()
    prov.update(finished=provenance(a.threads)["date"], load=load, graph=g.meta, adjacency_nnz=e,
                model=f"GCN {g.x.shape[1]}-{a.hidden}-{int(g.y.max()) + 1}, dropout 0.5, Glorot init",
                schedule=f"{a.steps} full-batch Adam steps (lr {a.lr}, L2 {a.wd}); prune: ERK per-layer counts, "
                         f"{a.finetune} fine-tune steps (fresh Adam); seeds {a.first_seed}..{a.first_seed + a.seeds - 1}",
                dst=f"ERK, delta_t {a.delta_t}, zeta0 0.3 cosine, T_end 0.75 T; DST-EE c 1, eps 1, |g| / mean|g|",
                macs="per step: weight products N*nnz (forward, weight grad, input grad of layer 2 only), adjacency "
                     "products nnz(Â)*width (forward and backward); dense/masked layers count every weight; RigL/"
                     "DST-EE add N*out*in per sparse layer per update step; bias, ReLU, dropout, loss not counted",
                memory="edgetrain.measure, one full-batch step, Adam, 10 timed steps after 2 warm-up", nodes=n,
                claims=CLAIMS)
    write_report(paths[0], {"provenance": prov, "rows": rows, "memory": mem}, paths[2], report_lines(rows, mem, a))
    return 0


def report_lines(rows: list[dict], mem: list[dict], a) -> list[str]:
    sp = sorted({r["sparsity"] for r in rows if r["method"] != "dense"})
    seeds = sorted({r["seed"] for r in rows})

    def pick(m: str, s: float, key: str) -> list[float]:
        return [r[key] for r in rows if r["method"] == m and r["sparsity"] == s]

    def cell(m: str, s: float) -> str:
        v = [100 * x for x in pick(m, s, "test_accuracy")]
        if not v:
            return "-"
        return f"{sum(v) / len(v):.1f}" + (f" ({', '.join(f'{x:.1f}' for x in v)})" if len(v) > 1 else "")

    dense_macs = pick("dense", 0.0, "train_macs")[:1] or [1]
    methods = list(dict.fromkeys(r["method"] for r in rows if r["method"] != "dense"))
    lines = ["# Sparse GCN training vs dense train-then-prune (SBM graph, node classification)", "",
             (f"Test accuracy % (1,000 test nodes) after {a.steps} steps, mean over seeds {seeds} (each seed in "
              f"brackets); dense: {cell('dense', 0.0)}."), "",
             "| method | " + " | ".join(f"{100 * s:g}% sparse" for s in sp) + " |", "|---|" + "---:|" * len(sp)]
    lines += [f"| {m} | " + " | ".join(cell(m, s) for s in sp) + " |" for m in methods]
    lines += ["", f"Training MACs (millions; dense training: {dense_macs[0] / 1e6:,.0f} M), and as a fraction of it:",
              "", "| method | " + " | ".join(f"{100 * s:g}% sparse" for s in sp) + " |", "|---|" + "---:|" * len(sp)]
    for m in methods:
        cells = []
        for s in sp:
            v = pick(m, s, "train_macs")
            cells.append(f"{v[0] / 1e6:,.0f} ({v[0] / dense_macs[0]:.2f})" if v else "-")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    if mem:
        lines += ["", ("Memory of one training step (edgetrain.measure, bytes; buffers: Â's CSR, the weights' CSR "
                       "indices, masks, DST-EE coverage counters; update step: peak rise of a RigL/DST-EE update "
                       "step (a plain step's) from the profiler):"), "",
                  "| kind | sparsity | params | grads | optimizer | buffers | saved | peak | step ms | update step |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in mem:
            upd = (f"{r['update_step_peak_delta']:,} ({r['plain_step_peak_delta']:,})"
                   if "update_step_peak_delta" in r else "")
            lines.append(f"| {r['kind']} | {100 * r['sparsity']:g}% | {r['param_bytes']:,} | {r['grad_bytes']:,} | "
                         f"{r['optimizer_bytes']:,} | {r['buffer_bytes']:,} | {r['saved_bytes']:,} | "
                         f"{r['peak_bytes']:,} | {1e3 * r['step_seconds']:.1f} | {upd} |")
    return lines


if __name__ == "__main__":
    run_main(main, "gnn")
