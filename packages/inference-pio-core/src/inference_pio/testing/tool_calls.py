"""Shared material for model packages' forced tool-call tests: two tools with constrained arguments (enums,
bounds, a nested object), a question, the ``tool_choice`` cases, and the check every forced answer must pass.

Model packages differ in how calls are written (their templates and grammars), not in what a valid call is,
so the tools and the check live here once. ``check_calls`` needs ``jsonschema`` (a test dependency).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

WEATHER: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather forecast for a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "days": {"type": "integer", "minimum": 1, "maximum": 14},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "days"],
            "additionalProperties": False,
        },
    },
}
SEARCH: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "search",
        "parameters": {
            "type": "object",
            "properties": {
                "query": {"type": "string"},
                "filters": {
                    "type": "object",
                    "properties": {"year": {"type": "integer"}, "lang": {"type": "string", "enum": ["en", "fr"]}},
                    "required": ["year"],
                    "additionalProperties": False,
                },
            },
            "required": ["query", "filters"],
            "additionalProperties": False,
        },
    },
}
SCHEMAS: dict[str, Any] = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, SEARCH)}
MESSAGES: list[dict[str, Any]] = [{"role": "user", "content": "What is the weather in Paris?"}]
CHOICES: list[tuple[Any, list[dict[str, Any]]]] = [
    ("required", [WEATHER]),
    ("required", [WEATHER, SEARCH]),
    ({"type": "function", "function": {"name": "search"}}, [WEATHER, SEARCH]),
]
"""``(tool_choice, tools)``: forced among one, forced among two, and one function named."""


def check_calls(calls: Sequence[Any], tools: Sequence[dict[str, Any]], choice: Any) -> None:
    """At least one call; each names an offered function (or the named one), has an OpenAI-style id, and its
    arguments are JSON that validates against that function's schema."""
    import jsonschema

    offered = [t["function"]["name"] for t in tools] if choice == "required" else [choice["function"]["name"]]
    assert calls
    for call in calls:
        assert call.name in offered
        assert call.id.startswith("call_")
        jsonschema.validate(json.loads(call.arguments), SCHEMAS[call.name])
