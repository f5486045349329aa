"""Ready-made hook implementations for a distribution that provides one plugin by factory string.

A model package's entry module is then two assignments (the attribute names are the hook names)::

    inference_pio_register_plugins = register_plugins_hook(METADATA, "my_pkg.plugin:create_plugin", trust="high")
    inference_pio_demo_checkpoint = demo_checkpoint_hook(METADATA.name, "my_pkg.testing:make_tiny_checkpoint")

Both strings are imported only when used, so listing plugins stays light.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from inference_pio.plugin_system.hookspecs import Register, hookimpl
from inference_pio.plugin_system.registry import resolve_factory


def register_plugins_hook(
    metadata: Any, factory: str, *, trust: str | None = None, needs: Any = None
) -> Callable[[Register], None]:
    """An ``inference_pio_register_plugins`` implementation registering ``factory`` under ``metadata.name``.

    ``trust`` is the level the plugin asks for, ``needs`` what it needs (``"gpu"``, ``"in_process"``,
    ``"pickle_weights"``; shown to the user, who grants it); see docs/security.md."""
    name = metadata["name"] if isinstance(metadata, dict) else metadata.name

    @hookimpl
    def inference_pio_register_plugins(register: Register) -> None:
        register(name, factory, metadata, trust=trust, needs=needs)

    return inference_pio_register_plugins


def demo_checkpoint_hook(plugin_name: str, maker: str) -> Callable[[str, Path], Path | None]:
    """An ``inference_pio_demo_checkpoint`` implementation: for ``plugin_name`` only, calls ``maker``
    (a ``"module:function"`` string taking the target folder) with ``directory / plugin_name``."""

    @hookimpl
    def inference_pio_demo_checkpoint(plugin_name: str, directory: Path) -> Path | None:
        if plugin_name != wanted:
            return None
        return Path(resolve_factory(maker)(directory / plugin_name))

    wanted = plugin_name
    return inference_pio_demo_checkpoint
