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
