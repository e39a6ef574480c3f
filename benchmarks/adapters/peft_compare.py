"""edgetrain's adapters side by side with Hugging Face PEFT's (LoRA, LoKr) on one workload and schedule.

The config is a bench config (``edgetrain bench``'s format: the workload, the schedule, edgetrain recipes) plus a
``peft:`` list of PEFT adapters (``{name, type: lora|lokr, ...LoraConfig/LoKrConfig fields}``). PEFT adapts the same
layers edgetrain's adapters adapt by default (every linear and dense conv2d but the classifier, as
``edgetrain inspect`` names them) and trains the classifier whole (``modules_to_save``), as ``classifier=True``
does. Every row is measured by the same meter (one training step) and trained by the same loop
(:func:`edgetrain.bench.bench_row`); rows and ratios (against ``plain``, full fine-tuning) are written as the bench
writes them, with ``trainable_params`` and the PEFT config in each row.

    OMP_NUM_THREADS=1 python benchmarks/adapters/peft_compare.py --config benchmarks/adapters/t1_adapters.yaml \
        --out benchmarks/results --name adapters-2026-12-02 --threads 1

PEFT is the optional ``bench`` extra (``pip install edgetrain[bench]``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import yaml

from edgetrain.bench import BenchSpec, bench_row, provenance, ratios, result_paths, run_bench, write_results
from edgetrain.errors import ConfigError
from edgetrain.recipe import Recipe
from edgetrain.structure import analyze

KINDS = {"lora": "LoraConfig", "lokr": "LoKrConfig"}


def peft_model(model: torch.nn.Module, entry: dict, example: torch.Tensor) -> torch.nn.Module:
    """``model`` wrapped by PEFT's adapter ``entry`` on edgetrain's default adapter targets."""
    from edgetrain.models.foreign import ensure_torchvision

    ensure_torchvision()  # peft imports transformers, which imports torchvision when it is installed
    try:
        import peft
    except ImportError:
        raise ConfigError("PEFT is not installed: pip install 'edgetrain[bench]'") from None
    s = analyze(model, example)
    modules = dict(model.named_modules())
    targets = [n for n in s.layers_of({"linear", "conv2d"}) if n != s.classifier and
               getattr(modules[n], "groups", 1) == 1]
    fields = {k: v for k, v in entry.items() if k not in ("name", "type")}
    config = getattr(peft, KINDS[entry["type"]])(target_modules=targets, modules_to_save=[s.classifier], **fields)
    return peft.get_peft_model(model, config)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--name", required=True)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--force", action="store_true")
    a = ap.parse_args(argv)
    d = yaml.safe_load(Path(a.config).read_text())
    entries = d.pop("peft", None) or []
    bad = [e for e in entries if not isinstance(e, dict) or e.get("type") not in KINDS or not e.get("name")]
    if bad:
        raise SystemExit(f"peft_compare: each peft entry needs a name and a type in {sorted(KINDS)}, got {bad[0]!r}")
    spec = BenchSpec.from_dict(d)
    stem = f"{spec.work.lower()}-{a.name}"
    result_paths(a.out, stem, force=a.force)  # refuse before hours of training
    result = run_bench(spec, threads=a.threads)
    wl = spec.workload
    train_data, eval_data = wl.load_data("train"), wl.load_data("test")
    batch = wl.example_batch(train_data)
    from edgetrain.train import TrainConfig

    cfg = TrainConfig(**{"batch_size": wl.batch_size, "seed": wl.seed, **spec.train, "threads": a.threads})
    for i, entry in enumerate(entries):
        tag = f"[peft {i + 1}/{len(entries)}] {entry['name']}"
        print(f"{tag}: measuring one training step", file=sys.stderr, flush=True)
        model = peft_model(wl.build_model(train_data.num_classes), entry, batch[0])
        row = bench_row(model, Recipe(name=entry["name"]), batch, cfg, train_data, eval_data,
                        repeats=spec.measure_repeats, tag=tag)
        row.update(techniques=[f"peft-{entry['type']}"], peft=entry)
        result["rows"].append(row)
    ratios(result["rows"])
    result["provenance"] = {**result["provenance"], "peft": _version("peft"), "finished": provenance(a.threads)["date"]}
    for p in write_results(result, a.out, stem, force=a.force):
        print(p)
    return 0


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


if __name__ == "__main__":
    try:
        sys.exit(main())
    except ConfigError as e:
        print(f"peft_compare: {e}", file=sys.stderr)
        sys.exit(2)
