"""``ConfigManager``: layered, validated runtime configuration.

Precedence, lowest first: built-in defaults < plugin defaults < TOML config file < ``INFERENCE_PIO_*``
environment variables < keyword arguments. Each value remembers where it came from, so errors can say so.
"""

from __future__ import annotations

import os
import re
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from inference_pio.common.memory import (
    DeviceMemory,
    MemoryPlan,
    QuantizationSupport,
    WeightSizes,
    host_memory,
    plan_memory,
)
from inference_pio.common.metadata import GB, ModelPluginMetadata, Precision
from inference_pio.errors import ConfigError

if TYPE_CHECKING:
    from inference_pio.common.schemas import BuiltinConfig as BuiltinConfig
else:

    def __getattr__(name: str) -> Any:
        """``BuiltinConfig`` (a pydantic model) loads on first use: listing plugins never needs it."""
        if name == "BuiltinConfig":
            from inference_pio.common.schemas import BuiltinConfig

            return BuiltinConfig
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


RESERVED_ENV = {"PLUGINS", "DISABLE_PLUGINS", "STRICT", "CONFIG", "SIMULATED_FREE_MEMORY", "LOG_LEVEL"}
DEFAULT_MAX_QUEUE = 64
"""``BuiltinConfig.max_queue`` unless configured; here so help texts can show it without pydantic."""


def default_config_path(environ: Mapping[str, str]) -> Path:
    if "INFERENCE_PIO_CONFIG" in environ:
        return Path(environ["INFERENCE_PIO_CONFIG"])
    base = environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "inference-pio" / "config.toml"


def parse_size(text: str) -> int:
    """'24GB', '512MiB', '1e9' -> bytes."""
    match = re.fullmatch(r"\s*([0-9.eE+]+)\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)?\s*", text)
    if not match:
        raise ConfigError(f"cannot read {text!r} as a size; use e.g. '24GB' or '512MiB'")
    unit = match.group(2) or "B"
    scale = {
        "B": 1,
        "KB": 10**3,
        "MB": 10**6,
        "GB": 10**9,
        "TB": 10**12,
        "KiB": 2**10,
        "MiB": 2**20,
        "GiB": 2**30,
        "TiB": 2**40,
    }[unit]
    return int(float(match.group(1)) * scale)


@dataclass
class ResolvedConfig:
    """The merged configuration of one activation, with the source of every value."""

    values: dict[str, Any]
    sources: dict[str, str] = field(default_factory=dict)

    def __getitem__(self, key: str) -> Any:
        return self.values[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.values.get(key, default)


class ConfigManager:
    """Merges configuration layers and adapts precision to the device's free memory."""

    def __init__(
        self,
        config_file: str | Path | None = None,
        environ: Mapping[str, str] | None = None,
        memory_probe: Callable[[str], DeviceMemory] | None = None,
    ) -> None:
        self.environ = dict(os.environ if environ is None else environ)
        self.config_file = Path(config_file) if config_file else default_config_path(self.environ)
        self._file_data: dict[str, Any] | None = None
        self.memory_probe = memory_probe

    # -- layers ---------------------------------------------------------------------------------
    def file_data(self) -> dict[str, Any]:
        """The parsed TOML file (empty when it does not exist)."""
        if self._file_data is None:
            if self.config_file.is_file():
                import tomllib  # only when there is a file: listing plugins without one skips the parser

                try:
                    self._file_data = tomllib.loads(self.config_file.read_text(encoding="utf-8"))
                except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
                    raise ConfigError(f"config file {self.config_file} is not valid TOML: {exc}") from exc
            else:
                self._file_data = {}
        return self._file_data

    def section(self, *path: str) -> dict[str, Any]:
        """A table of the config file, e.g. ``section("server")``; empty when absent."""
        data: Any = self.file_data()
        for key in path:
            data = data.get(key, {}) if isinstance(data, dict) else {}
        if not isinstance(data, dict):
            raise ConfigError(f"config file {self.config_file}: [{'.'.join(path)}] must be a table")
        return data

    def _env_layer(self, plugin_name: str) -> dict[str, tuple[str, str]]:
        from inference_pio.common.schemas import BuiltinConfig

        out: dict[str, tuple[str, str]] = {}
        plugin_prefix = f"INFERENCE_PIO_{plugin_name.upper()}__"
        for key, value in self.environ.items():
            if key.startswith(plugin_prefix):
                out[key[len(plugin_prefix) :].lower()] = (value, key)
            elif key.startswith("INFERENCE_PIO_") and "__" not in key:
                short = key[len("INFERENCE_PIO_") :]
                if short not in RESERVED_ENV and short.lower() in BuiltinConfig.model_fields:
                    out.setdefault(short.lower(), (value, key))
        return out  # per-plugin variables overwrite, global ones only fill in

    def resolve(
        self,
        plugin_name: str,
        plugin_defaults: Mapping[str, Any] | None = None,
        overrides: Mapping[str, Any] | None = None,
    ) -> ResolvedConfig:
        """Merge every layer for ``plugin_name`` and validate the result."""
        from pydantic import ValidationError

        from inference_pio.common.schemas import BuiltinConfig

        plugin_defaults = dict(plugin_defaults or {})
        values: dict[str, Any] = BuiltinConfig().model_dump()
        sources = dict.fromkeys(values, "built-in default")
        known = set(values) | set(plugin_defaults)

        def apply(layer: Mapping[str, Any], source: Callable[[str], str]) -> None:
            for key, value in layer.items():
                if key not in known:
                    raise ConfigError(
                        f"unknown configuration key {key!r} for plugin {plugin_name} (from {source(key)}); "
                        f"known keys: {', '.join(sorted(known))}"
                    )
                values[key] = value
                sources[key] = source(key)

        apply(plugin_defaults, lambda k: "plugin default")
        file_layer = {**self.section("defaults"), **self.section("plugins", plugin_name)}
        apply(file_layer, lambda k: f"config file {self.config_file}")
        env = self._env_layer(plugin_name)
        apply(
            {k: self._coerce_env(k, v, plugin_defaults) for k, (v, _) in env.items()},
            lambda k: f"environment variable {env[k][1]}",
        )
        apply({k: v for k, v in (overrides or {}).items() if v is not None}, lambda k: "keyword argument")

        builtin = {k: values[k] for k in BuiltinConfig.model_fields}
        try:
            checked = BuiltinConfig.model_validate(builtin)
        except ValidationError as exc:
            err = exc.errors()[0]
            key = str(err["loc"][0]) if err["loc"] else "?"
            raise ConfigError(
                f"invalid configuration value {key}={builtin.get(key)!r} (from {sources.get(key)}): {err['msg']}"
            ) from exc
        values.update(checked.model_dump())
        return ResolvedConfig(values, sources)

    @staticmethod
    def _coerce_env(key: str, raw: str, plugin_defaults: Mapping[str, Any]) -> Any:
        """Environment values are strings: convert to the key's type, taken from ``BuiltinConfig``'s
        annotation or from the plugin default's type."""
        from inference_pio.common.schemas import BuiltinConfig

        if key in BuiltinConfig.model_fields:
            annotation = BuiltinConfig.model_fields[key].annotation
            kinds = typing.get_args(annotation) or (annotation,)
        else:
            kinds = (type(plugin_defaults.get(key)),)
        if bool in kinds:
            return raw.strip().lower() in ("1", "true", "yes", "on")
        for kind, noun in ((int, "an integer"), (float, "a number")):
            if kind in kinds:
                try:
                    return kind(raw)
                except ValueError:
                    raise ConfigError(f"environment value for {key} must be {noun}, got {raw!r}") from None
        return raw

    # -- runtime adaptation ---------------------------------------------------------------------
    def probe(self, device: str, probe: Callable[[str], DeviceMemory] | None = None) -> DeviceMemory:
        """Free memory of ``device``.

        First that applies: ``INFERENCE_PIO_SIMULATED_FREE_MEMORY`` (tests and drills), this manager's
        ``memory_probe``, the caller's ``probe`` (the runtime passes its torch-based one: this layer never
        imports torch), and for the CPU the host's available RAM.
        """
        simulated = self.environ.get("INFERENCE_PIO_SIMULATED_FREE_MEMORY")
        if simulated:
            size = parse_size(simulated)
            return DeviceMemory(device, size, size)
        chosen = self.memory_probe or probe
        if chosen is not None:
            return chosen(device)
        if device.split(":", 1)[0] == "cpu":
            return host_memory(device)
        raise ConfigError(
            f"cannot measure the free memory of {device!r}: pass probe= to plan_memory (the runtime's "
            "inference_pio.runtime.devices.probe_memory), or set INFERENCE_PIO_SIMULATED_FREE_MEMORY"
        )

    def plan_memory(
        self,
        metadata: ModelPluginMetadata,
        config: ResolvedConfig,
        requirements: Mapping[Precision, int] | WeightSizes | None = None,
        *,
        probe: Callable[[str], DeviceMemory] | None = None,
        quantization_support: QuantizationSupport | None = None,
    ) -> MemoryPlan:
        """Pick dtype, quantization and device(s) for ``metadata`` on ``config['device']`` (already resolved, not
        'auto'; several GPUs as 'cuda:0,cuda:1'); ``probe`` measures each device's free memory (see :meth:`probe`),
        ``quantization_support`` says where bitsandbytes works (default: found from what is installed)."""
        memory = [self.probe(device.strip(), probe) for device in str(config["device"]).split(",")]
        return plan_memory(
            metadata.name,
            metadata.memory_requirements if requirements is None else requirements,
            memory,
            dtype=config["dtype"],
            quantization=config["quantization"],
            supported_quantizations=metadata.supported_quantizations,
            quantization_support=quantization_support,
        )


__all__ = ["DEFAULT_MAX_QUEUE", "GB", "BuiltinConfig", "ConfigManager", "ResolvedConfig", "parse_size"]
