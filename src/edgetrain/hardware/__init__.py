"""Hardware cost: what a training step costs on real hardware, beyond bytes.

Each module is one model with its equations and sourced constants (docs/hardware.md):

* :mod:`edgetrain.hardware.energy`: energy and time of a training step per device profile, from the cost model's
  per-layer MACs and bytes moved, split by memory level and layer.
"""
