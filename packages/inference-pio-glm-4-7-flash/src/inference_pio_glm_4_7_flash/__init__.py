"""GLM-4.7-Flash for inference-pio: a text plugin named ``glm_4_7_flash``.

Importing this package is light (no torch); weights load in ``load_model``.
"""

from __future__ import annotations

from inference_pio_glm_4_7_flash.metadata import METADATA
from inference_pio_glm_4_7_flash.plugin import Glm47FlashPlugin, create_glm_4_7_flash_plugin

__version__ = "0.1.0"
__all__ = ["METADATA", "Glm47FlashPlugin", "__version__", "create_glm_4_7_flash_plugin"]
