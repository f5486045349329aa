"""Qwen3-VL-2B-Instruct for inference-pio: a vision-language plugin named ``qwen3_vl_2b``.

Importing this package is light (no torch); weights load in ``load_model``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from inference_pio_qwen3_vl_2b.metadata import METADATA

if TYPE_CHECKING:
    from inference_pio_qwen3_vl_2b.plugin import Qwen3VL2BPlugin, create_qwen3_vl_2b_plugin
else:

    def __getattr__(name: str) -> Any:
        """The plugin module loads on first use: listing plugins imports this package and must stay light."""
        if name in ("Qwen3VL2BPlugin", "create_qwen3_vl_2b_plugin"):
            from inference_pio_qwen3_vl_2b import plugin

            return getattr(plugin, name)
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__version__ = "0.1.0"
__all__ = ["METADATA", "Qwen3VL2BPlugin", "__version__", "create_qwen3_vl_2b_plugin"]
