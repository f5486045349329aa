"""The first-party plugin passes the core's conformance kit."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from inference_pio_glm_4_7_flash import create_glm_4_7_flash_plugin


def test_glm_4_7_flash_conforms(plugin_conformance: Callable[..., Any], checkpoint: Path) -> None:
    kit = plugin_conformance(
        create_glm_4_7_flash_plugin,
        config={"device": "cpu", "model_path": str(checkpoint)},
        distribution="inference-pio-glm-4-7-flash",
    )
    kit.run_all()
