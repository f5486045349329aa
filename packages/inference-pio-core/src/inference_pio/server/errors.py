"""One translation of exceptions into OpenAI error responses.

Imports neither torch nor the runtime, so a server of torch-free plugins answers bad requests with
4xx like any other: every error type it needs lives in :mod:`inference_pio.errors`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from fastapi.responses import JSONResponse

from inference_pio.errors import ContextLengthError, InvalidRequestError, QueueFullError, SchedulerStoppedError

log = logging.getLogger("inference_pio.server")


class APIError(Exception):
    """An HTTP error with an OpenAI error body: ``status``, ``type``, ``param``, ``code`` and extra headers."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.type, self.param, self.code, self.headers = status, type_, param, code, headers

    def body(self) -> dict[str, object]:
        return {"error": {"message": str(self), "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


class BodyTooLarge(APIError):
    """The request body went over the size limit while it was being read (413)."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body exceeds the limit of {limit} bytes", code="request_too_large")


def translate(exc: BaseException) -> APIError:
    """The API error for ``exc``: our own errors keep their meaning; anything else is a logged 500."""
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
    log.error("internal error", exc_info=exc)
    return APIError(500, f"internal error: {type(exc).__name__}: {exc}", type_="server_error")


def create_error_response(exc: BaseException) -> JSONResponse:
    """The JSON error response for ``exc`` (see :func:`translate`)."""
    return translate(exc).response()
