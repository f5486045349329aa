"""``PluginManager``: the one place that discovers, activates, executes and deactivates plugins."""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from importlib.metadata import EntryPoint
from pathlib import Path
from typing import Any

from inference_pio.common.config_manager import ConfigManager
from inference_pio.common.interfaces import PLUGIN_API_VERSION, ModelPluginInterface
from inference_pio.common.memory import MemoryPlan
from inference_pio.common.metadata import validate_metadata
from inference_pio.errors import (
    ConfigError,
    PluginConflictError,
    PluginDisabledError,
    PluginIncompatibleError,
    PluginLoadError,
    PluginNotActiveError,
    PluginNotFoundError,
)
from inference_pio.plugin_system import discovery
from inference_pio.plugin_system.registry import PluginRecord, Selection, resolve_factory, strict_mode
from inference_pio.plugin_system.trust import apply_trust, assign_trust, isolated_stand_in
from inference_pio.security.paths import check_directory
from inference_pio.security.policy import TrustPolicy

log = logging.getLogger("inference_pio.plugins")


class PluginManager:
    """Discovers plugins lazily, isolates their failures, and runs their lifecycle. Thread-safe."""

    def __init__(
        self, *, environ: Mapping[str, str] | None = None, config_manager: ConfigManager | None = None
    ) -> None:
        self._lock = threading.RLock()
        self._pm = discovery.new_hook_manager()
        self._records: dict[str, PluginRecord] = {}
        self._entry_points: list[EntryPoint] | None = None
        self._loaded_entry_points: set[str] = set()
        self._loaded_directories: dict[Path, list[str]] = {}
        self.selection = Selection.from_env(environ)
        self.strict = strict_mode(environ)
        self.config_manager = config_manager or ConfigManager(environ=environ)
        self._environ = environ
        self._trust_policy: TrustPolicy | None = None

    @property
    def trust_policy(self) -> TrustPolicy:
        """Trust levels, isolation and limits, from the [trust] and [limits.*] tables of the config file."""
        if self._trust_policy is None:
            self._trust_policy = TrustPolicy.from_config(
                self.config_manager.section("trust"), self.config_manager.section("limits"), self._environ
            )
        return self._trust_policy

    # -- discovery ------------------------------------------------------------------------------
    def _eps(self) -> list[EntryPoint]:
        if self._entry_points is None:
            self._entry_points = discovery.installed_entry_points()
        return self._entry_points

    def _load_entry_point(self, ep: EntryPoint) -> None:
        if ep.name in self._loaded_entry_points:
            return
        self._loaded_entry_points.add(ep.name)
        dist = ep.dist.name if ep.dist else None
        dist_version = ep.dist.version if ep.dist else None
        source = f"distribution {dist}" if dist else f"entry point {ep.name}"
        if not self.selection.allows(ep.name, dist):
            self._records.setdefault(
                ep.name,
                PluginRecord(
                    ep.name,
                    source,
                    dist,
                    dist_version,
                    status="disabled",
                    error=PluginDisabledError(self.selection.reason()),
                ),
            )
            return
        try:
            obj = ep.load()
        except Exception as exc:  # a broken plugin must not take the others down
            self._broken(
                ep.name,
                source,
                dist,
                dist_version,
                PluginLoadError(
                    f"entry point {ep.name} ({ep.value}) of {source} failed to import: {type(exc).__name__}: {exc}", exc
                ),
            )
            return
        self._register_module(obj, source, dist, dist_version, key=ep.name)

    def _load_all_entry_points(self) -> None:
        for ep in self._eps():
            self._load_entry_point(ep)

    def _broken(
        self, key: str, source: str, dist: str | None, dist_version: str | None, error: PluginLoadError
    ) -> None:
        log.warning("%s", error)
        if self.strict:
            raise error
        existing = self._records.get(key)
        if existing is None or existing.status != "broken":
            self._records[key] = PluginRecord(key, source, dist, dist_version, status="broken", error=error)

    def _register_module(
        self, obj: Any, source: str, dist: str | None, dist_version: str | None, *, key: str
    ) -> list[str]:
        """Register ``obj``'s hook implementations and collect the plugins it registers."""
        try:
            discovery.register_hooks(self._pm, obj, f"{source}:{key}")
        except Exception as exc:
            self._broken(
                key, source, dist, dist_version, PluginLoadError(f"{source}: invalid hook implementation: {exc}", exc)
            )
            return []
        try:
            found = discovery.registrations(self._pm, obj)
        except Exception as exc:
            self._broken(
                key,
                source,
                dist,
                dist_version,
                PluginLoadError(f"{source}: inference_pio_register_plugins raised {type(exc).__name__}: {exc}", exc),
            )
            return []
        names: list[str] = []
        for registration in found:
            self._add(registration, source, dist, dist_version)
            names.append(registration.name)
        return names

    def _add(
        self, registration: discovery.Registration, source: str, dist: str | None, dist_version: str | None
    ) -> None:
        name, metadata = registration.name, registration.metadata
        with self._lock:
            existing = self._records.get(name)
            if existing is not None and existing.status != "disabled":
                if existing.source == source:
                    return  # the same source registering again (e.g. a directory loaded twice)
                error = PluginConflictError(
                    f"plugin name {name!r} is registered twice: by {existing.source} and by {source}. "
                    f"Uninstall one, or disable one with INFERENCE_PIO_DISABLE_PLUGINS."
                )
                log.error("%s", error)
                if self.strict:
                    raise error
                existing.status, existing.error = "broken", error
                return
            record = PluginRecord(name, source, dist, dist_version, factory=registration.factory)
            if source.startswith("directory "):
                record.directory = source.removeprefix("directory ")
            self._records[name] = record
            try:
                assign_trust(record, self.trust_policy, registration.trust, registration.needs)
                record.metadata = validate_metadata(metadata, source=f"plugin {name!r} from {source}")
                if record.metadata.name != name:
                    raise ValueError(
                        f"plugin registered as {name!r} but its metadata says name={record.metadata.name!r}"
                    )
            except Exception as exc:
                record.status, record.error = "broken", PluginLoadError(str(exc), exc)
                log.warning("%s", record.error)
                if self.strict:
                    raise record.error from exc
                return
            if not self.selection.allows(name, dist):
                record.status, record.error = "disabled", PluginDisabledError(self.selection.reason())
            elif not record.metadata.supports_api(PLUGIN_API_VERSION):
                record.status = "incompatible"
                record.error = PluginIncompatibleError(
                    f"plugin {name!r} supports plugin API {record.metadata.plugin_api}, "
                    f"but this inference-pio-core provides {PLUGIN_API_VERSION}; upgrade the plugin or the core"
                )
                if self.strict:
                    raise record.error

    # -- public API -----------------------------------------------------------------------------
    def list_plugins(self) -> list[PluginRecord]:
        """Every known plugin with its status; imports each entry module (never torch)."""
        with self._lock:
            self._load_all_entry_points()
            return sorted(self._records.values(), key=lambda r: r.name)

    def get_record(self, name: str) -> PluginRecord:
        """The record of ``name``. Every entry module is imported first (they are light), so that a
        second distribution claiming the same name is always detected, never silently shadowed."""
        with self._lock:
            self._load_all_entry_points()
            if name not in self._records:
                known = ", ".join(sorted(self._records)) or "none"
                raise PluginNotFoundError(
                    f"no plugin named {name!r}; installed plugins: {known}. "
                    f"Install one with pip (e.g. pip install inference-pio-{name.replace('_', '-')})"
                )
            return self._records[name]

    def _usable(self, name: str) -> PluginRecord:
        record = self.get_record(name)
        if record.status == "ok":
            return record
        if record.status == "disabled":
            raise PluginDisabledError(f"plugin {name!r} is disabled: {record.error}")
        assert isinstance(record.error, PluginLoadError)
        raise record.error

    def get_plugin(self, name: str) -> ModelPluginInterface:
        """The plugin instance (created on first use, not loaded). Raises ``PluginLoadError`` for broken plugins."""
        with self._lock:
            record = self._usable(name)
            if record.instance is None and record.isolated:
                record.instance = isolated_stand_in(record, self.trust_policy)
            if record.instance is None:
                try:
                    instance = resolve_factory(record.factory)()
                except Exception as exc:
                    raise PluginLoadError(
                        f"factory of plugin {name!r} from {record.source} raised {type(exc).__name__}: {exc}", exc
                    ) from exc
                if not isinstance(instance, ModelPluginInterface):
                    raise PluginLoadError(
                        f"factory of plugin {name!r} returned {type(instance).__name__}, "
                        f"which does not implement ModelPluginInterface"
                    )
                record.instance = instance
            return record.instance  # type: ignore[no-any-return]

    def register_plugin(self, name: str, factory: Any, metadata: Any = None) -> PluginRecord:
        """Register a plugin from code. Without ``metadata``, the factory is called once to read it."""
        if metadata is None:
            metadata = resolve_factory(factory)().metadata
        self._add(discovery.Registration(name, factory, metadata), "programmatic", None, None)
        return self.get_record(name)

    def load_plugins_from_directory(self, directory: str | Path) -> list[str]:
        """Load plugins from modules (``*.py``) and packages in ``directory``; returns the names registered."""
        if not Path(directory).expanduser().is_dir():
            raise FileNotFoundError(f"plugin directory {directory} does not exist or is not a directory")
        path = check_directory(Path(directory), "plugin directory")
        with self._lock:
            if path in self._loaded_directories:
                return list(self._loaded_directories[path])
            names: list[str] = []
            source = f"directory {path}"
            for key, location, module in discovery.directory_modules(path):
                if isinstance(module, BaseException):
                    error = PluginLoadError(f"{location} failed to import: {type(module).__name__}: {module}", module)
                    self._broken(key, source, None, None, error)
                else:
                    names += self._register_module(module, source, None, None, key=key)
            self._loaded_directories[path] = names
            return names

    def activate_plugin(self, name: str, device: str | None = None, **config: Any) -> ModelPluginInterface:
        """Create, configure and load ``name`` on ``device``; other keywords are configuration (model_path=...).
        ``device=None`` leaves the choice to the configuration (``[plugins.NAME] device``, its environment
        variable), whose default is ``auto``."""
        plugin = self.get_plugin(name)
        record = self._records[name]
        with self._lock:
            if record.active:
                self._deactivate(record)
            values = self._configure(record, plugin, device, config)
            plugin.initialize(**values)
            try:
                plugin.load_model(values)
            except BaseException:
                plugin.cleanup()
                raise
            record.active = True
            return plugin

    def plan_plugin(self, name: str, device: str | None = None, **config: Any) -> MemoryPlan:
        """The memory plan ``activate_plugin(name, device, **config)`` would follow, without loading weights.

        Sizing a checkpoint runs the plugin's own code, so only plugins that run in this process are planned
        here; an isolated plugin's plan is shown when it is activated (``inference-pio run`` prints it)."""
        plugin = self.get_plugin(name)
        record = self._records[name]
        planner = getattr(plugin, "plan_memory", None)
        if record.isolated or planner is None:
            why = "runs in an isolated worker" if record.isolated else "does not plan its memory (no plan_memory)"
            raise ConfigError(
                f"plugin {name!r} {why}, so its memory plan is known only once it is activated: "
                f"`inference-pio run {name} ...` prints it"
            )
        return planner(self._configure(record, plugin, device, config))  # type: ignore[no-any-return]

    def _configure(
        self, record: PluginRecord, plugin: ModelPluginInterface, device: str | None, config: Mapping[str, Any]
    ) -> dict[str, Any]:
        """The configuration an activation (or its plan) runs with: resolved, held to the plugin's trust level
        and checked against what the plugin supports; the plugin gets this manager's ConfigManager."""
        name = record.name
        resolved = self.config_manager.resolve(name, plugin.default_config(), _with_device(device, config))
        apply_trust(record, resolved.values, self.trust_policy)
        if not plugin.supports_config(resolved.values):
            meta = plugin.metadata
            raise ConfigError(
                f"plugin {name!r} cannot run with device={resolved['device']!r}, "
                f"quantization={resolved['quantization']!r}; it supports devices "
                f"{', '.join(meta.supported_devices)} and quantizations {', '.join(meta.supported_quantizations)}"
            )
        plugin.config_manager = self.config_manager
        return resolved.values

    def execute_plugin(self, name: str, data: Any, **kwargs: Any) -> Any:
        """Run ``infer`` on an activated plugin."""
        record = self.get_record(name)
        if not record.active:
            raise PluginNotActiveError(f"plugin {name!r} is not active; call activate_plugin({name!r}, ...) first")
        return record.instance.infer(data, **kwargs)

    def deactivate_plugin(self, name: str) -> None:
        """Call ``cleanup()`` and release the plugin's memory; a no-op for inactive plugins."""
        with self._lock:
            record = self.get_record(name)
            if record.active:
                self._deactivate(record)

    def _deactivate(self, record: PluginRecord) -> None:
        try:
            record.instance.cleanup()
        finally:
            record.active = False

    def active_plugins(self) -> list[str]:
        with self._lock:
            return sorted(n for n, r in self._records.items() if r.active)

    def shutdown(self) -> None:
        """Deactivate every active plugin."""
        for name in self.active_plugins():
            self.deactivate_plugin(name)

    def demo_checkpoint(self, name: str, directory: Path) -> Path | None:
        """Ask the plugin's distribution for its tiny demo checkpoint (hook ``inference_pio_demo_checkpoint``)."""
        self._usable(name)
        result = self._pm.hook.inference_pio_demo_checkpoint(plugin_name=name, directory=directory)
        return None if result is None else Path(result)


_manager: PluginManager | None = None
_manager_lock = threading.Lock()


def get_plugin_manager() -> PluginManager:
    """The process-wide ``PluginManager`` (created on first call)."""
    global _manager
    with _manager_lock:
        if _manager is None:
            _manager = PluginManager()
        return _manager


def reset_plugin_manager() -> None:
    """Shut down and forget the process-wide manager (tests, and after changing INFERENCE_PIO_* variables)."""
    global _manager
    with _manager_lock:
        if _manager is not None:
            _manager.shutdown()
        _manager = None


def _with_device(device: str | None, config: Mapping[str, Any]) -> dict[str, Any]:
    """Call-site settings: ``device`` only when the caller chose one, so the config file's stays in force."""
    return dict(config) if device is None else {"device": device, **config}
