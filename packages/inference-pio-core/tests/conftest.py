from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from inference_pio import PluginManager, reset_plugin_manager

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture
def fixture_dir() -> Path:
    return FIXTURES / "plugins"


@pytest.fixture
def broken_dir() -> Path:
    return FIXTURES / "broken_plugins"


@pytest.fixture
def pm(tmp_path: Path) -> Iterator[PluginManager]:
    """A manager that sees no installed entry points' selection env and no user config file."""
    manager = PluginManager(environ={"INFERENCE_PIO_CONFIG": str(tmp_path / "none.toml")})
    yield manager
    manager.shutdown()


@pytest.fixture(autouse=True)
def _fresh_singleton() -> Iterator[None]:
    yield
    reset_plugin_manager()
