"""``POST /v1/chat/completions``: messages (with images) and the model's chat template options."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from fastapi import Request
from fastapi.responses import Response

from inference_pio.common.interfaces import StreamChunk, TextModelPluginInterface
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


def start_chat(state: ServerState, request: ChatCompletionRequest, plugin: TextModelPluginInterface) -> StreamFactory:
    options = template_options(plugin, request)
    settings = state.settings
    given = [message.model_dump(exclude_unset=True) for message in request.messages]
    messages = resolve_images(given, settings.allowed_image_hosts, settings.max_body_bytes)

    def make(i: int) -> Iterator[StreamChunk]:
        return plugin.stream_chat(messages, **request.generation_params(seed_offset=i), **options)

    return make


CHAT = Endpoint("chat", "chat", "chatcmpl", ChatCompletionRequest, start_chat)


async def create_chat_completion(state: ServerState, request: Request) -> Response:
    return await serve(state, request, CHAT)
