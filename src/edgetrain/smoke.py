"""Smoke mode: ``EDGETRAIN_SMOKE=1`` shrinks every workload so that a command runs in seconds.

It exists so that the test suite can run every command the documentation shows (``tests/test_docs.py``) as it is
written, on a tiny workload: it checks that commands run and what they write parses, never what they measure.
Results written in smoke mode say so (``"smoke": true`` in their provenance) and mean nothing.

What it caps (each only downwards; nothing else changes):

* data loaders (:func:`edgetrain.data.load_data`): the first :data:`SAMPLES` samples of each split;
* the training loop (:func:`edgetrain.train.train`): :data:`STEPS` optimizer steps;
* workloads built by the command line and by bench configs: image size :data:`IMAGE_SIZE`, batch :data:`BATCH`;
* bench configs: ``measure_repeats`` :data:`REPEATS`, each recipe's micro-batches at most the (capped) batch; ``edgetrain plan``: :data:`ANALYSIS_STEPS` analysis steps
  and a small analysis grid.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

ENV = "EDGETRAIN_SMOKE"
SAMPLES = 64
STEPS = 2
IMAGE_SIZE = 48
BATCH = 4
REPEATS = 1
ANALYSIS_STEPS = 2


def active() -> bool:
    """Whether ``$EDGETRAIN_SMOKE`` is set to something other than empty or ``0``."""
    return os.environ.get(ENV, "") not in ("", "0")


def cap(value: int | None, limit: int) -> int | None:
    """``min(value, limit)`` in smoke mode (``None`` becomes ``limit``), else ``value``."""
    if not active():
        return value
    return limit if value is None else min(value, limit)


def workload(wl: Any) -> Any:
    """An :class:`edgetrain.Workload` with smoke-mode image size and batch (unchanged outside smoke mode)."""
    if not active():
        return wl
    return dataclasses.replace(wl, image_size=min(wl.image_size, IMAGE_SIZE), batch_size=min(wl.batch_size, BATCH))


def recipe(rec: Any, batch_size: int) -> Any:
    """A :class:`edgetrain.Recipe` whose micro-batches fit a smoke-mode batch (unchanged outside smoke mode)."""
    if not active() or rec.execution.micro_batches <= batch_size:
        return rec
    return dataclasses.replace(rec, execution=dataclasses.replace(rec.execution, micro_batches=batch_size))
