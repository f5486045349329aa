"""Entry module (group ``inference_pio.plugins``): metadata and hooks only, because it is imported
whenever plugins are listed. The factory and the checkpoint builder are strings, imported when used.

No ``trust=`` request: the plugin runs at the level every pip-installed plugin gets by default
(medium, in an isolated worker process), so it needs nothing from the user.
"""

from __future__ import annotations

from inference_pio import ModelPluginMetadata
from inference_pio.plugin_system.hookimpls import demo_checkpoint_hook, register_plugins_hook

PARAMETERS = 1_100_048_384  # 22 layers, hidden 2048, 32 heads (4 key/value heads), vocabulary 32000

METADATA = ModelPluginMetadata(
    name="tinyllama",
    version="1.0.0",
    description="TinyLlama-1.1B-Chat: a 1.1 B-parameter Llama-architecture chat model",
    model_id="TinyLlama/TinyLlama-1.1B-Chat-v1.0",
    architecture="LlamaForCausalLM",
    modalities=("text",),
    parameter_count=PARAMETERS,
    memory_requirements={  # bytes of weights per precision (not GB)
        "float32": PARAMETERS * 4,
        "bfloat16": PARAMETERS * 2,
        "float16": PARAMETERS * 2,
    },
    supported_devices=("cpu", "cuda"),
    plugin_api=">=1.0,<2",
    license="Apache-2.0",
    context_length=2048,
    homepage="https://huggingface.co/TinyLlama/TinyLlama-1.1B-Chat-v1.0",
)

inference_pio_register_plugins = register_plugins_hook(METADATA, "inference_pio_tinyllama.plugin:create_plugin")
inference_pio_demo_checkpoint = demo_checkpoint_hook(
    METADATA.name, "inference_pio_tinyllama.testing:make_tiny_checkpoint"
)
