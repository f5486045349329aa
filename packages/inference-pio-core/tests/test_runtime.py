"""The generation runtime on its own: a tiny random Llama built here, no model package.

Proves the contract (submit → token stream → finish reason, cancel, stats, close), that batching
never changes a request's tokens, and that the compiled decode step has no graph break, compiles
once for every view bucket and slot mix, and gives the eager step's tokens.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from inference_pio import GenerationParams
from inference_pio.errors import QueueFullError, SchedulerStoppedError
from inference_pio.runtime.contract import GenerationRuntime, Prompt, TokenStream
from inference_pio.runtime.engine import VIEW_BUCKET, DecodeEngine
from inference_pio.runtime.scheduler import Scheduler

MAX_LEN = 2 * VIEW_BUCKET


@pytest.fixture(scope="module")
def model() -> Any:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=384,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
    )
    model = LlamaForCausalLM(config).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def make_runtime(model: Any, slots: int = 1, *, compile: bool = False, queue: int = 8) -> Scheduler:
    engine = DecodeEngine(model, max_len=MAX_LEN, max_slots=slots, compile=compile)
    engine.warm_up()
    return Scheduler(engine, frozenset(), max_queue=queue)


@pytest.fixture
def runtime(model: Any) -> Iterator[Scheduler]:
    scheduler = make_runtime(model, slots=3)
    yield scheduler
    scheduler.close()


def prompt(n: int, start: int = 1) -> Prompt:
    return Prompt([(start + 7 * i) % 380 + 1 for i in range(n)])


def greedy(n: int) -> GenerationParams:
    return GenerationParams(max_new_tokens=n, ignore_eos=True)


def reference(model: Any, p: Prompt, n: int) -> list[int]:
    with torch.inference_mode():
        out = model.generate(input_ids=torch.tensor([p.ids]), max_new_tokens=n, do_sample=False)
    return out[0, len(p.ids) :].tolist()  # type: ignore[no-any-return]


def test_scheduler_satisfies_the_runtime_contract(runtime: Scheduler) -> None:
    contract: GenerationRuntime = runtime  # checked by mypy
    stream = contract.submit(prompt(5), greedy(3))
    assert isinstance(stream, TokenStream)
    assert len(list(stream)) == 3
    stats = contract.stats()
    assert (stats.slots, stats.active, stats.queued, stats.compiled) == (3, 0, 0, False)
    assert stats.tokens >= 3


def test_one_request_gives_transformers_greedy_tokens(model: Any, runtime: Scheduler) -> None:
    p = prompt(20)
    stream = runtime.submit(p, greedy(24))
    assert list(stream) == reference(model, p, 24)
    assert stream.finish_reason == "length"


def test_batched_requests_joining_and_leaving_get_the_tokens_they_get_alone(model: Any, runtime: Scheduler) -> None:
    requests = [(prompt(5 + 11 * i, start=i), 6 + 9 * i) for i in range(5)]
    alone = [list(runtime.submit(p, greedy(n))) for p, n in requests]
    results: dict[int, list[int]] = {}

    def run(i: int) -> None:
        p, n = requests[i]
        results[i] = list(runtime.submit(p, greedy(n)))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(5)]  # 5 requests, 3 slots
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert [results[i] for i in range(5)] == alone
    assert alone[0] == reference(model, requests[0][0], requests[0][1])


def test_the_runtime_alone_decides_finishing(model: Any) -> None:
    p = prompt(10)
    expected = reference(model, p, 8)
    eos = expected[4]
    scheduler = Scheduler(DecodeEngine(model, max_len=MAX_LEN), frozenset({eos}), max_queue=1)
    try:
        stream = scheduler.submit(p, GenerationParams(max_new_tokens=8))
        got = list(stream)
        assert got == expected[: expected.index(eos) + 1]  # the end-of-sequence token is the last one
        assert stream.finish_reason == "stop"
        stream = scheduler.submit(p, GenerationParams(max_new_tokens=8, ignore_eos=True))
        assert list(stream) == expected
        assert stream.finish_reason == "length"
        near_end = prompt(MAX_LEN - 3)
        stream = scheduler.submit(near_end, greedy(50))
        assert len(list(stream)) == 4  # the context window ends the request: 3 free positions + the last token
        assert stream.finish_reason == "length"
    finally:
        scheduler.close()


def test_cancel_frees_the_slot_and_a_full_queue_refuses(model: Any) -> None:
    scheduler = make_runtime(model, slots=1, queue=1)
    try:
        running = scheduler.submit(prompt(4), greedy(10_000))
        next(running)
        waiting = scheduler.submit(prompt(4), greedy(3))
        with pytest.raises(QueueFullError, match="queue of 1 waiting requests is full"):
            scheduler.submit(prompt(4), greedy(3))
        running.close()
        assert running.finish_reason == "cancelled"
        assert len(list(waiting)) == 3  # the cancelled request's slot went to the waiting one
    finally:
        scheduler.close()
    with pytest.raises(SchedulerStoppedError):
        scheduler.submit(prompt(4), greedy(3))


def test_seeded_sampling_is_the_same_alone_and_batched(runtime: Scheduler) -> None:
    params = GenerationParams(max_new_tokens=12, temperature=0.9, top_p=0.9, top_k=50, seed=5, ignore_eos=True)
    alone = list(runtime.submit(prompt(8), params))
    crowd = [
        runtime.submit(prompt(3 + i, start=9), GenerationParams(max_new_tokens=20, temperature=1.0)) for i in range(2)
    ]
    together = list(runtime.submit(prompt(8), params))
    for stream in crowd:
        stream.close()
    assert together == alone
    assert list(runtime.submit(prompt(8), params.model_copy(update={"seed": 6}))) != alone


def test_compiled_step_has_no_graph_break_compiles_once_and_matches_eager(model: Any) -> None:
    """300+ decode steps crossing from the first view bucket into the second, with slots joining and leaving."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    requests = [
        (prompt(VIEW_BUCKET - 60, start=1), 120),  # crosses into the second bucket
        (prompt(30, start=2), 40),  # leaves early; its slot is reused
        (prompt(50, start=3), 310),
        (prompt(VIEW_BUCKET + 10, start=4), 60),  # joins in the second bucket
        (prompt(5, start=5), 150),
    ]

    def run(compile: bool) -> tuple[list[list[int]], int]:
        scheduler = make_runtime(model, slots=3, compile=compile)
        streams = [(scheduler.submit(p, greedy(n)), n) for p, n in requests]
        out = [list(stream) for stream, _ in streams]
        steps = scheduler.steps
        scheduler.close()
        return out, steps

    eager, _ = run(False)
    started = time.perf_counter()
    compiled, steps = run(True)
    assert steps >= 300, steps
    assert compiled == eager
    assert dict(counters["graph_break"]) == {}
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])  # no recompilation for any bucket
    assert time.perf_counter() - started < 600


def test_logprobs_are_the_log_softmax_of_the_reference_logits(model: Any, runtime: Scheduler) -> None:
    p = prompt(12)
    with torch.inference_mode():
        ref = model.generate(
            input_ids=torch.tensor([p.ids]),
            max_new_tokens=6,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
        )
    expected = torch.log_softmax(torch.stack([s[0].float() for s in ref.logits]), dim=-1)
    stream = runtime.submit(p, GenerationParams(max_new_tokens=6, ignore_eos=True, logprobs=5))
    alone_in_batch = runtime.submit(prompt(7), greedy(6))  # a batch-mate that asks for none
    tokens = list(stream)
    assert list(alone_in_batch) and alone_in_batch.logprobs == []
    assert tokens == ref.sequences[0, len(p.ids) :].tolist()
    assert len(stream.logprobs) == 6
    for step, (token, value, top) in enumerate(stream.logprobs):
        assert token == tokens[step]
        assert abs(value - expected[step, token].item()) < 1e-4
        best = expected[step].topk(5)
        assert [t for t, _ in top] == best.indices.tolist()
        assert max(abs(v - w) for (_, v), w in zip(top, best.values.tolist())) < 1e-4


def test_importing_inference_pio_chooses_passive_openmp_waiting_unless_the_user_chose() -> None:
    import os
    import subprocess
    import sys

    code = "import os, inference_pio; print(os.environ['OMP_WAIT_POLICY'])"
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    chosen = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert chosen.stdout.strip() == "PASSIVE"
    kept = subprocess.run(
        [sys.executable, "-c", code], env={**env, "OMP_WAIT_POLICY": "ACTIVE"}, capture_output=True, text=True
    )
    assert kept.stdout.strip() == "ACTIVE"
