"""Entry module: registers the plugin. Keep it light - it is imported to list plugins."""

from typing import Any

from inference_pio import ModelPluginMetadata, hookimpl

METADATA = ModelPluginMetadata(
    name="echo",
    version="1.0.0",
    description="Echoes the last user message, one word per token",
    model_id="example/echo",
    architecture="Echo",
    modalities=("text",),
    parameter_count=1,
    memory_requirements={"float32": 4},
    supported_devices=("cpu",),
    plugin_api=">=1.0,<2",
    license="Apache-2.0",
    context_length=2048,
)


@hookimpl
def inference_pio_register_plugins(register: Any) -> None:
    register("echo", "inference_pio_echo.plugin:create_echo_plugin", METADATA)
