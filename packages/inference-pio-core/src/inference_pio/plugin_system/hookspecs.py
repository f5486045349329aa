"""The hooks a distribution implements to plug into inference-pio (pluggy project ``inference_pio``).

A distribution names a module in the ``inference_pio.plugins`` entry-point group; that module
implements these hooks with ``@hookimpl``. Keep it light: it is imported to list plugins.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import pluggy

PROJECT = "inference_pio"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


class Register(Protocol):
    """The callback handed to ``inference_pio_register_plugins``."""

    def __call__(
        self, name: str, factory: Any, metadata: Any, *, trust: str | None = None, needs: Any = None
    ) -> None: ...


@hookspec
def inference_pio_register_plugins(register: Register) -> None:
    """Register model plugins: call ``register(name, factory, metadata)`` once per plugin.

    ``factory`` is a zero-argument callable returning a ``ModelPluginInterface``, or a
    ``"module:attribute"`` string imported only when the plugin is used. ``metadata`` is a
    ``ModelPluginMetadata`` or a dict validated into one. ``trust`` (optional) is the level the
    plugin asks for, e.g. ``"high"`` for a model that must run in-process on a GPU; an installed
    distribution gets it up to ``[trust] max_requested`` (default ``high``), see docs/security.md.
    ``needs`` (optional) says what the plugin needs, from ``"gpu"``, ``"in_process"`` and
    ``"pickle_weights"``: ``inference-pio plugins`` shows it with the command that grants it; nothing is
    granted until the user runs that command.
    """


@hookspec(firstresult=True)
def inference_pio_demo_checkpoint(plugin_name: str, directory: Path) -> Path | None:
    """Write a tiny offline checkpoint for ``plugin_name`` under ``directory`` and return its path.

    Return None for plugins this distribution does not provide. Used by ``inference-pio demo``.
    """
