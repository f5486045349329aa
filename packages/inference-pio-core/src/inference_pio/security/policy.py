"""``TrustLevel``, ``ResourceLimits`` and the policy that maps plugins to them.

Policy (documented in docs/security.md, which also says who gets which level):

=========  ==============  =============================================  ================  =======================
level      runs            may read weights from                          pickle weights    default limits
=========  ==============  =============================================  ================  =======================
LOW        worker process  Hugging Face cache, configured ``model_dirs``  refused           8 GiB, 300 s CPU, no GPU
MEDIUM     worker process  Hugging Face cache, configured ``model_dirs``  refused           32 GiB, 3600 s CPU, 90 % GPU
HIGH       in-process      any checked local directory, or the hub        refused           95 % of a GPU
MAXIMUM    in-process      any checked local directory, or the hub        pass path checks  none
=========  ==============  =============================================  ================  =======================

At MAXIMUM pickle files pass path validation; whether they are loaded is the plugin's choice (the
shared runtime's loader reads safetensors only).
"""

from __future__ import annotations

import enum
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from inference_pio.errors import ConfigError

TRUST_KEYS = frozenset(
    {
        "directory",
        "third_party",
        "programmatic",
        "max_requested",
        "isolate_below",
        "plugins",
        "distributions",
        "model_dirs",
    }
)


class TrustLevel(enum.IntEnum):
    LOW = 1
    MEDIUM = 2
    HIGH = 3
    MAXIMUM = 4

    @classmethod
    def parse(cls, value: Any, where: str) -> TrustLevel:
        if isinstance(value, TrustLevel):
            return value
        try:
            return cls[str(value).strip().upper()]
        except KeyError:
            raise ConfigError(f"{where}: trust level must be low, medium, high or maximum, got {value!r}") from None

    def __str__(self) -> str:
        return self.name.lower()


MEMORY_ACCOUNTING = ("auto", "address_space", "cgroup", "resident")

# What a distribution may say it needs (``register(..., needs=[...])``); the level each takes is
# decided by the policy (:meth:`TrustPolicy.level_needed`), and only the user grants it.
NEEDS = {
    "gpu": "a GPU (levels whose gpu_memory_fraction is above 0)",
    "in_process": "running in the calling process (levels at or above [trust] isolate_below)",
    "pickle_weights": "loading pickle-based weights (maximum)",
}


@dataclass(frozen=True)
class ResourceLimits:
    """Caps for one plugin. ``None`` means unlimited. Enforced by the OS in isolated workers."""

    cpu_seconds: int | None = None  # over the worker's whole life, not per call
    memory_bytes: int | None = None  # address space (device cpu), else a cgroup or resident memory of the worker tree
    disk_write_bytes: int | None = None  # largest file the worker may write
    open_files: int | None = None
    wall_seconds: float | None = None  # per call
    gpu_memory_fraction: float | None = None  # share of the GPU's memory per process; 0 means no GPU
    memory_accounting: str | None = None  # how memory_bytes is enforced; None is "auto" (chosen per device)

    def describe(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @property
    def gpu_allowed(self) -> bool:
        return self.gpu_memory_fraction is None or self.gpu_memory_fraction > 0


GIB = 1024**3
DEFAULT_LIMITS: dict[TrustLevel, ResourceLimits] = {
    TrustLevel.LOW: ResourceLimits(
        cpu_seconds=300,
        memory_bytes=8 * GIB,
        disk_write_bytes=256 * 1024**2,
        open_files=256,
        wall_seconds=120,
        gpu_memory_fraction=0.0,
    ),
    TrustLevel.MEDIUM: ResourceLimits(
        cpu_seconds=3600,
        memory_bytes=32 * GIB,
        disk_write_bytes=4 * GIB,
        open_files=1024,
        wall_seconds=600,
        gpu_memory_fraction=0.9,
    ),
    TrustLevel.HIGH: ResourceLimits(gpu_memory_fraction=0.95),
    TrustLevel.MAXIMUM: ResourceLimits(),
}


def hf_cache_dir(environ: Mapping[str, str] | None = None) -> Path:
    env = os.environ if environ is None else environ
    if env.get("HF_HUB_CACHE"):
        return Path(env["HF_HUB_CACHE"])
    home = env.get("HF_HOME") or os.path.join(
        env.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "huggingface"
    )
    return Path(home) / "hub"


@dataclass(frozen=True)
class TrustPolicy:
    """Which level each plugin gets, which levels are isolated, limits per level, and allowed roots."""

    directory: TrustLevel = TrustLevel.LOW
    third_party: TrustLevel = TrustLevel.MEDIUM
    max_requested: TrustLevel = TrustLevel.HIGH  # the most an installed distribution's own request is granted
    programmatic: TrustLevel = TrustLevel.HIGH
    isolate_below: TrustLevel = TrustLevel.HIGH
    plugins: Mapping[str, TrustLevel] | None = None
    distributions: Mapping[str, TrustLevel] | None = None
    limits: Mapping[TrustLevel, ResourceLimits] | None = None
    model_dirs: tuple[Path, ...] = ()
    hf_cache: Path = Path("~/.cache/huggingface/hub")

    @classmethod
    def from_config(
        cls, trust: Mapping[str, Any], limits: Mapping[str, Any], environ: Mapping[str, str] | None = None
    ) -> TrustPolicy:
        from inference_pio.common.config_manager import parse_size

        unknown = sorted(set(trust) - TRUST_KEYS)
        if unknown:
            raise ConfigError(
                f"[trust] {', '.join(unknown)}: unknown key; known: {', '.join(sorted(TRUST_KEYS))} "
                "(see docs/security.md)"
            )

        def level(key: str, default: TrustLevel) -> TrustLevel:
            return TrustLevel.parse(trust[key], f"[trust] {key}") if key in trust else default

        per_level = dict(DEFAULT_LIMITS)
        for name, table in limits.items():
            lvl = TrustLevel.parse(name, f"[limits.{name}]")
            changes: dict[str, Any] = {}
            for key, value in dict(table).items():
                if key in ("memory", "memory_bytes"):
                    changes["memory_bytes"] = parse_size(str(value)) if isinstance(value, str) else int(value)
                elif key in ("disk", "disk_write_bytes"):
                    changes["disk_write_bytes"] = parse_size(str(value)) if isinstance(value, str) else int(value)
                elif key in ("cpu_seconds", "open_files"):
                    changes[key] = int(value)
                elif key in ("wall_seconds", "gpu_memory_fraction"):
                    changes[key] = float(value)
                    if key == "gpu_memory_fraction" and not 0 <= changes[key] <= 1:
                        raise ConfigError(
                            f"[limits.{name}] gpu_memory_fraction must be between 0 (no GPU) and 1, got {value!r}"
                        )
                elif key == "memory_accounting":
                    if value not in MEMORY_ACCOUNTING:
                        raise ConfigError(
                            f"[limits.{name}] memory_accounting must be one of {', '.join(MEMORY_ACCOUNTING)}, "
                            f"got {value!r}"
                        )
                    changes[key] = None if value == "auto" else str(value)
                else:
                    raise ConfigError(
                        f"[limits.{name}] {key}: unknown limit; known: memory, cpu_seconds, disk, "
                        "open_files, wall_seconds, gpu_memory_fraction, memory_accounting"
                    )
            per_level[lvl] = replace(per_level[lvl], **changes)
        return cls(
            directory=level("directory", TrustLevel.LOW),
            third_party=level("third_party", TrustLevel.MEDIUM),
            max_requested=level("max_requested", TrustLevel.HIGH),
            programmatic=level("programmatic", TrustLevel.HIGH),
            isolate_below=level("isolate_below", TrustLevel.HIGH),
            plugins={k: TrustLevel.parse(v, f"[trust.plugins] {k}") for k, v in trust.get("plugins", {}).items()},
            distributions={
                k: TrustLevel.parse(v, f"[trust.distributions] {k}") for k, v in trust.get("distributions", {}).items()
            },
            limits=per_level,
            model_dirs=tuple(Path(p).expanduser() for p in trust.get("model_dirs", [])),
            hf_cache=hf_cache_dir(environ),
        )

    def level_for(
        self, name: str, source: str, distribution: str | None, requested: TrustLevel | None = None
    ) -> TrustLevel:
        """The level of one plugin. Configuration decides first; an installed distribution's own request
        (``register(..., trust=...)``) comes next, capped at ``max_requested``; then the defaults."""
        if self.plugins and name in self.plugins:
            return self.plugins[name]
        if distribution and self.distributions and distribution in self.distributions:
            return self.distributions[distribution]
        if source.startswith("directory"):
            return self.directory
        if source == "programmatic":
            return self.programmatic
        if requested is not None and distribution is not None:
            return min(requested, self.max_requested)
        return self.third_party

    def level_needed(self, needs: tuple[str, ...]) -> TrustLevel:
        """The lowest level that gives a plugin everything in ``needs`` (see :data:`NEEDS`)."""
        wanted = TrustLevel.LOW
        for need in needs:
            if need == "in_process":
                wanted = max(wanted, self.isolate_below)
            elif need == "pickle_weights":
                wanted = TrustLevel.MAXIMUM
            elif need == "gpu":
                wanted = max(wanted, min(lvl for lvl in TrustLevel if self.limits_for(lvl).gpu_allowed))
        return wanted

    def isolated(self, level: TrustLevel) -> bool:
        return level < self.isolate_below

    def limits_for(self, level: TrustLevel) -> ResourceLimits:
        return (self.limits or DEFAULT_LIMITS)[level]

    def roots_for(self, level: TrustLevel) -> tuple[Path, ...] | None:
        """Directories weights may come from; ``None`` means any checked directory."""
        if level >= TrustLevel.HIGH:
            return None
        return (self.hf_cache.expanduser(), *self.model_dirs)
