"""The FastAPI application: OpenAI-compatible endpoints over activated plugins."""

from __future__ import annotations

import asyncio
import functools
import hmac
import json
import logging
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from inference_pio.common.interfaces import GenerationResult, StreamChunk, TextModelPluginInterface, collect
from inference_pio.errors import ContextLengthError, InferencePIOError, InvalidRequestError
from inference_pio.plugin_system.manager import PluginManager
from inference_pio.server import protocol
from inference_pio.server.metrics import Metrics

log = logging.getLogger("inference_pio.server")


@dataclass
class ServedModel:
    name: str
    config: dict[str, Any] = field(default_factory=dict)


@dataclass
class ServerSettings:
    models: list[ServedModel]
    api_key: str | None = None
    allowed_image_hosts: frozenset[str] = frozenset()
    max_body_bytes: int = 32 * 1024 * 1024
    max_n: int = 4
    max_messages: int = 256
    default_max_tokens: int = 256


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.type, self.param, self.code, self.headers = status, type_, param, code, headers

    def response(self) -> JSONResponse:
        body = protocol.error_body(str(self), type_=self.type, param=self.param, code=self.code)
        return JSONResponse(body, status_code=self.status, headers=self.headers)


class _BodyTooLarge(Exception):
    pass


class BodyLimit:
    """Refuse request bodies over ``limit`` bytes with 413 (with or without Content-Length), and
    header blocks over ``header_limit`` bytes with 431."""

    def __init__(self, app: ASGIApp, limit: int, header_limit: int = 64 * 1024) -> None:
        self.app, self.limit, self.header_limit = app, limit, header_limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        header_bytes = sum(len(k) + len(v) for k, v in scope["headers"])
        if header_bytes > self.header_limit:
            await self._reject(
                send,
                431,
                f"request headers total {header_bytes} bytes, over the limit of {self.header_limit}",
                "headers_too_large",
            )
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            await self._reject(send, 413, f"request body exceeds the limit of {self.limit} bytes", "request_too_large")
            return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise _BodyTooLarge
            return message

        try:
            await self.app(scope, limited, send)
        except _BodyTooLarge:
            await self._reject(send, 413, f"request body exceeds the limit of {self.limit} bytes", "request_too_large")

    async def _reject(self, send: Send, status: int, message: str, code: str) -> None:
        body = json.dumps(protocol.error_body(message, code=code)).encode()
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": body})


class ServerState:
    def __init__(self, settings: ServerSettings, manager: PluginManager) -> None:
        self.settings = settings
        self.manager = manager
        self.metrics = Metrics()
        self.status = "loading"
        self.error: str | None = None
        self.plugins: dict[str, TextModelPluginInterface] = {}
        self.created = protocol.now()

    def load(self) -> None:
        try:
            for model in self.settings.models:
                log.info("loading %s", model.name)
                plugin = self.manager.activate_plugin(model.name, **model.config)
                if not isinstance(plugin, TextModelPluginInterface):
                    raise InferencePIOError(f"plugin {model.name!r} does not generate text and cannot be served")
                scheduler = getattr(plugin, "scheduler", None)
                if scheduler is not None:
                    self.metrics.watch_scheduler(model.name, scheduler)
                self.plugins[model.name] = plugin
                log.info("%s ready: %s", model.name, plugin.memory_plan.describe() if plugin.memory_plan else "")
            self.status = "ready"
        except Exception as exc:
            log.exception("loading failed")
            self.status, self.error = "failed", f"{type(exc).__name__}: {exc}"

    def shutdown(self) -> None:
        self.manager.shutdown()

    def plugin(self, name: str) -> TextModelPluginInterface:
        if self.status != "ready":
            raise APIError(
                503,
                f"the server is {self.status}" + (f": {self.error}" if self.error else ""),
                type_="server_error",
                code="not_ready",
                headers={"Retry-After": "5"},
            )
        if name not in self.plugins:
            raise APIError(
                404,
                f"the model {name!r} does not exist; this server serves {', '.join(sorted(self.plugins))}",
                param="model",
                code="model_not_found",
            )
        return self.plugins[name]


def _translate(exc: Exception) -> APIError:
    from inference_pio.errors import QueueFullError, SchedulerStoppedError

    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, ContextLengthError):
        return APIError(400, str(exc), param=exc.param, code="context_length_exceeded")
    if isinstance(exc, InvalidRequestError):
        return APIError(400, str(exc), param=exc.param)
    if isinstance(exc, QueueFullError):
        return APIError(
            429,
            str(exc),
            type_="rate_limit_error",
            code="queue_full",
            headers={"Retry-After": str(max(1, round(exc.retry_after)))},
        )
    if isinstance(exc, SchedulerStoppedError):
        return APIError(503, str(exc), type_="server_error", code="shutting_down")
    log.exception("internal error", exc_info=exc)
    return APIError(500, f"internal error: {type(exc).__name__}: {exc}", type_="server_error")


async def _json_body(request: Request) -> Any:
    raw = await request.body()
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise APIError(400, f"the request body is not valid JSON: {exc}", code="invalid_json") from exc


def _parse(model: type[protocol._Common], body: Any, settings: ServerSettings) -> Any:
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    try:
        parsed = model.model_validate(body)
    except ValidationError as exc:
        err = exc.errors()[0]
        param = ".".join(str(p) for p in err["loc"]) or None
        raise APIError(400, f"invalid value for '{param}': {err['msg']}", param=param) from exc
    if parsed.n > settings.max_n:
        raise APIError(400, f"n={parsed.n} is above this server's limit of {settings.max_n}", param="n")
    problem = parsed.unsupported()
    if problem:
        raise APIError(400, problem[1], param=problem[0], code="unsupported_parameter")
    return parsed


def _fetch_image(url: str, settings: ServerSettings, where: str) -> bytes:
    host = urllib.parse.urlsplit(url).hostname or ""
    if host not in settings.allowed_image_hosts:
        allowed = ", ".join(sorted(settings.allowed_image_hosts)) or "none"
        raise APIError(
            400,
            f"{where}: image URLs from {host or url!r} are not allowed (allowed hosts: {allowed}); "
            "send the image as a data: URL",
            param=where,
            code="image_url_not_allowed",
        )
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:  # the host is allow-listed
            data: bytes = resp.read(settings.max_body_bytes + 1)
    except OSError as exc:
        raise APIError(400, f"{where}: could not fetch {url}: {exc}", param=where) from exc
    if len(data) > settings.max_body_bytes:
        raise APIError(400, f"{where}: the image at {url} is larger than {settings.max_body_bytes} bytes", param=where)
    return data


def _resolve_images(messages: list[dict[str, Any]], settings: ServerSettings) -> list[dict[str, Any]]:
    if len(messages) > settings.max_messages:
        raise APIError(
            400, f"{len(messages)} messages is above this server's limit of {settings.max_messages}", param="messages"
        )
    out = []
    for i, message in enumerate(messages):
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list):
            parts = []
            for j, part in enumerate(content):
                if isinstance(part, dict) and part.get("type") == "image_url":
                    url = part.get("image_url")
                    url = url.get("url") if isinstance(url, dict) else url
                    if isinstance(url, str) and url.startswith(("http://", "https://")):
                        data = _fetch_image(url, settings, f"messages[{i}].content[{j}]")
                        part = {"type": "image", "image": data}
                parts.append(part)
            message = {**message, "content": parts}
        out.append(message)
    return out


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


def create_app(
    settings: ServerSettings, manager: PluginManager | None = None, *, load_in_background: bool = True
) -> FastAPI:
    """Build the app; models load at startup (in a thread, so /health answers 'loading' meanwhile)."""
    state = ServerState(settings, manager or PluginManager())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if load_in_background:
            threading.Thread(target=state.load, name="inference-pio-loader", daemon=True).start()
        else:
            state.load()
        yield
        await run_in_threadpool(state.shutdown)

    app = FastAPI(title="inference-pio", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.server = state
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> Response:
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return APIError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", code=code).response()

    @app.exception_handler(_BodyTooLarge)
    async def _too_large(request: Request, exc: _BodyTooLarge) -> Response:
        return APIError(
            413, f"request body exceeds the limit of {settings.max_body_bytes} bytes", code="request_too_large"
        ).response()

    def authorize(request: Request) -> None:
        if settings.api_key is None:
            return
        header = request.headers.get("authorization", "")
        token = header[7:] if header.lower().startswith("bearer ") else ""
        if not hmac.compare_digest(token.encode(), settings.api_key.encode()):
            raise APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'", code="invalid_api_key")

    @app.get("/health")
    async def health() -> Response:
        status = {"loading": 503, "ready": 200, "failed": 500}[state.status]
        return JSONResponse(
            {"status": state.status, "error": state.error, "models": sorted(state.plugins)}, status_code=status
        )

    @app.get("/metrics")
    async def metrics() -> Response:
        return PlainTextResponse(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        authorize(request)
        data = [
            {"id": name, "object": "model", "created": state.created, "owned_by": "inference-pio"}
            for name in sorted(state.plugins)
        ]
        return JSONResponse({"object": "list", "data": data})

    @app.get("/v1/models/{model_id}")
    async def model(model_id: str, request: Request) -> Response:
        authorize(request)
        state.plugin(model_id)  # 404 (or 503 while loading) with an OpenAI error body
        return JSONResponse({"id": model_id, "object": "model", "created": state.created, "owned_by": "inference-pio"})

    async def generate(request: Request, kind: protocol.Kind) -> Response:
        arrived = time.perf_counter()
        endpoint = "chat" if kind == "chat" else "completions"
        model_label = "-"

        def failed(exc: Exception) -> Response:
            error = _translate(exc)
            state.metrics.requests.labels(endpoint, model_label, str(error.status)).inc()
            return error.response()

        try:
            authorize(request)
            body = await _json_body(request)
            parsed = _parse(
                protocol.ChatCompletionRequest if kind == "chat" else protocol.CompletionRequest, body, settings
            )
            plugin = state.plugin(parsed.model)
            model_label = parsed.model
            make: Callable[[int], Iterator[StreamChunk]]
            if kind == "chat":
                messages = await run_in_threadpool(_resolve_images, parsed.messages, settings)
                extra = dict(parsed.chat_template_kwargs or {})
                if parsed.enable_thinking is not None:
                    extra["enable_thinking"] = parsed.enable_thinking

                def make(i: int) -> Iterator[StreamChunk]:
                    return plugin.stream_chat(messages, **parsed.generation_params(seed_offset=i), **extra)
            else:

                def make(i: int) -> Iterator[StreamChunk]:
                    return plugin.stream_text(parsed.text, **parsed.generation_params(seed_offset=i))

            first = await run_in_threadpool(make, 0)  # bad input and a full queue answer before any streaming
        except Exception as exc:
            return failed(exc)
        # Further choices start when they run: an isolated plugin serves one stream at a time, so creating
        # them all up front would wait on the first forever.
        factories: list[Callable[[], Iterator[StreamChunk]]] = [lambda: first]
        factories += [functools.partial(make, i) for i in range(1, parsed.n)]
        prefix = "chatcmpl" if kind == "chat" else "cmpl"
        rid, created = protocol.new_id(prefix), protocol.now()
        if parsed.stream:
            include_usage = bool(parsed.stream_options and parsed.stream_options.include_usage)
            return StreamingResponse(
                _sse(state, kind, rid, created, parsed.model, factories, include_usage, arrived, endpoint),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache"},
            )
        try:
            results = await asyncio.gather(*(run_in_threadpool(_run_to_end, f) for f in factories))
        except Exception as exc:
            return failed(exc)
        state.metrics.ttft.labels(parsed.model).observe(time.perf_counter() - arrived)
        prompt_tokens = results[0].usage.prompt_tokens
        completion_tokens = sum(r.usage.completion_tokens for r in results)
        _count_tokens(state, parsed.model, prompt_tokens, completion_tokens)
        state.metrics.requests.labels(endpoint, parsed.model, "200").inc()
        choices: list[dict[str, Any]]
        if kind == "chat":
            choices = [
                {
                    "index": i,
                    "message": {"role": "assistant", "content": r.text},
                    "logprobs": None,
                    "finish_reason": r.finish_reason,
                }
                for i, r in enumerate(results)
            ]
            obj = "chat.completion"
        else:
            choices = [
                {"index": i, "text": r.text, "logprobs": None, "finish_reason": r.finish_reason}
                for i, r in enumerate(results)
            ]
            obj = "text_completion"
        return JSONResponse(
            {
                "id": rid,
                "object": obj,
                "created": created,
                "model": parsed.model,
                "choices": choices,
                "usage": protocol.usage_dict(prompt_tokens, completion_tokens),
            }
        )

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await generate(request, "chat")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await generate(request, "completion")

    return app


def _run_to_end(factory: Callable[[], Iterator[StreamChunk]]) -> GenerationResult:
    return collect(factory())


def _count_tokens(state: ServerState, model: str, prompt: int, completion: int) -> None:
    state.metrics.prompt_tokens.labels(model).inc(prompt)
    state.metrics.completion_tokens.labels(model).inc(completion)


def _event(data: Any) -> bytes:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n".encode()


async def _sse(
    state: ServerState,
    kind: protocol.Kind,
    rid: str,
    created: int,
    model: str,
    streams: list[Callable[[], Iterator[StreamChunk]]],
    include_usage: bool,
    arrived: float,
    endpoint: str,
) -> AsyncIterator[bytes]:
    """Server-sent events for every choice, merged as they arrive; ends with ``data: [DONE]``."""
    queue: asyncio.Queue[tuple[int, StreamChunk | BaseException | None]] = asyncio.Queue()

    async def pump(index: int, factory: Callable[[], Iterator[StreamChunk]]) -> None:
        try:
            stream = await run_in_threadpool(factory)
            async for item in _iterate(stream):
                await queue.put((index, item))
            await queue.put((index, None))
        except Exception as exc:
            await queue.put((index, exc))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    usage: list[tuple[int, int]] = [(0, 0)] * len(streams)
    last_time: list[float | None] = [None] * len(streams)
    status, remaining, finished = "200", len(streams), False
    try:
        if kind == "chat":
            for i in range(len(streams)):
                first = protocol.chunk(kind, rid, model, created, i, "", None, first=True)
                yield _event({**first, "usage": None} if include_usage else first)
        while remaining:
            index, item = await queue.get()
            if item is None:
                remaining -= 1
                continue
            if isinstance(item, BaseException):
                error = _translate(item) if isinstance(item, Exception) else APIError(500, str(item))
                status = str(error.status)
                yield _event(protocol.error_body(str(error), type_=error.type, param=error.param, code=error.code))
                remaining -= 1
                continue
            now = time.perf_counter()
            if item.text:
                if last_time[index] is None:
                    state.metrics.ttft.labels(model).observe(now - arrived)
                else:
                    state.metrics.itl.labels(model).observe(now - last_time[index])  # type: ignore[operator]
                last_time[index] = now
            if item.text or item.finish_reason:
                data = protocol.chunk(
                    kind, rid, model, created, index, item.text if item.text else None, item.finish_reason
                )
                yield _event({**data, "usage": None} if include_usage else data)
            if item.usage is not None:
                usage[index] = (item.usage.prompt_tokens, item.usage.completion_tokens)
        prompt_tokens, completion_tokens = usage[0][0], sum(u[1] for u in usage)
        _count_tokens(state, model, prompt_tokens, completion_tokens)
        if include_usage:
            yield _event(
                {
                    "id": rid,
                    "object": "chat.completion.chunk" if kind == "chat" else "text_completion",
                    "created": created,
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
            state.metrics.cancelled.labels(model).inc()
        state.metrics.requests.labels(endpoint, model, status).inc()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
