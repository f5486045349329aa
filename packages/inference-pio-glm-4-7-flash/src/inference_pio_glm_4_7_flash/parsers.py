"""GLM-4.7's output formats: ``<think>`` reasoning and ``<tool_call>`` calls with ``<arg_key>``/``<arg_value>``.

A call, as the published chat template writes one in history and the model writes one in its answer::

    <tool_call>get_weather<arg_key>city</arg_key><arg_value>Paris</arg_value></tool_call>

The template writes a string argument as it is and any other value as JSON, so a value is read back
as a string when the offered function's schema says ``string``, else as JSON when it parses, else as
the string it is.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

from inference_pio.parsers import DelimitedReasoningParser, TaggedToolCallParser

_PAIR = re.compile(r"\s*<arg_key>(.*?)</arg_key>\s*<arg_value>(.*?)</arg_value>", re.DOTALL)


class Glm47ToolCallParser(TaggedToolCallParser):
    """``<tool_call>name<arg_key>k</arg_key><arg_value>v</arg_value>...</tool_call>``, any number of them."""

    def parse_call(self, body: str) -> tuple[str, Mapping[str, Any]] | None:
        at = body.find("<arg_key>")
        name = (body if at < 0 else body[:at]).strip()
        if not name or "<" in name or ">" in name:
            return None
        arguments: dict[str, Any] = {}
        pos = len(body) if at < 0 else at
        while pos < len(body):
            match = _PAIR.match(body, pos)
            if match is None:
                return None if body[pos:].strip() else (name, arguments)
            key = match.group(1).strip()
            if not key or key in arguments:
                return None
            arguments[key] = self._value(name, key, match.group(2))
            pos = match.end()
        return name, arguments

    def _value(self, function: str, key: str, raw: str) -> Any:
        kind = self.parameter_schema(function, key).get("type")
        if kind == "string" or (isinstance(kind, list) and "string" in kind):
            return raw
        try:
            return json.loads(raw)
        except ValueError:
            return raw


class Glm47ReasoningParser(DelimitedReasoningParser):
    """With thinking on, the generation prompt ends in ``<think>``: the output is reasoning up to
    ``</think>``, then the answer."""

    def __init__(self) -> None:
        super().__init__("<think>", "</think>", inside=True)


def split_reasoning(content: str) -> tuple[str, str] | None:
    """``(reasoning, answer)`` exactly as the published template reads them out of an assistant message's
    content (``reasoning</think>answer``, optionally opened by ``<think>``), or None without ``</think>``."""
    if "</think>" not in content:
        return None
    reasoning = content.split("</think>")[0].rstrip("\n").split("<think>")[-1].lstrip("\n")
    return reasoning, content.split("</think>")[-1].lstrip("\n")
