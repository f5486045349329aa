"""Validate server responses against OpenAI's own API description (the OpenAPI document of their API).

The document ships with the tests (``tests/fixtures/reference/openai-openapi.yaml.xz``, compressed; set
``INFERENCE_PIO_OPENAI_OPENAPI`` to a plain or ``.xz`` copy to validate against another version). It is
OpenAPI 3.1 (JSON Schema 2020-12) but still carries OpenAPI 3.0's ``nullable: true`` in places, which JSON
Schema ignores; those schemas are rewritten to also accept ``null`` before validation. ``$ref``s resolve
inside the document with ``referencing``.

One schema is added: ``CreateCompletionStreamResponse``. The document says streamed completions share
``CreateCompletionResponse``, whose ``finish_reason`` is a string, yet OpenAI's API (and every compatible
server) streams ``finish_reason: null`` until the last chunk; the added schema is that one with a nullable
``finish_reason``, nothing else changed.
"""

from __future__ import annotations

import copy
import functools
import json
import lzma
import os
from pathlib import Path
from typing import Any

import yaml
from jsonschema import Draft202012Validator
from referencing import Registry
from referencing.jsonschema import DRAFT202012

ROOT = Path(__file__).resolve().parents[1]
DOCUMENT = Path(
    os.environ.get("INFERENCE_PIO_OPENAI_OPENAPI", ROOT / "tests" / "fixtures" / "reference" / "openai-openapi.yaml.xz")
)
URI = "urn:openai-openapi"


def _nullable(node: Any) -> Any:
    """OpenAPI 3.0's ``nullable: true`` as JSON Schema: ``anyOf: [the schema, {type: null}]``, everywhere."""
    if isinstance(node, list):
        return [_nullable(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {key: _nullable(value) for key, value in node.items()}
    if out.pop("nullable", False) is True:
        return {"anyOf": [out, {"type": "null"}]}
    return out


@functools.cache
def _registry() -> Registry:
    opener = lzma.open if DOCUMENT.suffix == ".xz" else open
    with opener(DOCUMENT, "rt", encoding="utf-8") as f:  # a missing document is an error, not a skip
        document = _nullable(yaml.load(f, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)))
    schemas = document["components"]["schemas"]
    stream = copy.deepcopy(schemas["CreateCompletionResponse"])
    finish = stream["properties"]["choices"]["items"]["properties"]
    finish["finish_reason"] = {"anyOf": [finish["finish_reason"], {"type": "null"}]}
    schemas["CreateCompletionStreamResponse"] = stream
    registry: Registry = Registry().with_resource(URI, DRAFT202012.create_resource(document))
    return registry


@functools.cache
def _validator(schema: str) -> Draft202012Validator:
    return Draft202012Validator({"$ref": f"{URI}#/components/schemas/{schema}"}, registry=_registry())


def validate(schema: str, instance: Any) -> None:
    """Fail with every violation of ``components.schemas.<schema>`` by ``instance`` (a decoded JSON body)."""
    errors = sorted(_validator(schema).iter_errors(instance), key=lambda e: list(e.absolute_path))
    if errors:
        lines = [f"{'/'.join(map(str, e.absolute_path)) or '(root)'}: {e.message[:300]}" for e in errors[:10]]
        raise AssertionError(f"not a valid {schema}:\n" + "\n".join(lines) + f"\nin {instance!r:.2000}")


def validate_stream(schema: str, events: list[Any]) -> None:
    """Each event of a stream (``[DONE]`` excluded) against ``schema``; an error event against ``ErrorResponse``."""
    for event in events:
        validate("ErrorResponse" if "error" in event else schema, event)


class Checked:
    """Validates each generation response against the OpenAPI document; counts what it checked."""

    def __init__(self) -> None:
        self.bodies = 0
        self.events = 0

    def __call__(self, response: Any) -> None:  # the openai client's httpx Response
        path = response.request.url.path
        if not path.endswith(("/chat/completions", "/completions")):
            return
        chat = path.endswith("/chat/completions")
        response.read()  # the client then reads the buffered body, streamed or not
        if response.headers.get("content-type", "").startswith("text/event-stream"):
            lines = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
            assert lines[-1] == "[DONE]", lines[-3:]
            events = [json.loads(line) for line in lines[:-1]]
            validate_stream("CreateChatCompletionStreamResponse" if chat else "CreateCompletionStreamResponse", events)
            self.events += len(events)
        elif response.status_code == 200:
            validate("CreateChatCompletionResponse" if chat else "CreateCompletionResponse", response.json())
            self.bodies += 1
        else:
            validate("ErrorResponse", response.json())
            self.bodies += 1
