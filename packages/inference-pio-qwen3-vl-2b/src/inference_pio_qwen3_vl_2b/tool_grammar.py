"""The grammar of forced tool calls (``tool_choice="required"`` or a named function) in Qwen3-VL's format.

Exactly what the published template writes for an assistant's calls in history, so real weights see
their own format: one or more ::

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

joined by a newline. The name is one of the offered functions (or the named one); the arguments
follow the function's JSON schema, embedded with llguidance's ``%json`` and written with the
separators of the template's ``tojson`` (``", "`` and ``": "``), so every output parses with
:class:`~inference_pio_qwen3_vl_2b.parsers.Qwen3VLToolCallParser` into arguments that validate. The
tags are the tokenizer's added tokens (llguidance treats those as special, written ``<tool_call>``
in the grammar), so they are single tokens as in the prompt, and no argument text can contain one.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

JSON_LAYOUT = {"whitespace_flexible": False, "key_separator": ": ", "item_separator": ", "}
"""llguidance's JSON options for the template's ``tojson`` layout (no free whitespace to wander in)."""


def arguments_schema(function: Mapping[str, Any]) -> dict[str, Any]:
    """The schema of one function's arguments, always an object (no ``parameters``: no arguments), as the
    parser takes nothing else."""
    params = function.get("parameters")
    if not isinstance(params, Mapping):
        return {"type": "object", "properties": {}, "additionalProperties": False}
    return {**params, "type": "object"}


def tool_call_grammar(tools: Sequence[Mapping[str, Any]], function: str | None = None, *, parallel: bool = True) -> str:
    """Lark (llguidance's dialect) for one or more calls (exactly one unless ``parallel``) of ``tools`` (OpenAI
    tool objects), or of exactly ``function`` when it is given (a named ``tool_choice``)."""
    functions = [t["function"] for t in tools if function is None or t["function"]["name"] == function]
    if not functions:
        raise ValueError(f"no offered tool is named {function!r}")
    rules = []
    for i, fn in enumerate(functions):
        head = json.dumps(f'"{fn["name"]}", "arguments": ')
        schema = {**arguments_schema(fn), "x-guidance": JSON_LAYOUT}
        rules.append(f"fn_{i}: {head} %json {json.dumps(schema, ensure_ascii=False)}")
    choice = " | ".join(f"fn_{i}" for i in range(len(functions)))
    return "\n".join(
        [
            'start: call ("\\n" call)*' if parallel else "start: call",
            'call: <tool_call> "\\n{\\"name\\": " function "}\\n" </tool_call>',
            f"function: {choice}",
            *rules,
        ]
    )
