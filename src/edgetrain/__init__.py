"""edgetrain: train and fine-tune neural networks on memory-constrained devices."""

from __future__ import annotations

__version__ = "0.1.0"
