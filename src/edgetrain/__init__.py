"""edgetrain: train and fine-tune neural networks on memory-constrained devices.

The public surface::

    import edgetrain as et
    recipe = et.Recipe([et.Freeze(last_k_blocks=2)], name="last2")
    handle = et.apply_(model, recipe)          # in place; handle.remove() undoes it
    report = et.measure(model, (x, y))          # one real training step, measured
"""

from __future__ import annotations

__version__ = "0.1.0"

from edgetrain.apply import Applied, apply_
from edgetrain.errors import (
    BudgetError,
    CheckpointError,
    ConfigError,
    DataError,
    EdgetrainError,
    TrainingDiverged,
    WeightsError,
)
from edgetrain.measure import Measurement, measure
from edgetrain.recipe import Execution, Recipe
from edgetrain.registry import TechniqueInfo, get, list_techniques, register
from edgetrain.cost import CostTable, estimate
from edgetrain.techniques import (
    ActNN,
    ApproxMultiply,
    BiasOnly,
    BNNEdge,
    Checkpoint,
    Comet,
    Freeze,
    FrozenChunks,
    FrozenInference,
    GradientFilter,
    Int8,
    Int8Frozen,
    KronA,
    KronABlock,
    LightNorm,
    LiteResidual,
    LoRA,
    MEBQAT,
    MobileTL,
    PatchExecute,
    SmartDeal,
    SparseUpdate,
    Technique,
)
from edgetrain.train import TrainConfig, TrainResult, evaluate, train
from edgetrain.workload import Workload

__all__ = [
    "KronA",
    "KronABlock",
    "LightNorm",
    "LiteResidual",
    "LoRA",
    "MEBQAT",
    "PatchExecute",
    "SmartDeal",
    "MobileTL",
    "Int8Frozen",
    "FrozenInference",
    "FrozenChunks",
    "Comet",
    "BNNEdge",
    "ApproxMultiply",
    "ActNN",
    "Applied",
    "BiasOnly",
    "BudgetError",
    "Checkpoint",
    "CheckpointError",
    "ConfigError",
    "CostTable",
    "DataError",
    "EdgetrainError",
    "Freeze",
    "GradientFilter",
    "Int8",
    "Measurement",
    "Execution",
    "Recipe",
    "SparseUpdate",
    "Technique",
    "TechniqueInfo",
    "TrainConfig",
    "TrainResult",
    "TrainingDiverged",
    "WeightsError",
    "Workload",
    "__version__",
    "apply_",
    "estimate",
    "evaluate",
    "get",
    "list_techniques",
    "measure",
    "register",
    "train",
]
