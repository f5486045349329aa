"""Device resolution and free-memory probing (torch imported lazily)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from inference_pio.common.memory import DeviceMemory
from inference_pio.errors import ConfigError


def resolve_device(spec: str) -> str:
    """'auto' -> 'cuda:0' when a GPU is usable, else 'cpu'; 'cuda' -> 'cuda:0'; checks the index exists."""
    import torch

    if spec == "auto":
        return "cuda:0" if torch.cuda.is_available() else "cpu"
    if spec.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(
                f"device {spec!r} was requested but torch {torch.__version__} sees no CUDA GPU; "
                "use device='cpu' or install a CUDA build of torch"
            )
        index = int(spec.split(":", 1)[1]) if ":" in spec else 0
        count = torch.cuda.device_count()
        if index >= count:
            raise ConfigError(f"device {spec!r} does not exist: this machine has {count} CUDA device(s)")
        return f"cuda:{index}"
    if spec == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("device 'mps' was requested but Apple's Metal backend is not available")
    return spec


def probe_memory(device: str) -> DeviceMemory:
    """Free and total bytes of ``device`` (RAM for the CPU)."""
    if device.startswith("cuda"):
        import torch

        free, total = torch.cuda.mem_get_info(torch.device(device))
        return DeviceMemory(device, int(free), int(total))
    info: dict[str, int] = {}
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            key, _, rest = line.partition(":")
            info[key] = int(rest.split()[0]) * 1024
    except OSError:
        pass
    total = info.get("MemTotal", 0)
    free = info.get("MemAvailable", info.get("MemFree", 0))
    return DeviceMemory(device, free, total)


def torch_dtype(name: str) -> Any:
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]
