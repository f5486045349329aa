"""The flow every generating endpoint shares: accept a request, then answer it whole or as server-sent events.

Accepting means: the API key, the body (size, JSON, schema), the model, the endpoint's own preparation
(:class:`Endpoint.start`) and the first choice's stream, so that bad input and a full queue are answered
with a status code before anything is streamed. The endpoint modules (``serving_chat``,
``serving_completion``) supply only what differs.
"""

from __future__ import annotations

import asyncio
import functools
import json
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from inference_pio.common.interfaces import GenerationResult, StreamChunk, TextModelPluginInterface, collect
from inference_pio.server import protocol
from inference_pio.server.errors import translate
from inference_pio.server.parsing import load_json, parse_request
from inference_pio.server.state import ServerState

StreamFactory = Callable[[int], Iterator[StreamChunk]]
"""Starts the stream of choice ``i`` (the index also offsets the seed, so choices differ when sampling)."""
Choice = Callable[[], Iterator[StreamChunk]]


@dataclass(frozen=True)
class Endpoint:
    """What differs between the generating endpoints."""

    label: str  # the metrics label: "chat" or "completions"
    kind: protocol.Kind
    id_prefix: str
    request: type[protocol.GenerationRequest]
    start: Callable[[ServerState, Any, TextModelPluginInterface], StreamFactory]
    """Check what the generic parsing cannot (plugin options, images) and return the stream factory; blocking."""


@dataclass
class Reply:
    """One accepted request being answered."""

    state: ServerState
    endpoint: Endpoint
    model: str
    arrived: float
    logprobs: bool = False  # the request asked for logprobs
    rid: str = field(init=False)
    created: int = field(default_factory=protocol.now)

    def __post_init__(self) -> None:
        self.rid = protocol.new_id(self.endpoint.id_prefix)

    def count(self, status: str) -> None:
        self.state.metrics.requests.labels(self.endpoint.label, self.model, status).inc()

    def count_tokens(self, prompt: int, completion: int) -> None:
        self.state.metrics.prompt_tokens.labels(self.model).inc(prompt)
        self.state.metrics.completion_tokens.labels(self.model).inc(completion)


async def serve(state: ServerState, request: Request, endpoint: Endpoint) -> Response:
    """Answer one request to ``endpoint``."""
    arrived = time.perf_counter()
    model = "-"  # metrics label: only served model names, so clients cannot grow the label set
    try:
        state.authorize(request.headers.get("authorization"))
        parsed = parse_request(endpoint.request, load_json(await request.body()), state.settings.max_n)
        plugin = state.plugin(parsed.model)
        model = parsed.model
        make = await run_in_threadpool(endpoint.start, state, parsed, plugin)
        first = await run_in_threadpool(make, 0)
    except Exception as exc:
        error = translate(exc)
        state.metrics.requests.labels(endpoint.label, model, str(error.status)).inc()
        return error.response()
    # Further choices start when their turn comes, so one request never holds more of a plugin's bounded
    # slots and queue than it is using.
    choices: list[Choice] = [lambda: first, *(functools.partial(make, i) for i in range(1, parsed.n))]
    reply = Reply(state, endpoint, model, arrived, logprobs="logprobs" in parsed.generation_params())
    if parsed.stream:
        include_usage = bool(parsed.stream_options and parsed.stream_options.include_usage)
        return StreamingResponse(
            stream_events(reply, choices, include_usage),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache"},
        )
    return await whole_response(reply, choices)


async def whole_response(reply: Reply, choices: list[Choice]) -> Response:
    """Run every choice to its end and answer with one JSON body."""
    try:
        results = await asyncio.gather(*(run_in_threadpool(_run_to_end, c) for c in choices))
    except Exception as exc:
        error = translate(exc)
        reply.count(str(error.status))
        return error.response()
    reply.state.metrics.ttft.labels(reply.model).observe(time.perf_counter() - reply.arrived)
    body = protocol.completion_body(
        reply.endpoint.kind, reply.rid, reply.created, reply.model, results, logprobs=reply.logprobs
    )
    reply.count_tokens(body["usage"]["prompt_tokens"], body["usage"]["completion_tokens"])
    reply.count("200")
    return JSONResponse(body)


def _run_to_end(choice: Choice) -> GenerationResult:
    return collect(choice())


async def _iterate(stream: Iterator[StreamChunk]) -> AsyncIterator[StreamChunk]:
    """Pull a blocking stream in worker threads; on exit (finished, error or disconnect) close it."""
    sentinel = object()
    try:
        while True:
            item = await run_in_threadpool(next, stream, sentinel)
            if item is sentinel:
                return
            yield item  # type: ignore[misc]
    finally:
        close = getattr(stream, "close", None)
        if close is not None:
            await run_in_threadpool(close)


def _event(data: Any) -> bytes:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n".encode()


def _chunks(reply: Reply, index: int, item: StreamChunk, offsets: list[int]) -> Iterator[dict[str, Any]]:
    """The stream events of one piece: chat sends its deltas, then the finish reason in a chunk of its own
    (an empty delta), as OpenAI does; a completion chunk carries its text and finish reason together."""
    logprobs = item.logprobs if reply.logprobs else None
    if reply.endpoint.kind == "chat":
        delta = protocol.chat_delta(item)
        if delta or logprobs:
            yield protocol.chat_chunk(reply.rid, reply.model, reply.created, index, delta, None, logprobs)
        if item.finish_reason:
            yield protocol.chat_chunk(reply.rid, reply.model, reply.created, index, {}, item.finish_reason)
        return
    if item.text or item.finish_reason or logprobs:
        entries = protocol.completion_logprobs(logprobs, offsets[index]) if logprobs is not None else None
        offsets[index] += sum(len(e.token) for e in logprobs or ())
        yield protocol.completion_chunk(
            reply.rid, reply.model, reply.created, index, item.text, item.finish_reason, entries
        )


async def stream_events(reply: Reply, choices: list[Choice], include_usage: bool) -> AsyncIterator[bytes]:
    """Server-sent events for every choice, merged as they arrive; ends with ``data: [DONE]``.

    An error after the 200 went out becomes an error event for that choice. A client that goes away
    cancels every choice (their streams are closed, which frees the decode slots) and counts as 499.
    """
    kind, model = reply.endpoint.kind, reply.model
    metrics = reply.state.metrics
    queue: asyncio.Queue[tuple[int, StreamChunk | Exception | None]] = asyncio.Queue()

    async def pump(index: int, choice: Choice) -> None:
        try:
            stream = await run_in_threadpool(choice)
            async for item in _iterate(stream):
                await queue.put((index, item))
            await queue.put((index, None))
        except Exception as exc:
            await queue.put((index, exc))

    def event(data: dict[str, Any]) -> bytes:
        return _event({**data, "usage": None} if include_usage else data)

    tasks = [asyncio.create_task(pump(i, c)) for i, c in enumerate(choices)]
    usage: list[tuple[int, int]] = [(0, 0)] * len(choices)
    last_time: list[float | None] = [None] * len(choices)
    offsets = [0] * len(choices)  # characters streamed per choice (completions' text_offset)
    status, remaining, finished = "200", len(choices), False
    try:
        if kind == "chat":
            for i in range(len(choices)):
                first = {"role": "assistant", "content": ""}
                yield event(protocol.chat_chunk(reply.rid, model, reply.created, i, first, None))
        while remaining:
            index, item = await queue.get()
            if item is None or isinstance(item, Exception):
                remaining -= 1
                if isinstance(item, Exception):
                    error = translate(item)
                    status = str(error.status)
                    yield _event(error.body())
                continue
            now = time.perf_counter()
            if item.text or item.reasoning or item.tool_calls:
                previous = last_time[index]
                if previous is None:
                    metrics.ttft.labels(model).observe(now - reply.arrived)
                else:
                    metrics.itl.labels(model).observe(now - previous)
                last_time[index] = now
            for data in _chunks(reply, index, item, offsets):
                yield event(data)
            if item.usage is not None:
                usage[index] = (item.usage.prompt_tokens, item.usage.completion_tokens)
        prompt_tokens, completion_tokens = usage[0][0], sum(u[1] for u in usage)
        reply.count_tokens(prompt_tokens, completion_tokens)
        if include_usage:
            yield _event(
                {
                    "id": reply.rid,
                    "object": "chat.completion.chunk" if kind == "chat" else "text_completion",
                    "created": reply.created,
                    "model": model,
                    "choices": [],
                    "usage": protocol.usage_dict(prompt_tokens, completion_tokens),
                }
            )
        yield b"data: [DONE]\n\n"
        finished = True
    finally:
        if not finished:
            status = "499"  # the client went away
            metrics.cancelled.labels(model).inc()
        reply.count(status)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
