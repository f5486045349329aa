"""Memory planning: pick dtype, quantization and GPUs from the weights' size and the devices' free memory.

Pure Python: sizes come from plugin metadata or from the checkpoint (see :class:`WeightSizes`), free memory from
a probe that the caller supplies (so tests can simulate any device, and any number of GPUs).
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, cast

from packaging.version import InvalidVersion, Version

from inference_pio.common.metadata import GB, Precision, Quantization
from inference_pio.errors import ConfigError, InsufficientMemoryError, ModelLoadError

log = logging.getLogger("inference_pio.memory")

BYTES_PER_PARAM: dict[Precision, float] = {
    "float32": 4.0,
    "bfloat16": 2.0,
    "float16": 2.0,
    "int8": 1.0,  # bitsandbytes LLM.int8 weights plus per-row scales: about one byte per parameter
    "int4": 0.55,  # NF4 with double-quantized block scales, plus what stays unquantized
}
"""Bytes per parameter where only the count is known (metadata figures); :class:`WeightSizes` is exact."""

FullDtype = Literal["float32", "bfloat16", "float16"]
DTYPE_BYTES: dict[str, int] = {"float32": 4, "bfloat16": 2, "float16": 2}
NF4_BYTES_PER_PARAM = 0.5 + 1 / 64 + 4 / (64 * 256)
"""bitsandbytes NF4 with double quantization: 4 bits, one 8-bit scale per 64 values, one float32 per 256 scales."""
NF4_BYTES_PER_TENSOR = 16 * 4 + 256 * 4 + 8
"""Each NF4 tensor's own code tables (16 and 256 float32 values) and rounding of its last blocks."""
MIB = 1024 * 1024


@dataclass(frozen=True)
class WeightSizes:
    """A checkpoint's parameters split by what 8/4-bit loading does to them, so each (dtype, quantization) has
    its exact byte count: bitsandbytes quantizes ``nn.Linear`` weights only; embeddings, norms, biases, the output
    head, and what a loader leaves alone (e.g. fused 3-D expert weights) stay in the compute dtype."""

    quantizable: int
    """Parameters stored in 8 or 4 bits when quantizing."""
    kept: int
    """Parameters that stay in the compute dtype either way."""
    rows: int = 0
    """Output rows of the quantizable matrices: LLM.int8 keeps one float32 scale per row."""
    tensors: int = 0
    """How many quantizable matrices: NF4 keeps code tables per tensor."""
    custom: int = 0
    """Parameters a model package quantizes in its own format (e.g. fused expert tensors)."""
    custom_bytes: tuple[tuple[str, int], ...] = ()
    """Bytes of the ``custom`` parameters per quantization, e.g. (("int8", n8), ("int4", n4))."""
    largest_layer: int = 0
    """Parameters of the largest piece a split cannot cut (a decoder layer, the embedding): 0 when unknown."""

    def bytes_for(self, dtype: str, quantization: str) -> int:
        full = DTYPE_BYTES[dtype]
        if quantization == "none":
            return (self.quantizable + self.kept + self.custom) * full
        if quantization == "int8":
            quantized = self.quantizable + 4 * self.rows
        else:
            quantized = int(self.quantizable * NF4_BYTES_PER_PARAM) + self.tensors * NF4_BYTES_PER_TENSOR
        custom = dict(self.custom_bytes).get(quantization, self.custom * full)
        return quantized + self.kept * full + custom

    @property
    def parameters(self) -> int:
        return self.quantizable + self.kept + self.custom


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
    """The precision and device(s) chosen for an activation, and why."""

    device: str
    """The device that holds the whole model, or the first of a split (inputs go there)."""
    dtype: FullDtype
    quantization: Quantization
    required_bytes: int
    """Weights plus headroom (activations, KV cache, allocator slack)."""
    free_bytes: int
    """Free memory of the device(s) used."""
    reason: str
    weight_bytes: int = 0
    """The weights alone: what the loaded model's parameters and buffers should measure."""
    max_memory: tuple[tuple[str, int], ...] = ()
    """When the model is split over GPUs: each GPU and the most weight bytes it may hold (free memory less its
    headroom), passed to accelerate as ``max_memory``; empty when one device holds everything."""

    def __post_init__(self) -> None:
        # A plan that crossed a process boundary as JSON comes back with lists.
        object.__setattr__(self, "max_memory", tuple((str(d), int(b)) for d, b in self.max_memory))

    @property
    def devices(self) -> tuple[str, ...]:
        return tuple(d for d, _ in self.max_memory) or (self.device,)

    @property
    def split(self) -> bool:
        return len(self.max_memory) > 1

    def describe(self) -> str:
        quant = "" if self.quantization == "none" else f" with {self.quantization} weights"
        where = f"on {self.device}"
        if self.split:
            limits = ", ".join(f"{d} \N{LESS-THAN OR EQUAL TO} {b / GB:.2f} GB" for d, b in self.max_memory)
            where = f"split over {len(self.max_memory)} GPUs (weights {limits})"
        return (
            f"{self.dtype}{quant} {where}: needs {self.required_bytes / GB:.2f} GB, "
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
    return max(weights // 10, 256 * MIB)


def split_slack(requirements: Mapping[Precision, int] | WeightSizes, dtype: str, weights: int, gpus: int) -> int:
    """Bytes a split may waste: whole layers go to one GPU, so each GPU may stop up to one layer short of its
    limit, and accelerate keeps room for the largest layer on the first GPU. Unknown layer size: 1/20 of the
    weights per GPU."""
    if isinstance(requirements, WeightSizes) and requirements.largest_layer:
        return requirements.largest_layer * DTYPE_BYTES[dtype] * gpus
    return weights // 20 * gpus


def split_limits(memories: Sequence[DeviceMemory]) -> tuple[tuple[str, int], ...]:
    """The most weight bytes each GPU may hold in a split: its free memory less the same headroom a single
    device keeps (a tenth of the weights, so 1/11 of a full device, at least 256 MiB); devices with nothing
    left over are left out."""
    limits = ((m.device, m.free_bytes - max(m.free_bytes // 11, 256 * MIB)) for m in memories)
    return tuple((d, b) for d, b in limits if b > 0)


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


def full_precision_for(device_kind: str) -> FullDtype:
    """The unquantized dtype to use when the user asked for ``auto``: bf16 on GPUs, fp32 on CPUs."""
    return cast(FullDtype, {"cuda": "bfloat16", "mps": "float16"}.get(device_kind, "float32"))


def plan_memory(
    name: str,
    requirements: Mapping[Precision, int] | WeightSizes,
    memory: DeviceMemory | Sequence[DeviceMemory],
    *,
    dtype: str = "auto",
    quantization: str = "auto",
    supported_quantizations: tuple[Quantization, ...] = ("none",),
    quantization_support: QuantizationSupport | None = None,
) -> MemoryPlan:
    """Choose dtype, quantization and device(s) that fit ``memory``, or raise ``InsufficientMemoryError`` naming
    the sizes.

    ``auto`` tries full precision first, then, on CUDA, 8-bit and 4-bit (bitsandbytes); on a CPU, float32 falls
    back to bfloat16 and quantization is used only when asked for (bitsandbytes' CPU kernels are slow). An
    explicit choice is honoured or refused, never silently changed. ``quantization_support`` says where
    bitsandbytes works (default: what :func:`bitsandbytes_support` finds installed).

    With several GPUs in ``memory``, each precision is tried on one GPU (the first that fits) and then split over
    all of them (accelerate's device map with :func:`split_limits` per GPU, and :func:`split_slack` spare for
    whole layers): full precision split over GPUs is preferred to quantized weights on one.
    """
    memories = [memory] if isinstance(memory, DeviceMemory) else list(memory)
    if not memories:
        raise ConfigError(f"no device to plan {name} on")
    kinds = {m.kind for m in memories}
    if len(memories) > 1 and kinds != {"cuda"}:
        raise ConfigError(
            f"a model is split over CUDA GPUs only; got {', '.join(m.device for m in memories)}: "
            "use device='cuda' (every visible GPU), 'cuda:0,cuda:1', or one device"
        )
    support = bitsandbytes_support() if quantization_support is None else quantization_support
    kind = memories[0].kind
    where = ", ".join(m.device for m in memories)
    if dtype != "auto" and dtype not in DTYPE_BYTES:
        raise ConfigError(f"dtype must be auto, float32, bfloat16 or float16, got {dtype!r}")
    full = full_precision_for(kind) if dtype == "auto" else cast(FullDtype, dtype)

    def size(cand_dtype: str, quant: str) -> int | None:
        if isinstance(requirements, WeightSizes):
            return requirements.bytes_for(cand_dtype, quant)
        precision = cand_dtype if quant == "none" else quant
        if precision in requirements:
            return requirements[precision]  # type: ignore[index]
        # Derive from any known size: requirements scale with bytes per parameter.
        for known, value in requirements.items():
            return int(value / BYTES_PER_PARAM[known] * BYTES_PER_PARAM[precision])  # type: ignore[index]
        return None

    candidates: list[tuple[FullDtype, Quantization]] = []
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
            raise ConfigError(f"{quantization} quantization of {name} on {where} is not possible: {why}")
        candidates.append((full, quantization))
    elif quantization != "none":
        raise ConfigError(f"quantization must be auto, none, int8 or int4, got {quantization!r}")

    limits = split_limits(memories) if len(memories) > 1 else ()
    tried: list[str] = []
    for cand_dtype, quant in candidates:
        weights = size(cand_dtype, quant)
        if weights is None:
            continue
        need = weights + headroom(weights)
        label = cand_dtype if quant == "none" else quant
        reason = f"{'; '.join(tried)} would not fit" if tried else "fits"
        for mem in memories:
            if need <= mem.free_bytes:
                plan = MemoryPlan(mem.device, cand_dtype, quant, need, mem.free_bytes, reason, weights)
                log.info("%s: memory plan %s", name, plan.describe())
                return plan
        if len(limits) > 1 and weights + split_slack(requirements, cand_dtype, weights, len(limits)) <= sum(
            b for _, b in limits
        ):
            largest = max(m.free_bytes for m in memories)
            reason = f"{label} needs {need / GB:.2f} GB, more than one GPU's {largest / GB:.2f} GB free" + (
                f"; {'; '.join(tried)} would not fit" if tried else ""
            )
            used = {d for d, _ in limits}
            free = sum(m.free_bytes for m in memories if m.device in used)
            plan = MemoryPlan(limits[0][0], cand_dtype, quant, need, free, reason, weights, limits)
            log.info("%s: memory plan %s", name, plan.describe())
            return plan
        tried.append(f"{label} needs {need / GB:.2f} GB")
    options = ["free memory on the device", "choose another device with device=..."]
    if quantization in ("auto", "none") and any(q != "none" for q in supported_quantizations):
        if kind != "cuda":
            options.append("use a CUDA GPU, where 8-bit/4-bit weights (bitsandbytes) are chosen when needed")
        if kind == "cpu" and kind in support.device_kinds:
            options.append("ask for quantization='int8' or 'int4' (bitsandbytes on the CPU: smaller, slower)")
        if support.problem:
            options.append(f"for 8-bit/4-bit weights: {support.problem}")
    free_total = sum(m.free_bytes for m in memories)
    total = sum(m.total_bytes for m in memories)
    if len(memories) > 1:
        options.insert(0, "add GPUs")
        room = (
            f"only {free_total / GB:.2f} GB of {total / GB:.2f} GB is free over the {len(memories)} GPUs "
            f"({', '.join(f'{m.device} {m.free_bytes / GB:.2f} GB' for m in memories)}), "
            f"{sum(b for _, b in limits) / GB:.2f} GB of it for weights when split"
        )
    else:
        room = f"only {free_total / GB:.2f} GB of {total / GB:.2f} GB is free"
    raise InsufficientMemoryError(
        f"{name} does not fit on {where}: {'; '.join(tried) or 'no size known'}, but {room}. "
        f"Options: {'; '.join(options)}."
    )
