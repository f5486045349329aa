"""Size limits applied before any route runs: request headers (431) and bodies (413)."""

from __future__ import annotations

import json

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from inference_pio.server.errors import APIError, BodyTooLarge


class BodyLimit:
    """Refuse request bodies over ``limit`` bytes with 413 (with or without Content-Length), and
    header blocks over ``header_limit`` bytes with 431.

    A chunked body is counted while it is read: the read raises :class:`BodyTooLarge`, an
    :class:`APIError` that a route's error handling answers with 413 like any other API error.
    """

    def __init__(self, app: ASGIApp, limit: int, header_limit: int = 64 * 1024) -> None:
        self.app, self.limit, self.header_limit = app, limit, header_limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        header_bytes = sum(len(k) + len(v) for k, v in scope["headers"])
        if header_bytes > self.header_limit:
            message = f"request headers total {header_bytes} bytes, over the limit of {self.header_limit}"
            await _reject(send, APIError(431, message, code="headers_too_large"))
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            await _reject(send, BodyTooLarge(self.limit))
            return
        seen = 0
        started = False

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise BodyTooLarge(self.limit)
            return message

        async def tracking(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited, tracking)
        except BodyTooLarge as exc:
            if started:  # the route answered already; nothing more can be said on this response
                raise
            await _reject(send, exc)


async def _reject(send: Send, error: APIError) -> None:
    body = json.dumps(error.body()).encode()
    await send(
        {
            "type": "http.response.start",
            "status": error.status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})
