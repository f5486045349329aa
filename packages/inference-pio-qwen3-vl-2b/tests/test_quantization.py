"""8-bit and 4-bit weights on the CPU (bitsandbytes' CPU backend): the tiny checkpoint loads, answers text and
image requests, and the memory plan's bytes are what the loaded weights measure."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from PIL import Image

from inference_pio import PluginManager
from inference_pio.runtime.devices import loaded_weight_bytes, weight_sizes

TOLERANCE = 0.01
"""Buffers (rotary tables) are not in the plan: well under 1 % here."""


def png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 10, 10)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("quantization", ["int8", "int4"])
def test_quantized_weights_load_and_generate_on_the_cpu(checkpoint: Path, tmp_path: Path, quantization: str) -> None:
    import bitsandbytes as bnb

    pm = PluginManager(environ={"INFERENCE_PIO_CONFIG": str(tmp_path / "none.toml")})
    try:
        plugin = pm.activate_plugin(
            "qwen3_vl_2b", device="cpu", model_path=str(checkpoint), quantization=quantization, max_context=256
        )
        plan = plugin.memory_plan
        assert plan is not None and (plan.device, plan.dtype, plan.quantization) == ("cpu", "float32", quantization)
        layer = plugin.model.model.language_model.layers[0].self_attn.q_proj  # type: ignore[attr-defined]
        assert isinstance(layer, bnb.nn.Linear8bitLt if quantization == "int8" else bnb.nn.Linear4bit)
        vision = plugin.model.model.visual.blocks[0].attn.qkv  # type: ignore[attr-defined]
        assert isinstance(vision, (bnb.nn.Linear8bitLt, bnb.nn.Linear4bit))  # the vision tower is quantized too

        measured = loaded_weight_bytes(plugin.model)  # type: ignore[attr-defined]
        assert abs(plan.weight_bytes - measured) <= TOLERANCE * measured, (plan.weight_bytes, measured)
        full = weight_sizes("Qwen3VLForConditionalGeneration", checkpoint).bytes_for("float32", "none")
        assert measured < 0.7 * full

        image = tmp_path / "red.png"
        image.write_bytes(png())
        text = pm.execute_plugin("qwen3_vl_2b", "Describe this image", max_new_tokens=4)
        assert text.usage.completion_tokens == 4
        seen = pm.execute_plugin("qwen3_vl_2b", "Describe this image", image=str(image), max_new_tokens=3)
        assert seen.usage.completion_tokens >= 1
        assert seen.usage.prompt_tokens > text.usage.prompt_tokens  # the image went through the vision tower
    finally:
        pm.shutdown()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_full_precision_plan_matches_the_loaded_weights(checkpoint: Path, tmp_path: Path, dtype: str) -> None:
    pm = PluginManager(environ={"INFERENCE_PIO_CONFIG": str(tmp_path / "none.toml")})
    try:
        plugin = pm.activate_plugin("qwen3_vl_2b", device="cpu", model_path=str(checkpoint), dtype=dtype)
        assert plugin.memory_plan is not None
        measured = loaded_weight_bytes(plugin.model)  # type: ignore[attr-defined]
        assert abs(plugin.memory_plan.weight_bytes - measured) <= TOLERANCE * measured
    finally:
        pm.shutdown()


def test_the_published_models_quantized_requirements_are_what_the_plan_computes(tmp_path: Path) -> None:
    """The metadata figures (used when loading from the hub, before any checkpoint is on disk) against the
    plan's computation on the full-size architecture built on the meta device."""
    from inference_pio_qwen3_vl_2b.metadata import METADATA
    from inference_pio_qwen3_vl_2b.testing import full_size_config

    full_size_config().save_pretrained(tmp_path)
    sizes = weight_sizes("Qwen3VLForConditionalGeneration", tmp_path)
    assert sizes.parameters == METADATA.parameter_count
    for quantization in ("int8", "int4"):
        planned = sizes.bytes_for("bfloat16", quantization)
        assert abs(METADATA.memory_requirements[quantization] - planned) <= 0.01 * planned  # type: ignore[index]
    assert METADATA.memory_requirements["bfloat16"] == sizes.bytes_for("bfloat16", "none")
