"""Markdown tables for docs/gradient_filter.md from the speed and T1 results files.

    python benchmarks/gradient_filter/report.py benchmarks/results/gradient_filter-speed-<date>.json \
        benchmarks/results/t1-gf-<date>.json
"""

from __future__ import annotations

import json
import sys


def speed_table(d: dict) -> str:
    rows = [r for r in d["rows"] if "layer" in r]
    lines = ["| layer | input | batch | plain bwd ms | r2 | r4 | r7 | saved ×plain (r4) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    keys = sorted({(r["layer"], r["input_px"], r["batch"]) for r in rows}, key=lambda k: (k[0], -k[1], -k[2]))
    for layer, px, n in keys:
        by_r = {r["radius"]: r for r in rows if (r["layer"], r["input_px"], r["batch"]) == (layer, px, n)}
        plain = sum(r["plain_backward_ms"] for r in by_r.values()) / len(by_r)
        sp = " | ".join(f"{by_r[k]['backward_speedup']:.2f}×" if k in by_r else "" for k in (2, 4, 7))
        r4 = by_r.get(4)
        saved = f"{r4['saved_bytes'] / r4['plain_saved_bytes']:.3f}" if r4 else ""
        lines.append(f"| {layer} | {px} | {n} | {plain:.2f} | {sp} | {saved} |")
    return "\n".join(lines)


def step_table(d: dict) -> str:
    rows = [r for r in d["rows"] if "layer" not in r]
    lines = ["| T1 training step | step s | ratio to plain same convs | saved MiB |", "|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['step_seconds']:.4f} | {r['step_ratio']:.3f} | {r['saved_bytes'] / 2**20:.2f} |")
    return "\n".join(lines)


def main() -> None:
    speed = json.load(open(sys.argv[1]))
    print(speed_table(speed), end="\n\n")
    print(step_table(speed))
    if len(sys.argv) > 2:
        from edgetrain.bench import markdown_table

        print()
        print(markdown_table(json.load(open(sys.argv[2]))))


if __name__ == "__main__":
    main()
