"""Entry module (``inference_pio.plugins`` group). Kept light: imported whenever plugins are listed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from inference_pio import hookimpl
from inference_pio_glm_4_7_flash.metadata import METADATA


@hookimpl
def inference_pio_register_plugins(register: Any) -> None:
    register(METADATA.name, "inference_pio_glm_4_7_flash.plugin:create_glm_4_7_flash_plugin", METADATA)


@hookimpl
def inference_pio_demo_checkpoint(plugin_name: str, directory: Path) -> Path | None:
    if plugin_name != METADATA.name:
        return None
    from inference_pio_glm_4_7_flash.testing import make_tiny_checkpoint

    return make_tiny_checkpoint(directory / plugin_name)
