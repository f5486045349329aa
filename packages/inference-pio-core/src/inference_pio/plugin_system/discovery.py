"""Finding plugins: installed entry points, modules in a plugin directory, and the registrations their
hooks make. Shared by the manager (which records every plugin) and the isolated worker (which only
needs the factory of the one plugin it runs). Light: no torch here.
"""

from __future__ import annotations

import hashlib
import importlib.util
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path
from types import ModuleType
from typing import Any

import pluggy

from inference_pio.errors import PluginLoadError, PluginNotFoundError
from inference_pio.plugin_system import hookspecs
from inference_pio.plugin_system.registry import ENTRY_POINT_GROUP
from inference_pio.security.paths import check_directory, read_checked


@dataclass(frozen=True)
class Registration:
    """One ``register(name, factory, metadata, trust=..., needs=...)`` call made by a hook implementation."""

    name: str
    factory: Any
    metadata: Any
    trust: str | None = None  # the level the distribution asks for; the policy decides what it gets
    needs: tuple[str, ...] | None = None  # what the plugin says it needs ("gpu", "in_process"); the user grants


def new_hook_manager() -> pluggy.PluginManager:
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    return pm


def installed_entry_points() -> list[EntryPoint]:
    """Entry points of the ``inference_pio.plugins`` group, from package metadata only (nothing imported)."""
    return sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda ep: ep.name)


def register_hooks(pm: pluggy.PluginManager, plugin: Any, name: str) -> None:
    """Add ``plugin``'s hook implementations to ``pm``; a bad signature leaves ``pm`` unchanged."""
    try:
        pm.register(plugin, name=name)
        pm.check_pending()
    except Exception:
        if pm.is_registered(plugin):
            pm.unregister(plugin)
        raise


def registrations(pm: pluggy.PluginManager, plugin: Any) -> list[Registration]:
    """Call ``inference_pio_register_plugins`` of ``plugin`` alone (a pluggy subset hook caller) and
    return what it registered. Exceptions from the hook propagate to the caller."""
    others = [p for p in pm.get_plugins() if p is not plugin]
    caller = pm.subset_hook_caller("inference_pio_register_plugins", remove_plugins=others)
    found: list[Registration] = []

    def register(name: str, factory: Any, metadata: Any, *, trust: str | None = None, needs: Any = None) -> None:
        found.append(Registration(name, factory, metadata, trust, None if needs is None else tuple(needs)))

    caller(register=register)
    return found


def directory_modules(path: Path) -> Iterator[tuple[str, Path, ModuleType | BaseException]]:
    """Import the plugin modules (``*.py``) and packages in a checked directory, in name order.

    Yields ``(key, location, module or the exception its import raised)``. Module names are unique
    per directory, so two directories may both hold ``plugin.py``.
    """
    prefix = "inference_pio_local_" + hashlib.sha1(str(path).encode()).hexdigest()[:10]
    for entry in sorted(path.iterdir()):
        if entry.name.startswith(("_", ".")):
            continue
        if entry.is_file() and entry.suffix == ".py":
            location, search = entry, None
        elif entry.is_dir() and (entry / "__init__.py").is_file():
            location, search = entry / "__init__.py", [str(entry)]
        else:
            continue
        try:
            yield entry.stem, location, import_file(f"{prefix}.{entry.stem}", location, search)
        except Exception as exc:
            yield entry.stem, location, exc


def import_file(module_name: str, location: Path, search: list[str] | None) -> ModuleType:
    """Import ``location`` as ``module_name``; its source is read with :func:`read_checked`, so the
    bytes executed are the bytes of the regular file that was checked."""
    parent = module_name.rpartition(".")[0]
    if parent not in sys.modules:
        sys.modules[parent] = ModuleType(parent)
        sys.modules[parent].__path__ = []
    spec = importlib.util.spec_from_file_location(module_name, location, submodule_search_locations=search)
    if spec is None:
        raise ImportError(f"cannot import {location}")
    module = importlib.util.module_from_spec(spec)
    code = compile(read_checked(location), str(location), "exec")
    sys.modules[module_name] = module
    try:
        exec(code, module.__dict__)
    except BaseException:
        sys.modules.pop(module_name, None)
        raise
    return module


def find_factory(name: str, *, distribution: str | None = None, directory: str | None = None) -> Any:
    """The factory of plugin ``name``, found the way the manager found it: in ``directory``'s modules,
    or in the entry points of ``distribution`` (the isolated worker rebuilds its plugin with this)."""
    pm = new_hook_manager()
    sources: list[tuple[str, Any]] = []
    if directory is not None:
        for key, location, module in directory_modules(check_directory(Path(directory), "plugin directory")):
            if not isinstance(module, BaseException):
                sources.append((f"{location}:{key}", module))
    else:
        for ep in installed_entry_points():
            ep_dist = ep.dist.name if ep.dist else None
            if ep_dist == distribution or (distribution is None and ep.name == name):
                sources.append((f"entry point {ep.name}", ep.load()))
    for label, module in sources:
        try:
            register_hooks(pm, module, label)
        except Exception as exc:
            raise PluginLoadError(f"{label}: invalid hook implementation: {exc}", exc) from exc
        for found in registrations(pm, module):
            if found.name == name:
                return found.factory
    where = f"directory {directory}" if directory else f"distribution {distribution or '?'}"
    raise PluginNotFoundError(f"{where} no longer registers a plugin named {name!r}")
