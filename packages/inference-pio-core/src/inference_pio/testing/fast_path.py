"""Checks a plugin author runs on a fast path: the compiled decode step (what a GPU runs as CUDA
graphs) must give the eager step's tokens, alone and with requests sharing the step.

Torch-free on import; the plugins passed in are activated already (one with ``compile=True`` and at
least as many slots as there are requests).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any


def assert_compiled_matches_eager(
    eager: Any, compiled: Any, requests: Sequence[Sequence[Any]], *, max_new_tokens: int = 24
) -> None:
    """Greedy ``chat_completion`` tokens of each request through ``compiled`` equal ``eager``'s, one at a
    time and all at once."""
    expected = [eager.chat_completion(m, max_new_tokens=max_new_tokens).token_ids for m in requests]
    alone = [compiled.chat_completion(m, max_new_tokens=max_new_tokens).token_ids for m in requests]
    assert alone == expected, "compiled decode differs from eager decode for single requests"
    together: dict[int, Any] = {}

    def ask(i: int) -> None:
        together[i] = compiled.chat_completion(requests[i], max_new_tokens=max_new_tokens).token_ids

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert [together.get(i) for i in range(len(requests))] == expected, "compiled decode differs when batched"
