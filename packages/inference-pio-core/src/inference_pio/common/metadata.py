"""``ModelPluginMetadata``: how a plugin describes itself before anything heavy is imported."""

from __future__ import annotations

from typing import Literal

from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.version import InvalidVersion, Version
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from inference_pio.errors import MetadataError

Modality = Literal["text", "image", "audio", "video"]
Precision = Literal["float32", "bfloat16", "float16", "int8", "int4"]
DeviceKind = Literal["cpu", "cuda", "mps"]
Quantization = Literal["none", "int8", "int4"]

GB = 1_000_000_000


class ModelPluginMetadata(BaseModel):
    """Self-description of a model plugin; validated when the plugin is registered."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[a-z][a-z0-9_]{1,63}$", description="plugin name used in the API and CLI")
    version: str
    description: str = Field(min_length=1)
    model_id: str = Field(min_length=1, description="Hugging Face hub id of the default weights")
    architecture: str = Field(min_length=1, description="transformers architecture class name")
    modalities: tuple[Modality, ...] = Field(min_length=1, description="input modalities")
    parameter_count: int = Field(gt=0)
    memory_requirements: dict[Precision, int] = Field(
        min_length=1, description="bytes needed to hold the weights in each precision"
    )
    supported_devices: tuple[DeviceKind, ...] = Field(min_length=1)
    supported_quantizations: tuple[Quantization, ...] = ("none",)
    plugin_api: str = Field(description="PEP 440 specifier of the plugin-API versions supported, e.g. '>=1.0,<2'")
    license: str = Field(min_length=1)
    context_length: int = Field(default=4096, gt=0)
    active_parameter_count: int | None = Field(default=None, gt=0, description="for MoE models: read per token")
    homepage: str | None = None

    @field_validator("version")
    @classmethod
    def _pep440(cls, value: str) -> str:
        try:
            Version(value)
        except InvalidVersion as exc:
            raise ValueError(f"{value!r} is not a PEP 440 version") from exc
        return value

    @field_validator("plugin_api")
    @classmethod
    def _specifier(cls, value: str) -> str:
        try:
            SpecifierSet(value)
        except InvalidSpecifier as exc:
            raise ValueError(f"{value!r} is not a PEP 440 specifier such as '>=1.0,<2'") from exc
        return value

    @field_validator("memory_requirements")
    @classmethod
    def _positive_sizes(cls, value: dict[str, int]) -> dict[str, int]:
        for precision, size in value.items():
            if size <= 0:
                raise ValueError(f"memory for {precision} must be a positive number of bytes, got {size}")
        return value

    @model_validator(mode="after")
    def _quantizations_have_sizes(self) -> ModelPluginMetadata:
        for quant in self.supported_quantizations:
            if quant != "none" and quant not in self.memory_requirements:
                raise ValueError(f"quantization {quant!r} is supported but memory_requirements has no {quant!r} entry")
        return self

    def supports_api(self, api_version: str) -> bool:
        """Whether this plugin accepts the core's plugin-API version."""
        return Version(api_version) in SpecifierSet(self.plugin_api)

    def memory_gb(self, precision: Precision) -> float:
        """Weights size in GB (10^9 bytes) for ``precision``."""
        return self.memory_requirements[precision] / GB


def validate_metadata(raw: object, *, source: str) -> ModelPluginMetadata:
    """Turn a dict or metadata object into validated metadata, or a ``MetadataError`` naming the field."""
    if isinstance(raw, ModelPluginMetadata):
        return raw
    if not isinstance(raw, dict):
        raise MetadataError(f"{source}: metadata must be a ModelPluginMetadata or a dict, got {type(raw).__name__}")
    try:
        return ModelPluginMetadata.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"field '{'.'.join(str(p) for p in err['loc']) or '(root)'}': {err['msg']}" for err in exc.errors()
        )
        raise MetadataError(f"{source}: invalid plugin metadata: {problems}") from exc
