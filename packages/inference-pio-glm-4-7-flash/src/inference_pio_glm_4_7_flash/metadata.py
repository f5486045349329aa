"""The plugin's self-description, with the published model's real figures."""

from __future__ import annotations

from inference_pio.common.metadata import ModelPluginMetadata

PARAMETERS = 29_943_390_976  # 47 layers, 64 routed experts (4 active) + 1 shared, MLA attention
ACTIVE_PARAMETERS = 3_579_596_800  # weights read per decoded token (embedding lookup excluded)

METADATA = ModelPluginMetadata(
    name="glm_4_7_flash",
    version="0.1.0",
    description="GLM-4.7-Flash: a 30 B-total / 3.6 B-active mixture-of-experts chat model with MLA attention",
    model_id="zai-org/GLM-4.7-Flash",
    architecture="Glm4MoeLiteForCausalLM",
    modalities=("text",),
    parameter_count=PARAMETERS,
    active_parameter_count=ACTIVE_PARAMETERS,
    memory_requirements={
        "float32": PARAMETERS * 4,
        "bfloat16": PARAMETERS * 2,  # ~60 GB
        "float16": PARAMETERS * 2,
        # What the plan computes for the published architecture (tests/test_quantization.py checks it): routed
        # experts in this package's store (int8 per row; int4 in groups of 64), linear layers through
        # bitsandbytes, and in bf16 what neither quantizes (embeddings, norms, router, kv_b_proj, lm_head).
        "int8": 30_862_602_496,  # ~30.9 GB
        "int4": 18_013_620_776,  # ~18.0 GB
    },
    supported_devices=("cpu", "cuda"),
    supported_quantizations=("none", "int8", "int4"),
    plugin_api=">=1.0,<2",
    license="MIT",
    context_length=202_752,
    homepage="https://huggingface.co/zai-org/GLM-4.7-Flash",
)
