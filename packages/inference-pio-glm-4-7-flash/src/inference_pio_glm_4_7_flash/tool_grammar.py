"""The grammar of forced tool calls (``tool_choice="required"`` or a named function) in GLM-4.7's format.

Exactly what the published template writes for an assistant's calls in history, so real weights see
their own format: ``</think>`` (the reasoning, closed at once), then one or more calls with no
separator::

    <tool_call>get_weather<arg_key>city</arg_key><arg_value>Paris</arg_value><arg_key>days</arg_key><arg_value>3</arg_value></tool_call>

Keys come from the function schema's ``properties``, in their order (required ones always, the
others optionally); a value whose schema says ``string`` is written raw (as the template does and
:class:`~inference_pio_glm_4_7_flash.parsers.Glm47ToolCallParser` reads it: an ``enum``/``const``
becomes its alternatives, anything else any text without ``</arg_value>`` or ``</tool_call>``, within
``minLength``/``maxLength`` and matching ``pattern`` whole), every
other value is JSON following its schema (llguidance's ``%json``, with the template's ``tojson``
separators). A function whose schema lists no properties but allows others takes free key/value pairs
(a repeated key makes the call text, as the parser reads it). The tags are the tokenizer's added tokens
(special to llguidance, written ``<arg_key>`` in the grammar), so no value can contain one.

With thinking on, the generation prompt ends in ``<think>``; the grammar starts with ``</think>``, so
a forced call skips the reasoning (free reasoning could not be brought to an end on a token budget).
With thinking off the prompt already closed it and the grammar starts with the first call.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

JSON_LAYOUT = {"whitespace_flexible": False, "key_separator": ": ", "item_separator": ", "}
"""llguidance's JSON options for the template's ``tojson`` layout (no free whitespace to wander in)."""

_RAW = r"RAW: /(?s:.*)/ & ~/(?s:.*)(<\/arg_value>|<\/tool_call>)(?s:.*)/"
_KEY = r"KEY: /[^<>]+/"


def _literal(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


def _is_string(schema: Mapping[str, Any]) -> bool:
    """The parser's rule: a value is read raw when its schema's type is (or includes) ``string``."""
    kind = schema.get("type")
    return kind == "string" or (isinstance(kind, list) and "string" in kind)


def _value(schema: Mapping[str, Any], name: str) -> tuple[str, list[str]]:
    """The grammar of one argument value (between ``<arg_value>`` and ``</arg_value>``) and the terminal it
    defines (``name``) when a string has a length or a pattern."""
    if not _is_string(schema):
        return "%json " + json.dumps({**schema, "x-guidance": JSON_LAYOUT}, ensure_ascii=False), []
    options = schema.get("enum", [schema["const"]] if "const" in schema else None)
    if isinstance(options, list) and options and all(isinstance(o, str) for o in options):
        return "(" + " | ".join(_literal(o) for o in options) + ")", []
    limits = []
    low, high = schema.get("minLength"), schema.get("maxLength")
    if isinstance(low, int) or isinstance(high, int):
        limits.append(f"/(?s:.){{{low if isinstance(low, int) else 0},{high if isinstance(high, int) else ''}}}/")
    pattern = schema.get("pattern")
    if isinstance(pattern, str):  # matched whole: a subset of what the (unanchored) JSON-schema pattern allows
        limits.append("/" + pattern.removeprefix("^").removesuffix("$").replace("/", "\\/") + "/")
    if not limits:
        return "RAW", []
    return name, [f"{name}: " + " & ".join(["RAW", *limits])]


def tool_call_grammar(
    tools: Sequence[Mapping[str, Any]],
    function: str | None = None,
    *,
    parallel: bool = True,
    close_thinking: bool = True,
) -> str:
    """Lark (llguidance's dialect) for one or more calls (exactly one unless ``parallel``) of ``tools`` (OpenAI
    tool objects), or of exactly ``function`` when it is given (a named ``tool_choice``). ``close_thinking``:
    the generation prompt left ``<think>`` open (thinking on), so the output starts with ``</think>``."""
    functions = [t["function"] for t in tools if function is None or t["function"]["name"] == function]
    if not functions:
        raise ValueError(f"no offered tool is named {function!r}")
    rules: list[str] = []
    for i, fn in enumerate(functions):
        params = fn.get("parameters")
        params = params if isinstance(params, Mapping) else {}
        props = params.get("properties")
        props = props if isinstance(props, Mapping) else {}
        required = params.get("required")
        required = set(required) if isinstance(required, list) else set()
        pairs: list[str] = []
        args: list[str] = []
        for j, (key, schema) in enumerate(props.items()):
            schema = schema if isinstance(schema, Mapping) else {}
            value, terminals = _value(schema, f"STR_{i}_{j}")
            rules += terminals
            args.append(f"arg_{i}_{j}: <arg_key> {_literal(str(key))} </arg_key> <arg_value> {value} </arg_value>")
            pairs.append(f"arg_{i}_{j}" + ("" if key in required else "?"))
        if not props and params.get("additionalProperties", True) is not False:
            pairs.append("(<arg_key> KEY </arg_key> <arg_value> RAW </arg_value>)*")
        rules += [f"fn_{i}: {' '.join([_literal(str(fn['name'])), *pairs])}", *args]
    choice = " | ".join(f"fn_{i}" for i in range(len(functions)))
    head = "</think> " if close_thinking else ""
    return "\n".join(
        [
            f"start: {head}call{'+' if parallel else ''}",
            f"call: <tool_call> ({choice}) </tool_call>",
            *rules,
            _RAW,
            _KEY,
        ]
    )
