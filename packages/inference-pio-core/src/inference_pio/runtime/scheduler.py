"""``Scheduler``: the one execution path from a submitted prompt to a stream of tokens.

One background thread owns a :class:`DecodeEngine`. Each iteration is schedule → run → postprocess:
waiting requests take free slots and are prefilled, then one decode step advances every slot,
sampling happens on the device for the whole batch, and the tokens are read back once.
:meth:`Scheduler._postprocess` is the only place a request finishes. A single request is the same
path with one slot (the Python API and the CLI); the server runs more slots, so concurrent requests
share each decode step (continuous batching).
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
from inference_pio.errors import InvalidRequestError, QueueFullError, SchedulerStoppedError
from inference_pio.runtime.constraints import LOOKAHEAD, MARGIN, Constraints, apply_constraints
from inference_pio.runtime.contract import EndReason, Prompt, RuntimeStats
from inference_pio.runtime.engine import DecodeEngine
from inference_pio.runtime.sampling import MIN_TEMPERATURE, SamplingState

log = logging.getLogger("inference_pio.scheduler")


@dataclass(frozen=True)
class _End:
    reason: EndReason
    error: BaseException | None = None
    last: int | None = None  # the final token travels with the end, so the reader knows it is the last


@dataclass(eq=False)
class Sequence:
    """All per-request state: the prompt, its parameters, its slot, what it has produced."""

    prompt: Prompt
    params: GenerationParams
    out: queue.SimpleQueue[int | _End] = field(default_factory=queue.SimpleQueue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    slot: int = -1
    generated: int = 0
    matcher: Any = None  # llguidance matcher of a constrained request
    closing_length: int = 0  # tokens its grammar needs to close up, measured near the end of the budget
    closing: bool = False  # closing up (until it finishes)
    logprobs: list[tuple[int, float, tuple[tuple[int, float], ...]]] = field(default_factory=list)
    """(token, its log-probability, the best alternatives) per new token, when ``params.logprobs`` is set."""


class TokenStream(Iterator[int]):
    """Token ids of one scheduled request. ``close()`` (or garbage collection) cancels it."""

    def __init__(self, sequence: Sequence) -> None:
        self._sequence = sequence
        self.finish_reason: EndReason | None = None

    @property
    def logprobs(self) -> list[tuple[int, float, tuple[tuple[int, float], ...]]]:
        """Entry ``i`` belongs to the ``i``-th token; it is there before the token is yielded."""
        return self._sequence.logprobs

    def __next__(self) -> int:
        if self.finish_reason is not None:
            raise StopIteration
        item = self._sequence.out.get()
        if isinstance(item, _End):
            self.finish_reason = item.reason
            if item.error is not None:
                raise item.error
            if item.last is None:
                raise StopIteration
            return item.last
        return item

    def close(self) -> None:
        if self.finish_reason is None:
            self._sequence.cancelled.set()
            self.finish_reason = "cancelled"

    def __del__(self) -> None:
        self.close()


class Scheduler:
    """Runs prefill and batched decode steps for every request on one engine (a ``GenerationRuntime``)."""

    def __init__(
        self,
        engine: DecodeEngine,
        eos_ids: frozenset[int],
        *,
        max_queue: int,
        on_step: Callable[[int], None] | None = None,
        constraints: Constraints | None = None,
    ) -> None:
        self.engine = engine
        self.constraints = constraints
        self.eos_ids = eos_ids
        self.max_queue = max_queue
        self.on_step = on_step
        self.sampling = SamplingState.allocate(engine.max_slots, engine.device)
        self._pending: collections.deque[Sequence] = collections.deque()
        self._active: list[Sequence] = []
        self._free = list(range(engine.max_slots - 1, -1, -1))
        self._cond = threading.Condition()
        self._stopping = False
        self.steps = 0
        self.tokens = 0
        self._thread = threading.Thread(target=self._run, name="inference-pio-scheduler", daemon=True)
        self._thread.start()

    # -- the contract -------------------------------------------------------------------------------
    @property
    def queue_depth(self) -> int:
        return len(self._pending)

    @property
    def active(self) -> int:
        return len(self._active)

    def stats(self) -> RuntimeStats:
        return RuntimeStats(
            slots=self.engine.max_slots,
            active=len(self._active),
            queued=len(self._pending),
            steps=self.steps,
            tokens=self.tokens,
            compiled=self.engine.compile,
        )

    def submit(self, prompt: Prompt, params: GenerationParams) -> TokenStream:
        """Queue a request; raises ``QueueFullError`` at once when there is no room."""
        if not prompt.ids or len(prompt.ids) > self.engine.max_len:
            raise ValueError(f"a prompt must have 1 to {self.engine.max_len} tokens, got {len(prompt.ids)}")
        sequence = Sequence(prompt, params)
        if params.grammar is not None:  # a bad grammar is refused here, in the caller's thread
            if self.constraints is None:
                raise InvalidRequestError("this model's runtime has no tokenizer for constrained output", "grammar")
            sequence.matcher = self.constraints.matcher(params.grammar)
        with self._cond:
            if self._stopping:
                raise SchedulerStoppedError("the server is shutting down; no new requests are accepted")
            if len(self._pending) >= self.max_queue + len(self._free):
                raise QueueFullError(
                    f"all {self.engine.max_slots} decode slots are busy and the queue of {self.max_queue} waiting "
                    "requests is full; retry shortly",
                    retry_after=1.0,
                )
            self._pending.append(sequence)
            self._cond.notify()
        return TokenStream(sequence)

    def close(self, timeout: float = 30.0) -> None:
        """Finish running requests (up to ``timeout`` seconds), fail queued ones, and end the thread."""
        with self._cond:
            self._stopping = True
            for sequence in self._pending:
                sequence.out.put(
                    _End("error", SchedulerStoppedError("the server shut down before this request started"))
                )
            self._pending.clear()
            self._cond.notify()
        self._thread.join(timeout)
        with self._cond:
            for sequence in self._active:
                sequence.cancelled.set()
            self._cond.notify()
        self._thread.join(5)

    # -- the loop -----------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._active and not self._stopping:
                    self._cond.wait()
                if self._stopping and not self._active:
                    return
                admit: list[Sequence] = []
                while self._pending and self._free:
                    sequence = self._pending.popleft()
                    if sequence.cancelled.is_set():
                        sequence.out.put(_End("cancelled"))
                        continue
                    sequence.slot = self._free.pop()
                    admit.append(sequence)
            for sequence in self._active[:]:
                if sequence.cancelled.is_set():
                    self._finish(sequence, "cancelled")
            with self.engine.lock:
                for sequence in admit:
                    self._prefill(sequence)
                if self._active:
                    self._decode()

    def _prefill(self, sequence: Sequence) -> None:
        engine = self.engine
        try:
            logits = engine.prefill(sequence.slot, sequence.prompt)[-1:]
            with torch.inference_mode():
                self.sampling.assign(sequence.slot, sequence.params, sequence.prompt.ids, engine.vocab_size)
                rows = engine.rows_tensor([sequence.slot])
                tokens = self.sampling.sample(
                    self._constrain([sequence], logits),
                    rows,
                    filters=_filters(sequence.params),
                    random=_random(sequence.params),
                )
                engine.tokens[rows, 0] = tokens
                _record_logprobs([sequence], logits, tokens)
        except Exception as exc:  # one bad request must not stop the others
            log.exception("prefill failed")
            self._finish(sequence, "error", exc)
            return
        with self._cond:
            self._active.append(sequence)
        self._postprocess([sequence], tokens.tolist())

    def _decode(self) -> None:
        batch = [s for s in self._active if not s.cancelled.is_set()]
        if not batch:
            return
        engine = self.engine
        slots = [s.slot for s in batch]
        try:
            logits = engine.decode_step(slots)
            with torch.inference_mode():
                rows = engine.rows_tensor(slots)
                picked_logits = logits[rows]
                tokens = self.sampling.sample(
                    self._constrain(batch, picked_logits),
                    rows,
                    filters=any(_filters(s.params) for s in batch),
                    random=any(_random(s.params) for s in batch),
                )
                engine.tokens[rows, 0] = tokens
                _record_logprobs(batch, picked_logits, tokens)
                picked = tokens.tolist()  # the one host read of the step
        except Exception as exc:
            log.exception("decode step failed")
            for sequence in batch:
                self._finish(sequence, "error", exc)
            return
        self.steps += 1
        if self.on_step is not None:
            self.on_step(len(batch))
        self._postprocess(batch, picked)

    def _constrain(self, batch: list[Sequence], logits: torch.Tensor) -> torch.Tensor:
        """``logits`` (one row per sequence of ``batch``) with each grammar's disallowed tokens removed."""
        rows = [j for j, s in enumerate(batch) if s.matcher is not None]
        if not rows or self.constraints is None:
            return logits
        matchers = [batch[j].matcher for j in rows]
        allowed = self.constraints.mask(matchers, logits.device)
        forced = []
        for j in rows:
            sequence = batch[j]
            left = sequence.params.max_new_tokens - sequence.generated
            if not sequence.closing and left <= LOOKAHEAD:
                if sequence.closing_length == 0 or left % 4 == 0:
                    sequence.closing_length = self.constraints.closing_length(sequence.matcher)
                # near the end, a complete answer ends rather than starting something it cannot finish
                sequence.closing = sequence.matcher.is_accepting() or left <= sequence.closing_length + MARGIN
            forced.append(self.constraints.best_closer(sequence.matcher) if sequence.closing else -1)
        return apply_constraints(logits, rows, allowed, forced)

    def _postprocess(self, batch: list[Sequence], tokens: list[int]) -> None:
        """Hand each sequence its token and decide, here only, whether it is finished."""
        for sequence, token in zip(batch, tokens):
            sequence.generated += 1
            self.tokens += 1
            grammar_done = False
            if sequence.matcher is not None:
                sequence.matcher.consume_token(token)
                grammar_done = sequence.matcher.is_stopped()
            if (token in self.eos_ids and not sequence.params.ignore_eos) or grammar_done:
                self._finish(sequence, "stop", last=token)
            elif (
                sequence.generated >= sequence.params.max_new_tokens
                or self.engine.lengths[sequence.slot] >= self.engine.max_len
            ):
                self._finish(sequence, "length", last=token)
            else:
                sequence.out.put(token)

    def _finish(
        self, sequence: Sequence, reason: EndReason, error: BaseException | None = None, *, last: int | None = None
    ) -> None:
        with self._cond:  # the slot is free before the reader sees the end
            if sequence in self._active:
                self._active.remove(sequence)
            if sequence.slot >= 0:
                self.engine.release_slot(sequence.slot)
                self._free.append(sequence.slot)
                sequence.slot = -1
        sequence.out.put(_End(reason, error, last))


def _random(params: GenerationParams) -> bool:
    """Whether sampling for ``params`` draws (as opposed to greedy decoding)."""
    return params.temperature >= MIN_TEMPERATURE


def _filters(params: GenerationParams) -> bool:
    """Whether sampling for ``params`` needs the top-k/top-p sort."""
    return params.temperature > 0 and (params.top_k > 0 or params.top_p < 1.0)


def _record_logprobs(batch: list[Sequence], logits: torch.Tensor, tokens: torch.Tensor) -> None:
    """Append each asking sequence's logprob entry: log-softmax of the raw logits (what the model says,
    before temperature, penalties and filters), the chosen token's value and the top alternatives."""
    wanted = [s.params.logprobs for s in batch]
    if all(n is None for n in wanted):
        return
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    chosen = logprobs.gather(-1, tokens[:, None])[:, 0].tolist()
    k = max(n or 0 for n in wanted)
    top_values, top_ids = logprobs.topk(k, dim=-1) if k else (logprobs[:, :0], tokens[:, None][:, :0])
    values, ids = top_values.tolist(), top_ids.tolist()
    for i, (sequence, token) in enumerate(zip(batch, tokens.tolist())):
        n = sequence.params.logprobs
        if n is not None:
            sequence.logprobs.append((token, chosen[i], tuple(zip(ids[i][:n], values[i][:n]))))
