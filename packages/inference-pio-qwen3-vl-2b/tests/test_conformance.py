"""The first-party plugin passes the core's conformance kit."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from inference_pio_qwen3_vl_2b import create_qwen3_vl_2b_plugin


def test_qwen3_vl_2b_conforms(plugin_conformance: Callable[..., Any], checkpoint: Path) -> None:
    kit = plugin_conformance(
        create_qwen3_vl_2b_plugin,
        config={"device": "cpu", "model_path": str(checkpoint)},
        distribution="inference-pio-qwen3-vl-2b",
    )
    kit.run_all()
