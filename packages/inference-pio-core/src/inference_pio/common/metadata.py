"""``ModelPluginMetadata``: how a plugin describes itself before anything heavy is imported.

Every model package builds its metadata when its entry module is imported, which listing plugins does; so this
is a plain frozen dataclass with its own checks rather than a pydantic model (pydantic alone would be about a
third of a cold ``inference-pio plugins``).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, get_args

from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.version import InvalidVersion, Version

from inference_pio.errors import MetadataError

Modality = Literal["text", "image", "audio", "video"]
Precision = Literal["float32", "bfloat16", "float16", "int8", "int4"]
DeviceKind = Literal["cpu", "cuda", "mps"]
Quantization = Literal["none", "int8", "int4"]

GB = 1_000_000_000
NAME_RE = re.compile(r"^[a-z][a-z0-9_]{1,63}$")


@dataclass(frozen=True, kw_only=True)
class ModelPluginMetadata:
    """Self-description of a model plugin; checked when built, so a bad field fails where it is written.

    Invalid values raise ``MetadataError`` naming every bad field; unknown keywords raise ``TypeError``.
    """

    name: str
    """Plugin name used in the API and CLI: lowercase letters, digits and underscores, 2 to 64 long."""
    version: str
    """PEP 440 version of the plugin."""
    description: str
    model_id: str
    """Hugging Face hub id of the default weights."""
    architecture: str
    """transformers architecture class name."""
    modalities: tuple[Modality, ...]
    """Input modalities."""
    parameter_count: int
    memory_requirements: dict[Precision, int]
    """Bytes needed to hold the weights in each precision."""
    supported_devices: tuple[DeviceKind, ...]
    supported_quantizations: tuple[Quantization, ...] = ("none",)
    plugin_api: str
    """PEP 440 specifier of the plugin-API versions supported, e.g. '>=1.0,<2'."""
    license: str
    context_length: int = 4096
    active_parameter_count: int | None = None
    """For mixture-of-experts models: parameters read per token."""
    homepage: str | None = None

    def __post_init__(self) -> None:
        problems: dict[str, str] = {}
        set_ = object.__setattr__  # frozen: normalized values are stored once, here

        def text(name: str, *, optional: bool = False) -> None:
            value = getattr(self, name)
            if optional and value is None:
                return
            if not isinstance(value, str) or not value:
                problems[name] = f"must be a non-empty string, got {value!r}"

        def count(name: str, *, optional: bool = False) -> None:
            value = getattr(self, name)
            if optional and value is None:
                return
            if isinstance(value, float) and value.is_integer():
                value = int(value)
                set_(self, name, value)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                problems[name] = f"must be a positive integer, got {value!r}"

        def choices(name: str, allowed: tuple[str, ...], *, empty_ok: bool = False) -> None:
            value = getattr(self, name)
            if isinstance(value, str) or not isinstance(value, (list, tuple)):
                problems[name] = f"must be a tuple of {', '.join(allowed)}, got {value!r}"
                return
            set_(self, name, tuple(value))
            bad = [v for v in value if v not in allowed]
            if bad:
                problems[name] = f"{', '.join(map(repr, bad))} not among {', '.join(allowed)}"
            elif not value and not empty_ok:
                problems[name] = "must name at least one"

        text("name")
        if "name" not in problems and not NAME_RE.fullmatch(self.name):
            problems["name"] = f"{self.name!r} must be lowercase letters, digits and '_', starting with a letter"
        text("version")
        if "version" not in problems:
            try:
                Version(self.version)
            except InvalidVersion:
                problems["version"] = f"{self.version!r} is not a PEP 440 version"
        for name in ("description", "model_id", "architecture", "license"):
            text(name)
        text("homepage", optional=True)
        text("plugin_api")
        if "plugin_api" not in problems:
            try:
                SpecifierSet(self.plugin_api)
            except InvalidSpecifier:
                problems["plugin_api"] = f"{self.plugin_api!r} is not a PEP 440 specifier such as '>=1.0,<2'"
        count("parameter_count")
        count("context_length")
        count("active_parameter_count", optional=True)
        choices("modalities", get_args(Modality))
        choices("supported_devices", get_args(DeviceKind))
        choices("supported_quantizations", get_args(Quantization), empty_ok=True)

        sizes = self.memory_requirements
        if not isinstance(sizes, Mapping) or not sizes:
            problems["memory_requirements"] = f"must map precisions to byte counts, got {sizes!r}"
        else:
            set_(self, "memory_requirements", dict(sizes))
            for precision, size in sizes.items():
                if precision not in get_args(Precision):
                    problems["memory_requirements"] = f"{precision!r} is not one of {', '.join(get_args(Precision))}"
                elif isinstance(size, bool) or not isinstance(size, int) or size <= 0:
                    problems["memory_requirements"] = (
                        f"memory for {precision} must be a positive number of bytes, got {size!r}"
                    )
            if "supported_quantizations" not in problems:
                for quant in self.supported_quantizations:
                    if quant != "none" and quant not in sizes:
                        problems["supported_quantizations"] = (
                            f"quantization {quant!r} is supported but memory_requirements has no {quant!r} entry"
                        )
        if problems:
            raise MetadataError(
                "invalid plugin metadata: " + "; ".join(f"field '{k}': {v}" for k, v in problems.items())
            )

    def supports_api(self, api_version: str) -> bool:
        """Whether this plugin accepts the core's plugin-API version."""
        return Version(api_version) in SpecifierSet(self.plugin_api)

    def memory_gb(self, precision: Precision) -> float:
        """Weights size in GB (10^9 bytes) for ``precision``."""
        return self.memory_requirements[precision] / GB

    def model_dump(self) -> dict[str, Any]:
        """The fields as a dict (``model_validate`` reads it back)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def model_validate(cls, data: Mapping[str, Any]) -> ModelPluginMetadata:
        """Build from a mapping, refusing unknown and missing keys with a ``MetadataError`` naming them."""
        if not isinstance(data, Mapping):
            raise MetadataError(f"metadata must be a mapping of field names to values, got {type(data).__name__}")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(fields))
        missing = [
            name
            for name, f in fields.items()
            if name not in data and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        ]
        if unknown or missing:
            problems = [f"field '{k}': not a metadata field (known: {', '.join(fields)})" for k in unknown]
            problems += [f"field '{k}': required" for k in missing]
            raise MetadataError("invalid plugin metadata: " + "; ".join(problems))
        return cls(**data)


def validate_metadata(raw: object, *, source: str) -> ModelPluginMetadata:
    """Turn a dict or metadata object into validated metadata, or a ``MetadataError`` naming the field."""
    if isinstance(raw, ModelPluginMetadata):
        return raw
    if not isinstance(raw, dict):
        raise MetadataError(f"{source}: metadata must be a ModelPluginMetadata or a dict, got {type(raw).__name__}")
    try:
        return ModelPluginMetadata.model_validate(raw)
    except MetadataError as exc:
        raise MetadataError(f"{source}: {exc}") from exc
