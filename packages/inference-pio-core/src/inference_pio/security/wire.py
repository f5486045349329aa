"""Length-prefixed JSON messages between the manager and an isolated worker.

JSON, never pickle: the parent must not run code chosen by an untrusted worker. Bytes and images
travel base64-encoded; results and stream chunks as tagged objects.
"""

from __future__ import annotations

import base64
import io
import json
import struct
from typing import IO, Any

from inference_pio.common.interfaces import GenerationResult, StreamChunk, TokenLogprob, Usage
from inference_pio.parsers import ToolCall, ToolCallDelta

MAX_MESSAGE = 256 * 1024 * 1024


class WireError(Exception):
    """The other side closed the pipe or sent something that is not a message."""


def encode(obj: Any) -> Any:
    if isinstance(obj, (bytes, bytearray, memoryview)):
        return {"__bytes__": base64.b64encode(bytes(obj)).decode()}
    if isinstance(obj, GenerationResult):
        return {
            "__result__": [
                obj.text,
                obj.finish_reason,
                obj.usage.prompt_tokens,
                obj.usage.completion_tokens,
                list(obj.token_ids),
                obj.reasoning,
                [[c.id, c.name, c.arguments] for c in obj.tool_calls],
                _logprobs(obj.logprobs),
            ]
        }
    if isinstance(obj, StreamChunk):
        usage = None if obj.usage is None else [obj.usage.prompt_tokens, obj.usage.completion_tokens]
        calls = [[d.index, d.id, d.name, d.arguments] for d in obj.tool_calls]
        logprobs = _logprobs(obj.logprobs)
        return {"__chunk__": [obj.text, obj.finish_reason, usage, list(obj.token_ids), obj.reasoning, calls, logprobs]}
    if isinstance(obj, dict):
        return {str(k): encode(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [encode(v) for v in obj]
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    if hasattr(obj, "save") and hasattr(obj, "mode"):  # a PIL image
        buf = io.BytesIO()
        obj.save(buf, format="PNG")
        return {"__bytes__": base64.b64encode(buf.getvalue()).decode()}
    return str(obj)


def _logprobs(entries: tuple[TokenLogprob, ...]) -> list[Any]:
    return [[e.token_id, e.token, e.logprob, [list(t) for t in e.top]] for e in entries]


def _from_logprobs(entries: list[Any]) -> tuple[TokenLogprob, ...]:
    return tuple(
        TokenLogprob(int(i), str(t), float(v), tuple((int(a), str(b), float(c)) for a, b, c in top))
        for i, t, v, top in entries
    )


def decode(obj: Any) -> Any:
    if isinstance(obj, dict):
        if "__bytes__" in obj:
            return base64.b64decode(obj["__bytes__"])
        if "__result__" in obj:
            text, finish, prompt, completion, ids, reasoning, calls, logprobs = obj["__result__"]
            tool_calls = tuple(ToolCall(str(i), str(n), str(a)) for i, n, a in calls)
            usage = Usage(prompt, completion)
            return GenerationResult(text, finish, usage, tuple(ids), reasoning, tool_calls, _from_logprobs(logprobs))
        if "__chunk__" in obj:
            text, finish, usage, ids, reasoning, calls, logprobs = obj["__chunk__"]
            deltas = tuple(ToolCallDelta(int(x), i, n, str(a)) for x, i, n, a in calls)
            return StreamChunk(
                text,
                finish,
                None if usage is None else Usage(*usage),
                tuple(ids),
                str(reasoning),
                deltas,
                _from_logprobs(logprobs),
            )
        return {k: decode(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [decode(v) for v in obj]
    return obj


def send(stream: IO[bytes], message: dict[str, Any]) -> None:
    data = json.dumps(encode(message)).encode()
    view = memoryview(struct.pack("<I", len(data)) + data)
    while view:  # an unbuffered pipe may take part of a large message (a signal between two writes)
        written = stream.write(view)
        view = view[written or 0 :]
    stream.flush()


def _read_exact(stream: IO[bytes], size: int) -> bytes:
    parts, got = [], 0
    while got < size:
        part = stream.read(size - got)
        if not part:
            raise WireError("pipe closed" if got == 0 else "pipe closed mid-message")
        parts.append(part)
        got += len(part)
    return b"".join(parts)


def recv(stream: IO[bytes]) -> dict[str, Any]:
    """Read one message; streams are unbuffered so that ``select`` sees exactly what is pending."""
    (length,) = struct.unpack("<I", _read_exact(stream, 4))
    if length > MAX_MESSAGE:
        raise WireError(f"message of {length} bytes is over the {MAX_MESSAGE}-byte limit")
    data = _read_exact(stream, length)
    try:
        message = decode(json.loads(data))
    except ValueError as exc:
        raise WireError(f"not a JSON message: {exc}") from exc
    if not isinstance(message, dict):
        raise WireError("message is not an object")
    return message
