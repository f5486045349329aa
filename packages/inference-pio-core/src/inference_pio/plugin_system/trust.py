"""Trust wrapping: the manager's bridge to ``inference_pio.security``.

Gives each new record its level, isolation and limits; stands an ``IsolatedPlugin`` in for plugins
that run in a worker; and checks a plugin's configuration (model_path, GPU memory fraction) against
its level before ``load_model`` sees it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from inference_pio.plugin_system.registry import PluginRecord
from inference_pio.security.paths import custom_code_modules, is_hub_id, validate_model_path
from inference_pio.security.policy import TrustLevel, TrustPolicy

log = logging.getLogger("inference_pio.plugins")


def assign_trust(record: PluginRecord, policy: TrustPolicy, requested: str | None) -> None:
    """Set the record's level (config first, then the distribution's request, then defaults), whether
    it is isolated, and the limits shown by ``inference-pio plugins``."""
    asked = None if requested is None else TrustLevel.parse(requested, f"plugin {record.name!r}: register(trust=...)")
    record.trust = policy.level_for(record.name, record.source, record.distribution, asked)
    # a worker can re-create plugins from entry points and directories, not from in-process callables
    record.isolated = policy.isolated(record.trust) and record.source != "programmatic"
    record.extra["limits"] = policy.limits_for(record.trust).describe()


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


def apply_trust(record: PluginRecord, config: dict[str, Any], policy: TrustPolicy) -> None:
    """Validate ``model_path`` against the plugin's level (the checked, resolved path replaces it);
    cap GPU memory of in-process plugins."""
    model_path = config.get("model_path")
    if model_path and not is_hub_id(model_path):  # hub ids download into the HF cache, an allowed root
        resolved = validate_model_path(Path(str(model_path)), record.trust, policy.roots_for(record.trust))
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
    if not record.isolated and config.get("gpu_memory_fraction") is None and limits.gpu_memory_fraction:
        config["gpu_memory_fraction"] = limits.gpu_memory_fraction
