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


def cuda_indices(device: str, count: int) -> list[int]:
    """The CUDA devices a ``device`` setting names, of ``count`` visible: 'auto' and 'cuda' mean every
    one (as the memory plan reads them), 'cuda:N' that one, 'cuda:0,cuda:2' those. Parts that name no
    visible GPU are left to the plugin, which refuses them in its own words."""
    if device in ("auto", "cuda"):
        return list(range(count))
    found: list[int] = []
    for part in device.split(","):
        kind, _, index = part.strip().partition(":")
        if kind == "cuda" and index.isdigit() and int(index) < count and int(index) not in found:
            found.append(int(index))
    return found


def claim_device(config: Mapping[str, Any]) -> str | None:
    """Make the first configured CUDA device current and cap the memory of each configured one; returns
    what was done (for the log), or None when the worker runs on no GPU."""
    device = str(config.get("device", "auto"))
    if not (device.startswith("cuda") or (device == "auto" and nvidia_present())):
        return None
    import torch

    if not torch.cuda.is_available():
        return None  # the plugin reports a missing GPU itself, in its own words
    indices = cuda_indices(device, torch.cuda.device_count())
    if not indices:
        return None
    torch.cuda.set_device(indices[0])
    fraction = config.get("gpu_memory_fraction")
    if fraction is not None:
        for index in indices:
            torch.cuda.set_per_process_memory_fraction(float(fraction), index)
    shown = ",".join(f"cuda:{i}" for i in indices)
    return shown + ("" if fraction is None else f" capped at {float(fraction):.0%} of their memory each")
