"""What one server process holds: its settings, the activated plugins, their loading status, metrics."""

from __future__ import annotations

import hmac
import logging
from dataclasses import dataclass, field
from typing import Any

from inference_pio.common.interfaces import TextModelPluginInterface
from inference_pio.errors import InferencePIOError
from inference_pio.plugin_system.manager import PluginManager
from inference_pio.server import protocol
from inference_pio.server.errors import APIError
from inference_pio.server.metrics import Metrics

log = logging.getLogger("inference_pio.server")


@dataclass
class ServedModel:
    name: str
    config: dict[str, Any] = field(default_factory=dict)


@dataclass
class ServerSettings:
    models: list[ServedModel]
    api_key: str | None = None
    allowed_image_hosts: frozenset[str] = frozenset()
    max_body_bytes: int = 32 * 1024 * 1024
    max_n: int = 4


class ServerState:
    """The plugins a server serves; ``status`` is ``loading``, then ``ready`` or ``failed``."""

    def __init__(self, settings: ServerSettings, manager: PluginManager) -> None:
        self.settings = settings
        self.manager = manager
        self.metrics = Metrics()
        self.status = "loading"
        self.error: str | None = None
        self.plugins: dict[str, TextModelPluginInterface] = {}
        self.created = protocol.now()

    def load(self) -> None:
        """Activate every served model (runs in a thread, so /health answers meanwhile)."""
        try:
            for model in self.settings.models:
                log.info("loading %s", model.name)
                plugin = self.manager.activate_plugin(model.name, **model.config)
                if not isinstance(plugin, TextModelPluginInterface):
                    raise InferencePIOError(f"plugin {model.name!r} does not generate text and cannot be served")
                scheduler = getattr(plugin, "scheduler", None)
                if scheduler is not None:
                    self.metrics.watch_scheduler(model.name, scheduler)
                self.plugins[model.name] = plugin
                log.info("%s ready: %s", model.name, plugin.memory_plan.describe() if plugin.memory_plan else "")
            self.status = "ready"
        except Exception as exc:
            log.exception("loading failed")
            self.status, self.error = "failed", f"{type(exc).__name__}: {exc}"

    def shutdown(self) -> None:
        self.manager.shutdown()

    def authorize(self, authorization: str | None) -> None:
        """Check an ``Authorization`` header against the API key (when one is set); 401 otherwise."""
        if self.settings.api_key is None:
            return
        header = authorization or ""
        token = header[7:] if header.lower().startswith("bearer ") else ""
        if not hmac.compare_digest(token.encode(), self.settings.api_key.encode()):
            raise APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'", code="invalid_api_key")

    def plugin(self, name: str) -> TextModelPluginInterface:
        """The plugin serving ``name``: 503 while loading (or after a failed load), 404 if not served."""
        if self.status != "ready":
            raise APIError(
                503,
                f"the server is {self.status}" + (f": {self.error}" if self.error else ""),
                type_="server_error",
                code="not_ready",
                headers={"Retry-After": "5"},
            )
        if name not in self.plugins:
            raise APIError(
                404,
                f"the model {name!r} does not exist; this server serves {', '.join(sorted(self.plugins))}",
                param="model",
                code="model_not_found",
            )
        return self.plugins[name]
