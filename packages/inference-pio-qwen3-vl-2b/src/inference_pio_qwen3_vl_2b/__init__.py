"""Qwen3-VL-2B-Instruct for inference-pio: a vision-language plugin named ``qwen3_vl_2b``.

Importing this package is light (no torch); weights load in ``load_model``.
"""

from __future__ import annotations

from inference_pio_qwen3_vl_2b.metadata import METADATA
from inference_pio_qwen3_vl_2b.plugin import Qwen3VL2BPlugin, create_qwen3_vl_2b_plugin

__version__ = "0.1.0"
__all__ = ["METADATA", "Qwen3VL2BPlugin", "__version__", "create_qwen3_vl_2b_plugin"]
