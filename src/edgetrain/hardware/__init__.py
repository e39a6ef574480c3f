"""Hardware cost: what a training step costs on real hardware, beyond bytes.

Each module is one model with its equations and sourced constants (docs/hardware.md):

* :mod:`edgetrain.hardware.energy`: energy and time of a training step per device profile, from the cost model's
  per-layer MACs and bytes moved, split by memory level and layer (:mod:`.profiles`: device profiles with a source
  on every constant; :mod:`.calibrate`: this machine's rates, measured).
* :mod:`edgetrain.hardware.design_space`: a QUIDAM-style sweep (PE type x array x buffer): area, energy and latency of
  a training step on a weight-stationary systolic accelerator (docs/design_space.md).
* :mod:`edgetrain.hardware.memtech`: SRAM vs STT-/SOT-MRAM last-level cache at iso-capacity and iso-area, priced with a
  step's traffic (DeepNVM++-style; docs/memory_technology.md).
* :mod:`edgetrain.hardware.polyact`: PolyMPCNet's trainable polynomial activations in place of ReLUs (modules and
  functional calls), a learned gate with the 2PC latency in the loss, and an MPC latency/communication cost model per
  site and network (docs/private_inference.md).
* :mod:`edgetrain.hardware.variation`: NVM device variation in compute-in-memory accelerators (device-to-device
  log-normal, cycle-to-cycle Gaussian, conductance levels): expected accuracy over chips, worst case within k sigma by
  PGD, variation-aware training (docs/nvm_variation.md).
* :mod:`edgetrain.hardware.thermal`: thermal-aware execution: a slimmable network (switchable BatchNorm), a lumped RC
  thermal model of a phone's big CPU cluster, a step-wise throttling governor and a policy that narrows the network
  before the trip point (docs/thermal.md).
"""
