"""Entry module (``inference_pio.plugins`` group). Kept light: imported whenever plugins are listed.

The plugin asks for trust level ``high``: it must run in-process to use the GPU (see docs/security.md
for how the core grants a distribution's request).
"""

from __future__ import annotations

from inference_pio.plugin_system.hookimpls import demo_checkpoint_hook, register_plugins_hook
from inference_pio_glm_4_7_flash.metadata import METADATA

inference_pio_register_plugins = register_plugins_hook(
    METADATA, "inference_pio_glm_4_7_flash.plugin:create_glm_4_7_flash_plugin", trust="high"
)
inference_pio_demo_checkpoint = demo_checkpoint_hook(
    METADATA.name, "inference_pio_glm_4_7_flash.testing:make_tiny_checkpoint"
)
