"""Every technique on models edgetrain did not write (the foreign zoo, :mod:`edgetrain.testing.zoo`): it works, or
it refuses in one line; it never crashes and never silently changes a model.

"Works" means: ``apply_`` accepted it (its own probe check: the eval-mode output is unchanged, or within the stated
bound, and the technique acted), one training step's gradients are within the technique's stated bound of plain
PyTorch's with the same trainable set (exact techniques: relative error 1e-4 in float32), the cost model predicts
the meter's saved bytes within 10% where it has an estimate, and ``remove()`` restores parameters, flags, hooks and
outputs. The table these rows make is docs/techniques.md's (``benchmarks/zoo/run.py`` writes it with peaks).
"""

from __future__ import annotations

import functools
import warnings

import pytest
import torch

import edgetrain as et
from edgetrain.structure import analyze
from edgetrain.testing.zoo import ZOO, available, evaluate, zoo_configs

MODELS = available()
TECHNIQUES = [i.name for i in et.list_techniques()]


@functools.lru_cache(maxsize=None)
def _base(name: str):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = ZOO[name].build()
    return model, zoo_configs(analyze(model, ZOO[name].batch(2)[0]))


def test_every_technique_has_a_zoo_config_and_the_zoo_is_installed():
    model, configs = _base("functional")
    assert sorted(configs) == sorted(TECHNIQUES)
    assert set(MODELS) == set(ZOO), f"zoo entries skipped (missing test extras?): {sorted(set(ZOO) - set(MODELS))}"


@pytest.mark.parametrize("technique", TECHNIQUES)
@pytest.mark.parametrize("name", MODELS)
def test_technique_works_or_refuses_in_one_line(name, technique):
    torch.manual_seed(0)
    model, configs = _base(name)
    row = evaluate(ZOO[name], configs[technique], model=model)
    if row["outcome"] == "refused":
        assert "\n" not in row["reason"] and row["reason"], row
        return
    info = et.get(technique)
    assert row["restored"], row
    if info.grad_cosine >= 1.0:
        assert row["grad_error"] <= 1e-4, row
    else:
        assert row["grad_cosine"] >= info.grad_cosine, row
    if row["estimate"] is not None:
        assert row["estimate"] == row["saved"], row  # the bar is 10%; at the traced batch it is exact


@pytest.mark.parametrize("name", MODELS)
def test_the_baseline_techniques_apply_to_every_zoo_model(name):
    """Freezing, bias-only training and activation compression make sense for any network: none may refuse."""
    model, configs = _base(name)
    for technique in ("freeze", "bias_only", "actnn", "sparse_update"):
        row = evaluate(ZOO[name], configs[technique], model=model)
        assert row["outcome"] == "works", row
        assert row["saved"] < row["plain_saved"], row
