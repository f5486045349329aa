from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from inference_pio import PluginManager
from inference_pio_qwen3_vl_2b import Qwen3VL2BPlugin
from inference_pio_qwen3_vl_2b.testing import make_tiny_checkpoint


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("qwen") / "tiny")


@pytest.fixture(scope="session")
def manager(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[PluginManager]:
    pm = PluginManager(environ={"INFERENCE_PIO_CONFIG": str(tmp_path_factory.mktemp("cfg") / "none.toml")})
    pm.activate_plugin("qwen3_vl_2b", device="cpu", model_path=str(checkpoint), max_context=512, max_images=3)
    yield pm
    pm.shutdown()


@pytest.fixture(scope="session")
def plugin(manager: PluginManager) -> Qwen3VL2BPlugin:
    plugin = manager.get_plugin("qwen3_vl_2b")
    assert isinstance(plugin, Qwen3VL2BPlugin)
    return plugin
