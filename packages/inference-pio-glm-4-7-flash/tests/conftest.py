from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from inference_pio import PluginManager
from inference_pio_glm_4_7_flash import Glm47FlashPlugin
from inference_pio_glm_4_7_flash.testing import make_tiny_checkpoint


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("glm") / "tiny")


@pytest.fixture(scope="session")
def manager(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[PluginManager]:
    pm = PluginManager(environ={"INFERENCE_PIO_CONFIG": str(tmp_path_factory.mktemp("cfg") / "none.toml")})
    pm.activate_plugin("glm_4_7_flash", device="cpu", model_path=str(checkpoint), max_context=512)
    yield pm
    pm.shutdown()


@pytest.fixture(scope="session")
def plugin(manager: PluginManager) -> Glm47FlashPlugin:
    plugin = manager.get_plugin("glm_4_7_flash")
    assert isinstance(plugin, Glm47FlashPlugin)
    return plugin
