"""The contract between plugins (and the server) and the generation runtime, torch-free.

A runtime accepts a tokenized :class:`Prompt` with :class:`GenerationParams`, hands back a
:class:`TokenStream` of new token ids, and decides on its own when a request is finished
(end of sequence, ``max_new_tokens``, the end of the context, cancellation); the stream says why in
:attr:`TokenStream.finish_reason`. Single requests and concurrent ones go through the same path: a
runtime with one slot is simply a scheduler that never batches.

Everything here imports without torch, so torch-free code (the server, isolated plugins) can
type against it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

from inference_pio.common.interfaces import GenerationParams

EndReason = Literal["stop", "length", "cancelled", "error"]


@dataclass
class Prompt:
    """A tokenized request ready for prefill.

    ``model_inputs`` carries extra forward inputs for the prefill only (e.g. ``pixel_values``);
    ``position_ids`` (a ``[3, 1, L]`` tensor for multimodal RoPE) and ``rope_delta`` (decode positions
    are cache position + delta) are set by plugins whose positions are not simply ``0..L-1``.
    """

    ids: list[int]
    model_inputs: dict[str, Any] = field(default_factory=dict)
    position_ids: Any = None
    rope_delta: int = 0


@runtime_checkable
class TokenStream(Protocol):
    """New token ids of one request, in order. ``close()`` cancels the request and frees its slot."""

    finish_reason: EndReason | None
    """Set when the stream ends: ``stop`` (end-of-sequence token, which is the last id yielded),
    ``length`` (``max_new_tokens`` or the context window), ``cancelled`` or ``error``."""

    @property
    def logprobs(self) -> list[tuple[int, float, tuple[tuple[int, float], ...]]]:
        """With ``params.logprobs`` set: per token (id, log-probability, best alternatives as (id, value)),
        entry ``i`` present before token ``i`` is yielded."""
        ...

    def __iter__(self) -> Iterator[int]: ...

    def __next__(self) -> int: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class RuntimeStats:
    """A snapshot of a runtime, for metrics and ``/health``."""

    slots: int
    active: int
    queued: int
    steps: int
    tokens: int
    compiled: bool


class GenerationRuntime(Protocol):
    """What plugins and the server need from a runtime: submit, stream, cancel (``close`` the stream),
    stats, close."""

    def submit(self, prompt: Prompt, params: GenerationParams) -> TokenStream:
        """Queue a request; raises ``QueueFullError`` at once when there is no room,
        ``SchedulerStoppedError`` after :meth:`close`."""
        ...

    def stats(self) -> RuntimeStats: ...

    def close(self, timeout: float = 30.0) -> None:
        """Finish running requests (up to ``timeout`` seconds), fail queued ones, release the device."""
        ...
