"""``edgetrain export``: a training run's model as plain safetensors and ONNX (checked with onnxruntime)."""

from __future__ import annotations

import argparse
import json


def add_parser(sub) -> None:  # noqa: ANN001
    p = sub.add_parser("export", help="export a training run's model (safetensors, ONNX)",
                       description="Rebuild the model of an `edgetrain train` run, load its checkpoint, take the "
                       "techniques out keeping what they trained (adapters merged, sparse-update slices written "
                       "back), and write model.safetensors, model.onnx (BatchNorms folded; onnxruntime's "
                       "predictions compared with PyTorch's on the eval set), model.pte (ExecuTorch, XNNPACK, "
                       "compared the same way) and export.json to --out; --training-program adds train.pte, a "
                       "sparse-update plan's training step for ExecuTorch's runtime, checked against PyTorch's.")
    p.add_argument("--run", required=True, help="the run directory (`edgetrain train --out`)")
    p.add_argument("--out", required=True, help="where to write the exported files")
    p.add_argument("--no-onnx", action="store_true", help="no ONNX model")
    p.add_argument("--no-pte", action="store_true", help="no ExecuTorch inference program")
    p.add_argument("--training-program", action="store_true",
                   help="also write train.pte: the plan's training step as an ExecuTorch program (sparse-update "
                   "plans only; ExecuTorch's training export is experimental)")
    p.add_argument("--force", action="store_true", help="replace an earlier export in --out")
    p.add_argument("--threads", type=int, default=2)


def run(args: argparse.Namespace) -> int:
    import torch

    from edgetrain.export import export

    torch.set_num_threads(args.threads)
    info = export(args.run, args.out, onnx=not args.no_onnx, pte=not args.no_pte,
                  training_program=args.training_program, force=args.force)
    print(json.dumps(info))
    return 0
