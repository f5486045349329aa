"""Turning a batch of logits into next tokens on the device: repetition penalty, temperature, top-k,
top-p, greedy, per-request seeds.

Every row carries its own parameters in device tensors (:class:`SamplingState`), so one call
samples a whole decode step and the host reads the tokens back once. Randomness is a counter-based
hash of (seed, step, token id) turned into Gumbel noise: a request's draws depend only on its own
seed and position, never on which other requests share the batch or on a stateful generator, so
the same seed gives the same output alone or batched, eager or compiled.

Extreme values behave like their limits instead of producing inf/NaN: a temperature below
:data:`MIN_TEMPERATURE` is greedy, a tiny ``top_p`` keeps the top token, a tiny repetition penalty
is clamped to :data:`MIN_PENALTY`.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

import torch

from inference_pio.common.interfaces import GenerationParams

MIN_TEMPERATURE = 1e-5
"""Temperatures below this are greedy decoding (the limit of dividing logits by a vanishing number)."""
MIN_PENALTY = 1e-6
"""Repetition penalties are clamped here, so dividing a logit by the penalty stays finite in float32."""
_M32 = 0xFFFFFFFF


def random_seed() -> int:
    """A fresh seed for a request that did not ask for one."""
    return secrets.randbits(62)


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (xorshift-multiply rounds) on int64 tensors holding values < 2**32.

    Multipliers are below 2**31, so no product overflows int64 on any device.
    """
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x6C8E9CF5) & _M32
    return x ^ (x >> 16)


def gumbel_noise(seeds: torch.Tensor, steps: torch.Tensor, vocab: int) -> torch.Tensor:
    """Gumbel(0, 1) noise ``[rows, vocab]`` determined by each row's (seed, step) and the token id."""
    token = torch.arange(vocab, device=seeds.device, dtype=torch.int64)
    low = seeds & _M32
    high = (seeds >> 32) & _M32
    row = _mix32(_mix32(low ^ _mix32(high)) ^ (steps & _M32))[:, None]
    bits = _mix32(row ^ _mix32(token[None, :] + 0x3C6EF372))
    uniform = (bits.to(torch.float64) + 0.5) / 4294967296.0  # in (0, 1), never 0 or 1
    return -torch.log(-torch.log(uniform)).to(torch.float32)


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    """CTRL-style penalty over seen tokens (``seen`` is a ``[rows, vocab]`` bool mask): positive logits
    divided, negative multiplied by each row's ``penalty`` (``[rows]``, 1 leaves a row unchanged)."""
    p = penalty.clamp(min=MIN_PENALTY)[:, None]
    return torch.where(seen, torch.where(logits < 0, logits * p, logits / p), logits)


def filter_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Mask (``-inf``) everything outside each row's top-k tokens (``0`` = all) and outside the smallest
    set holding ``top_p`` of the probability; the most likely token is always kept."""
    vocab = logits.shape[-1]
    ordered, order = torch.sort(logits, descending=True, dim=-1)
    rank = torch.arange(vocab, device=logits.device)[None, :]
    k = torch.where(top_k > 0, top_k.clamp(max=vocab), vocab)[:, None]
    probs = ordered.softmax(-1)
    before = probs.cumsum(-1) - probs  # probability of the tokens ranked above
    drop = (rank >= k) | ((before >= top_p[:, None]) & (rank > 0))
    ordered = ordered.masked_fill(drop, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(-1, order, ordered)


@dataclass
class SamplingState:
    """Per-slot sampling parameters in device tensors, written when a request takes a slot."""

    temperature: torch.Tensor  # [S] float32, 0 = greedy
    top_k: torch.Tensor  # [S] int64, 0 = off
    top_p: torch.Tensor  # [S] float32, 1 = off
    penalty: torch.Tensor  # [S] float32, 1 = off
    seed: torch.Tensor  # [S] int64
    step: torch.Tensor  # [S] int64: tokens drawn so far, the counter of the noise
    seen: torch.Tensor | None = None  # [S, vocab] bool, allocated when a request first uses a penalty

    @classmethod
    def allocate(cls, slots: int, device: torch.device) -> SamplingState:
        return cls(
            temperature=torch.zeros(slots, device=device),
            top_k=torch.zeros(slots, dtype=torch.int64, device=device),
            top_p=torch.ones(slots, device=device),
            penalty=torch.ones(slots, device=device),
            seed=torch.zeros(slots, dtype=torch.int64, device=device),
            step=torch.zeros(slots, dtype=torch.int64, device=device),
        )

    def assign(self, slot: int, params: GenerationParams, prompt_ids: list[int], vocab: int) -> None:
        """Take ``params`` for ``slot``; the prompt's tokens count as seen for the repetition penalty."""
        greedy = params.temperature < MIN_TEMPERATURE
        self.temperature[slot] = 0.0 if greedy else params.temperature
        self.top_k[slot] = params.top_k
        self.top_p[slot] = params.top_p
        self.penalty[slot] = params.repetition_penalty
        self.seed[slot] = params.seed if params.seed is not None else random_seed()
        self.step[slot] = 0
        if params.repetition_penalty != 1.0 and self.seen is None:
            self.seen = torch.zeros((self.temperature.shape[0], vocab), dtype=torch.bool, device=self.seed.device)
        if self.seen is not None:
            self.seen[slot] = False
            ids = torch.tensor([i for i in prompt_ids if 0 <= i < vocab], dtype=torch.int64, device=self.seed.device)
            self.seen[slot, ids] = True

    def sample(
        self, logits: torch.Tensor, rows: torch.Tensor, *, filters: bool = True, random: bool = True
    ) -> torch.Tensor:
        """Next token of each of ``rows`` (slot indices) from ``logits`` ``[len(rows), vocab]`` (float32).

        The host knows which parameters its rows use: ``filters=False`` skips the top-k/top-p sort,
        ``random=False`` (every row greedy) skips the noise.
        """
        logits = logits.float()
        if self.seen is not None:
            logits = apply_repetition_penalty(logits, self.seen[rows], self.penalty[rows])
        greedy_pick = logits.argmax(-1)
        if not random:
            tokens = greedy_pick
            self.step[rows] += 1
            if self.seen is not None:
                self.seen[rows, tokens] = True
            return tokens
        temperature = self.temperature[rows]
        scaled = logits / temperature.clamp(min=MIN_TEMPERATURE)[:, None]
        if filters:
            scaled = filter_top_k_top_p(scaled, self.top_k[rows], self.top_p[rows])
        noisy = scaled + gumbel_noise(self.seed[rows], self.step[rows], logits.shape[-1])
        tokens = torch.where(temperature > 0, noisy.argmax(-1), greedy_pick)
        self.step[rows] += 1
        if self.seen is not None:
            self.seen[rows, tokens] = True
        return tokens
