"""``POST /v1/completions``: continue one prompt."""

from __future__ import annotations

from collections.abc import Iterator

from fastapi import Request
from fastapi.responses import Response

from inference_pio.common.interfaces import StreamChunk, TextModelPluginInterface
from inference_pio.server.protocol import CompletionRequest
from inference_pio.server.serving import Endpoint, StreamFactory, serve
from inference_pio.server.state import ServerState


def start_completion(state: ServerState, request: CompletionRequest, plugin: TextModelPluginInterface) -> StreamFactory:
    def make(i: int) -> Iterator[StreamChunk]:
        return plugin.stream_text(request.text, **request.generation_params(seed_offset=i))

    return make


COMPLETION = Endpoint("completions", "completion", "cmpl", CompletionRequest, start_completion)


async def create_completion(state: ServerState, request: Request) -> Response:
    return await serve(state, request, COMPLETION)
