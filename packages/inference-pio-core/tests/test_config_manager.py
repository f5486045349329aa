"""ConfigManager: layer precedence, validation with sources, and memory-driven precision choice."""

from __future__ import annotations

from pathlib import Path

import pytest

from inference_pio import ConfigError, ConfigManager, InsufficientMemoryError, ModelPluginMetadata
from inference_pio.common.memory import (
    DeviceMemory,
    QuantizationSupport,
    checkpoint_parameter_count,
    plan_memory,
    requirements_for,
)

GB = 10**9


def write_toml(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_layers_apply_in_documented_order(tmp_path: Path) -> None:
    cfg = write_toml(
        tmp_path / "c.toml",
        '[defaults]\ndevice = "cpu"\nmax_context = 100\n'
        '[plugins.demo]\nmax_context = 200\nmax_images = 3\nflavour = "file"\n',
    )
    env = {
        "INFERENCE_PIO_CONFIG": str(cfg),
        "INFERENCE_PIO_MAX_IMAGES": "4",
        "INFERENCE_PIO_DEMO__MAX_IMAGES": "5",
        "INFERENCE_PIO_DTYPE": "bfloat16",
    }
    cm = ConfigManager(environ=env)
    resolved = cm.resolve("demo", {"flavour": "plugin", "max_batch_size": 2}, {"dtype": "float32"})
    assert resolved["device"] == "cpu"
    assert resolved.sources["device"].startswith("config file")
    assert resolved["max_context"] == 200
    assert resolved["max_images"] == 5
    assert resolved.sources["max_images"] == "environment variable INFERENCE_PIO_DEMO__MAX_IMAGES"
    assert resolved["flavour"] == "file"
    assert resolved["max_batch_size"] == 2
    assert resolved.sources["max_batch_size"] == "plugin default"
    assert resolved["dtype"] == "float32"
    assert resolved.sources["dtype"] == "keyword argument"
    assert resolved["quantization"] == "auto"
    assert resolved.sources["quantization"] == "built-in default"


def test_invalid_values_name_key_and_source(tmp_path: Path) -> None:
    cfg = write_toml(tmp_path / "c.toml", "[defaults]\nmax_batch_size = 0\n")
    with pytest.raises(ConfigError, match=r"max_batch_size=0 \(from config file .*c.toml\)"):
        ConfigManager(environ={"INFERENCE_PIO_CONFIG": str(cfg)}).resolve("demo")
    with pytest.raises(ConfigError, match="environment value for max_context must be an integer"):
        ConfigManager(environ={"INFERENCE_PIO_MAX_CONTEXT": "lots", "INFERENCE_PIO_CONFIG": "/nonexistent"}).resolve(
            "x"
        )
    with pytest.raises(ConfigError, match="unknown configuration key 'colour'.*keyword argument"):
        ConfigManager(environ={"INFERENCE_PIO_CONFIG": "/nonexistent"}).resolve("x", {}, {"colour": "red"})


def test_broken_toml_is_reported_with_its_path(tmp_path: Path) -> None:
    cfg = write_toml(tmp_path / "bad.toml", "[defaults\n")
    with pytest.raises(ConfigError, match="bad.toml is not valid TOML"):
        ConfigManager(environ={"INFERENCE_PIO_CONFIG": str(cfg)}).resolve("x")


REQ = requirements_for(30 * GB)  # a 30 B-parameter model
BNB = QuantizationSupport(frozenset({"cuda", "cpu"}))  # bitsandbytes installed, whatever this machine has


@pytest.mark.parametrize(
    ("device", "free_gb", "expected"),
    [
        ("cuda:0", 80, ("bfloat16", "none")),
        ("cuda:0", 40, ("bfloat16", "int8")),
        ("cuda:0", 24, ("bfloat16", "int4")),
        ("cpu", 200, ("float32", "none")),
        ("cpu", 100, ("bfloat16", "none")),
    ],
)
def test_memory_plan_picks_the_best_precision_that_fits(device: str, free_gb: int, expected: tuple[str, str]) -> None:
    plan = plan_memory(
        "big",
        REQ,
        DeviceMemory(device, free_gb * GB, 100 * GB),
        supported_quantizations=("none", "int8", "int4"),
        quantization_support=BNB,
    )
    assert (plan.dtype, plan.quantization) == expected
    assert plan.required_bytes <= free_gb * GB
    assert "GB" in plan.describe()


def test_memory_plan_refuses_naming_both_sizes() -> None:
    with pytest.raises(InsufficientMemoryError) as info:
        plan_memory(
            "big",
            REQ,
            DeviceMemory("cpu", 24 * GB, 24 * GB),
            supported_quantizations=("none", "int8", "int4"),
            quantization_support=BNB,
        )
    message = str(info.value)
    assert "132.00 GB" in message
    assert "66.00 GB" in message
    assert "24.00 GB" in message
    assert "CUDA GPU" in message


def test_explicit_choices_are_honoured_or_refused() -> None:
    mem = DeviceMemory("cuda:0", 80 * GB, 80 * GB)
    plan = plan_memory(
        "big", REQ, mem, quantization="int4", supported_quantizations=("none", "int4"), quantization_support=BNB
    )
    assert plan.quantization == "int4"
    with pytest.raises(ConfigError, match="does not support int8"):
        plan_memory("big", REQ, mem, quantization="int8", supported_quantizations=("none",))
    with pytest.raises(ConfigError, match=r"int8 quantization of big on mps is not possible.*cpu and cuda only"):
        plan_memory(
            "big",
            REQ,
            DeviceMemory("mps", 999 * GB, 999 * GB),
            quantization="int8",
            supported_quantizations=("none", "int8"),
            quantization_support=QuantizationSupport(frozenset({"cuda", "cpu"})),
        )
    with pytest.raises(InsufficientMemoryError):
        plan_memory(
            "big",
            REQ,
            DeviceMemory("cuda:0", 40 * GB, 80 * GB),
            quantization="none",
            supported_quantizations=("none", "int8"),
        )


def test_config_manager_plans_with_simulated_memory() -> None:
    meta = ModelPluginMetadata(
        name="big",
        version="1.0",
        description="d",
        model_id="a/b",
        architecture="A",
        modalities=("text",),
        parameter_count=30 * GB,
        memory_requirements=REQ,
        supported_devices=("cpu", "cuda"),
        supported_quantizations=("none", "int8", "int4"),
        plugin_api=">=1.0",
        license="MIT",
    )
    probed: list[str] = []

    def probe(device: str) -> DeviceMemory:
        probed.append(device)
        return DeviceMemory(device, 35 * GB, 80 * GB)

    cm = ConfigManager(environ={"INFERENCE_PIO_CONFIG": "/nonexistent"}, memory_probe=probe)
    resolved = cm.resolve("big", {}, {"device": "cuda:0"})
    plan = cm.plan_memory(meta, resolved, quantization_support=BNB)
    assert probed == ["cuda:0"]
    assert plan.quantization == "int8"
    env = ConfigManager(environ={"INFERENCE_PIO_SIMULATED_FREE_MEMORY": "20GB", "INFERENCE_PIO_CONFIG": "/none"})
    assert env.plan_memory(meta, resolved, quantization_support=BNB).quantization == "int4"


def test_checkpoint_parameter_count_reads_safetensors_headers(tmp_path: Path) -> None:
    import torch
    from safetensors.torch import save_file

    save_file({"a": torch.zeros(3, 4), "b": torch.zeros(5, dtype=torch.bfloat16)}, str(tmp_path / "m.safetensors"))
    assert checkpoint_parameter_count(tmp_path) == 17
    (tmp_path / "junk.safetensors").write_bytes(b"\x01")
    from inference_pio import ModelLoadError

    with pytest.raises(ModelLoadError, match="junk.safetensors"):
        checkpoint_parameter_count(tmp_path)


def test_memory_probe_order_is_manager_probe_then_callers_probe_then_host_ram() -> None:
    seen: list[str] = []

    def caller_probe(device: str) -> DeviceMemory:
        seen.append(f"caller {device}")
        return DeviceMemory(device, 1 * GB, 2 * GB)

    plain = ConfigManager(environ={"INFERENCE_PIO_CONFIG": "/none"})
    assert plain.probe("cuda:1", caller_probe).free_bytes == 1 * GB
    assert seen == ["caller cuda:1"]
    host = plain.probe("cpu")  # no probe at all: the host's RAM, read without torch
    assert host.device == "cpu" and 0 < host.free_bytes <= host.total_bytes
    injected = ConfigManager(
        environ={"INFERENCE_PIO_CONFIG": "/none"}, memory_probe=lambda d: DeviceMemory(d, 7 * GB, 8 * GB)
    )
    assert injected.probe("cuda:0", caller_probe).free_bytes == 7 * GB
    assert seen == ["caller cuda:1"]


def test_planning_for_a_gpu_without_a_probe_says_what_to_pass() -> None:
    cm = ConfigManager(environ={"INFERENCE_PIO_CONFIG": "/none"})
    with pytest.raises(ConfigError, match=r"'cuda:0'.*probe=.*probe_memory"):
        cm.probe("cuda:0")
