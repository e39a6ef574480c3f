"""AE-BERT-style searched per-layer pruning vs uniform pruning of attention heads and MLP neurons, same overall ratio.

Huang et al., *An Automatic and Efficient BERT Pruning for Edge AI Systems*, ISQED 2022, arXiv:2206.10461 (the idea:
search the per-layer pruning pattern under an overall ratio with a cheap evaluation, fine-tune the best candidate);
head importance from Michel et al., NeurIPS 2019, arXiv:1905.10650. Library: :mod:`edgetrain.prune_transformer`.

Models (``--model``):

* ``tiny``: ``create_model("tiny_transformer", num_classes=10, in_channels=1, depth=4, heads=8, patch=7)`` (dim 64,
  16 tokens of 7x7 patches, MLP 128 per layer: 32 heads, 512 neurons) on Fashion-MNIST 28x28 (60k train / 10k
  test), dataset mean/std. Patch 7 rather than the default 4 (49 tokens) to fit the shared CPU (our choice).
* ``bert``: ``transformers.BertForSequenceClassification(BertConfig(...))`` built offline (4 layers, hidden 64, 8
  heads, intermediate 256: 32 heads, 1024 neurons) on a synthetic task (ours): a sequence is ``[CLS]`` and 15 tokens
  holding each of 4 marker tokens exactly once at random places among random filler tokens (58 kinds); the label is
  the marker that comes first. 20,000 training, 2,000 validation and 4,000 test sequences (seeds 0, 1, 2).

Protocol (one seed): train the base model ``--base-steps`` AdamW steps; importance scores (Michel et al.) over
``--score-batches`` training batches; for each ratio in ``--ratios`` (applied to heads and to neurons separately)
the allocations ``uniform`` (same ratio in every layer), ``global`` (the most important units over all layers) and
``searched`` (:func:`edgetrain.prune_transformer.search`: candidates scored by the loss on validation batches after
``--probe-steps`` fine-tuning steps from the base weights) are each fine-tuned ``--finetune-steps`` steps from the
base weights with the same batch order, then tested. Within a layer all three keep the same most important units.
Writes ``<out>/ae-bert-<model>-<name>.{json,md}``.

    OMP_NUM_THREADS=1 python benchmarks/prune/ae_bert.py --model tiny --name smoke --out /tmp/ae
"""

from __future__ import annotations

import argparse
import copy
import math
import subprocess
import time

import torch
from torch import nn

from edgetrain import prune_transformer as pt
from edgetrain import smoke
from edgetrain.bench import provenance, result_paths
from edgetrain.errors import ConfigError
from edgetrain.report import run_main, write_report

CLAIM = ("AE-BERT (abstract): the automatically searched sub-network beats hand-crafted pruning on GLUE with BERT-base,"
         " e.g. MRPC +4.6 points at the same overall ratio 0.5; QNLI/RTE 75%/42.8% more overall pruning at higher "
         "accuracy")
SEQ, MARKERS, VOCAB = 16, 4, 64  # our synthetic task: [CLS] + 15 tokens, markers 2..5, filler 6..63 (0 pad, 1 CLS)


class Tokens:
    """The synthetic 'first marker' task as (input dict, label) batches."""

    def __init__(self, n: int, seed: int, task: str = "first") -> None:
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(2 + MARKERS, VOCAB, (n, SEQ), generator=g)
        ids[:, 0] = 1
        pos = torch.argsort(torch.rand(n, SEQ - 1, generator=g), dim=1)[:, :MARKERS] + 1  # distinct places
        ids.scatter_(1, pos, torch.arange(2, 2 + MARKERS).expand(n, MARKERS))
        order = torch.argsort(pos, dim=1)  # markers (0..3) by position
        self.ids, self.labels = ids, order[:, 0] if task == "first" else order[:, 0] * MARKERS + order[:, 1]

    def __len__(self) -> int:
        return len(self.labels)

    def batches(self, batch: int, seed: int = 0, epoch: int = 0, shuffle: bool = True):
        g = torch.Generator().manual_seed(seed * 100003 + epoch)
        order = torch.randperm(len(self), generator=g) if shuffle else torch.arange(len(self))
        for i in range(0, len(self) - (batch - 1 if shuffle else 0), batch):
            j = order[i:i + batch]
            yield {"input_ids": self.ids[j], "attention_mask": torch.ones_like(self.ids[j])}, self.labels[j]


def setup(a: argparse.Namespace) -> tuple[nn.Module, object, object, object, str]:
    """The model and its train, validation and test data, and a description."""
    torch.manual_seed(a.seed)
    if a.model == "tiny":
        from edgetrain.data import load_data
        from edgetrain.models import create_model

        train = load_data("fashion-mnist", "train", channels=1, normalize="dataset")
        test = load_data("fashion-mnist", "test", channels=1, normalize="dataset")
        test.transform = train.transform
        model = create_model("tiny_transformer", num_classes=10, in_channels=1, depth=4, heads=8, patch=7)
        return model, train, train, test, ("tiny_transformer depth 4, dim 64, 8 heads, MLP 128, patch 7; "
                                           "Fashion-MNIST 60k/10k")
    from edgetrain.models.foreign import ensure_torchvision

    ensure_torchvision()
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=4, num_attention_heads=8,
                     intermediate_size=256, max_position_embeddings=SEQ, num_labels=MARKERS if a.task == "first" else MARKERS ** 2)
    n = smoke.cap(20000, smoke.SAMPLES)
    desc = f"BERT 4 layers, hidden 64, 8 heads, intermediate 256, dropout 0.1; synthetic task {a.task!r} 20k/4k"
    return (BertForSequenceClassification(cfg), Tokens(n, 0, a.task), Tokens(smoke.cap(2000, smoke.SAMPLES), 1, a.task),
            Tokens(smoke.cap(4000, smoke.SAMPLES), 2, a.task), desc)


def stream(data, batch: int, seed: int):
    """Endless training batches, epoch after epoch, order fixed by ``seed``."""
    epoch = 0
    while True:
        yield from data.batches(batch, seed=seed, epoch=epoch)
        epoch += 1


def loss_fn(model: nn.Module, batch: tuple) -> torch.Tensor:
    return nn.functional.cross_entropy(pt.forward(model, batch[0]), batch[1])


def train(model: nn.Module, data, steps: int, lr: float, batch: int, seed: int = 0) -> float:
    """``steps`` AdamW steps (cosine from ``lr``, weight decay 0.01); the last 20 steps' mean loss. The global RNG
    (dropout) is seeded with ``seed`` too, so that two runs with one allocation are identical."""
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    losses = []
    for step, b in zip(range(steps), stream(data, batch, seed)):
        for g in opt.param_groups:
            g["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / max(1, steps)))
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model, b)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        if (step + 1) % 100 == 0:
            print(f"[ae-bert] step {step + 1}/{steps} loss {sum(losses[-20:]) / 20:.4f}", flush=True)
    return sum(losses[-20:]) / max(1, len(losses[-20:]))


@torch.no_grad()
def accuracy(model: nn.Module, data, batch: int = 500) -> float:
    model.eval()
    hit = n = 0
    for x, y in data.batches(batch, shuffle=False, drop_last=False) if hasattr(data, "images") else \
            data.batches(batch, shuffle=False):
        hit += int((pt.forward(model, x).argmax(1) == y).sum())
        n += len(y)
    return hit / n


@torch.no_grad()
def val_loss(model: nn.Module, batches: list) -> float:
    model.eval()
    return sum(float(loss_fn(model, b)) for b in batches) / len(batches)


def params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=("tiny", "bert"), default="tiny")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--name", required=True)
    ap.add_argument("--ratios", default="0.5,0.7,0.85")
    ap.add_argument("--base-steps", type=int, default=600)
    ap.add_argument("--finetune-steps", type=int, default=150)
    ap.add_argument("--probe-steps", type=int, default=10)
    ap.add_argument("--population", type=int, default=6)
    ap.add_argument("--generations", type=int, default=2)
    ap.add_argument("--score-batches", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--finetune-lr", type=float, default=5e-4)
    ap.add_argument("--task", choices=("first", "first2"), default="first",
                    help="bert: label = the first marker (4 classes) or the first two in order (first2, 16 labels)")
    ap.add_argument("--seed", type=int, default=0, help="initialisation, batch orders and search")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--force", action="store_true")
    a = ap.parse_args(argv)
    for k in ("base_steps", "finetune_steps", "probe_steps"):
        setattr(a, k, smoke.cap(getattr(a, k), smoke.STEPS))  # EDGETRAIN_SMOKE=1: a command check, not a result
    a.batch_size = smoke.cap(a.batch_size, smoke.BATCH)
    a.score_batches = smoke.cap(a.score_batches, 2)
    try:
        ratios = [float(r) for r in a.ratios.split(",")]
    except ValueError:
        raise ConfigError(f"--ratios {a.ratios!r}: comma-separated numbers in [0, 1) expected") from None
    paths = result_paths(a.out, f"ae-bert-{a.model}-{a.name}", force=a.force)
    torch.set_num_threads(a.threads)
    prov = provenance(a.threads)
    model, train_data, val_data, test_data, desc = setup(a)
    t0 = time.perf_counter()
    base_loss = train(model, train_data, a.base_steps, a.lr, a.batch_size, seed=a.seed)
    base_seconds = time.perf_counter() - t0
    example = next(iter(train_data.batches(2, seed=0)))[0]
    pruner = pt.Pruner(model, example)
    for r in ratios:  # refuse every bad ratio before any work on it
        pt.uniform_allocation(pruner, r)
    base_acc, base_params = accuracy(model, test_data), params(model)
    print(f"[ae-bert] {a.model} base: {a.base_steps} steps {base_seconds:.0f}s loss {base_loss:.4f} "
          f"test {100 * base_acc:.2f}%", flush=True)
    score_batches = [b for _, b in zip(range(a.score_batches), stream(train_data, a.batch_size, seed=7))]
    val_batches = [b for _, b in zip(range(4), stream(val_data, 256 if not smoke.active() else 4, seed=11))]
    model.eval()  # scores without dropout
    scores = pt.importance(pruner, score_batches, loss_fn)
    base_state = copy.deepcopy(model.state_dict())

    def finetune(alloc: pt.Allocation, steps: int, seed: int = 0) -> float:
        model.load_state_dict(base_state)
        pruner.apply(alloc, scores)
        return train(model, train_data, steps, a.finetune_lr, a.batch_size, seed=seed + a.seed)

    def probe(alloc: pt.Allocation) -> float:
        finetune(alloc, a.probe_steps, seed=3)
        return val_loss(model, val_batches)

    rows = []
    for r in ratios:
        t0 = time.perf_counter()
        best, history = pt.search(pruner, r, scores, probe, a.population, a.generations, seed=a.seed)
        search_seconds = time.perf_counter() - t0
        allocs = {"uniform": pt.uniform_allocation(pruner, r), "global": pt.global_allocation(pruner, r, scores),
                  "searched": best}
        for kind, alloc in allocs.items():
            model.load_state_dict(base_state)
            pruner.apply(alloc, scores)
            acc0 = accuracy(model, test_data)
            t1 = time.perf_counter()
            loss = finetune(alloc, a.finetune_steps)
            ft_seconds = time.perf_counter() - t1
            acc = accuracy(model, test_data)
            small = pt.sliced(pruner, heads=a.model == "bert")
            x = example
            model.eval()
            small.eval()
            with torch.no_grad():
                diff = float((pt.forward(small, x) - pt.forward(model, x)).abs().max())
            n_params = params(small)
            if a.model == "tiny":  # heads not sliceable there: subtract the masked heads' q/k/v rows, proj columns
                n_params -= sum((t.heads - k) * t.head_dim * (4 * 64 + 3) for t, k in zip(pruner.layers, alloc[0]))
            rows.append({"name": f"{kind}-{round(100 * r)}", "techniques": ["ae-bert-prune"], "model": a.model,
                         "ratio": r, "allocation": kind, "heads_kept": list(alloc[0]), "neurons_kept": list(alloc[1]),
                         "test_accuracy_pruned": acc0, "test_accuracy": acc, "finetune_loss": loss,
                         "finetune_seconds": round(ft_seconds, 1), "params": n_params, "base_params": base_params,
                         "params_sliced_heads": a.model == "bert", "sliced_max_abs_diff": diff,
                         "search_seconds": round(search_seconds, 1) if kind == "searched" else None,
                         "search_history": history if kind == "searched" else None,
                         "paper_claim": CLAIM if kind == "searched" else None})
            print(f"[ae-bert] {a.model} r={r} {kind}: heads {alloc[0]} neurons {alloc[1]} pruned "
                  f"{100 * acc0:.2f}% -> fine-tuned {100 * acc:.2f}% params {n_params} (diff {diff:.1e})", flush=True)
    load = subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()
    prov.update(finished=provenance(a.threads)["date"], load=load, model=desc, seed=a.seed, task=a.task if a.model == "bert" else None,
                base={"steps": a.base_steps, "lr": a.lr, "batch": a.batch_size, "final_loss": base_loss,
                      "test_accuracy": base_acc, "params": base_params, "seconds": round(base_seconds, 1)},
                protocol={"ratio_applies_to": "heads and neurons separately", "score_batches": a.score_batches,
                          "probe_steps": a.probe_steps, "population": a.population, "generations": a.generations,
                          "finetune_steps": a.finetune_steps, "finetune_lr": a.finetune_lr,
                          "optimizer": "AdamW, cosine, weight decay 0.01",
                          "search_score": ("mean loss on 4 validation batches after probe steps"
                                           + (" (training split)" if a.model == "tiny" else ""))})
    lines = [f"# AE-BERT-style searched vs uniform pruning: {desc}", "",
             (f"Base: {a.base_steps} steps, test accuracy {100 * base_acc:.2f}%, {base_params:,} parameters. Each row: "
              f"{a.finetune_steps} fine-tuning steps from the base weights."), "",
             ("| ratio | allocation | heads kept / layer | neurons kept / layer | acc pruned % | acc fine-tuned % | "
              "params |"), "|---:|---|---|---|---:|---:|---:|"]
    lines += [f"| {r['ratio']} | {r['allocation']} | {r['heads_kept']} | {r['neurons_kept']} | "
              f"{100 * r['test_accuracy_pruned']:.2f} | {100 * r['test_accuracy']:.2f} | {r['params']:,} |"
              for r in rows]
    write_report(paths[0], {"provenance": prov, "rows": rows}, paths[2], lines)
    return 0


if __name__ == "__main__":
    run_main(main, "ae_bert")
