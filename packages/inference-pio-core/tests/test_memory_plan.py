"""The memory plan: where bitsandbytes quantization is possible (CPU included), and splitting over GPUs."""

from __future__ import annotations

import importlib.metadata
from collections.abc import Callable

import pytest

from inference_pio import ConfigError, InsufficientMemoryError
from inference_pio.common.memory import (
    DeviceMemory,
    QuantizationSupport,
    bitsandbytes_support,
    plan_memory,
    requirements_for,
)

GB = 10**9
REQ = requirements_for(30 * GB)  # a 30 B-parameter model: 60 GB in bf16, 30 GB in int8, 16.5 GB in int4
QUANTS = ("none", "int8", "int4")
BNB = QuantizationSupport(frozenset({"cuda", "cpu"}))


def installed(version: str | None) -> Callable[[str], str]:
    """A stand-in for ``importlib.metadata.version`` that reports ``version`` of bitsandbytes (None: absent)."""

    def version_of(name: str) -> str:
        assert name == "bitsandbytes"
        if version is None:
            raise importlib.metadata.PackageNotFoundError(name)
        return version

    return version_of


def test_bitsandbytes_support_is_read_from_the_installed_version() -> None:
    assert bitsandbytes_support(installed("0.50.2")) == BNB
    missing = bitsandbytes_support(installed(None))
    assert missing.device_kinds == frozenset()
    assert "bitsandbytes is not installed" in missing.problem
    assert "[quantization]" in missing.problem and "bitsandbytes>=0.46.1" in missing.problem
    old = bitsandbytes_support(installed("0.45.5"))
    assert old.device_kinds == frozenset()
    assert "bitsandbytes 0.45.5 is installed, but 0.46.1 or later is needed" in old.problem
    assert bitsandbytes_support(installed("garbage")).device_kinds == frozenset()


@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_explicit_quantization_on_the_cpu_is_planned_where_bitsandbytes_works(quant: str) -> None:
    plan = plan_memory(
        "big",
        REQ,
        DeviceMemory("cpu", 40 * GB, 64 * GB),
        quantization=quant,
        supported_quantizations=QUANTS,
        quantization_support=BNB,
    )
    assert (plan.device, plan.dtype, plan.quantization) == ("cpu", "float32", quant)
    assert plan.required_bytes <= 40 * GB


def test_explicit_quantization_without_bitsandbytes_says_what_to_install() -> None:
    none = bitsandbytes_support(installed(None))
    for device in ("cpu", "cuda:0"):
        with pytest.raises(ConfigError) as info:
            plan_memory(
                "big",
                REQ,
                DeviceMemory(device, 999 * GB, 999 * GB),
                quantization="int4",
                supported_quantizations=QUANTS,
                quantization_support=none,
            )
        message = str(info.value)
        assert f"int4 quantization of big on {device} is not possible: bitsandbytes is not installed" in message
        assert "pip install 'bitsandbytes>=0.46.1'" in message and "[quantization]" in message


def test_auto_on_the_cpu_keeps_full_precision_and_suggests_asking_for_quantization() -> None:
    mem = DeviceMemory("cpu", 70 * GB, 128 * GB)
    plan = plan_memory("big", REQ, mem, supported_quantizations=QUANTS, quantization_support=BNB)
    assert (plan.dtype, plan.quantization) == ("bfloat16", "none")
    with pytest.raises(InsufficientMemoryError, match=r"ask for quantization='int8' or 'int4'"):
        plan_memory(
            "big", REQ, DeviceMemory("cpu", 20 * GB, 64 * GB), supported_quantizations=QUANTS, quantization_support=BNB
        )


def test_auto_on_cuda_without_bitsandbytes_refuses_instead_of_planning_what_cannot_load() -> None:
    mem = DeviceMemory("cuda:0", 40 * GB, 80 * GB)
    assert plan_memory("big", REQ, mem, supported_quantizations=QUANTS, quantization_support=BNB).quantization == "int8"
    with pytest.raises(InsufficientMemoryError) as info:
        plan_memory(
            "big", REQ, mem, supported_quantizations=QUANTS, quantization_support=bitsandbytes_support(installed(None))
        )
    assert "bfloat16 needs 66.00 GB" in str(info.value)
    assert "for 8-bit/4-bit weights: bitsandbytes is not installed" in str(info.value)


# -- several GPUs ------------------------------------------------------------------------------------------
def gpus(*free_gb: float, total_gb: int = 80) -> list[DeviceMemory]:
    return [DeviceMemory(f"cuda:{i}", int(f * GB), total_gb * GB) for i, f in enumerate(free_gb)]


def test_a_model_that_fits_one_gpu_stays_on_the_first_that_has_room() -> None:
    plan = plan_memory("big", REQ, gpus(80, 80), supported_quantizations=QUANTS, quantization_support=BNB)
    assert (plan.device, plan.devices, plan.split, plan.max_memory) == ("cuda:0", ("cuda:0",), False, ())
    assert (plan.dtype, plan.quantization, plan.weight_bytes) == ("bfloat16", "none", 60 * GB)
    busy_first = plan_memory("big", REQ, gpus(10, 80), supported_quantizations=QUANTS, quantization_support=BNB)
    assert (busy_first.device, busy_first.split, busy_first.free_bytes) == ("cuda:1", False, 80 * GB)


def test_a_model_that_fits_only_the_sum_is_split_with_headroom_on_every_gpu() -> None:
    plan = plan_memory("big", REQ, gpus(40, 44), supported_quantizations=QUANTS, quantization_support=BNB)
    assert (plan.dtype, plan.quantization, plan.split) == ("bfloat16", "none", True)  # full precision split wins
    assert plan.devices == ("cuda:0", "cuda:1") and plan.device == "cuda:0"
    limits = dict(plan.max_memory)
    assert limits == {"cuda:0": 40 * GB - 40 * GB // 11, "cuda:1": 44 * GB - 44 * GB // 11}
    assert sum(limits.values()) >= plan.weight_bytes == 60 * GB
    assert plan.free_bytes == 84 * GB
    assert "split over 2 GPUs" in plan.describe() and "cuda:1 \u2264 40.00 GB" in plan.describe()
    assert "bfloat16 needs 66.00 GB, more than one GPU's 44.00 GB free" in plan.reason


def test_split_leaves_out_a_gpu_with_no_room_and_keeps_256_mib_on_small_ones() -> None:
    mib = 1024 * 1024
    plan = plan_memory(
        "small", requirements_for(10**9), [*gpus(1.5, 1.5), DeviceMemory("cuda:2", 200 * mib, GB)], dtype="bfloat16"
    )
    assert plan.devices == ("cuda:0", "cuda:1")
    assert dict(plan.max_memory)["cuda:0"] == int(1.5 * GB) - 256 * mib


def test_quantization_and_split_interplay() -> None:
    # bf16 needs 60 GB of weights, more than two 24 GB GPUs hold; int8 (30 GB) fits neither alone but both together.
    plan = plan_memory("big", REQ, gpus(24, 24), supported_quantizations=QUANTS, quantization_support=BNB)
    assert (plan.quantization, plan.split) == ("int8", True)
    assert "bfloat16 needs 66.00 GB would not fit" in plan.reason
    # int4 (16.5 GB) fits one of them: asked for, it is not split.
    int4 = plan_memory(
        "big", REQ, gpus(24, 24), quantization="int4", supported_quantizations=QUANTS, quantization_support=BNB
    )
    assert (int4.quantization, int4.split, int4.device) == ("int4", False, "cuda:0")
    # Full precision asked for: split, never quantized.
    none = plan_memory(
        "big", REQ, gpus(38, 38), quantization="none", supported_quantizations=QUANTS, quantization_support=BNB
    )
    assert (none.quantization, none.split) == ("none", True)


def test_a_model_that_fits_neither_one_gpu_nor_all_names_every_size() -> None:
    with pytest.raises(InsufficientMemoryError) as info:
        plan_memory("big", REQ, gpus(8, 6), supported_quantizations=QUANTS, quantization_support=BNB)
    message = str(info.value)
    assert message.startswith("big does not fit on cuda:0, cuda:1: bfloat16 needs 66.00 GB; int8 needs 33.00 GB")
    assert "int4 needs 18.15 GB" in message
    assert "only 14.00 GB of 160.00 GB is free over the 2 GPUs (cuda:0 8.00 GB, cuda:1 6.00 GB)" in message
    assert "GB of it for weights when split" in message and "add GPUs" in message


def test_splitting_is_for_cuda_gpus_only() -> None:
    with pytest.raises(ConfigError, match="split over CUDA GPUs only; got cpu, cuda:0"):
        plan_memory("big", REQ, [DeviceMemory("cpu", GB, GB), *gpus(80)])


def test_the_config_manager_probes_every_listed_gpu() -> None:
    from inference_pio import ConfigManager, ModelPluginMetadata

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
        supported_quantizations=QUANTS,
        plugin_api=">=1.0",
        license="MIT",
    )
    probed: list[str] = []

    def probe(device: str) -> DeviceMemory:
        probed.append(device)
        return DeviceMemory(device, 48 * GB, 80 * GB)

    cm = ConfigManager(environ={"INFERENCE_PIO_CONFIG": "/nonexistent"}, memory_probe=probe)
    resolved = cm.resolve("big", {}, {"device": "cuda:0,cuda:1"})
    plan = cm.plan_memory(meta, resolved, quantization_support=BNB)
    assert probed == ["cuda:0", "cuda:1"]
    assert (plan.dtype, plan.quantization, plan.devices) == ("bfloat16", "none", ("cuda:0", "cuda:1"))


def test_a_split_plan_survives_the_isolated_workers_json() -> None:
    import dataclasses
    import json

    from inference_pio.common.memory import MemoryPlan

    plan = plan_memory("big", REQ, gpus(40, 44), supported_quantizations=QUANTS, quantization_support=BNB)
    back = MemoryPlan(**json.loads(json.dumps(dataclasses.asdict(plan))))
    assert back == plan and back.describe() == plan.describe()


def test_device_settings_name_gpus_as_the_plan_reads_them(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from inference_pio.runtime.devices import resolve_device, resolve_devices

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_devices("auto") == ("cpu",)
    with pytest.raises(ConfigError, match="sees no CUDA GPU"):
        resolve_devices("cuda:0,cuda:1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)  # a simulated 3-GPU machine
    assert resolve_devices("auto") == resolve_devices("cuda") == ("cuda:0", "cuda:1", "cuda:2")
    assert resolve_devices("cuda:2, cuda:0,cuda:2") == ("cuda:2", "cuda:0")
    assert resolve_device("cuda:1") == "cuda:1" and resolve_device("cuda") == "cuda:0,cuda:1,cuda:2"
    with pytest.raises(ConfigError, match=r"'cuda:5' does not exist: this machine has 3 CUDA device\(s\)"):
        resolve_devices("cuda:0,cuda:5")
    with pytest.raises(ConfigError, match=r"'cpu' is not cuda:N"):
        resolve_devices("cuda:0,cpu")
    from inference_pio import ConfigManager

    cm = ConfigManager(environ={"INFERENCE_PIO_CONFIG": "/nonexistent"})
    assert cm.resolve("x", {}, {"device": "cuda:0,cuda:2"})["device"] == "cuda:0,cuda:2"
    with pytest.raises(ConfigError, match="invalid configuration value device='cuda:0,'"):
        cm.resolve("x", {}, {"device": "cuda:0,"})
