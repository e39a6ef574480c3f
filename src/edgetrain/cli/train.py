"""``edgetrain train``: fine-tune or train a workload under a recipe, with checkpoints and resume."""

from __future__ import annotations

import argparse
import json

from edgetrain.cli._common import add_optimizer_args, add_workload_args, one_line_warnings, recipe, workload


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="train a model under a recipe", description="Train or fine-tune a model "
                       "under a recipe; writes metrics.jsonl, checkpoint.pt (atomic, checksummed) and the resolved "
                       "recipe to --out. A non-finite loss, gradient, parameter or buffer stops the run (exit 2); the "
                       "last checkpoint written is always from a finite state.")
    add_workload_args(p)
    g = p.add_argument_group("schedule")
    g.add_argument("--steps", type=int, default=None, help="optimizer steps (default: 1 epoch if --epochs unset)")
    g.add_argument("--epochs", type=float, default=None, help="epochs (alternative to --steps)")
    add_optimizer_args(g, what="of the run")
    g.add_argument("--lr", type=float, default=0.01)
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument("--schedule", choices=["cosine", "constant", "step"], default="cosine")
    g.add_argument("--warmup-steps", type=int, default=0)
    g.add_argument("--eval-every", type=int, default=None, help="evaluate every N steps (always at the end)")
    g.add_argument("--checkpoint-every", type=int, default=None, help="checkpoint every N steps (always at the end)")
    p.add_argument("--out", default="runs/train", help="output directory (default runs/train); an existing run "
                   "there is continued only with --resume and replaced only with --force")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint (refused if "
                   "model, recipe, data or schedule differ from the checkpoint's)")
    g.add_argument("--force", action="store_true", help="replace the run in --out (its checkpoint, metrics, config "
                   "and recipe are deleted; other files stay)")
    p.add_argument("--no-progress", action="store_true", help="no progress output")


def run(args: argparse.Namespace) -> int:
    with one_line_warnings():
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    from edgetrain.train import TrainConfig, finite, train

    wl, rec = workload(args), recipe(args)
    epochs = args.epochs if args.epochs is not None or args.steps is not None else 1.0
    cfg = TrainConfig(steps=args.steps, epochs=epochs, batch_size=wl.batch_size, optimizer=args.optimizer,
                      lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay, schedule=args.schedule,
                      warmup_steps=args.warmup_steps, eval_every=args.eval_every,
                      checkpoint_every=args.checkpoint_every, seed=wl.seed, threads=args.threads, out_dir=args.out)
    train_data, eval_data = wl.load_data("train"), wl.load_data("test")
    model = wl.build_model(train_data.num_classes)
    result = train(model, train_data, eval_data, cfg, recipe=rec, resume=args.resume, force=args.force,
                   progress=not args.no_progress)
    from pathlib import Path

    from edgetrain.checkpoint import atomic_write_text

    # what `edgetrain export` rebuilds the model from
    atomic_write_text(Path(args.out) / "workload.json", json.dumps({"workload": wl.to_dict(),
                                                                   "num_classes": train_data.num_classes}) + "\n")
    print(json.dumps(finite({"recipe": rec.name, "steps": result.steps, "final_loss": result.final_loss,
                             "accuracy": result.accuracy, "seconds": round(result.seconds, 2),
                             "checkpoint": str(result.checkpoint) if result.checkpoint else None}), allow_nan=False))
    return 0
