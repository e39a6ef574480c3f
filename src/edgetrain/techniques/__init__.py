"""Built-in techniques. Importing this package registers each of them (one file per technique)."""

from edgetrain.technique import Technique
from edgetrain.techniques.actnn import ActNN
from edgetrain.techniques.approx_multiply import ApproxMultiply
from edgetrain.techniques.bias_only import BiasOnly
from edgetrain.techniques.bnn_edge import BNNEdge
from edgetrain.techniques.checkpoint import Checkpoint
from edgetrain.techniques.comet import Comet
from edgetrain.techniques.freeze import Freeze
from edgetrain.techniques.frozen_chunks import FrozenChunks
from edgetrain.techniques.frozen_inference import FrozenInference
from edgetrain.techniques.gradient_filter import GradientFilter
from edgetrain.techniques.int8 import Int8
from edgetrain.techniques.int8_frozen import Int8Frozen
from edgetrain.techniques.krona import KronA
from edgetrain.techniques.krona_block import KronABlock
from edgetrain.techniques.lightnorm import LightNorm
from edgetrain.techniques.lite_residual import LiteResidual
from edgetrain.techniques.lora import LoRA
from edgetrain.techniques.mebqat import MEBQAT
from edgetrain.techniques.mobiletl import MobileTL
from edgetrain.techniques.patch_execute import PatchExecute
from edgetrain.techniques.smartdeal import SmartDeal
from edgetrain.techniques.sparse_update import SparseUpdate

__all__ = ["ActNN", "ApproxMultiply", "BiasOnly", "BNNEdge", "Checkpoint", "Comet", "Freeze", "FrozenChunks", "FrozenInference", "GradientFilter", "Int8", "Int8Frozen", "KronA", "KronABlock", "LightNorm", "LiteResidual", "LoRA", "MEBQAT", "MobileTL", "PatchExecute", "SmartDeal", "SparseUpdate", "Technique"]
