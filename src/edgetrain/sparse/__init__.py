"""Dynamic sparse training with layers stored sparse (values + CSR indices): SET, RigL and DST-EE.

See :mod:`edgetrain.sparse.dst` (the controller), :mod:`edgetrain.sparse.layers` (the sparse layers and their
autograd) and :mod:`edgetrain.sparse.density` (ERK and uniform densities); docs/sparse.md.
"""

from edgetrain.sparse.density import DISTRIBUTIONS, layer_densities
from edgetrain.sparse.dst import METHODS, DynamicSparse
from edgetrain.sparse.layers import SparseConv2d, SparseLinear, SparseMixin, sparse_from_dense

__all__ = ["DISTRIBUTIONS", "METHODS", "DynamicSparse", "SparseConv2d", "SparseLinear", "SparseMixin",
           "layer_densities", "sparse_from_dense"]
