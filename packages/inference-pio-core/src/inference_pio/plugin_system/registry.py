"""Records of known plugins, fed by entry points, directories and programmatic registration, and the
selection (allow/deny lists) that decides which may load."""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from inference_pio.common.metadata import ModelPluginMetadata

ENTRY_POINT_GROUP = "inference_pio.plugins"
Status = Literal["ok", "broken", "disabled", "incompatible"]


@dataclass
class PluginRecord:
    """Everything the manager knows about one plugin name."""

    name: str
    source: str  # "distribution NAME", "directory PATH" or "programmatic"
    distribution: str | None = None
    dist_version: str | None = None
    status: Status = "ok"
    error: BaseException | None = None
    metadata: ModelPluginMetadata | None = None
    factory: Any = None  # callable or "module:attr"
    instance: Any = None
    active: bool = False
    trust: Any = None  # TrustLevel, set on registration
    isolated: bool = False
    directory: str | None = None  # for plugins loaded from a directory
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def version(self) -> str | None:
        return self.metadata.version if self.metadata else self.dist_version

    def as_row(self) -> dict[str, Any]:
        """The row ``inference-pio plugins --json`` prints."""
        return {
            "name": self.name,
            "version": self.version,
            "distribution": self.distribution,
            "source": self.source,
            "status": self.status,
            "error": None if self.error is None else f"{type(self.error).__name__}: {self.error}",
            "trust": None if self.trust is None else str(self.trust),
            "isolated": self.isolated,
            "limits": self.extra.get("limits"),  # None until a trust level is known (e.g. a broken plugin)
            "request": self.extra.get("request"),  # what its distribution asks for, and whether it is granted
        }


def resolve_factory(factory: Any) -> Callable[..., Any]:
    if isinstance(factory, str):
        module, _, attr = factory.partition(":")
        if not module or not attr:
            raise ValueError(f"factory string {factory!r} must look like 'package.module:function'")
        obj: Any = importlib.import_module(module)
        for part in attr.split("."):
            obj = getattr(obj, part)
        factory = obj
    if not callable(factory):
        raise TypeError(f"plugin factory must be callable, got {type(factory).__name__}")
    return factory  # type: ignore[no-any-return]


@dataclass(frozen=True)
class Selection:
    """Which plugins may load: ``INFERENCE_PIO_PLUGINS`` (allow-list) and ``INFERENCE_PIO_DISABLE_PLUGINS``."""

    allow: frozenset[str] | None
    deny: frozenset[str]

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Selection:
        env = os.environ if environ is None else environ

        def names(value: str) -> frozenset[str]:
            return frozenset(n.strip() for n in value.split(",") if n.strip())

        allow = env.get("INFERENCE_PIO_PLUGINS")
        return cls(None if allow is None else names(allow), names(env.get("INFERENCE_PIO_DISABLE_PLUGINS", "")))

    def allows(self, *names: str | None) -> bool:
        """True when any of ``names`` (entry-point, distribution or plugin name) is allowed and none is denied."""
        given = {n for n in names if n}
        if given & self.deny:
            return False
        return self.allow is None or bool(given & self.allow)

    def reason(self) -> str:
        if self.allow is not None:
            return f"not in INFERENCE_PIO_PLUGINS={','.join(sorted(self.allow))}"
        return f"listed in INFERENCE_PIO_DISABLE_PLUGINS={','.join(sorted(self.deny))}"


def strict_mode(environ: Mapping[str, str] | None = None) -> bool:
    env = os.environ if environ is None else environ
    return env.get("INFERENCE_PIO_STRICT", "").strip().lower() in ("1", "true", "yes", "on")
