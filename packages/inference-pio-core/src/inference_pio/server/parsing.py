"""Request bodies: JSON with a nesting limit and no lone surrogates, then the endpoint's pydantic model.

Both checks run before pydantic sees the body: deep nesting would otherwise end in a
``RecursionError`` (in ``json`` or in validation), and a lone surrogate such as ``"\\udc90"``
(valid JSON, not valid Unicode) would reach a tokenizer that cannot encode it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, TypeVar

from pydantic import ValidationError

from inference_pio.server import protocol
from inference_pio.server.errors import APIError

MAX_JSON_DEPTH = 64
"""Deepest nesting of arrays and objects a request body may have (OpenAI requests need fewer than 10)."""

Request = TypeVar("Request", bound=protocol.GenerationRequest)


def param_path(loc: Sequence[int | str]) -> str:
    """``("messages", 0, "content")`` as ``messages[0].content``, the form error bodies use."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _input_loc(loc: Sequence[int | str], body: Any) -> list[int | str]:
    """The part of a pydantic error location that names places in the request, without union member tags
    (``("stop", "list[str]")`` is ``stop``); a missing key is kept (``("model",)``)."""
    out: list[int | str] = []
    value = body
    for part in loc:
        found = (isinstance(value, dict) and part in value) or (
            isinstance(value, list) and isinstance(part, int) and 0 <= part < len(value)
        )
        if found:
            value = value[part]
        else:
            if isinstance(value, dict):
                out.append(part)  # a required key that is missing
            break
        out.append(part)
    return out


def load_json(raw: bytes) -> Any:
    """Decode a request body, or raise a 400 that says what is wrong with it."""
    too_deep = f"the request body nests arrays and objects more than {MAX_JSON_DEPTH} deep"
    try:
        body = json.loads(raw)
    except RecursionError as exc:
        raise APIError(400, too_deep, code="invalid_json") from exc
    except (ValueError, UnicodeDecodeError) as exc:
        raise APIError(400, f"the request body is not valid JSON: {exc}", code="invalid_json") from exc
    stack: list[tuple[Any, tuple[int | str, ...]]] = [(body, ())]
    while stack:  # iterative: the check itself must not recurse
        value, loc = stack.pop()
        if isinstance(value, str):
            _check_text(value, loc)
        elif isinstance(value, dict | list):
            if len(loc) >= MAX_JSON_DEPTH:
                raise APIError(400, f"{too_deep} (at {param_path(loc)})", param=param_path(loc), code="invalid_json")
            items = value.items() if isinstance(value, dict) else enumerate(value)
            for key, item in items:
                if isinstance(key, str):
                    _check_text(key, loc)
                stack.append((item, (*loc, key)))
    return body


def _check_text(text: str, loc: tuple[int | str, ...]) -> None:
    if text.isascii():
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        where = param_path(loc) or "the request body"
        raise APIError(
            400,
            f"{where} contains a lone UTF-16 surrogate ({text[exc.start]!r} at character {exc.start}), "
            "which is not valid Unicode; send text as valid UTF-8, with surrogate pairs escaped together",
            param=param_path(loc) or None,
            code="invalid_unicode",
        ) from None


def parse_request(model: type[Request], body: Any, max_n: int) -> Request:
    """Validate a decoded body into ``model``; a 400 names the first bad parameter."""
    if not isinstance(body, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(body).__name__}")
    try:
        parsed = model.model_validate(body)
    except ValidationError as exc:
        err = exc.errors()[0]
        param = param_path(_input_loc(err["loc"], body)) or None
        raise APIError(400, f"invalid value for '{param}': {err['msg']}", param=param) from exc
    if parsed.n > max_n:
        raise APIError(400, f"n={parsed.n} is above this server's limit of {max_n}", param="n")
    problem = parsed.unsupported()
    if problem:
        raise APIError(400, problem[1], param=problem[0], code="unsupported_parameter")
    return parsed
