"""Device profiles for the planner, and memory sizes with units.

Each number carries its source. ``train_budget`` is what the planner gives training by default (trainable
weights + gradients + optimizer state + saved activations); where it is our assumption, it says so.
"""

from __future__ import annotations

import dataclasses
import re

from edgetrain.errors import ConfigError

KB, KiB, MB, MiB, GB, GiB = 1000, 1024, 1000**2, 1024**2, 1000**3, 1024**3
_UNITS = {"": 1, "B": 1, "KB": KB, "KIB": KiB, "MB": MB, "MIB": MiB, "GB": GB, "GIB": GiB}


def parse_size(text: str | int | float) -> int:
    """``"256KB"`` -> 256000, ``"256KiB"`` -> 262144, ``"1.5 MiB"``, ``"4096"``/``4096`` (bytes).

    Units are SI (KB = 1000 B) or binary (KiB = 1024 B), case-insensitive; a bare number is bytes.
    """
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value, unit = float(text), ""
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
        if not m or m.group(2).upper() not in _UNITS:
            raise ConfigError(f"size {text!r}: expected a number with an optional unit "
                              "(B, KB, KiB, MB, MiB, GB, GiB), e.g. 256KB")
        value, unit = float(m.group(1)), m.group(2).upper()
    size = int(round(value * _UNITS[unit]))
    if size <= 0:
        raise ConfigError(f"size {text!r}: must be positive")
    return size


def format_size(n: float) -> str:
    """Bytes in the largest binary unit that keeps the number >= 1 (``262144`` -> ``256.0 KiB``)."""
    for unit, scale in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if abs(n) >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


@dataclasses.dataclass(frozen=True)
class Device:
    name: str
    description: str
    sram_bytes: int  # working memory (RAM)
    flash_bytes: int | None  # storage for frozen weights, when it is separate and small
    train_budget: int  # default budget for trainable state + saved activations
    batch_size: int  # default training batch size on the device
    source: str


DEVICES = {
    "mcu": Device(
        "mcu", "microcontroller, 256 KB SRAM / 1 MB flash (STM32F746-class, TTE's target)",
        sram_bytes=256 * KiB, flash_bytes=1 * MiB, train_budget=256 * KiB, batch_size=1,
        source="Lin et al., On-Device Training Under 256KB Memory, NeurIPS 2022 (abstract: 256KB SRAM, 1MB Flash; "
        "on-device training at batch size 1, specs/algorithms_A.md §6.4)"),
    "raspberry_pi_4": Device(
        "raspberry_pi_4", "Raspberry Pi 4 Model B, 4 GB LPDDR4-3200 (also sold with 1, 2 and 8 GB)",
        sram_bytes=4 * GiB, flash_bytes=None, train_budget=1 * GiB, batch_size=32,
        source="Raspberry Pi 4 Model B product brief (raspberrypi.com): 1/2/4/8 GB LPDDR4-3200; the 1 GiB training "
        "budget (room for the OS, data and frozen weights) is our assumption"),
    "jetson_nano": Device(
        "jetson_nano", "NVIDIA Jetson Nano, 4 GB LPDDR4 shared by CPU and GPU",
        sram_bytes=4 * GiB, flash_bytes=None, train_budget=1 * GiB, batch_size=32,
        source="NVIDIA Jetson Nano Developer Kit specifications: 4 GB 64-bit LPDDR4, 25.6 GB/s; the 1 GiB training "
        "budget is our assumption (gradient filtering's CPU results were measured on this board)"),
    "phone": Device(
        "phone", "mid-range phone, 6 GB RAM, app share 512 MiB",
        sram_bytes=6 * GiB, flash_bytes=None, train_budget=512 * MiB, batch_size=16,
        source="6 GB is a common mid-range phone RAM size (e.g. Google Pixel 6a spec sheet); 512 MiB for one app's "
        "training and batch 16 are our assumptions (Android's per-app large heap is typically 256-512 MiB)"),
}


def get_device(name: str) -> Device:
    if name not in DEVICES:
        raise ConfigError(f"unknown device {name!r}; known: {', '.join(DEVICES)}")
    return DEVICES[name]
