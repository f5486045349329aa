"""Sampling: greedy, seeded reproducibility, top-k/top-p masks, repetition penalty."""

from __future__ import annotations

import torch

from inference_pio import GenerationParams
from inference_pio.runtime.sampling import apply_repetition_penalty, filter_top_k_top_p, make_generator, next_token


def test_greedy_is_argmax() -> None:
    logits = torch.tensor([0.1, 3.0, -1.0, 2.9])
    assert next_token(logits, GenerationParams(temperature=0), torch.tensor([], dtype=torch.long), None) == 1


def test_same_seed_same_tokens_different_seed_differs() -> None:
    logits = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    params = GenerationParams(temperature=1.0)
    empty = torch.tensor([], dtype=torch.long)

    def draw(seed: int) -> list[int]:
        gen = make_generator(torch.device("cpu"), seed)
        return [next_token(logits, params, empty, gen) for _ in range(20)]

    assert draw(7) == draw(7)
    assert draw(7) != draw(8)


def test_top_k_and_top_p_keep_the_right_tokens() -> None:
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    kept = torch.isfinite(filter_top_k_top_p(logits, top_k=2, top_p=1.0))
    assert kept.tolist() == [True, True, False, False]
    kept = torch.isfinite(filter_top_k_top_p(logits, top_k=0, top_p=0.7))
    assert kept.tolist() == [True, True, False, False]
    kept = torch.isfinite(filter_top_k_top_p(logits, top_k=0, top_p=0.1))
    assert kept.tolist() == [True, False, False, False]


def test_repetition_penalty_lowers_seen_tokens() -> None:
    logits = torch.tensor([2.0, -2.0, 1.0])
    out = apply_repetition_penalty(logits, torch.tensor([0, 1]), 2.0)
    assert out.tolist() == [1.0, -4.0, 1.0]
