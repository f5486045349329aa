"""The GPU an isolated worker may use, claimed in the worker before its plugin is built.

The manager decides the device and the cap (``gpu_memory_fraction`` of the plugin's trust level, see
:func:`inference_pio.plugin_system.trust.apply_trust`) and hands both over in the activation config; the
worker makes that device current and caps PyTorch's allocator on it, so a plugin that never looks at
``gpu_memory_fraction`` is held to it too. Imports torch only when the device may be a GPU.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any


def nvidia_present() -> bool:
    """Whether an NVIDIA driver is loaded, without importing torch (so CPU-only workers start fast)."""
    return os.path.isdir("/proc/driver/nvidia/gpus") and bool(os.listdir("/proc/driver/nvidia/gpus"))


def claim_device(config: Mapping[str, Any]) -> str | None:
    """Make the configured CUDA device current and cap its memory; returns what was done (for the log),
    or None when the worker runs on no GPU."""
    device = str(config.get("device", "auto"))
    if not (device.startswith("cuda") or (device == "auto" and nvidia_present())):
        return None
    import torch

    if not torch.cuda.is_available():
        return None  # the plugin reports a missing GPU itself, in its own words
    index = torch.device(device).index if device.startswith("cuda") else None
    index = torch.cuda.current_device() if index is None else index
    torch.cuda.set_device(index)
    fraction = config.get("gpu_memory_fraction")
    if fraction is not None:
        torch.cuda.set_per_process_memory_fraction(float(fraction), index)
    return f"cuda:{index}" + ("" if fraction is None else f" capped at {float(fraction):.0%} of its memory")
