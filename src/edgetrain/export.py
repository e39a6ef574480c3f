"""Export what a training run trained as a plain, deployable model: ``edgetrain export``.

From a run directory of ``edgetrain train`` (``workload.json``, ``recipe.json``, ``checkpoint.pt``): the model is
rebuilt, the recipe applied and the checkpoint loaded; then the techniques are taken out with what they trained kept
(adapters merged into their weights, :func:`edgetrain.techniques.lora.merge`; a sparse update's trained slices
written back into the weight by its ``remove()``). Written to ``--out``:

* ``model.safetensors``: the plain model's state dict (the parameter names of the model as built: for the built-in
  MobileNetV2, torchvision's, since its ImageNet weights load into it strictly);
* ``model.onnx`` (``[export]`` extra: onnx, onnxruntime): the eval-mode model with each BatchNorm that only reads a
  convolution folded into it (checked against the unfolded model before writing), run by onnxruntime on the whole
  eval set: predictions compared with PyTorch's;
* ``model.pte`` and, with ``training_program``, ``train.pte`` (``[export]`` extra: executorch): ExecuTorch's
  inference program, and a sparse-update plan's training program checked step for step against PyTorch
  (:mod:`edgetrain.export_executorch`);
* ``export.json``: what was done and measured (agreement, largest logit difference, file sizes).

Techniques whose trained part is not a weight of the plain model (KronA^B's and TinyTL's branches) are refused in one
line.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from edgetrain.errors import ConfigError

NOT_EXPORTABLE = {"krona_block": "KronA^B's branches", "lite_residual": "TinyTL's lite residual branches"}
ONNX_TOLERANCE = 1e-4  # the largest logit difference allowed, relative to the largest logit (float32 kernels differ)


def plain_model(run: Path) -> tuple[nn.Module, Any, dict[str, Any]]:
    """The trained model without its techniques, the workload's eval data and what was done."""
    from edgetrain.apply import apply_
    from edgetrain.checkpoint import load_checkpoint
    from edgetrain.recipe import Recipe
    from edgetrain.techniques.lora import merge
    from edgetrain.workload import Workload

    meta = run / "workload.json"
    if not meta.exists():
        raise ConfigError(f"{run}: no workload.json (export reads a run directory written by `edgetrain train`)")
    try:
        d = json.loads(meta.read_text())
        wl, classes = Workload.from_dict(d["workload"]), int(d["num_classes"])
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{meta}: malformed ({type(e).__name__}: {e})") from None
    recipe = Recipe.load(run / "recipe.json")
    blocked = [n for n in recipe.technique_names if n in NOT_EXPORTABLE]
    if blocked:
        raise ConfigError(f"export: {NOT_EXPORTABLE[blocked[0]]} ({blocked[0]}) are not part of the plain model; "
                          "they cannot be exported yet")
    ck = load_checkpoint(run / "checkpoint.pt")
    eval_data = wl.load_data("test")
    model = wl.build_model(classes)
    example = next(iter(eval_data.batches(min(8, len(eval_data)), shuffle=False, drop_last=False)))[0]
    handle = apply_(model, recipe, example)
    try:
        model.load_state_dict(ck["model"])
    except RuntimeError as e:
        raise ConfigError(f"{run}/checkpoint.pt: does not fit the rebuilt model ({str(e).splitlines()[0]})") from None
    from edgetrain.export_executorch import trainable_of

    trainable = trainable_of(model)
    merged = merge(model)
    handle.remove()  # a sparse update writes its trained slices back; every technique's ops go
    for p in model.parameters():
        p.requires_grad_(True)
    return model.eval(), eval_data, {"step": ck.get("step"), "recipe": recipe.name, "merged_adapters": merged,
                                     "techniques_removed": recipe.technique_names, "trainable": trainable}


def fold_batchnorms(model: nn.Module, example: Tensor) -> tuple[nn.Module, int]:
    """A copy of the eval-mode ``model`` with every BatchNorm whose input is only a conv2d's output folded into that
    conv (weight scaled, bias added) and replaced by ``nn.Identity``; checked on ``example``."""
    from edgetrain.structure import analyze

    folded = copy.deepcopy(model).eval()
    s = analyze(folded, example)
    readers: dict[int, int] = {}
    for op in s.ops:
        for t in op.inputs:
            readers[t] = readers.get(t, 0) + 1
    modules = dict(folded.named_modules())
    n = 0
    for conv_name, layer in s.layers.items():
        if layer.kind != "conv2d" or layer.calls != 1:
            continue
        bn_name = s.followers(conv_name)
        conv, bn = modules[conv_name], modules.get(bn_name) if bn_name else None
        if not isinstance(bn, nn.BatchNorm2d) or not isinstance(conv, nn.Conv2d) or bn.running_mean is None:
            continue
        outs = [o for op in s.ops if op.params and op.params[0] == f"{conv_name}.weight" for o in op.outputs]
        if any(readers.get(o, 0) != 1 for o in outs):  # its output is read by something else too
            continue
        with torch.no_grad():
            scale = bn.weight / torch.sqrt(bn.running_var + bn.eps) if bn.affine else 1 / torch.sqrt(
                bn.running_var + bn.eps)
            shift = (bn.bias if bn.affine else 0) - bn.running_mean * scale
            bias = (conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)) * scale + shift
            conv.weight.mul_(scale.view(-1, 1, 1, 1))
            conv.bias = nn.Parameter(bias)
        parent, _, leaf = bn_name.rpartition(".")
        setattr(folded.get_submodule(parent) if parent else folded, leaf, nn.Identity())
        n += 1
    with torch.no_grad():
        a, b = model(example), folded(example)
    if not torch.allclose(a, b, rtol=1e-4, atol=1e-4 * float(a.abs().max())):
        raise ConfigError(f"export: folding {n} BatchNorms changed the outputs (largest difference "
                          f"{float((a - b).abs().max()):.3g}); not exported")
    return folded, n


def export(run: str | Path, out: str | Path, *, onnx: bool = True, pte: bool = True, training_program: bool = False,
           force: bool = False) -> dict[str, Any]:
    """Write the plain model of ``run`` to ``out`` (see the module docstring); returns ``export.json``'s content."""
    from safetensors.torch import save_file

    run, out = Path(run), Path(out)
    if (out / "export.json").exists() and not force:
        raise ConfigError(f"{out}: holds an export already (export.json); choose another --out, or --force")
    model, data, info = plain_model(run)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    save_file(state, str(out / "model.safetensors"))
    info["safetensors"] = {"file": "model.safetensors", "bytes": (out / "model.safetensors").stat().st_size,
                           "tensors": len(state)}
    if onnx:
        info["onnx"] = _onnx(model, data, out / "model.onnx")
    if pte or training_program:
        from edgetrain import export_executorch as et

        if pte:
            info["executorch"] = et.pte_inference(model, data, out / "model.pte", ONNX_TOLERANCE)
        if training_program:
            info["executorch_training"] = et.pte_training(model, info["trainable"], info["techniques_removed"], data,
                                                          out / "train.pte")
    (out / "export.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def _ort_reason(text: str) -> str:
    """onnxruntime's load error in a few words, naming the op it lacks when it says which."""
    missing = re.search(r"(\S*?):?(\w+)\(-?\d+\) is not a registered function/op", text)
    if missing:
        domain = f" (domain {missing.group(1)})" if missing.group(1) else ""
        return f"it does not implement op {missing.group(2)!r}{domain}"
    impl = re.search(r"Could not find an implementation for (\w+)\((\d+)\)", text)
    if impl:
        return f"no CPU implementation of op {impl.group(1)!r} (opset {impl.group(2)})"
    return text.strip().splitlines()[0][:200]


def _onnx(model: nn.Module, data, path: Path) -> dict[str, Any]:  # noqa: ANN001
    try:
        import onnx
        import onnxruntime as ort
    except ImportError:
        raise ConfigError("ONNX export needs onnx and onnxruntime: pip install 'edgetrain[export]' (or --no-onnx)") \
            from None
    x, _ = next(iter(data.batches(min(8, len(data)), shuffle=False, drop_last=False)))
    folded, n = fold_batchnorms(model, x)
    try:
        torch.onnx.export(folded, (x,), str(path), input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, dynamo=False)
    except torch.onnx.errors.OnnxExporterError as e:  # an op with no ONNX form: torch names it
        raise ConfigError(f"export: the model cannot be written as ONNX ({str(e).splitlines()[0]}); --no-onnx "
                          "skips the ONNX file") from None
    onnx.checker.check_model(onnx.load(str(path)))
    try:
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001  (onnxruntime's pybind errors share no public base class)
        raise ConfigError(f"export: onnxruntime cannot load {path} ({_ort_reason(str(e))}); the file is kept for "
                          "inspection, --no-onnx skips the ONNX file") from None
    agree, total, worst, top = 0, 0, 0.0, 0.0
    with torch.no_grad():
        for xb, _ in data.batches(256, shuffle=False, drop_last=False):
            ref = model(xb)
            got = torch.from_numpy(sess.run(None, {"input": xb.numpy()})[0])
            agree += int((ref.argmax(1) == got.argmax(1)).sum())
            total += len(xb)
            worst = max(worst, float((ref - got).abs().max()))
            top = max(top, float(ref.abs().max()))
    if worst > ONNX_TOLERANCE * max(top, 1e-12):
        raise ConfigError(f"export: onnxruntime's logits differ from PyTorch's by {worst:.3g} (largest logit {top:.3g}"
                          f", tolerance {ONNX_TOLERANCE:g} of it); {path} kept for inspection")
    return {"file": path.name, "bytes": path.stat().st_size, "folded_batchnorms": n, "eval_samples": total,
            "prediction_agreement": agree / total, "max_abs_logit_difference": worst, "max_abs_logit": top,
            "tolerance_relative": ONNX_TOLERANCE}
