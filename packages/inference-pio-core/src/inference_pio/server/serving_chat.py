"""``POST /v1/chat/completions``: messages (with images) and the model's chat template options."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from typing import Any

from fastapi import Request
from fastapi.responses import Response

from inference_pio.common.interfaces import StreamChunk, TextModelPluginInterface
from inference_pio.errors import InvalidRequestError
from inference_pio.server.images import resolve_images
from inference_pio.server.protocol import ChatCompletionRequest
from inference_pio.server.serving import Endpoint, StreamFactory, serve
from inference_pio.server.state import ServerState


def template_options(plugin: TextModelPluginInterface, request: ChatCompletionRequest) -> dict[str, Any]:
    """``chat_template_kwargs`` (and the ``enable_thinking`` shorthand) checked against the plugin's ``Options``.

    Only keys the request set are passed on, so the plugin's declared defaults apply to the rest; an unknown
    key or a wrong type is a 400 naming it (``chat_template_kwargs.<key>``, or ``enable_thinking``).
    """
    options: dict[str, Any] = {}
    if request.chat_template_kwargs:
        parsed = plugin.Options.parse(request.chat_template_kwargs, "chat_template_kwargs.")
        options.update(parsed.model_dump(exclude_unset=True))
    if request.enable_thinking is not None:
        options.update(plugin.Options.parse({"enable_thinking": request.enable_thinking}).model_dump())
    return options


def structured_output(request: ChatCompletionRequest) -> dict[str, Any]:
    """The ``grammar`` generation parameter for ``response_format`` json_object / json_schema (none for text).

    Forced tool calls (``tool_choice`` "required" or a named function) are a grammar of their own, which the
    plugin builds; one answer cannot follow both, so asking for both is a 400.
    """
    grammar = request.response_format.grammar() if request.response_format is not None else None
    if grammar is None:
        return {}
    if request.tools and request.tool_choice not in (None, "auto", "none"):
        raise InvalidRequestError(
            "response_format json_object/json_schema cannot be combined with a forced tool_choice "
            f"({request.tool_choice!r}); send tool_choice 'auto' or 'none', or response_format 'text'",
            "response_format",
        )
    return {"grammar": grammar}


class OneCallOnly(Iterator[StreamChunk]):
    """``parallel_tool_calls: false``: pass the first tool call (index 0) on, drop the pieces of any other.
    A class, not a generator, so ``close()`` reaches the plugin's stream even before iteration starts."""

    def __init__(self, stream: Iterator[StreamChunk]) -> None:
        self._stream = stream

    def __next__(self) -> StreamChunk:
        item = next(self._stream)
        if any(d.index > 0 for d in item.tool_calls):
            item = replace(item, tool_calls=tuple(d for d in item.tool_calls if d.index == 0))
        return item

    def close(self) -> None:
        close = getattr(self._stream, "close", None)
        if close is not None:
            close()


def start_chat(state: ServerState, request: ChatCompletionRequest, plugin: TextModelPluginInterface) -> StreamFactory:
    options = template_options(plugin, request)
    constraint = structured_output(request)
    if constraint and "enable_thinking" in plugin.Options.model_fields:
        # The grammar holds from the first new token, so reasoning would swallow the JSON: thinking is off
        # for structured outputs unless asked for, and asking for both is a 400.
        if options.get("enable_thinking"):
            raise InvalidRequestError(
                "response_format json_object/json_schema needs thinking off (the grammar applies from the first "
                "token); drop enable_thinking or set it to false",
                "chat_template_kwargs.enable_thinking",
            )
        options["enable_thinking"] = False
    settings = state.settings
    given = [message.model_dump(exclude_unset=True) for message in request.messages]
    messages = resolve_images(given, settings.allowed_image_hosts, settings.max_body_bytes)

    def make(i: int) -> Iterator[StreamChunk]:
        stream = plugin.stream_chat(messages, **request.generation_params(seed_offset=i), **constraint, **options)
        return OneCallOnly(stream) if request.parallel_tool_calls is False else stream

    return make


CHAT = Endpoint("chat", "chat", "chatcmpl", ChatCompletionRequest, start_chat)


async def create_chat_completion(state: ServerState, request: Request) -> Response:
    return await serve(state, request, CHAT)
