"""Trust wrapping: the manager's bridge to ``inference_pio.security``.

Gives each new record its level, isolation, limits and what its distribution asks for; stands an
``IsolatedPlugin`` in for plugins that run in a worker; checks a plugin's configuration (model_path,
device, GPU memory fraction) against its level before ``load_model`` sees it; and writes the grants a
user makes with ``inference-pio trust`` into the config file.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
import tomllib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from inference_pio.errors import ConfigError
from inference_pio.plugin_system.registry import PluginRecord
from inference_pio.security.paths import custom_code_modules, is_hub_id, validate_model_path
from inference_pio.security.policy import NEEDS, TrustLevel, TrustPolicy

log = logging.getLogger("inference_pio.plugins")


def parse_needs(name: str, needs: Iterable[str] | None) -> tuple[str, ...]:
    """Check what a distribution says its plugin needs against :data:`NEEDS`."""
    if needs is None:
        return ()
    if isinstance(needs, str):
        needs = [needs]
    found = tuple(dict.fromkeys(str(n) for n in needs))
    unknown = [n for n in found if n not in NEEDS]
    if unknown:
        raise ConfigError(
            f"plugin {name!r}: register(needs=...) names {', '.join(map(repr, unknown))}; "
            f"known needs: {', '.join(NEEDS)}"
        )
    return found


def request_of(record: PluginRecord, policy: TrustPolicy) -> dict[str, Any] | None:
    """What the plugin's distribution asks for (``needs`` and a ``trust`` level), the level that takes,
    whether it is granted, and the command that grants it; None when it asks for nothing."""
    needs: tuple[str, ...] = record.extra.get("needs", ())
    asked: TrustLevel | None = record.extra.get("asked")
    if not needs and asked is None:
        return None
    level = policy.level_needed(needs)
    if asked is not None:
        level = max(level, asked)
    granted = record.trust is not None and record.trust >= level
    return {
        "needs": list(needs),
        "level": str(level),
        "granted": granted,
        "grant": None if granted else f"inference-pio trust {record.name} {level}",
    }


def assign_trust(
    record: PluginRecord, policy: TrustPolicy, requested: str | None, needs: Iterable[str] | None = None
) -> None:
    """Set the record's level (config first, then the distribution's ``trust`` request, then defaults),
    whether it is isolated, its limits, and what it asks for (``needs`` are shown, never granted here)."""
    asked = None if requested is None else TrustLevel.parse(requested, f"plugin {record.name!r}: register(trust=...)")
    record.extra["needs"] = parse_needs(record.name, needs)
    record.extra["asked"] = asked
    record.trust = policy.level_for(record.name, record.source, record.distribution, asked)
    # a worker can re-create plugins from entry points and directories, not from in-process callables
    record.isolated = policy.isolated(record.trust) and record.source != "programmatic"
    record.extra["limits"] = policy.limits_for(record.trust).describe()
    record.extra["request"] = request_of(record, policy)


def isolated_stand_in(record: PluginRecord, policy: TrustPolicy) -> Any:
    """The ``IsolatedPlugin`` that runs ``record``'s plugin in a limited worker process."""
    from inference_pio.security.isolated import IsolatedPlugin

    assert record.metadata is not None
    return IsolatedPlugin(
        record.name,
        record.metadata,
        level=record.trust,
        limits=policy.limits_for(record.trust),
        hf_cache=policy.hf_cache,
        distribution=record.distribution,
        directory=record.directory,
        on_exit=lambda: setattr(record, "active", False),
    )


def allow_root(record: PluginRecord, path: Path) -> None:
    """Let this one plugin load checkpoints from ``path`` (``inference-pio demo`` builds its checkpoint in a
    temporary folder); every other plugin, and every other folder, is judged as before."""
    roots: tuple[Path, ...] = record.extra.get("allowed_roots", ())
    record.extra["allowed_roots"] = (*roots, path.resolve())


def forget_root(record: PluginRecord, path: Path) -> None:
    roots: tuple[Path, ...] = record.extra.get("allowed_roots", ())
    record.extra["allowed_roots"] = tuple(r for r in roots if r != path.resolve())


def apply_trust(record: PluginRecord, config: dict[str, Any], policy: TrustPolicy) -> None:
    """Validate ``model_path`` against the plugin's level (the checked, resolved path replaces it); keep a
    level without a GPU off GPUs; cap the GPU memory of every plugin at its level's fraction (in-process
    plugins may set a fraction of their own, workers only a smaller one)."""
    model_path = config.get("model_path")
    if model_path and not is_hub_id(model_path):  # hub ids download into the HF cache, an allowed root
        roots = policy.roots_for(record.trust)
        if roots is not None:
            roots = (*roots, *record.extra.get("allowed_roots", ()))
        resolved = validate_model_path(Path(str(model_path)), record.trust, roots)
        config["model_path"] = str(resolved)
        modules = custom_code_modules(resolved)
        if modules:
            log.warning(
                "%s: %s ships custom code (%s); it is ignored, never executed",
                record.name,
                resolved,
                ", ".join(modules),
            )
    limits = policy.limits_for(record.trust)
    device = str(config.get("device", "auto"))
    if not limits.gpu_allowed:
        supported = record.metadata.supported_devices if record.metadata is not None else ("cpu",)
        if device not in ("auto", "cpu") and device.split(":")[0] not in supported:
            return  # the plugin cannot run there anyway; the manager says so, naming the devices it supports
        if device not in ("auto", "cpu") or "cpu" not in supported:
            needed = policy.level_needed(("gpu",))
            raise ConfigError(
                f"plugin {record.name!r} runs at trust level {record.trust}, which has no GPU "
                f"([limits.{record.trust}] gpu_memory_fraction = 0), so it cannot run on device={device!r}. "
                f"Run it on the CPU (--device cpu), or let it use a GPU: inference-pio trust {record.name} {needed}"
            )
        config["device"] = "cpu"
        return
    cap, given = limits.gpu_memory_fraction, config.get("gpu_memory_fraction")
    if cap is None:
        return
    if given is None or (record.isolated and float(given) > cap):
        config["gpu_memory_fraction"] = cap


# -- grants in the config file ----------------------------------------------------------------------------
_TABLE = re.compile(r"^\s*\[\s*trust\s*\.\s*plugins\s*\]\s*(#.*)?$")
_ANY_TABLE = re.compile(r"^\s*\[")


def _key_line(name: str) -> re.Pattern[str]:
    quoted = re.escape(name)
    return re.compile(rf"""^\s*(?:{quoted}|"{quoted}"|'{quoted}')\s*=""")


def write_grant(config_file: Path, name: str, level: TrustLevel | None) -> str:
    """Set ``[trust.plugins] name = "level"`` in ``config_file`` (``None`` removes the grant), keeping the
    rest of the file as it is, and return what was done. The file is written whole (a temporary file
    renamed over it) and read back; a file whose layout this cannot edit safely is left unchanged."""
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise ConfigError(f"{name!r} is not a plugin name (letters, digits, '_', '-', '.')")
    config_file = config_file.expanduser()
    if config_file.is_symlink():  # edit the file the link points at, keep the link
        config_file = config_file.resolve()
    try:
        text = config_file.read_text()
    except FileNotFoundError:
        text = ""
    except OSError as exc:
        raise ConfigError(f"cannot read the config file {config_file}: {exc}") from exc
    try:
        before = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {config_file} is not valid TOML ({exc}); fix it, then grant again") from exc
    lines = text.splitlines()
    header = next((i for i, line in enumerate(lines) if _TABLE.match(line)), None)
    plugins = before.get("trust", {}).get("plugins") if isinstance(before.get("trust"), dict) else None
    if header is None and plugins is not None:
        raise ConfigError(
            f"config file {config_file} sets trust.plugins without a [trust.plugins] table (inline or dotted keys); "
            f'add the grant by hand: {name} = "{level}" in trust.plugins'
        )
    key = name if re.fullmatch(r"[A-Za-z0-9_-]+", name) else f'"{name}"'  # a dot would make a dotted key
    entry = None if level is None else f'{key} = "{level}"'
    if header is None:
        if entry is None:
            return f"{config_file} grants {name!r} nothing; nothing to remove"
        lines += ([""] if lines and lines[-1].strip() else []) + ["[trust.plugins]", entry]
        done = f"added [trust.plugins] {entry} to {config_file}"
    else:
        end = next((i for i in range(header + 1, len(lines)) if _ANY_TABLE.match(lines[i])), len(lines))
        matcher = _key_line(name)
        at = next((i for i in range(header + 1, end) if matcher.match(lines[i])), None)
        if at is None and entry is None:
            return f"{config_file} grants {name!r} nothing; nothing to remove"
        if at is None:
            assert entry is not None
            last = max([header, *(i for i in range(header + 1, end) if lines[i].strip())])
            lines.insert(last + 1, entry)
            done = f"added {entry} to [trust.plugins] in {config_file}"
        elif entry is None:
            del lines[at]
            done = f"removed the grant for {name!r} from [trust.plugins] in {config_file}"
        else:
            lines[at] = entry
            done = f"set {entry} in [trust.plugins] of {config_file}"
    new = "\n".join(lines) + "\n"
    after = tomllib.loads(new)
    expected = dict(before)
    granted = dict(expected.get("trust", {}).get("plugins", {}))
    if level is None:
        granted.pop(name, None)
    else:
        granted[name] = str(level)
    expected["trust"] = {**expected.get("trust", {}), "plugins": granted}
    if not granted and "plugins" not in before.get("trust", {}):
        expected["trust"].pop("plugins")
    if after != expected:
        raise ConfigError(f'could not edit {config_file} safely; add the grant by hand: {name} = "{level}"')
    config_file.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=config_file.parent, prefix=f".{config_file.name}.")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(new)
        if config_file.exists():
            os.chmod(tmp, config_file.stat().st_mode & 0o7777)
        os.replace(tmp, config_file)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return done
