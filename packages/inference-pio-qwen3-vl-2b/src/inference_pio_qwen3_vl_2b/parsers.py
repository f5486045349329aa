"""Qwen3-VL's tool-call format: a JSON object inside ``<tool_call>`` tags, as its published template asks.

::

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from inference_pio.parsers import TaggedToolCallParser


class Qwen3VLToolCallParser(TaggedToolCallParser):
    """``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``, any number of them."""

    def parse_call(self, body: str) -> tuple[str, Mapping[str, Any]] | None:
        call = json.loads(body)
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            return None
        arguments = call.get("arguments", {})
        if isinstance(arguments, str):  # some replies double-encode the arguments
            arguments = json.loads(arguments)
        return (call["name"], arguments) if isinstance(arguments, dict) else None
