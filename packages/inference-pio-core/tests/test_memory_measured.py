"""The memory plan against what loading really takes, on a tiny Llama checkpoint on the CPU: the plan's weight
bytes against the loaded parameters, buffers and quantization state (8-bit and 4-bit through bitsandbytes'
CPU backend), and a plan split over two simulated GPUs checked by transformers' own device-map computation."""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from inference_pio import InsufficientMemoryError
from inference_pio.common.memory import DeviceMemory, QuantizationSupport, plan_memory
from inference_pio.runtime.devices import loaded_weight_bytes, weight_sizes
from inference_pio.runtime.hf_plugin import from_pretrained_kwargs

HF_PLUGINS = Path(__file__).parent / "fixtures" / "hf_plugins"
sys.path.insert(0, str(HF_PLUGINS))
from fixture_hf import METADATA, FixtureHF, make_checkpoint  # noqa: E402

MIB = 1024 * 1024
TOLERANCE = 0.01
"""Plan and measurement may differ by 1 %: buffers (rotary tables) are not in the plan."""


class Quantizable(FixtureHF):
    METADATA = dataclasses.replace(
        METADATA,
        supported_quantizations=("none", "int8", "int4"),
        memory_requirements={**METADATA.memory_requirements, "int8": 150_000, "int4": 90_000},
    )


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("models") / "tiny-llama")


@pytest.fixture
def plugin() -> Iterator[Quantizable]:
    plugin = Quantizable()
    plugin.initialize()
    yield plugin
    plugin.cleanup()


def test_weight_sizes_split_what_bitsandbytes_quantizes_from_what_it_keeps(checkpoint: Path) -> None:
    sizes = weight_sizes("LlamaForCausalLM", checkpoint)
    # 2 layers of q/k/v/o (64x64, 32x64, 32x64, 64x64) and gate/up/down (128x64, 128x64, 64x128); the
    # embedding, lm_head (transformers keeps the output head) and norms stay in the compute dtype.
    assert sizes.quantizable == 2 * (64 * 64 * 2 + 32 * 64 * 2 + 128 * 64 * 3)
    assert sizes.tensors == 14 and sizes.rows == 2 * (64 + 32 + 32 + 64 + 128 + 128 + 64)
    vocab = sizes.kept - 2 * 64 * 2 - 64  # two norms per layer and the final norm
    assert vocab % (2 * 64) == 0  # embedding + untied lm_head


@pytest.mark.parametrize(
    ("dtype", "quantization"),
    [("float32", "none"), ("bfloat16", "none"), ("float32", "int8"), ("float32", "int4"), ("bfloat16", "int4")],
)
def test_the_plans_weight_bytes_match_the_loaded_model(
    checkpoint: Path, plugin: Quantizable, dtype: str, quantization: str
) -> None:
    plugin.load_model({"model_path": str(checkpoint), "device": "cpu", "dtype": dtype, "quantization": quantization})
    plan = plugin.memory_plan
    assert plan is not None and (plan.dtype, plan.quantization) == (dtype, quantization)
    measured = loaded_weight_bytes(plugin.model)
    assert abs(plan.weight_bytes - measured) <= TOLERANCE * measured, (plan.weight_bytes, measured)
    if quantization != "none":
        unquantized = weight_sizes("LlamaForCausalLM", checkpoint).bytes_for(dtype, "none")
        assert measured < 0.8 * unquantized  # the linear layers really are 8/4-bit
        assert plugin.generate_text("hello", max_new_tokens=3).usage.completion_tokens == 3


def test_a_plan_split_over_two_simulated_gpus_is_what_transformers_places(checkpoint: Path) -> None:
    import torch
    import transformers
    from transformers.integrations.accelerate import _get_device_map

    sizes = weight_sizes("LlamaForCausalLM", checkpoint)
    weights = sizes.bytes_for("float32", "none")
    # Each GPU keeps its 256 MiB headroom, then has room for half the weights and one whole layer (the plan's
    # slack for whole layers): only both together fit. The largest layer here is the embedding.
    assert 0 < sizes.largest_layer < sizes.parameters // 2
    share = (weights + 2 * 4 * sizes.largest_layer + 1) // 2
    small = [DeviceMemory(f"cuda:{i}", 256 * MIB + share - 4096, 80 * 10**9) for i in range(2)]
    with pytest.raises(InsufficientMemoryError):  # without room for the slack, refused rather than sent to disk
        plan_memory("fixture_hf", sizes, small, dtype="float32", quantization="none")
    gpus = [DeviceMemory(f"cuda:{i}", 256 * MIB + share, 80 * 10**9) for i in range(2)]
    plan = plan_memory("fixture_hf", sizes, gpus, dtype="float32", quantization="none")
    assert plan.split and plan.devices == ("cuda:0", "cuda:1")
    kwargs = from_pretrained_kwargs(plan, "cuda:0,cuda:1", {})
    assert kwargs["device_map"] == "auto"
    assert kwargs["max_memory"] == {0: share, 1: share}
    config = transformers.AutoConfig.from_pretrained(str(checkpoint))
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM._from_config(config, dtype=torch.float32)
    placed = _get_device_map(model, kwargs["device_map"], kwargs["max_memory"], None)  # what from_pretrained does
    assert set(placed.values()) == {0, 1}, placed  # both GPUs, nothing left for the CPU or the disk
    assert placed["model.embed_tokens"] == 0  # inputs enter on the plan's first device


def test_quantized_split_kwargs_carry_both_the_device_map_and_bitsandbytes() -> None:
    plan = plan_memory(
        "big",
        {"bfloat16": 60 * 10**9, "int8": 30 * 10**9},
        [DeviceMemory("cuda:0", 24 * 10**9, 24 * 10**9), DeviceMemory("cuda:1", 24 * 10**9, 24 * 10**9)],
        supported_quantizations=("none", "int8"),
        quantization_support=QuantizationSupport(frozenset({"cuda"})),
    )
    kwargs = from_pretrained_kwargs(plan, "cuda:0,cuda:1", {})
    assert (plan.quantization, kwargs["device_map"]) == ("int8", "auto")
    assert set(kwargs["max_memory"]) == {0, 1}
    assert kwargs["quantization_config"].load_in_8bit
