"""Device resolution, free-memory probing and checkpoint weight sizes (torch imported lazily)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from inference_pio.common.memory import DeviceMemory, WeightSizes
from inference_pio.errors import ConfigError, ModelLoadError


def resolve_devices(spec: str) -> tuple[str, ...]:
    """The devices a ``device`` setting names, checked against this machine.

    'auto': every visible GPU, else the CPU; 'cuda': every visible GPU; 'cuda:N': that one; 'cuda:0,cuda:2':
    those. With several GPUs the memory plan uses one when the model fits it and splits the model otherwise.
    """
    import torch

    if spec == "auto":
        if not torch.cuda.is_available():
            return ("cpu",)
        spec = "cuda"
    if spec.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(
                f"device {spec!r} was requested but torch {torch.__version__} sees no CUDA GPU; "
                "use device='cpu' or install a CUDA build of torch"
            )
        count = torch.cuda.device_count()
        if spec == "cuda":
            return tuple(f"cuda:{i}" for i in range(count))
        chosen: list[str] = []
        for part in spec.split(","):
            kind, _, index = part.strip().partition(":")
            if kind != "cuda" or not index.isdigit():
                raise ConfigError(f"device {spec!r}: {part!r} is not cuda:N; write e.g. 'cuda:0,cuda:1'")
            if int(index) >= count:
                raise ConfigError(f"device {part!r} does not exist: this machine has {count} CUDA device(s)")
            if f"cuda:{int(index)}" not in chosen:
                chosen.append(f"cuda:{int(index)}")
        return tuple(chosen)
    if spec == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("device 'mps' was requested but Apple's Metal backend is not available")
    return (spec,)


def resolve_device(spec: str) -> str:
    """:func:`resolve_devices` as one ``device`` value: 'cpu', 'cuda:0', or 'cuda:0,cuda:1' for several GPUs
    (the form the memory plan reads)."""
    return ",".join(resolve_devices(spec))


def probe_memory(device: str) -> DeviceMemory:
    """Free and total bytes of one device (RAM for the CPU); :func:`probe_all` reports each of a device list."""
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


def probe_all(spec: str = "auto") -> list[DeviceMemory]:
    """Free and total bytes of every device ``spec`` names: by default every visible GPU (or the CPU)."""
    return [probe_memory(device) for device in resolve_devices(spec)]


def torch_dtype(name: str) -> Any:
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def weight_sizes(
    model_class: str,
    directory: Path,
    *,
    skip_modules: Sequence[str] = (),
    custom: Callable[[str, tuple[int, ...]], Mapping[str, int] | None] | None = None,
) -> WeightSizes:
    """A checkpoint's parameters split as transformers' bitsandbytes loading splits them, from the model class
    built on the meta device (no weight is read): ``nn.Linear`` weights outside the modules transformers keeps
    (output head, tied and fp32-kept modules; ``skip_modules`` replaces these, as ``llm_int8_skip_modules`` does) are
    quantized, the rest stays in the compute dtype.

    ``custom(name, shape)``: for a parameter a model package quantizes itself, its bytes per quantization
    (``{"int8": ..., "int4": ...}``); None for the others.
    """
    import torch
    import transformers
    from transformers.quantizers.base import HfQuantizer
    from transformers.quantizers.quantizers_utils import should_convert_module

    try:
        config = transformers.AutoConfig.from_pretrained(str(directory), trust_remote_code=False, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot read the model configuration in {directory}: {exc}") from exc
    with torch.device("meta"):
        model = getattr(transformers, model_class)._from_config(config)
    keep = HfQuantizer.get_modules_to_not_convert(model, list(skip_modules) or None, model._keep_in_fp32_modules)
    quantized: set[int] = set()
    quantizable = rows = tensors = 0
    for name, module in model.named_modules():
        if type(module) is torch.nn.Linear and should_convert_module(name, keep):
            quantized.add(id(module.weight))
            quantizable += module.weight.numel()
            rows += module.weight.shape[0]
            tensors += 1
    kept = custom_count = 0
    custom_bytes: dict[str, int] = {}
    for name, param in model.named_parameters():
        if id(param) in quantized:
            continue
        own = custom(name, tuple(param.shape)) if custom is not None else None
        if own is None:
            kept += param.numel()
            continue
        custom_count += param.numel()
        for quant, size in own.items():
            custom_bytes[quant] = custom_bytes.get(quant, 0) + int(size)
    from accelerate.utils import compute_module_sizes, get_max_layer_size

    layer_bytes, _ = get_max_layer_size(  # the unit accelerate places whole, as from_pretrained's device map does
        list(model.named_children()), compute_module_sizes(model), list(model._no_split_modules or [])
    )
    largest = layer_bytes // 4  # the meta model is float32
    return WeightSizes(quantizable, kept, rows, tensors, custom_count, tuple(sorted(custom_bytes.items())), largest)


def loaded_weight_bytes(model: Any) -> int:
    """Bytes a loaded model's weights occupy: parameters and buffers, plus bitsandbytes' quantization state
    (LLM.int8 row scales, NF4 block scales) that hangs off its parameters."""
    seen: set[int] = set()
    total = 0

    def add(tensor: Any) -> None:
        nonlocal total
        if tensor is not None and id(tensor) not in seen:
            seen.add(id(tensor))
            total += tensor.numel() * tensor.element_size()

    for tensor in (*model.parameters(), *model.buffers()):
        add(tensor)
        add(getattr(tensor, "SCB", None))
        state = getattr(tensor, "quant_state", None)
        while state is not None:
            add(getattr(state, "absmax", None))
            add(getattr(state, "code", None))
            add(getattr(state, "offset", None))
            state = getattr(state, "state2", None)
    return total
