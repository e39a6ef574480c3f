"""T2: thermal-aware execution on a simulated phone: a slimmable CNN (Fashion-MNIST) switched to a narrower width
before the step-wise governor throttles, against always-wide and always-narrow.

Yu et al., *Slimmable Neural Networks*, ICLR 2019, arXiv:1812.08928; Yu and Huang, *Universally Slimmable Networks
and Improved Training Techniques*, ICCV 2019, arXiv:1903.05134; Zhou et al., *Play It Cool: Dynamic Shifting
Prevents Thermal Throttling*, ICML 2022 DyNN workshop, arXiv:2206.10849. Models and constants:
:mod:`edgetrain.hardware.thermal` and docs/thermal.md.

1. A slimmable CNN (widths 0.25/0.5/0.75/1.0 of 16-32-64 channels, switchable BatchNorm) is trained from scratch,
   every width every step (S-Net), the narrower ones by in-place distillation from the widest (US-Net); AdamW
   (lr ``--lr``, cosine), batch ``--batch-size``, ``--steps`` steps, seed 0. Test accuracy of each width on all
   10,000 test images.
2. Each width's forward MACs for a frame of ``--per-frame`` images: ``edgetrain.cost.estimate(...).macs``.
3. ``--seconds`` of frames at ``--fps`` on the PHONE device (SDM845 big cluster constants, lumped RC, step-wise
   governor), per frame size: always each width (the governor throttles the wide one), and the policy (predict
   ``--horizon`` s ahead, keep below the trip point) over {0.5, 1.0} (big/little) and over all four widths, and the
   policy with its thermal resistance underestimated by each of ``--model-errors`` (an imperfect thermal model).

Writes ``<out>/fashion-thermal-<name>.{json,md,png}`` (latency, temperature and frequency over time).

    OMP_NUM_THREADS=1 python benchmarks/hardware/thermal.py --out benchmarks/results --name 2026-12-07
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch

import edgetrain as et
from edgetrain import smoke
from edgetrain.bench import provenance, result_paths
from edgetrain.cost import estimate
from edgetrain.data import load_t2
from edgetrain.hardware.thermal import (
    PHONE,
    PHONE_SOURCES,
    WIDTHS,
    SlimmableCNN,
    channels,
    set_width,
    simulate,
    slimmable_step,
)
from edgetrain.report import run_main, write_report
from edgetrain.train import TrainConfig, lr_at

CHANS = (16, 32, 64)  # SlimmableCNN's default channels at width 1
CLAIM = ("Zhou et al. 2022 (Play It Cool, abstract): without shifting, throttling lowers the CPU clock and the "
         "inference latency may increase dramatically; with dynamic shifting between a large and a small "
         "shared-weight model the application runs without clock degradation or latency increase, at a reasonable "
         "accuracy trade-off (their per-phone numbers were not retrieved). Yu et al. 2019: slimmable networks reach "
         "accuracy similar to individually trained ones at each width (ImageNet)")


def train(model: SlimmableCNN, data, a) -> dict:
    cfg = TrainConfig(steps=a.steps, batch_size=a.batch_size, optimizer="adamw", lr=a.lr, schedule="cosine")
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr)
    step, t0, running = 0, time.perf_counter(), None
    model.train()
    while step < a.steps:
        for x, y in data.batches(a.batch_size, seed=0, epoch=step // data.steps_per_epoch(a.batch_size)):
            for g in opt.param_groups:
                g["lr"] = lr_at(step, cfg, a.steps)
            loss = slimmable_step(model, x, y, opt, distill=not a.no_distill)
            step += 1
            running = loss if running is None else 0.98 * running + 0.02 * loss
            if step % 250 == 0 or step == a.steps:
                print(f"[thermal] step {step}/{a.steps} loss {running:.4f} ({time.perf_counter() - t0:.0f}s)",
                      flush=True)
            if step >= a.steps:
                break
    return {"train_seconds": round(time.perf_counter() - t0, 1), "steps": step, "final_train_loss": running}


@torch.no_grad()
def accuracy(model: SlimmableCNN, test: list, width: float) -> float:
    set_width(model, width).eval()
    right = sum(int((model(x).argmax(1) == y).sum()) for x, y in test)
    return right / sum(len(y) for _, y in test)


def per_second(tr, values: list[float]) -> tuple[list[float], list[float], list[float], list[float]]:
    """Seconds, and the mean, min and max of ``values`` over the frames started in each second."""
    bins: dict[int, list[float]] = {}
    for t, v in zip(tr.time, values):
        bins.setdefault(int(t), []).append(v)
    keys = sorted(bins)
    return ([float(k) for k in keys], [sum(bins[k]) / len(bins[k]) for k in keys], [min(bins[k]) for k in keys],
            [max(bins[k]) for k in keys])


def figure(traces: dict, title: str, path, deadline_ms: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(4, 1, figsize=(9, 10), sharex=True)
    for label, tr in traces.items():
        t, mean, lo, hi = per_second(tr, [1e3 * x for x in tr.latency])
        line, = axes[0].plot(t, mean, label=label, lw=1.0)
        axes[0].fill_between(t, lo, hi, color=line.get_color(), alpha=0.15, lw=0)
        axes[1].plot(*per_second(tr, tr.width)[:2], label=label, lw=1.0)
        axes[2].plot(tr.time, tr.temp, label=label, lw=1.0)
        axes[3].plot(*per_second(tr, tr.mhz)[:2], label=label, lw=1.0)
    axes[0].axhline(deadline_ms, color="k", ls=":", lw=0.8, label="deadline (frame period)")
    axes[2].axhline(PHONE.trip, color="r", ls=":", lw=0.8, label="trip point")
    axes[0].set_ylabel("latency per frame (ms)\nmean per second,\nband: min-max")
    axes[1].set_ylabel("width\n(mean per second)")
    axes[2].set_ylabel("SoC temperature (C)")
    axes[3].set_ylabel("big-cluster MHz\n(mean per second)")
    axes[3].set_xlabel("time (s)")
    axes[0].legend(fontsize=8, loc="center right")
    axes[1].legend(fontsize=8, loc="center right")
    axes[2].legend([axes[2].lines[-1]], ["trip point"], fontsize=8, loc="lower right")
    axes[0].set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def individual(a, train_data, test: list, paths: list, prov: dict) -> int:
    """One plain CNN per width (channels ``round(w * c)``, one BatchNorm each), trained alone on the labels."""
    rows = []
    for w in WIDTHS:
        torch.manual_seed(0)
        net = SlimmableCNN(widths=(1.0,), chans=tuple(channels(c, w) for c in CHANS))
        res = train(net, train_data, a)
        acc = accuracy(net, test, 1.0)
        print(f"[thermal] individual width {w}: {100 * acc:.2f}%", flush=True)
        rows.append({"name": f"individual {w}", "width": w, "accuracy": acc, **res,
                     "params": sum(p.numel() for p in net.parameters()),
                     "macs_per_image": estimate(net, input_shape=(1, 28, 28), batch_size=1).macs})
    prov.update(finished=provenance(a.threads)["date"], work="T2", dataset="fashion-mnist 60k/10k, 28x28x1",
                model=f"plain CNN per width: 3x3 convs {'-'.join(str(c) for c in CHANS)} x width, BN, ReLU, GAP, linear",
                schedule=f"{a.steps} AdamW steps (lr {a.lr}, cosine) x batch {a.batch_size}, labels, seed 0, each",
                paper_claim=CLAIM)
    lines = ["# Individually trained networks per width (the slimmable network's baseline), Fashion-MNIST T2", "",
             "| width | test accuracy % | params | MACs per image | train s |", "|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['width']} | {100 * r['accuracy']:.2f} | {r['params']} | {r['macs_per_image']} | "
              f"{r['train_seconds']} |" for r in rows]
    write_report(paths[0], {"provenance": prov, "rows": rows}, paths[2], lines)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--name", required=True)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--no-distill", action="store_true", help="narrower widths learn the labels, not the widest")
    ap.add_argument("--per-frame", default="192,256,320", help="images per frame, comma-separated")
    ap.add_argument("--plot-frame", type=int, default=320, help="the frame size whose traces are plotted")
    ap.add_argument("--fps", type=float, default=30.0)
    ap.add_argument("--seconds", type=float, default=600.0)
    ap.add_argument("--horizon", type=float, default=5.0, help="the policy's prediction horizon (s)")
    ap.add_argument("--margin", type=float, default=0.0, help="the policy keeps below trip - margin (C)")
    ap.add_argument("--model-errors", default="0.2,0.5",
                    help="comma-separated fractions by which the policy's model underestimates R (empty: none)")
    ap.add_argument("--individual", action="store_true",
                    help="instead: train one plain network per width (Yu et al.'s baseline), same schedule and seed; "
                         "writes fashion-thermal-individual-<name>")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--force", action="store_true")
    a = ap.parse_args(argv)
    a.steps = smoke.cap(a.steps, smoke.STEPS)  # EDGETRAIN_SMOKE=1: a command check, not a result
    a.batch_size = smoke.cap(a.batch_size, smoke.BATCH)
    a.seconds = float(smoke.cap(int(a.seconds), 20))
    try:
        frames = [int(s) for s in a.per_frame.split(",")]
    except ValueError:
        raise et.ConfigError(f"--per-frame must be comma-separated ints, got {a.per_frame!r}") from None
    if any(f < 1 for f in frames) or a.plot_frame not in frames:
        raise et.ConfigError(f"--per-frame values must be >= 1 and include --plot-frame {a.plot_frame}, got {frames}")
    try:
        errors = [float(e) for e in a.model_errors.split(",") if e.strip()]
    except ValueError:
        raise et.ConfigError(f"--model-errors must be comma-separated numbers, got {a.model_errors!r}") from None
    if any(not 0 < e < 1 for e in errors):
        raise et.ConfigError(f"--model-errors must each be in (0, 1), got {errors}")
    paths = result_paths(a.out, f"fashion-thermal{'-individual' if a.individual else ''}-{a.name}", force=a.force)
    torch.set_num_threads(a.threads)
    prov = provenance(a.threads)
    train_data, test_data = load_t2()
    test = list(test_data.batches(1000, shuffle=False, drop_last=False))
    if a.individual:
        return individual(a, train_data, test, paths, prov)
    torch.manual_seed(0)
    model = SlimmableCNN()
    res = train(model, train_data, a)
    acc = {w: accuracy(model, test, w) for w in model.widths}
    print("[thermal] test accuracy by width: " + ", ".join(f"{w}: {100 * v:.2f}%" for w, v in acc.items()), flush=True)
    rows, plotted = [], {}
    for per in frames:
        macs = {}
        for w in model.widths:
            macs[w] = estimate(set_width(model, w), input_shape=(1, 28, 28), batch_size=per).macs
        set_width(model, 1.0)
        runs = [(f"always {w}", [w], None) for w in model.widths]
        runs += [("policy {0.5, 1.0}", [0.5, 1.0], None), ("policy all widths", list(model.widths), None)]
        runs += [(f"policy all widths, R -{100 * e:g}%", list(model.widths),
                  dataclasses.replace(PHONE.rc, r=PHONE.rc.r * (1 - e))) for e in errors]
        for label, widths, rc in runs:
            tr = simulate(PHONE, macs, widths, seconds=a.seconds, fps=a.fps, horizon=a.horizon, margin=a.margin,
                          model=rc)
            s = tr.summary(acc, 1 / a.fps)
            rows.append({"name": label, "per_frame": per, "widths": widths, "frame_gmacs": {str(w): macs[w] / 1e9
                                                                                           for w in widths}, **s})
            print(f"[thermal] {per}/frame {label}: acc {100 * s['mean_accuracy']:.2f} miss {100 * s['miss_rate']:.1f}% "
                  f"peak {s['peak_temp']:.1f} C throttled {100 * s['throttled_share']:.1f}% "
                  f"latency {s['latency_mean_ms']:.1f}/{s['latency_max_ms']:.1f} ms", flush=True)
            if per == a.plot_frame and label in ("always 1.0", "always 0.5", "policy {0.5, 1.0}", "policy all widths"):
                plotted[label] = tr
    paths[3].parent.mkdir(parents=True, exist_ok=True)
    figure(plotted, f"{a.plot_frame} images/frame at {a.fps:g} fps on the simulated SDM845 big cluster", paths[3],
           1e3 / a.fps)
    print(paths[3])
    prov.update(finished=provenance(a.threads)["date"], work="T2",
                dataset="fashion-mnist 60k/10k, 28x28x1, dataset mean/std, no augmentation",
                model="SlimmableCNN: 3x3 convs 16-32-64 (x width), switchable BN, ReLU, max pool, GAP, linear head",
                schedule=f"{a.steps} AdamW steps (lr {a.lr}, cosine) x batch {a.batch_size}, all widths every step, "
                         f"{'labels' if a.no_distill else 'in-place distillation'} for the narrower widths, seed 0",
                simulation=f"{a.seconds:g} s at {a.fps:g} fps, horizon {a.horizon} s, margin {a.margin} C, the "
                           f"policy's R underestimated by {errors} in the extra rows", device={**dataclasses.asdict(PHONE)},
                device_sources=PHONE_SOURCES, paper_claim=CLAIM)
    result = {"provenance": prov, "training": res, "accuracy": {str(w): v for w, v in acc.items()}, "rows": rows}
    lines = ["# Thermal-aware execution, slimmable CNN on Fashion-MNIST (T2), simulated SDM845 big cluster", "",
             (f"Test accuracy (test split) after {a.steps} steps: "
              + ", ".join(f"width {w}: {100 * v:.2f}%" for w, v in acc.items()) + "."), "",
             (f"{a.seconds:g} s at {a.fps:g} fps; a deadline is the frame period ({1e3 / a.fps:.1f} ms); mean accuracy "
              "weights each width's test accuracy by the time spent at it; on-time accuracy counts late or dropped "
              "frames as wrong."), "",
             ("| images/frame | run | mean acc % | on-time acc % | deadline misses % | dropped | peak C | throttled % | "
              "latency mean / p95 / max ms | time per width |"), "|---:|---|---:|---:|---:|---:|---:|---:|---|---|"]
    for r in rows:
        share = ", ".join(f"{w}: {100 * s:.0f}%" for w, s in r["width_share"].items())
        lines.append(f"| {r['per_frame']} | {r['name']} | {100 * r['mean_accuracy']:.2f} | "
                     f"{100 * r['on_time_accuracy']:.2f} | {100 * r['miss_rate']:.2f} | {r['dropped']} | "
                     f"{r['peak_temp']:.1f} | {100 * r['throttled_share']:.1f} | {r['latency_mean_ms']:.1f} / "
                     f"{r['latency_p95_ms']:.1f} / {r['latency_max_ms']:.1f} | {share} |")
    write_report(paths[0], result, paths[2], lines)
    return 0


if __name__ == "__main__":
    run_main(main, "thermal")
