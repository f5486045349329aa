"""The plugin's self-description, with the published model's real figures."""

from __future__ import annotations

from inference_pio.common.memory import requirements_for
from inference_pio.common.metadata import ModelPluginMetadata

PARAMETERS = 2_127_532_032  # 1.72 B text (tied embeddings) + 0.41 B vision
TEXT_PARAMETERS = 1_720_574_976

METADATA = ModelPluginMetadata(
    name="qwen3_vl_2b",
    version="0.1.0",
    description="Qwen3-VL-2B-Instruct: a 2 B vision-language chat model (text and images in, text out)",
    model_id="Qwen/Qwen3-VL-2B-Instruct",
    architecture="Qwen3VLForConditionalGeneration",
    modalities=("text", "image"),
    parameter_count=PARAMETERS,
    active_parameter_count=PARAMETERS,
    memory_requirements={
        **requirements_for(PARAMETERS),
        # bitsandbytes quantizes the 1.81 B linear weights only; the 0.32 B of embeddings, norms and biases stay
        # in bf16 (inference_pio.runtime.devices.weight_sizes on the full-size config; checked by a test).
        "int8": 2_446_401_536,
        "int4": 1_566_237_792,
    },
    supported_devices=("cpu", "cuda"),
    supported_quantizations=("none", "int8", "int4"),
    plugin_api=">=1.0,<2",
    license="Apache-2.0",
    context_length=262_144,
    homepage="https://huggingface.co/Qwen/Qwen3-VL-2B-Instruct",
)
