"""The FastAPI application: routes over a :class:`ServerState`; the work happens in the serving modules."""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from inference_pio.plugin_system.manager import PluginManager
from inference_pio.server.errors import APIError
from inference_pio.server.middleware import BodyLimit
from inference_pio.server.protocol import ChatCompletionRequest, CompletionRequest
from inference_pio.server.serving_chat import create_chat_completion
from inference_pio.server.serving_completion import create_completion
from inference_pio.server.state import ServedModel, ServerSettings, ServerState

__all__ = ["ServedModel", "ServerSettings", "create_app"]


def _json_body(model: type[BaseModel]) -> dict[str, Any]:
    """OpenAPI for a body the route parses itself (so it can limit depth and name bad fields its own way)."""
    ref = {"$ref": f"#/components/schemas/{model.__name__}"}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": ref}}}}


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
        message = f"{request.method} {request.url.path}: {exc.detail}"
        return APIError(exc.status_code, message, code=code, headers=exc.headers).response()  # 405 keeps Allow

    @app.get("/health")
    async def health() -> Response:
        status = {"loading": 503, "ready": 200, "failed": 500}[state.status]
        return JSONResponse(
            {"status": state.status, "error": state.error, "models": sorted(state.plugins)}, status_code=status
        )

    @app.get(
        "/metrics",
        response_class=PlainTextResponse,
        responses={200: {"description": "Prometheus text exposition format", "content": {"text/plain": {}}}},
    )
    async def metrics() -> Response:
        return PlainTextResponse(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        state.authorize(request.headers.get("authorization"))
        data = [
            {"id": name, "object": "model", "created": state.created, "owned_by": "inference-pio"}
            for name in sorted(state.plugins)
        ]
        return JSONResponse({"object": "list", "data": data})

    @app.get("/v1/models/{model_id}")
    async def model(model_id: str, request: Request) -> Response:
        state.authorize(request.headers.get("authorization"))
        state.plugin(model_id)  # 404 (or 503 while loading) with an OpenAI error body
        return JSONResponse({"id": model_id, "object": "model", "created": state.created, "owned_by": "inference-pio"})

    @app.post("/v1/chat/completions", openapi_extra=_json_body(ChatCompletionRequest))
    async def chat_completions(request: Request) -> Response:
        return await create_chat_completion(state, request)

    @app.post("/v1/completions", openapi_extra=_json_body(CompletionRequest))
    async def completions(request: Request) -> Response:
        return await create_completion(state, request)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for body in (ChatCompletionRequest, CompletionRequest):
                doc = body.model_json_schema(ref_template="#/components/schemas/{model}")
                components.update(doc.pop("$defs", {}))
                components[body.__name__] = doc
                # What this server accepts: its models, its limit on choices.
                doc["properties"]["model"]["enum"] = [m.name for m in settings.models]
                doc["properties"]["n"]["maximum"] = settings.max_n
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app
