"""ExecuTorch programs of a trained model (``edgetrain export``; the ``[export]`` extra's ``executorch``).

* **Inference** (``model.pte``): the eval-mode model with its BatchNorms folded (:func:`edgetrain.export.
  fold_batchnorms`), exported by ``torch.export`` at a fixed batch of :data:`BATCH` and lowered to XNNPACK; the
  ExecuTorch runtime's predictions on the whole eval set are compared with PyTorch's (the last batch padded).
* **Training** (``train.pte``, a sparse-update plan's run only): the program of one training step of what the plan
  trains: the classifier, the biases of the last k layers and the plan's weight slices, whose kept input channels
  are the trainable tensor (a ``torch.nn.utils.parametrize`` parametrization writes them into the frozen weight, so
  the layer's own forward runs). Exported with ExecuTorch's joint forward-backward graph
  (``torch.export.experimental._export_forward_backward``, as ExecuTorch's CIFAR training example does; experimental
  in ExecuTorch 1.5), it runs in the ExecuTorch runtime's training module. The check: one step on a batch of the eval
  data in ExecuTorch (loss, gradients, then its SGD) against the same step in PyTorch.

  The program is the plan's *what*, not its *how*: BatchNorms run with their running statistics (as the frozen part
  does under the plan), and the saved tensors are whatever ExecuTorch's graph keeps; the plan's memory techniques
  (1-bit masks, chunks, patches) are PyTorch-side and not in the program.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from edgetrain.errors import ConfigError

BATCH = 16  # the inference program's fixed batch
INSTALL = "ExecuTorch export needs executorch: pip install 'edgetrain[export]' (or --no-pte)"
#: recipe techniques whose training program is the sparse update's (they change how a step runs, not what it computes)
PROGRAM_TECHNIQUES = {"sparse_update", "frozen_inference", "frozen_chunks", "patch_execute"}


def _require() -> None:
    try:
        import executorch  # noqa: F401
    except ImportError:
        raise ConfigError(INSTALL) from None


def trainable_of(model: nn.Module) -> dict[str, Any]:
    """What an applied sparse update trains, by name: whole parameters, and per sliced layer its kept channels."""
    from edgetrain.techniques.sparse_update import _depthwise, _groups

    slices = {name: {"dim": 0 if _depthwise(m.weight, _groups(m)) else 1, "keep": m.weight_keep.tolist()}
              for name, m in model.named_modules() if hasattr(m, "weight_part")}
    whole = [n for n, p in model.named_parameters() if p.requires_grad and not n.endswith(".weight_part")]
    return {"parameters": whole, "slices": slices}


def pte_inference(model: nn.Module, data, path: Path, tolerance: float) -> dict[str, Any]:  # noqa: ANN001
    _require()
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower
    from executorch.runtime import Runtime

    from edgetrain.export import fold_batchnorms

    x = next(iter(data.batches(min(BATCH, len(data)), shuffle=False, drop_last=False)))[0]
    folded, n = fold_batchnorms(model, x)
    example = torch.zeros((BATCH, *x.shape[1:]))
    program = to_edge_transform_and_lower(torch.export.export(folded, (example,)),
                                          partitioner=[XnnpackPartitioner()]).to_executorch()
    path.write_bytes(program.buffer)
    method = Runtime.get().load_program(path).load_method("forward")
    agree, total, worst, top = 0, 0, 0.0, 0.0
    with torch.no_grad():
        for xb, _ in data.batches(BATCH, shuffle=False, drop_last=False):
            k = len(xb)
            padded = torch.cat([xb, example[: BATCH - k]]) if k < BATCH else xb
            got = method.execute([padded.contiguous()])[0][:k]
            ref = model(xb)
            agree += int((ref.argmax(1) == got.argmax(1)).sum())
            total += k
            worst, top = max(worst, float((ref - got).abs().max())), max(top, float(ref.abs().max()))
    if worst > tolerance * max(top, 1e-12):
        raise ConfigError(f"export: ExecuTorch's logits differ from PyTorch's by {worst:.3g} (largest logit {top:.3g}, "
                          f"tolerance {tolerance:g} of it); {path} kept for inspection")
    return {"file": path.name, "bytes": path.stat().st_size, "backend": "xnnpack", "batch": BATCH,
            "folded_batchnorms": n, "eval_samples": total, "prediction_agreement": agree / total,
            "max_abs_logit_difference": worst, "max_abs_logit": top, "tolerance_relative": tolerance}


class _Slice(nn.Module):
    """Parametrization: the trainable tensor is ``weight``'s kept channels; the rest stays a frozen buffer."""

    def __init__(self, weight: Tensor, keep: list[int], dim: int) -> None:
        super().__init__()
        self.dim = dim
        self.register_buffer("keep", torch.tensor(keep, dtype=torch.int64))
        self.register_buffer("frozen", weight.detach().clone())

    def forward(self, part: Tensor) -> Tensor:
        return self.frozen.index_copy(self.dim, self.keep, part)

    def right_inverse(self, weight: Tensor) -> Tensor:
        return weight.index_select(self.dim, self.keep)


class _WithLoss(nn.Module):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        return nn.functional.cross_entropy(self.net(x), y)


def program_model(model: nn.Module, trainable: dict[str, Any]) -> nn.Module:
    """A copy of the plain eval-mode ``model`` in which exactly the plan's tensors require grad."""
    from torch.nn.utils import parametrize

    net = copy.deepcopy(model).eval()
    for p in net.parameters():
        p.requires_grad_(False)
    for name, s in trainable["slices"].items():
        layer = net.get_submodule(name)
        parametrize.register_parametrization(layer, "weight", _Slice(layer.weight, s["keep"], s["dim"]))
    names = set(trainable["parameters"]) | {f"{n}.parametrizations.weight.original" for n in trainable["slices"]}
    params = dict(net.named_parameters())
    missing = sorted(names - set(params))
    if missing:
        raise ConfigError(f"export: the plan trains {missing[0]}, which the plain model does not have")
    for n in names:
        params[n].requires_grad_(True)
    return net


def pte_training(model: nn.Module, trainable: dict[str, Any], techniques: list[str], data, path: Path,  # noqa: ANN001
                 lr: float = 0.01) -> dict[str, Any]:
    """Write the sparse-update plan's training program and check one ExecuTorch step against PyTorch's."""
    other = [t for t in techniques if t not in PROGRAM_TECHNIQUES]
    if "sparse_update" not in techniques or other:
        raise ConfigError("export --training-program: needs a sparse-update plan's run (`edgetrain plan -o`); this "
                          f"run's recipe is {techniques or 'plain'}" + (f" ({other[0]} is not in a program)" if other
                                                                       else ""))
    _require()
    from executorch.exir import EdgeCompileConfig, to_edge
    from executorch.extension.training import _load_for_executorch_for_training_from_buffer, get_sgd_optimizer
    from torch.export.experimental import _export_forward_backward

    x, y = next(iter(data.batches(min(BATCH, len(data)), shuffle=False, drop_last=False)))
    net = _WithLoss(program_model(model, trainable))
    joint = _export_forward_backward(torch.export.export(net, (x, y), strict=False))
    program = to_edge(joint, compile_config=EdgeCompileConfig(_check_ir_validity=False)).to_executorch()
    path.write_bytes(program.buffer)
    buffer = path.read_bytes()  # the module reads this buffer while it lives: keep a reference (freed early: SIGSEGV)
    et = _load_for_executorch_for_training_from_buffer(buffer)
    et_loss = float(et.forward_backward(method_name="forward", inputs=(x, y))[0])
    et_grads = {k: v.clone() for k, v in et.named_gradients().items()}
    get_sgd_optimizer(et.named_parameters(), lr, 0.0, 0.0, 0.0, False).step(et.named_gradients())
    et_after = {k: v.clone() for k, v in et.named_parameters().items()}

    loss = net(x, y)  # the same step in PyTorch
    loss.backward()
    params = {n: p for n, p in net.named_parameters() if p.requires_grad}
    if sorted(params) != sorted(et_grads):
        raise ConfigError(f"export: ExecuTorch's program trains {sorted(et_grads)}, PyTorch's {sorted(params)}")
    before = {n: p.detach().clone() for n, p in params.items()}
    with torch.no_grad():
        for p in params.values():
            p -= lr * p.grad
    grad_diff = max(float((et_grads[n] - p.grad).abs().max()) for n, p in params.items())
    step_diff = max(float((et_after[n] - p.detach()).abs().max()) for n, p in params.items())
    moved = max(float((p.detach() - before[n]).abs().max()) for n, p in params.items())
    return {"file": path.name, "bytes": path.stat().st_size, "batch": len(x), "lr": lr,
            "trainable": {n: list(p.shape) for n, p in params.items()},
            "trainable_elements": sum(p.numel() for p in params.values()),
            "loss_pytorch": loss.item(), "loss_executorch": et_loss,
            "max_abs_gradient_difference": grad_diff, "max_abs_parameter_difference_after_step": step_diff,
            "max_abs_parameter_change": moved}
