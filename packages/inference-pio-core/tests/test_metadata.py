"""ModelPluginMetadata validation: invalid metadata names the field."""

from __future__ import annotations

from typing import Any

import pytest

from inference_pio import MetadataError, ModelPluginMetadata
from inference_pio.common.metadata import validate_metadata

GOOD: dict[str, Any] = dict(
    name="demo_model",
    version="1.2.0",
    description="d",
    model_id="org/model",
    architecture="Arch",
    modalities=["text", "image"],
    parameter_count=10,
    memory_requirements={"bfloat16": 20, "int4": 6},
    supported_devices=["cpu", "cuda"],
    supported_quantizations=["none", "int4"],
    plugin_api=">=1.0,<2",
    license="MIT",
)


def test_valid_metadata_round_trips() -> None:
    meta = validate_metadata(GOOD, source="test")
    assert meta.supports_api("1.0")
    assert not meta.supports_api("2.0")
    assert meta.memory_gb("bfloat16") == 20 / 1e9
    assert ModelPluginMetadata.model_validate(meta.model_dump()) == meta


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("name", "Bad Name"),
        ("version", "not-a-version"),
        ("plugin_api", "one point oh"),
        ("parameter_count", 0),
        ("modalities", ["smell"]),
        ("memory_requirements", {"bfloat16": -1}),
        ("supported_devices", []),
        ("supported_quantizations", ["none", "int8"]),
        ("licence", "typo"),
    ],
)
def test_invalid_metadata_names_the_field(field: str, value: Any) -> None:
    with pytest.raises(MetadataError, match=f"field '{field}|int8"):
        validate_metadata({**GOOD, field: value}, source="plugin x")


def test_building_metadata_directly_names_every_bad_field_and_normalizes_lists() -> None:
    with pytest.raises(MetadataError, match=r"field 'name'.*field 'parameter_count'") as caught:
        ModelPluginMetadata(**{**GOOD, "name": "X", "parameter_count": -3})
    assert "field 'version'" not in str(caught.value)
    with pytest.raises(TypeError, match="licence"):
        ModelPluginMetadata(**GOOD, licence="typo")
    meta = ModelPluginMetadata(**{**GOOD, "parameter_count": 1e9})
    assert meta.modalities == ("text", "image") and meta.supported_devices == ("cpu", "cuda")
    assert meta.parameter_count == 10**9 and isinstance(meta.parameter_count, int)
    with pytest.raises(MetadataError, match="field 'parameter_count'"):
        ModelPluginMetadata(**{**GOOD, "parameter_count": 2.5})
    with pytest.raises(MetadataError, match="field 'license': required"):
        validate_metadata({k: v for k, v in GOOD.items() if k != "license"}, source="plugin x")
