"""A static, slot-based KV cache that plugs into transformers models as their ``Cache``.

Every layer owns pre-allocated ``[slots, heads, max_len, dim]`` buffers. Each forward writes at
per-row positions given by a shared :class:`WritePlan`, so the shapes of a decode step never
change: the step can be captured as a CUDA graph, and rows (slots) can hold different requests
at different lengths — what continuous batching needs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers.cache_utils import Cache, CacheLayerMixin


@dataclass
class WritePlan:
    """Where the current forward writes: ``rows`` [B] slot indices, ``positions`` [B, q] cache positions.

    Attention reads the first ``view`` positions of each row: a bucketed length, so shapes stay
    static within a bucket while short sequences do not pay for the whole cache.
    """

    rows: torch.Tensor
    positions: torch.Tensor
    all_rows: bool = False
    view: int = 0


class SlotLayer(CacheLayerMixin):  # type: ignore[misc]  # transformers is untyped here
    is_compileable = True
    is_sliding = False
    is_croppable = False

    def __init__(self, plan_holder: SlotCache, max_slots: int, max_len: int) -> None:
        super().__init__()
        self._holder = plan_holder
        self.max_slots = max_slots
        self.max_len = max_len

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        # One spare position: every view is then a strict prefix, never the whole buffer, so a compiled
        # step sees the same memory layout (non-contiguous) for every view length and never specializes.
        length = self.max_len + 1
        self.keys = key_states.new_zeros((self.max_slots, key_states.shape[1], length, key_states.shape[-1]))
        self.values = value_states.new_zeros((self.max_slots, value_states.shape[1], length, value_states.shape[-1]))
        # Fixed addresses: CUDA graphs may then write into the cache in place instead of skipping capture.
        torch._dynamo.mark_static_address(self.keys)
        torch._dynamo.mark_static_address(self.values)
        self.device = key_states.device
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        assert self.keys is not None
        assert self.values is not None
        plan = self._holder.plan
        rows, positions = plan.rows, plan.positions
        if rows.device != self.keys.device:  # a model split over GPUs: this layer's cache is on another GPU
            rows, positions = rows.to(self.keys.device), positions.to(self.keys.device)
        index = (rows[:, None], slice(None), positions)
        self.keys[index] = key_states.transpose(1, 2).to(self.keys.dtype)
        self.values[index] = value_states.transpose(1, 2).to(self.values.dtype)
        view = plan.view or self.max_len
        keys, values = self.keys.narrow(2, 0, view), self.values.narrow(2, 0, view)
        if plan.all_rows:
            return keys, values
        return keys[rows], values[rows]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.max_len, 0

    def get_seq_length(self) -> int:
        return int(self._holder.seen)

    def get_max_length(self) -> int:
        return self.max_len

    def nbytes(self) -> int:
        if self.keys is None or self.values is None:
            return 0
        return int(self.keys.numel() * self.keys.element_size() + self.values.numel() * self.values.element_size())


class SlotCache(Cache):  # type: ignore[misc]
    """One :class:`SlotLayer` per decoder layer, sharing one write plan."""

    def __init__(self, num_layers: int, max_slots: int, max_len: int) -> None:
        self.plan = WritePlan(torch.zeros(1, dtype=torch.long), torch.zeros(1, 1, dtype=torch.long))
        self.seen = 0
        super().__init__(layers=[SlotLayer(self, max_slots, max_len) for _ in range(num_layers)])
        self.max_slots = max_slots
        self.max_len = max_len

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers if isinstance(layer, SlotLayer))
