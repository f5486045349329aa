"""``BatchScheduler``: continuous batching over a :class:`DecodeEngine`'s slots.

One background thread owns the engine. Requests join the running batch at token boundaries
(prefilled into a free slot between decode steps) and leave it when they finish or are cancelled,
so concurrent requests share each decode step instead of waiting for one another.
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from inference_pio.common.interfaces import GenerationParams
from inference_pio.errors import QueueFullError, SchedulerStoppedError
from inference_pio.runtime.engine import DecodeEngine, Prompt
from inference_pio.runtime.sampling import make_generator, next_token

log = logging.getLogger("inference_pio.scheduler")
_DONE = object()


@dataclass(eq=False)
class _Request:
    prompt: Prompt
    params: GenerationParams
    out: queue.SimpleQueue[Any] = field(default_factory=queue.SimpleQueue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    slot: int = -1
    generated: int = 0
    last: int = 0
    history: torch.Tensor | None = None
    generator: torch.Generator | None = None


class TokenStream(Iterator[int]):
    """Token ids of one scheduled request. ``close()`` (or garbage collection) cancels it."""

    def __init__(self, request: _Request) -> None:
        self._request = request
        self._finished = False

    def __next__(self) -> int:
        if self._finished:
            raise StopIteration
        item = self._request.out.get()
        if item is _DONE:
            self._finished = True
            raise StopIteration
        if isinstance(item, BaseException):
            self._finished = True
            raise item
        return int(item)

    def close(self) -> None:
        if not self._finished:
            self._request.cancelled.set()
            self._finished = True

    def __del__(self) -> None:
        self.close()


class BatchScheduler:
    """Runs prefill and batched decode steps for many requests on one engine."""

    def __init__(
        self,
        engine: DecodeEngine,
        eos_ids: frozenset[int],
        *,
        max_queue: int = 64,
        on_step: Callable[[int], None] | None = None,
    ) -> None:
        self.engine = engine
        self.eos_ids = eos_ids
        self.max_queue = max_queue
        self.on_step = on_step
        self._pending: collections.deque[_Request] = collections.deque()
        self._active: list[_Request] = []
        self._free = list(range(engine.max_slots - 1, -1, -1))
        self._cond = threading.Condition()
        self._stopping = False
        self.steps = 0
        self.last_batch_size = 0
        self._thread = threading.Thread(target=self._run, name="inference-pio-scheduler", daemon=True)
        self._thread.start()

    # -- public -------------------------------------------------------------------------------------
    @property
    def queue_depth(self) -> int:
        return len(self._pending)

    @property
    def active(self) -> int:
        return len(self._active)

    def submit(self, prompt: Prompt, params: GenerationParams) -> TokenStream:
        """Queue a request; raises ``QueueFullError`` at once when there is no room."""
        request = _Request(prompt, params)
        with self._cond:
            if self._stopping:
                raise SchedulerStoppedError("the server is shutting down; no new requests are accepted")
            if len(self._pending) >= self.max_queue + len(self._free):
                raise QueueFullError(
                    f"all {self.engine.max_slots} decode slots are busy and the queue of {self.max_queue} waiting "
                    "requests is full; retry shortly",
                    retry_after=1.0,
                )
            self._pending.append(request)
            self._cond.notify()
        return TokenStream(request)

    def stop(self, timeout: float = 30.0) -> None:
        """Finish running requests (up to ``timeout`` seconds), fail queued ones, and end the thread."""
        with self._cond:
            self._stopping = True
            for request in self._pending:
                request.out.put(SchedulerStoppedError("the server shut down before this request started"))
            self._pending.clear()
            self._cond.notify()
        self._thread.join(timeout)
        with self._cond:
            for request in self._active:
                request.cancelled.set()
            self._cond.notify()
        self._thread.join(5)

    # -- loop ---------------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._active and not self._stopping:
                    self._cond.wait()
                if self._stopping and not self._active:
                    return
                admit: list[_Request] = []
                while self._pending and self._free:
                    request = self._pending.popleft()
                    if request.cancelled.is_set():
                        request.out.put(_DONE)
                        continue
                    request.slot = self._free.pop()
                    admit.append(request)
            for request in self._active[:]:
                if request.cancelled.is_set():
                    self._finish(request)
            for request in admit:
                self._prefill(request)
            if self._active:
                self._decode()

    def _finish(self, request: _Request, error: BaseException | None = None) -> None:
        request.out.put(error if error is not None else _DONE)
        with self._cond:
            if request in self._active:
                self._active.remove(request)
            if request.slot >= 0:
                self._free.append(request.slot)
                request.slot = -1

    def _emit(self, request: _Request, logits: torch.Tensor) -> None:
        assert request.history is not None
        token = next_token(logits, request.params, request.history, request.generator)
        request.generated += 1
        request.last = token
        request.out.put(token)
        if request.params.repetition_penalty != 1.0:
            request.history = torch.cat([request.history, request.history.new_tensor([token])])
        if (
            (token in self.eos_ids and not request.params.ignore_eos)
            or request.generated >= request.params.max_new_tokens
            or self.engine.lengths[request.slot] >= self.engine.max_len
        ):
            self._finish(request)

    def _prefill(self, request: _Request) -> None:
        try:
            logits = self.engine.prefill(request.slot, request.prompt)[-1]
            request.history = torch.tensor(request.prompt.ids, dtype=torch.long, device=self.engine.device)
            if request.params.temperature > 0:
                request.generator = make_generator(self.engine.device, request.params.seed)
            with self._cond:
                self._active.append(request)
            self._emit(request, logits)
        except Exception as exc:  # one bad request must not stop the others
            log.exception("prefill failed")
            self._finish(request, exc)

    def _decode(self) -> None:
        batch = [r for r in self._active if not r.cancelled.is_set()]
        if not batch:
            return
        try:
            logits = self.engine.decode([r.slot for r in batch], [r.last for r in batch])
        except Exception as exc:
            log.exception("decode step failed")
            for request in batch:
                self._finish(request, exc)
            return
        self.steps += 1
        self.last_batch_size = len(batch)
        if self.on_step is not None:
            self.on_step(len(batch))
        for i, request in enumerate(batch):
            self._emit(request, logits[i])
