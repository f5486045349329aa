"""Memory planning: pick dtype and quantization from the weights' size and the device's free memory.

Pure Python: sizes come from plugin metadata or from safetensors headers, free memory from a probe that
the caller supplies (so tests can simulate any device).
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from packaging.version import InvalidVersion, Version

from inference_pio.common.metadata import GB, Precision, Quantization
from inference_pio.errors import ConfigError, InsufficientMemoryError, ModelLoadError

log = logging.getLogger("inference_pio.memory")

BYTES_PER_PARAM: dict[Precision, float] = {
    "float32": 4.0,
    "bfloat16": 2.0,
    "float16": 2.0,
    "int8": 1.0,  # bitsandbytes LLM.int8 weights plus per-row scales: about one byte per parameter
    "int4": 0.55,  # NF4 with double-quantized block scales
}


BITSANDBYTES_MIN_VERSION = "0.46.1"
"""transformers 5.24 refuses older bitsandbytes; 0.46.1 and later also quantize on the CPU (tested: 0.46.1, 0.50.2)."""
BITSANDBYTES_INSTALL = (
    f"pip install 'bitsandbytes>={BITSANDBYTES_MIN_VERSION}' (the model package's 'quantization' extra, "
    "e.g. pip install 'inference-pio-<model>[quantization]')"
)


@dataclass(frozen=True)
class QuantizationSupport:
    """The device kinds where 8-bit/4-bit weights (bitsandbytes) can load here, and why not elsewhere."""

    device_kinds: frozenset[str]
    problem: str = ""
    """Why quantization is unavailable (empty when it is available on ``device_kinds``)."""


def bitsandbytes_support(version_of: Callable[[str], str] = importlib.metadata.version) -> QuantizationSupport:
    """Where bitsandbytes quantizes on this machine, read from the installed distribution without importing it
    (importing it imports torch): CUDA and the CPU from version 0.46.1 on."""
    try:
        installed = version_of("bitsandbytes")
    except importlib.metadata.PackageNotFoundError:
        return QuantizationSupport(frozenset(), f"bitsandbytes is not installed; {BITSANDBYTES_INSTALL}")
    try:
        too_old = Version(installed) < Version(BITSANDBYTES_MIN_VERSION)
    except InvalidVersion:
        too_old = True
    if too_old:
        return QuantizationSupport(
            frozenset(),
            f"bitsandbytes {installed} is installed, but {BITSANDBYTES_MIN_VERSION} or later is needed; "
            f"{BITSANDBYTES_INSTALL}",
        )
    return QuantizationSupport(frozenset({"cuda", "cpu"}))


@dataclass(frozen=True)
class DeviceMemory:
    """Free and total memory of one device, as probed (or simulated)."""

    device: str
    free_bytes: int
    total_bytes: int

    @property
    def kind(self) -> str:
        return self.device.split(":", 1)[0]


@dataclass(frozen=True)
class MemoryPlan:
    """The precision chosen for an activation, and why."""

    device: str
    dtype: Literal["float32", "bfloat16", "float16"]
    quantization: Quantization
    required_bytes: int
    free_bytes: int
    reason: str

    def describe(self) -> str:
        quant = "" if self.quantization == "none" else f" with {self.quantization} weights"
        return (
            f"{self.dtype}{quant} on {self.device}: needs {self.required_bytes / GB:.2f} GB, "
            f"{self.free_bytes / GB:.2f} GB free ({self.reason})"
        )


def host_memory(device: str = "cpu") -> DeviceMemory:
    """Available and total RAM of this machine, from /proc/meminfo (zeros where there is none)."""
    info: dict[str, int] = {}
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            key, _, rest = line.partition(":")
            info[key] = int(rest.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return DeviceMemory(device, info.get("MemAvailable", info.get("MemFree", 0)), info.get("MemTotal", 0))


def headroom(weights: int) -> int:
    """Bytes to keep free beside the weights: activations, KV cache, allocator slack."""
    return max(weights // 10, 256 * 1024 * 1024)


def checkpoint_parameter_count(directory: Path) -> int:
    """Count parameters from the safetensors headers in ``directory`` without loading any tensor."""
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"no *.safetensors files in {directory}; inference-pio loads safetensors weights only")
    total = 0
    for path in files:
        with path.open("rb") as fh:
            raw = fh.read(8)
            if len(raw) != 8:
                raise ModelLoadError(f"{path} is not a safetensors file (shorter than its 8-byte header length)")
            (length,) = struct.unpack("<Q", raw)
            if length > 100_000_000:
                raise ModelLoadError(f"{path}: safetensors header claims {length} bytes; the file is corrupt")
            try:
                header = json.loads(fh.read(length))
            except ValueError as exc:
                raise ModelLoadError(f"{path}: unreadable safetensors header ({exc})") from exc
        for key, info in header.items():
            if key == "__metadata__":
                continue
            count = 1
            for dim in info["shape"]:
                count *= int(dim)
            total += count
    return total


def requirements_for(parameter_count: int) -> dict[Precision, int]:
    """Bytes of weights per precision for a model of ``parameter_count`` parameters."""
    return {p: int(parameter_count * b) for p, b in BYTES_PER_PARAM.items()}


def full_precision_for(device_kind: str) -> Literal["float32", "bfloat16", "float16"]:
    """The unquantized dtype to use when the user asked for ``auto``: bf16 on GPUs, fp32 on CPUs."""
    return {"cuda": "bfloat16", "mps": "float16"}.get(device_kind, "float32")  # type: ignore[return-value]


def plan_memory(
    name: str,
    requirements: Mapping[Precision, int],
    memory: DeviceMemory,
    *,
    dtype: str = "auto",
    quantization: str = "auto",
    supported_quantizations: tuple[Quantization, ...] = ("none",),
    quantization_support: QuantizationSupport | None = None,
) -> MemoryPlan:
    """Choose dtype and quantization that fit ``memory``, or raise ``InsufficientMemoryError`` naming both sizes.

    ``auto`` tries full precision first, then, on CUDA, 8-bit and 4-bit (bitsandbytes); on a CPU, float32 falls
    back to bfloat16 and quantization is used only when asked for (bitsandbytes' CPU kernels are slow). An
    explicit choice is honoured or refused, never silently changed. ``quantization_support`` says where
    bitsandbytes works (default: what :func:`bitsandbytes_support` finds installed).
    """
    support = bitsandbytes_support() if quantization_support is None else quantization_support
    kind = memory.kind
    full = full_precision_for(kind) if dtype == "auto" else dtype
    if full not in ("float32", "bfloat16", "float16"):
        raise ConfigError(f"dtype must be auto, float32, bfloat16 or float16, got {dtype!r}")

    def size(precision: str) -> int | None:
        if precision in requirements:
            return requirements[precision]  # type: ignore[index]
        # Derive from any known size: requirements scale with bytes per parameter.
        for known, value in requirements.items():
            return int(value / BYTES_PER_PARAM[known] * BYTES_PER_PARAM[precision])  # type: ignore[index]
        return None

    candidates: list[tuple[str, Quantization]] = []
    if quantization in ("auto", "none"):
        candidates.append((full, "none"))
        if dtype == "auto" and kind == "cpu" and full == "float32":
            candidates.append(("bfloat16", "none"))
    if quantization == "auto":
        if kind == "cuda" and kind in support.device_kinds:
            candidates += [(full, q) for q in ("int8", "int4") if q in supported_quantizations]
    elif quantization in ("int8", "int4"):
        if quantization not in supported_quantizations:
            raise ConfigError(
                f"{name} does not support {quantization} quantization; it supports {', '.join(supported_quantizations)}"
            )
        if kind not in support.device_kinds:
            why = support.problem or f"bitsandbytes quantizes on {' and '.join(sorted(support.device_kinds))} only"
            raise ConfigError(f"{quantization} quantization of {name} on {memory.device} is not possible: {why}")
        candidates.append((full, quantization))
    elif quantization != "none":
        raise ConfigError(f"quantization must be auto, none, int8 or int4, got {quantization!r}")

    tried: list[str] = []
    for cand_dtype, quant in candidates:
        weights = size(cand_dtype if quant == "none" else quant)
        if weights is None:
            continue
        need = weights + headroom(weights)
        if need <= memory.free_bytes:
            first = not tried
            reason = "fits" if first else f"{'; '.join(tried)} would not fit"
            plan = MemoryPlan(memory.device, cand_dtype, quant, need, memory.free_bytes, reason)  # type: ignore[arg-type]
            log.info("%s: memory plan %s", name, plan.describe())
            return plan
        tried.append(f"{cand_dtype if quant == 'none' else quant} needs {need / GB:.2f} GB")
    options = ["free memory on the device", "choose another device with device=..."]
    if quantization in ("auto", "none") and any(q != "none" for q in supported_quantizations):
        if kind != "cuda":
            options.append("use a CUDA GPU, where 8-bit/4-bit weights (bitsandbytes) are chosen when needed")
        if kind == "cpu" and kind in support.device_kinds:
            options.append("ask for quantization='int8' or 'int4' (bitsandbytes on the CPU: smaller, slower)")
        if support.problem:
            options.append(f"for 8-bit/4-bit weights: {support.problem}")
    raise InsufficientMemoryError(
        f"{name} does not fit on {memory.device}: {'; '.join(tried) or 'no size known'}, but only "
        f"{memory.free_bytes / GB:.2f} GB of {memory.total_bytes / GB:.2f} GB is free. Options: {'; '.join(options)}."
    )
