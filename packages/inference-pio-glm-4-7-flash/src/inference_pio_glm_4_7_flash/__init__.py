"""GLM-4.7-Flash for inference-pio: a text plugin named ``glm_4_7_flash``.

Importing this package is light (no torch); weights load in ``load_model``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from inference_pio_glm_4_7_flash.metadata import METADATA

if TYPE_CHECKING:
    from inference_pio_glm_4_7_flash.plugin import Glm47FlashPlugin, create_glm_4_7_flash_plugin
else:

    def __getattr__(name: str) -> Any:
        """The plugin module loads on first use: listing plugins imports this package and must stay light."""
        if name in ("Glm47FlashPlugin", "create_glm_4_7_flash_plugin"):
            from inference_pio_glm_4_7_flash import plugin

            return getattr(plugin, name)
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__version__ = "0.1.0"
__all__ = ["METADATA", "Glm47FlashPlugin", "__version__", "create_glm_4_7_flash_plugin"]
