"""``DecodeEngine``: prefill and decode steps over a transformers model and a static slot cache.

The decode step runs every slot at once from persistent buffers (tokens, cache positions, RoPE
deltas) that are updated in place; slots without a request decode a dummy token at position 0,
which only touches their own free cache row. So the step's shapes depend only on the view bucket
(the cache length attention reads, a multiple of :data:`VIEW_BUCKET`), never on which requests are
running, and it contains no host-side branching on tensor values: it compiles with
``torch.compile(fullgraph=True)`` on any device and, on CUDA, is captured as CUDA graphs
(``mode="reduce-overhead"``). The view length enters as the size of a tensor marked dynamic, so one
compiled graph serves every bucket. Prefill runs eagerly, once per request, at its own length.
"""

from __future__ import annotations

import inspect
import logging
import threading
import time
from typing import Any

import torch

from inference_pio.runtime.contract import Prompt
from inference_pio.runtime.kv_cache import SlotCache, WritePlan

log = logging.getLogger("inference_pio.runtime")

VIEW_BUCKET = 256
"""Attention spans the cache in multiples of this many positions (one static shape per bucket)."""


def compile_mode(device: torch.device) -> str | None:
    """The ``torch.compile`` mode for a device: CUDA graphs on CUDA, plain compilation elsewhere."""
    return "reduce-overhead" if device.type == "cuda" else None


class DecodeEngine:
    """Owns a model's static KV cache and runs prefill and decode steps on it."""

    def __init__(
        self, model: Any, *, max_len: int, max_slots: int = 1, mrope: bool = False, compile: bool = False
    ) -> None:
        self.model = model
        param = next(model.parameters())
        self.device = param.device
        self.dtype = model.dtype if getattr(model, "dtype", None) is not None else param.dtype
        text_config = model.config.get_text_config()
        self.vocab_size = int(text_config.vocab_size)
        self.max_len = max_len
        self.max_slots = max_slots
        self.mrope = mrope
        self.cache = SlotCache(int(text_config.num_hidden_layers), max_slots, max_len)
        self.lengths = [0] * max_slots
        """Tokens held by each slot's cache (host copy; the next decode writes at this position)."""
        params = inspect.signature(model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self._mask_min = torch.finfo(self.dtype).min
        dev = self.device
        self._key_positions = torch.arange(max_len, device=dev)
        self._rows = torch.arange(max_slots, device=dev)
        self.tokens = torch.zeros((max_slots, 1), dtype=torch.long, device=dev)
        """Each slot's last token: the input of the next decode step (written in place)."""
        self.positions = torch.zeros((max_slots, 1), dtype=torch.long, device=dev)
        self.deltas = torch.zeros((max_slots, 1), dtype=torch.long, device=dev)
        self.active = torch.zeros((max_slots, 1), dtype=torch.long, device=dev)
        """1 for slots holding a request: the others are parked at position 0 after every step."""
        for buffer in (self._key_positions, self._rows, self.tokens, self.positions, self.deltas, self.active):
            torch._dynamo.mark_static_address(buffer)  # read by the captured step at fixed addresses
        self._row_lists: dict[tuple[int, ...], torch.Tensor] = {}
        self._compiled: Any = None
        self.compile = compile
        self.compiled_at: float | None = None
        self.lock = threading.Lock()
        """Held by whoever runs a step (the scheduler thread, or a test reading prefill logits)."""

    # -- shared pieces ------------------------------------------------------------------------------
    def view_for(self, last_position: int) -> int:
        """The bucketed cache length a forward whose furthest query sits at ``last_position`` reads."""
        return min(self.max_len, -(-(last_position + 1) // VIEW_BUCKET) * VIEW_BUCKET)

    def _mask(self, positions: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """Additive mask [B, 1, q, view]: the query at position p sees keys 0..p of its own row."""
        visible = keys[None, None, :] <= positions[:, :, None]
        zero = torch.zeros((), dtype=self.dtype, device=self.device)
        return torch.where(visible, zero, self._mask_min).unsqueeze(1)

    def _forward(
        self,
        ids: torch.Tensor,
        plan: WritePlan,
        keys: torch.Tensor,
        position_ids: torch.Tensor,
        logits_to_keep: int,
        extra: dict[str, Any],
    ) -> torch.Tensor:
        self.cache.plan = plan
        out = self.model(
            input_ids=ids,
            attention_mask=self._mask(plan.positions, keys),
            position_ids=position_ids,
            use_cache=True,
            logits_to_keep=logits_to_keep,
            **{self._cache_kw: self.cache},
            **extra,
        )
        return out.logits  # type: ignore[no-any-return]

    def rows_tensor(self, slots: list[int]) -> torch.Tensor:
        """``slots`` as a device tensor, kept while the same set of slots keeps decoding together."""
        key = tuple(slots)
        rows = self._row_lists.get(key)
        if rows is None:
            if len(self._row_lists) > 4 * self.max_slots:
                self._row_lists.clear()
            rows = self._row_lists[key] = torch.tensor(slots, dtype=torch.long, device=self.device)
        return rows

    # -- prefill --------------------------------------------------------------------------------------
    def prefill(self, slot: int, prompt: Prompt, *, all_logits: bool = False) -> torch.Tensor:
        """Run the prompt into ``slot`` (eager, at its own length); returns logits [L or 1, vocab] (float32).

        Also makes ``slot`` ready for decode steps: its RoPE delta and next position are set.
        """
        length = len(prompt.ids)
        if length > self.max_len:
            raise ValueError(f"prompt of {length} tokens exceeds the cache length {self.max_len}")
        with torch.inference_mode():
            ids = torch.tensor([prompt.ids], dtype=torch.long, device=self.device)
            positions = torch.arange(length, device=self.device)[None, :]
            if prompt.position_ids is not None:
                position_ids = prompt.position_ids.to(self.device)
            elif self.mrope:
                position_ids = positions[None].expand(3, -1, -1)
            else:
                position_ids = positions
            view = self.view_for(length - 1)
            plan = WritePlan(self._rows[slot : slot + 1], positions, False, view)
            self.cache.seen = 0
            logits = self._forward(
                ids, plan, self._key_positions[:view], position_ids, 0 if all_logits else 1, prompt.model_inputs
            )
            self.positions[slot, 0] = length
            self.deltas[slot, 0] = prompt.rope_delta
            self.active[slot, 0] = 1
        self.lengths[slot] = length
        return logits[0].float()

    def release_slot(self, slot: int) -> None:
        """Park a finished slot at position 0: later steps write only into its own (free) cache row."""
        self.lengths[slot] = 0
        with torch.inference_mode():
            self.positions[slot, 0] = 0
            self.deltas[slot, 0] = 0
            self.active[slot, 0] = 0

    # -- decode ---------------------------------------------------------------------------------------
    def _step(self, keys: torch.Tensor) -> torch.Tensor:
        """One token for every slot from the persistent buffers; ``keys`` is ``arange(view)``."""
        plan = WritePlan(self._rows, self.positions, True, keys.shape[0])
        position_ids = self.positions + self.deltas
        if self.mrope:
            position_ids = position_ids[None].expand(3, -1, -1)
        return self._forward(self.tokens, plan, keys, position_ids, 1, {})[:, -1]

    def decode_step(self, active: list[int]) -> torch.Tensor:
        """Advance every slot by the token in :attr:`tokens`; returns logits [slots, vocab] (float32).

        ``active`` lists the slots holding requests: they must have room for one more token, and
        their host lengths advance. Other slots compute throwaway values at position 0.
        """
        longest = 0
        for slot in active:
            if self.lengths[slot] >= self.max_len:
                raise ValueError(f"slot {slot} is full ({self.max_len} tokens)")
            longest = max(longest, self.lengths[slot])
        keys = self._key_positions[: self.view_for(longest)]
        with torch.inference_mode():
            if self.compile:
                torch._dynamo.mark_dynamic(keys, 0)  # one graph for every view bucket
                logits = self._compiled_step()(keys)
            else:
                logits = self._step(keys)
            logits = logits.float()
            self.positions.add_(1).mul_(self.active)  # in place; parked slots stay at 0
        for slot in active:
            self.lengths[slot] += 1
        return logits

    def _compiled_step(self) -> Any:
        if self._compiled is None:
            self._compiled = torch.compile(self._step, fullgraph=True, mode=compile_mode(self.device))
        return self._compiled

    def warm_up(self, progress: Any = None) -> float:
        """Compile (and on CUDA capture) the decode step before the first request; returns seconds spent.

        Must run while no request holds a slot. ``progress`` is called with a line to show the user.
        """
        if not self.compile:
            return 0.0
        start = time.perf_counter()
        if progress is not None:
            progress(f"compiling the decode step for {self.max_slots} slot(s) (once per process)...")
        with self.lock:
            self.prefill(0, Prompt([0]))  # allocates the cache buffers outside the graph
            self.release_slot(0)
            self.decode_step([])
            self.decode_step([])  # CUDA graphs are recorded on a later call than the compiling one
        self.compiled_at = time.perf_counter() - start
        if progress is not None:
            progress(f"decode step ready in {self.compiled_at:.1f} s")
        return self.compiled_at

    def release(self) -> None:
        """Drop the cache buffers (they are re-allocated on the next prefill)."""
        self._compiled = None
        for layer in self.cache.layers:
            layer.keys = layer.values = None
            layer.is_initialized = False
