"""``DecodeEngine``: our own prefill/decode loop over a transformers model and a static slot cache.

The per-token step (:meth:`DecodeEngine.decode`) has fixed shapes — tokens ``[B, 1]``, a 4-D additive
mask over the whole cache, per-row positions — and no host-side branching on tensor values, so it
can later be captured as a CUDA graph. Prefill runs once per request at its own length.
"""

from __future__ import annotations

import inspect
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from inference_pio.common.interfaces import GenerationParams
from inference_pio.runtime.kv_cache import SlotCache, WritePlan
from inference_pio.runtime.sampling import make_generator, next_token


@dataclass
class Prompt:
    """A tokenized request ready for prefill."""

    ids: list[int]
    model_inputs: dict[str, Any] = field(default_factory=dict)  # e.g. pixel_values, image_grid_thw
    position_ids: torch.Tensor | None = None  # [3, 1, L] for multimodal RoPE; None means 0..L-1
    rope_delta: int = 0  # decode positions are cache position + rope_delta (multimodal RoPE)


VIEW_BUCKET = 256
"""Attention spans the cache in multiples of this many positions (one static shape per bucket)."""


class DecodeEngine:
    """Owns a model's static KV cache and runs prefill and decode steps on it."""

    def __init__(self, model: Any, *, max_len: int, max_slots: int = 1, mrope: bool = False) -> None:
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
        self.deltas = [0] * max_slots
        params = inspect.signature(model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self._key_positions = torch.arange(max_len, device=self.device)
        self._mask_min = torch.finfo(self.dtype).min
        self.lock = threading.Lock()
        """Held while a request owns the engine (single-request use); a batch scheduler holds it per step."""

    # -- steps ----------------------------------------------------------------------------------
    def _view(self, last_position: int) -> int:
        return min(self.max_len, -(-(last_position + 1) // VIEW_BUCKET) * VIEW_BUCKET)

    def _mask(self, positions: torch.Tensor, view: int) -> torch.Tensor:
        """Additive mask [B, 1, q, view]: query at position p sees keys 0..p of its own row."""
        visible = self._key_positions[None, None, :view] <= positions[:, :, None]
        zero = torch.zeros((), dtype=self.dtype, device=self.device)
        return torch.where(visible, zero, self._mask_min).unsqueeze(1)

    def _forward(
        self,
        ids: torch.Tensor,
        rows: torch.Tensor,
        positions: torch.Tensor,
        position_ids: torch.Tensor,
        *,
        all_rows: bool,
        logits_to_keep: int,
        extra: dict[str, Any],
        last_position: int,
    ) -> torch.Tensor:
        view = self._view(last_position)
        self.cache.plan = WritePlan(rows, positions, all_rows, view)
        out = self.model(
            input_ids=ids,
            attention_mask=self._mask(positions, view),
            position_ids=position_ids,
            use_cache=True,
            logits_to_keep=logits_to_keep,
            **{self._cache_kw: self.cache},
            **extra,
        )
        return out.logits  # type: ignore[no-any-return]

    def prefill(self, slot: int, prompt: Prompt, *, all_logits: bool = False) -> torch.Tensor:
        """Run the prompt through the model into ``slot``; returns logits [L or 1, vocab] (float32)."""
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
            rows = torch.tensor([slot], device=self.device)
            self.cache.seen = 0
            logits = self._forward(
                ids,
                rows,
                positions,
                position_ids,
                all_rows=False,
                logits_to_keep=0 if all_logits else 1,
                extra=prompt.model_inputs,
                last_position=length - 1,
            )
        self.lengths[slot] = length
        self.deltas[slot] = prompt.rope_delta
        return logits[0].float()

    def decode(self, slots: list[int], tokens: list[int]) -> torch.Tensor:
        """One token for each of ``slots``; returns logits [len(slots), vocab] (float32)."""
        for slot in slots:
            if self.lengths[slot] >= self.max_len:
                raise ValueError(f"slot {slot} is full ({self.max_len} tokens)")
        with torch.inference_mode():
            ids = torch.tensor(tokens, dtype=torch.long, device=self.device)[:, None]
            rows = torch.tensor(slots, device=self.device)
            positions = torch.tensor([self.lengths[s] for s in slots], device=self.device)[:, None]
            if self.mrope:
                deltas = torch.tensor([self.deltas[s] for s in slots], device=self.device)[:, None]
                position_ids = (positions + deltas)[None].expand(3, -1, -1)
            else:
                position_ids = positions
            all_rows = len(slots) == self.max_slots and slots == list(range(self.max_slots))
            longest = max(self.lengths[s] for s in slots)
            self.cache.seen = longest
            logits = self._forward(
                ids,
                rows,
                positions,
                position_ids,
                all_rows=all_rows,
                logits_to_keep=1,
                extra={},
                last_position=longest,
            )
        for slot in slots:
            self.lengths[slot] += 1
        return logits[:, -1].float()

    # -- one request ------------------------------------------------------------------------------
    def generate(self, prompt: Prompt, params: GenerationParams, *, slot: int = 0) -> Iterator[int]:
        """Yield new token ids for ``prompt`` until ``max_new_tokens``; the caller stops earlier on EOS.

        Holds :attr:`lock` while running; close the iterator (or exhaust it) to release it.
        """
        with self.lock:
            logits = self.prefill(slot, prompt)[-1]
            history = torch.tensor(prompt.ids, dtype=torch.long, device=self.device)
            generator = make_generator(self.device, params.seed) if params.temperature > 0 else None
            for step in range(params.max_new_tokens):
                token = next_token(logits, params, history, generator)
                yield token
                if step + 1 == params.max_new_tokens or self.lengths[slot] >= self.max_len:
                    return
                if params.repetition_penalty != 1.0:
                    history = torch.cat([history, history.new_tensor([token])])
                logits = self.decode([slot], [token])[0]

    def release(self) -> None:
        """Drop the cache buffers (they are re-allocated on the next prefill)."""
        for layer in self.cache.layers:
            layer.keys = layer.values = None
            layer.is_initialized = False
