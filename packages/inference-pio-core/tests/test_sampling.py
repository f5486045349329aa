"""Batched sampling on the device: greedy, seeded reproducibility independent of the batch, the
distribution it draws from, top-k/top-p masks, repetition penalty, and extreme values at their limits."""

from __future__ import annotations

import math

import torch

from inference_pio import GenerationParams
from inference_pio.runtime.sampling import (
    SamplingState,
    apply_repetition_penalty,
    filter_top_k_top_p,
    gumbel_noise,
)

VOCAB = 1000


def state_for(*params: GenerationParams, prompt: list[int] | None = None) -> SamplingState:
    state = SamplingState.allocate(len(params), torch.device("cpu"))
    for slot, p in enumerate(params):
        state.assign(slot, p, prompt or [], VOCAB)
    return state


def draw(state: SamplingState, logits: torch.Tensor, steps: int, rows: list[int]) -> list[list[int]]:
    index = torch.tensor(rows)
    out = [state.sample(logits[index], index).tolist() for _ in range(steps)]
    return [list(column) for column in zip(*out)]


def test_greedy_is_argmax() -> None:
    logits = torch.tensor([[0.1, 3.0, -1.0, 2.9]])
    state = SamplingState.allocate(1, torch.device("cpu"))
    state.assign(0, GenerationParams(temperature=0), [], 4)
    assert state.sample(logits, torch.tensor([0])).tolist() == [1]


def test_same_seed_same_tokens_different_seed_differs_and_the_batch_does_not_matter() -> None:
    logits = torch.randn(1, VOCAB, generator=torch.Generator().manual_seed(0)).repeat(3, 1)
    seeded = [GenerationParams(temperature=1.0, seed=s) for s in (7, 7, 8)]
    together = draw(state_for(*seeded), logits, 20, [0, 1, 2])
    assert together[0] == together[1]
    assert together[0] != together[2]
    alone = draw(state_for(seeded[0]), logits[:1], 20, [0])
    assert alone[0] == together[0]


def test_draws_follow_the_softmax_of_the_scaled_logits() -> None:
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = (torch.log(probs) * 2.0)[None, :]  # temperature 2 undoes the doubling
    state = SamplingState.allocate(1, torch.device("cpu"))
    state.assign(0, GenerationParams(temperature=2.0, seed=3), [], 4)
    n = 4000
    counts = torch.bincount(torch.cat([state.sample(logits, torch.tensor([0])) for _ in range(n)]), minlength=4)
    for observed, p in zip(counts.tolist(), probs.tolist()):
        assert abs(observed / n - p) < 4 * math.sqrt(p * (1 - p) / n), (counts, probs)


def test_gumbel_noise_is_finite_and_depends_on_seed_step_and_token() -> None:
    noise = gumbel_noise(torch.tensor([0, 0, 1]), torch.tensor([0, 1, 0]), 50_000)
    assert torch.isfinite(noise).all()
    assert not torch.equal(noise[0], noise[1]) and not torch.equal(noise[0], noise[2])
    assert abs(noise.mean().item() - 0.5772) < 0.02  # the Euler-Mascheroni constant


def test_top_k_and_top_p_keep_the_right_tokens_per_row() -> None:
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05])).repeat(4, 1)
    kept = torch.isfinite(filter_top_k_top_p(logits, torch.tensor([2, 0, 0, 0]), torch.tensor([1.0, 0.7, 0.1, 1e-30])))
    assert kept.tolist() == [
        [True, True, False, False],
        [True, True, False, False],
        [True, False, False, False],
        [True, False, False, False],  # a vanishing top_p keeps the top token, never nothing
    ]


def test_repetition_penalty_lowers_seen_tokens_only_in_rows_that_ask_for_it() -> None:
    logits = torch.tensor([[2.0, -2.0, 1.0], [2.0, -2.0, 1.0]])
    seen = torch.tensor([[True, True, False], [True, True, False]])
    out = apply_repetition_penalty(logits, seen, torch.tensor([2.0, 1.0]))
    assert out.tolist() == [[1.0, -4.0, 1.0], [2.0, -2.0, 1.0]]


def test_the_prompt_and_drawn_tokens_count_as_seen() -> None:
    state = state_for(GenerationParams(repetition_penalty=1.5), prompt=[3, 5])
    assert state.seen is not None
    assert state.seen[0].nonzero().flatten().tolist() == [3, 5]
    logits = torch.zeros(1, VOCAB)
    logits[0, 9] = 1.0
    assert state.sample(logits, torch.tensor([0])).tolist() == [9]
    assert state.seen[0].nonzero().flatten().tolist() == [3, 5, 9]


def test_extreme_values_behave_like_their_limits_without_nan() -> None:
    logits = torch.randn(1, VOCAB, generator=torch.Generator().manual_seed(1)) * 30
    top = int(logits.argmax())
    for params in (
        GenerationParams(temperature=1e-40, seed=1),
        GenerationParams(temperature=5e-324, seed=1),
        GenerationParams(temperature=1.0, top_p=1e-303, seed=1),
        GenerationParams(temperature=1.0, top_k=1, seed=1),
    ):
        assert draw(state_for(params), logits, 5, [0])[0] == [top] * 5, params
    # a vanishing penalty favours a seen token with a positive logit without inf/NaN
    state = state_for(GenerationParams(temperature=1.0, repetition_penalty=1e-40, seed=1), prompt=[4])
    logits[0, 4] = 0.5
    assert draw(state, logits, 3, [0])[0] == [4, 4, 4]


def test_an_all_greedy_batch_skips_the_noise_and_picks_the_same_tokens() -> None:
    logits = torch.randn(2, VOCAB, generator=torch.Generator().manual_seed(2))
    fast = state_for(GenerationParams(), GenerationParams(repetition_penalty=1.3), prompt=[int(logits[0].argmax())])
    slow = state_for(GenerationParams(), GenerationParams(repetition_penalty=1.3), prompt=[int(logits[0].argmax())])
    rows = torch.tensor([0, 1])
    for _ in range(3):
        assert fast.sample(logits, rows, random=False).tolist() == slow.sample(logits, rows).tolist()
    assert fast.step.tolist() == slow.step.tolist() == [3, 3]
    assert fast.seen is not None and slow.seen is not None and torch.equal(fast.seen, slow.seen)
