"""OpenAI-style chat messages and tools: validation, and template rendering that keeps client text inert.

Every string that comes from the client (message text, reasoning, tool calls, tool definitions) is
"defused" before the chat template runs: a marker is put inside each occurrence of an added-token
string (``<|im_start|>``, ``<|user|>``, ``</think>``...). The template still sees the real text, so
whatever it does with content (strip it, test it, serialize it) works as published; afterwards the
prompt is cut at the markers, so those strings tokenize as plain text and can never act as role,
control or image tokens, while everything the template wrote tokenizes exactly as transformers'
``apply_chat_template(tokenize=True)`` would.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from inference_pio.errors import InvalidRequestError

ROLES = ("system", "developer", "user", "assistant", "tool")
MAX_MESSAGES = 1024
MAX_TOOLS = 128
_FUNCTION_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


@dataclass
class ChatMessage:
    role: str  # "developer" arrives as "system" (the templates know system)
    texts: list[str] = field(default_factory=list)
    images: list[Any] = field(default_factory=list)
    order: list[tuple[str, int]] = field(default_factory=list)  # ("text"|"image", index) in content order
    reasoning: str | None = None  # assistant: reasoning_content
    tool_calls: list[dict[str, Any]] = field(default_factory=list)  # assistant: arguments parsed into objects
    tool_call_id: str | None = None  # tool: the call this result answers
    name: str | None = None


def _image_source(part: Mapping[str, Any], where: str) -> Any:
    if part.get("type") == "image_url":
        url = part.get("image_url")
        if isinstance(url, Mapping):
            url = url.get("url")
        if not isinstance(url, str) or not url:
            raise InvalidRequestError(
                f"{where}: image_url part needs image_url.url as a non-empty string", param=f"{where}.image_url"
            )
        return url
    source = part.get("image", part.get("url", part.get("path")))
    if source is None:
        raise InvalidRequestError(
            f"{where}: image part needs 'image' (path, PIL image, bytes or data: URL)", param=where
        )
    return source


def _json_value(value: Any, where: str) -> Any:
    """A plain JSON copy of ``value`` (dicts, lists, strings, numbers), or ``InvalidRequestError``."""
    try:
        return json.loads(json.dumps(value))
    except (TypeError, ValueError) as exc:
        raise InvalidRequestError(f"{where} must be JSON: {exc}", where) from exc


def _tool_calls(value: Any, where: str) -> list[dict[str, Any]]:
    """An assistant message's ``tool_calls``, with each call's ``arguments`` parsed into an object (the
    form chat templates read)."""
    if value is None:
        return []
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise InvalidRequestError(f"{where} must be a list of tool calls", where)
    calls: list[dict[str, Any]] = []
    for j, call in enumerate(value):
        cwhere = f"{where}[{j}]"
        if not isinstance(call, Mapping) or call.get("type", "function") != "function":
            raise InvalidRequestError(f"{cwhere} must be {{'type': 'function', 'function': {{...}}}}", cwhere)
        function = call.get("function")
        name = function.get("name") if isinstance(function, Mapping) else None
        if not isinstance(name, str) or not name:
            raise InvalidRequestError(f"{cwhere}.function.name must be a non-empty string", f"{cwhere}.function.name")
        assert isinstance(function, Mapping)
        arguments = function.get("arguments")
        awhere = f"{cwhere}.function.arguments"
        if arguments is None or arguments == "":
            arguments = {}
        elif isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except ValueError as exc:
                raise InvalidRequestError(f"{awhere} is not valid JSON: {exc}", awhere) from exc
        if not isinstance(arguments, Mapping):
            raise InvalidRequestError(f"{awhere} must be a JSON object", awhere)
        entry: dict[str, Any] = {
            "type": "function",
            "function": {"name": name, "arguments": _json_value(arguments, awhere)},
        }
        if call.get("id") is not None:
            if not isinstance(call["id"], str):
                raise InvalidRequestError(f"{cwhere}.id must be a string", f"{cwhere}.id")
            entry = {"id": call["id"], **entry}
        calls.append(entry)
    return calls


def _optional_str(msg: Mapping[str, Any], key: str, where: str) -> str | None:
    value = msg.get(key)
    if value is not None and not isinstance(value, str):
        raise InvalidRequestError(f"{where}.{key} must be a string", f"{where}.{key}")
    return value


def normalize_messages(messages: Any, *, allow_images: bool, max_images: int) -> list[ChatMessage]:
    """Validate OpenAI-style messages into :class:`ChatMessage` objects, or raise ``InvalidRequestError``.

    Accepted beside role and content: ``name``; ``tool_calls`` and ``reasoning_content`` on assistant
    messages; ``tool_call_id`` on tool messages. ``developer`` is OpenAI's newer name for ``system``.
    """
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise InvalidRequestError("messages must be a list of {'role': ..., 'content': ...} objects", "messages")
    if not messages:
        raise InvalidRequestError("messages is empty; send at least one user message", "messages")
    if len(messages) > MAX_MESSAGES:
        raise InvalidRequestError(f"{len(messages)} messages is more than the limit of {MAX_MESSAGES}", "messages")
    out: list[ChatMessage] = []
    n_images = 0
    for i, msg in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(msg, Mapping):
            raise InvalidRequestError(f"{where} must be an object with role and content", where)
        role = msg.get("role")
        if role not in ROLES:
            raise InvalidRequestError(f"{where}.role must be one of {', '.join(ROLES)}, got {role!r}", f"{where}.role")
        content = msg.get("content")
        cm = ChatMessage("system" if role == "developer" else str(role))
        cm.name = _optional_str(msg, "name", where)
        if role == "assistant":
            cm.reasoning = _optional_str(msg, "reasoning_content", where)
            cm.tool_calls = _tool_calls(msg.get("tool_calls"), f"{where}.tool_calls")
        elif msg.get("tool_calls"):
            raise InvalidRequestError(f"{where}: only assistant messages carry tool_calls", f"{where}.tool_calls")
        if role == "tool":
            cm.tool_call_id = _optional_str(msg, "tool_call_id", where)
        if content is None:
            content = ""
        if isinstance(content, str):
            cm.texts.append(content)
            cm.order.append(("text", 0))
        elif isinstance(content, Sequence):
            for j, part in enumerate(content):
                pwhere = f"{where}.content[{j}]"
                if isinstance(part, str):
                    part = {"type": "text", "text": part}
                if not isinstance(part, Mapping):
                    raise InvalidRequestError(f"{pwhere} must be an object with a type", pwhere)
                kind = part.get("type")
                if kind == "text":
                    text = part.get("text")
                    if not isinstance(text, str):
                        raise InvalidRequestError(f"{pwhere}.text must be a string", f"{pwhere}.text")
                    cm.order.append(("text", len(cm.texts)))
                    cm.texts.append(text)
                elif kind in ("image_url", "image"):
                    if not allow_images:
                        raise InvalidRequestError(
                            f"{pwhere}: this model reads text only; remove the image part", pwhere
                        )
                    if role != "user":
                        raise InvalidRequestError(f"{pwhere}: images are accepted in user messages only", pwhere)
                    n_images += 1
                    if n_images > max_images:
                        raise InvalidRequestError(
                            f"more than {max_images} images in one request (max_images)", "messages"
                        )
                    cm.order.append(("image", len(cm.images)))
                    cm.images.append(_image_source(part, pwhere))
                else:
                    raise InvalidRequestError(
                        f"{pwhere}.type must be 'text', 'image_url' or 'image', got {kind!r}", f"{pwhere}.type"
                    )
        else:
            raise InvalidRequestError(f"{where}.content must be a string or a list of parts", f"{where}.content")
        out.append(cm)
    if not any(t.strip() for m in out for t in m.texts) and not any(m.images or m.tool_calls for m in out):
        raise InvalidRequestError("the prompt is empty: every message has empty content", "messages")
    return out


@dataclass(frozen=True)
class ToolRequest:
    """The validated ``tools`` and ``tool_choice`` of a chat request that offers tools."""

    tools: tuple[dict[str, Any], ...]  # OpenAI tool objects, as plain JSON values
    choice: str  # "auto" | "required" | "function" (one named function: ``function``)
    function: str | None = None

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(t["function"]["name"] for t in self.tools)


def normalize_tools(tools: Any, tool_choice: Any) -> ToolRequest | None:
    """Validate OpenAI ``tools`` and ``tool_choice``; None when no tools are in play (none offered, or
    ``tool_choice="none"``: then the template gets no tools and the output is not parsed for calls)."""
    if tool_choice is None:
        tool_choice = "auto"
    if tools is None:
        tools = []
    if isinstance(tools, (str, bytes, Mapping)) or not isinstance(tools, Sequence):
        raise InvalidRequestError("tools must be a list of {'type': 'function', 'function': {...}} objects", "tools")
    if len(tools) > MAX_TOOLS:
        raise InvalidRequestError(f"{len(tools)} tools is more than the limit of {MAX_TOOLS}", "tools")
    checked: list[dict[str, Any]] = []
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(tool, Mapping) or tool.get("type") != "function":
            raise InvalidRequestError(f"{where} must be {{'type': 'function', 'function': {{...}}}}", f"{where}.type")
        function = tool.get("function")
        name = function.get("name") if isinstance(function, Mapping) else None
        if not isinstance(name, str) or not _FUNCTION_NAME.fullmatch(name):
            raise InvalidRequestError(
                f"{where}.function.name must be 1 to 64 letters, digits, '_' or '-', got {name!r}",
                f"{where}.function.name",
            )
        assert isinstance(function, Mapping)
        if not isinstance(function.get("parameters", {}), Mapping):
            raise InvalidRequestError(f"{where}.function.parameters must be a JSON schema object", where)
        if any(t["function"]["name"] == name for t in checked):
            raise InvalidRequestError(f"{where}: two tools are named {name!r}", f"{where}.function.name")
        checked.append(_json_value(dict(tool), where))
    named: str | None = None
    if isinstance(tool_choice, Mapping):
        function = tool_choice.get("function")
        named = function.get("name") if isinstance(function, Mapping) else None
        if tool_choice.get("type") != "function" or not isinstance(named, str):
            raise InvalidRequestError(
                "tool_choice must be 'none', 'auto', 'required' or {'type': 'function', 'function': {'name': ...}}",
                "tool_choice",
            )
        choice = "function"
    elif tool_choice in ("none", "auto", "required"):
        choice = str(tool_choice)
    else:
        raise InvalidRequestError(
            f"tool_choice must be 'none', 'auto', 'required' or a named function, got {tool_choice!r}", "tool_choice"
        )
    if choice == "none" or (not checked and choice == "auto"):
        return None
    if not checked:
        raise InvalidRequestError(f"tool_choice {choice!r} needs tools; send the functions in 'tools'", "tool_choice")
    if named is not None and named not in (t["function"]["name"] for t in checked):
        raise InvalidRequestError(f"tool_choice names {named!r}, which is not among the tools", "tool_choice")
    return ToolRequest(tuple(checked), choice, named)


class _Defuser:
    """Puts ``mark`` after the first character of every occurrence of an added-token string."""

    def __init__(self, added_tokens: Iterable[str], mark: str) -> None:
        tokens = sorted({t for t in added_tokens if len(t) > 1}, key=len, reverse=True)
        self.mark = mark
        self.starts: re.Pattern[str] | None = None
        if tokens:  # the first-character class makes most positions fail fast (5x on long prompts)
            first = "".join(sorted({re.escape(t[0]) for t in tokens}))
            self.starts = re.compile(f"(?=[{first}])(?=" + "|".join(re.escape(t) for t in tokens) + ")")

    def text(self, text: str) -> str:
        if self.starts is None:
            return text
        cuts = sorted({m.start() + 1 for m in self.starts.finditer(text)})
        if not cuts:
            return text
        pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
        return self.mark.join(pieces)

    def value(self, value: Any) -> Any:
        """``value`` with every string in it (keys too) defused."""
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, Mapping):
            return {self.text(str(k)): self.value(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [self.value(v) for v in value]
        return value


def render_protected(
    messages: Sequence[ChatMessage],
    render: Callable[[list[dict[str, Any]], list[dict[str, Any]] | None], str],
    *,
    added_tokens: Iterable[str],
    tools: Sequence[Mapping[str, Any]] = (),
    split_reasoning: Callable[[str], tuple[str, str] | None] | None = None,
) -> list[str]:
    """Render ``messages`` (and ``tools``) with the chat template; return the prompt as pieces to tokenize
    one by one with added tokens recognised, and concatenate.

    ``render(messages, tools)`` gets template-ready messages (``content`` a string, or a list of
    text/image parts when the message has images; assistant ``reasoning_content`` and ``tool_calls``
    with object arguments; tool ``tool_call_id``) and returns the rendered prompt. Client strings in
    them are defused (see the module docstring); the pieces are the prompt cut at those places.

    ``split_reasoning(content)`` is how the model's template reads reasoning out of an assistant
    message's content (``(reasoning, answer)``, or None for none); it is applied here, before
    defusing, to messages without ``reasoning_content``, since a defused ``</think>`` no longer reads
    as one.
    """
    mark = f"\U000f0000{secrets.token_hex(8)}\U000f0001"
    defuse = _Defuser(added_tokens, mark)
    template_messages: list[dict[str, Any]] = []
    for m in messages:
        entry: dict[str, Any] = {"role": m.role}
        text = "".join(m.texts)
        reasoning = m.reasoning
        if m.role == "assistant" and reasoning is None and split_reasoning is not None:
            split = split_reasoning(text)
            if split is not None:
                reasoning, text = split
        if m.images:
            entry["content"] = [
                {"type": "text", "text": defuse.text(m.texts[idx])} if kind == "text" else {"type": "image"}
                for kind, idx in m.order
            ]
        else:
            entry["content"] = defuse.text(text)
        if reasoning is not None:
            entry["reasoning_content"] = defuse.text(reasoning)
        if m.tool_calls:
            entry["tool_calls"] = defuse.value(m.tool_calls)
        if m.tool_call_id is not None:
            entry["tool_call_id"] = defuse.text(m.tool_call_id)
        if m.name is not None:
            entry["name"] = defuse.text(m.name)
        template_messages.append(entry)
    rendered = render(template_messages, [defuse.value(t) for t in tools] or None)
    return rendered.split(mark)
