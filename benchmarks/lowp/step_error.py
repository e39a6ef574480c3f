"""How far one LightNorm training step is from stock BatchNorm's on T1's pretrained MobileNetV2, piece by piece.

LightNorm (Noh et al., ICCD 2022) reports no accuracy loss from training ResNet/MobileNet on CIFAR-100 *from scratch*
with its numerics; T1 fine-tunes an ImageNet-pretrained MobileNetV2, where every BN's arithmetic changes under
weights that were trained for fp32 BN. This script takes one training-mode forward and backward of the T1 model
(Fashion-MNIST 64x64x3, ImageNet normalisation, the first ``--batch`` training images, the seeded fresh head) under
each LightNorm variant and under stock BN, and reports:

* ``feature_error``: ``|f - f_ref| / |f_ref|`` of the classifier's input (the pooled 1280 features), where the error
  of every BN compounds over the 52 BNs;
* ``grad_cosine`` and ``grad_norm_ratio``: the whole gradient (every parameter, one vector) against stock BN's.

An independent check of the low-bit float piece, not using :mod:`edgetrain.lowp`: forward hooks round every BN's
input and output to ``m`` mantissa bits with ``torch.frexp``/``torch.ldexp`` (round to nearest, unbounded
exponent; straight-through gradient) in stock BN (rows ``frexp-m``: the forward rounded, the backward in fp32). Writes ``<out>/t1-<name>.{json,md}``.

    OMP_NUM_THREADS=1 python benchmarks/lowp/step_error.py --out benchmarks/results --name lightnorm-step-error-2026-12-07
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import nn

import edgetrain as et
from edgetrain import smoke
from edgetrain.bench import provenance, result_paths
from edgetrain.report import run_main, write_report
from edgetrain.workload import Workload

VARIANTS = {  # name: LightNorm config (None: the independent frexp rounding, see the docstring)
    "paper (range BN + fp10 + BFP 5/8)": et.LightNorm(),
    "paper, rounding nearest": et.LightNorm(rounding="nearest"),
    "paper, d2 range constant": et.LightNorm(scale="d2"),
    "range BN alone (fp32)": et.LightNorm(fwd_format="fp32", bwd_format="fp32", bfp_bits=None),
    "range BN alone, d2": et.LightNorm(scale="d2", fwd_format="fp32", bwd_format="fp32", bfp_bits=None),
    "fp10 alone": et.LightNorm(range_bn=False, bfp_bits=None),
    "fp10 alone, nearest": et.LightNorm(range_bn=False, bfp_bits=None, rounding="nearest"),
    "BFP 5 alone": et.LightNorm(range_bn=False, fwd_format="fp32", bwd_format="fp32"),
    "BFP 5 alone, nearest": et.LightNorm(range_bn=False, fwd_format="fp32", bwd_format="fp32", rounding="nearest"),
    "BFP 7 alone": et.LightNorm(range_bn=False, fwd_format="fp32", bwd_format="fp32", bfp_bits=7),
    "bfloat16 alone": et.LightNorm(range_bn=False, bfp_bits=None, fwd_format="bfloat16", bwd_format="bfloat16"),
}
FREXP_BITS = (4, 6, 8, 10)


def round_mantissa(t: torch.Tensor, bits: int) -> torch.Tensor:
    """``t`` with ``bits`` mantissa bits after the leading one, round to nearest (``frexp``'s m is in [0.5, 1));
    the gradient passes straight through (``round`` alone would give zero)."""
    m, e = torch.frexp(t.detach())
    return t + (torch.ldexp(torch.round(m * 2 ** (bits + 1)) / 2 ** (bits + 1), e) - t).detach()


def one_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, frexp_bits: int | None = None):  # noqa: ANN201
    """(classifier input, flat gradient) of one training-mode step."""
    model.train()
    hooks, got = [], {}
    if frexp_bits is not None:
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                hooks.append(m.register_forward_pre_hook(lambda _m, a: (round_mantissa(a[0], frexp_bits),)))
                hooks.append(m.register_forward_hook(lambda _m, _a, out: round_mantissa(out, frexp_bits)))
    head = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    hooks.append(head.register_forward_pre_hook(lambda _m, a: got.__setitem__("features", a[0].detach())))
    F.cross_entropy(model(x), y).backward()
    for h in hooks:
        h.remove()
    return got["features"], torch.cat([p.grad.flatten() for p in model.parameters()])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--name", required=True)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--force", action="store_true")
    a = ap.parse_args(argv)
    paths = result_paths(a.out, f"t1-{a.name}", force=a.force)
    torch.set_num_threads(a.threads)
    prov = provenance(a.threads)
    work = Workload(model="mobilenet_v2", data="fashion-mnist", image_size=smoke.cap(64, smoke.IMAGE_SIZE),
                    channels=3, batch_size=smoke.cap(a.batch, smoke.BATCH))
    x, y = work.load_data("train").batch(torch.arange(work.batch_size))  # (B, 3, 64, 64), (B,)
    f_ref, g_ref = one_step(work.build_model(10), x, y)
    rows = []
    for name, cfg in [*VARIANTS.items(), *((f"frexp-{b} (independent, forward only)", b) for b in FREXP_BITS)]:
        model = work.build_model(10)
        if isinstance(cfg, et.LightNorm):
            et.apply_(model, cfg, x[:2])
            f, g = one_step(model, x, y)
        else:
            f, g = one_step(model, x, y, frexp_bits=cfg)
        rows.append({"name": name, "techniques": ["lightnorm"] if isinstance(cfg, et.LightNorm) else [],
                     "config": cfg.to_dict() if isinstance(cfg, et.LightNorm) else {"mantissa_bits": cfg},
                     "feature_error": ((f - f_ref).norm() / f_ref.norm()).item(),
                     "grad_cosine": F.cosine_similarity(g, g_ref, dim=0).item(),
                     "grad_norm_ratio": (g.norm() / g_ref.norm()).item()})
        print(f"[step-error] {name}: feature error {rows[-1]['feature_error']:.3f}, "
              f"grad cosine {rows[-1]['grad_cosine']:.3f}", flush=True)
    prov.update(work="T1", batch=work.batch_size, image_size=work.image_size,
                data="fashion-mnist/train, first images, ImageNet normalisation", seed=work.seed)
    lines = ["# One training step of T1's pretrained MobileNetV2: LightNorm variants against stock BatchNorm", "",
             "| variant | feature error | gradient cosine | gradient norm ratio |", "|---|---:|---:|---:|"]
    lines += [f"| {r['name']} | {r['feature_error']:.3f} | {r['grad_cosine']:.3f} | {r['grad_norm_ratio']:.2f} |"
              for r in rows]
    write_report(paths[0], {"provenance": prov, "rows": rows}, paths[2], lines)
    return 0


if __name__ == "__main__":
    run_main(main, "step_error")
