"""Simulated K-input LUT networks (LUTNet) and Logic Shrinkage's learned fan-in pruning.

Wang et al., *Logic Shrinkage: Learned FPGA Netlist Sparsity for Efficient Neural Network Inference*, FPGA 2022,
arXiv:2112.02346 (LUTNet: FCCM 2019, arXiv:1904.00938); spec ``algorithms_B`` section 9. A LUT network is a model
of its own (a binarised net whose XNORs became trainable LUTs), not a technique applied to an arbitrary model: it is
not registered as a technique and does not run on the foreign-model zoo. See ``docs/logic_shrinkage.md``.
"""

from edgetrain.lut.layer import BinaryLinear, LUTLayer, ResidualSign, SignSTE, minterms, sign_ste
from edgetrain.lut.pipeline import LUTMLP, Schedule, evaluate, expand, magnitude_prune_, model_stats, shrink_model_
from edgetrain.lut.shrink import average_out, layer_stats, saliency, select_removals, shrink_, shrinkage_map

__all__ = ["LUTMLP", "BinaryLinear", "LUTLayer", "ResidualSign", "Schedule", "SignSTE", "average_out", "evaluate",
           "expand", "layer_stats", "magnitude_prune_", "minterms", "model_stats", "saliency", "select_removals",
           "shrink_", "shrink_model_", "shrinkage_map", "sign_ste"]
