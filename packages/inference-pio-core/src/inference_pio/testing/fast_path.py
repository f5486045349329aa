"""Checks a plugin author runs on a fast path: the compiled decode step (what a GPU runs as CUDA
graphs) must give the eager step's tokens, alone and with requests sharing the step.

Torch-free on import; the plugins passed in are activated already (one with ``compile=True`` and at
least as many slots as there are requests).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
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


def random_prompt(length: int, seed: int, vocab: int = 200) -> list[int]:
    """``length`` token ids below ``vocab``, the same for the same seed (prompts for fidelity tests)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    return [int(t) for t in torch.randint(0, vocab, (length,), generator=generator)]


def reference_greedy(model: Any, ids: Sequence[int], steps: int) -> tuple[list[int], Any]:
    """The reference a fast path is held to: plain transformers, a prefill of ``ids`` then ``steps`` greedy
    decode steps with its own cache. Returns the tokens (the prefill's first) and the decode steps' logits
    ``[steps, vocab]`` in float32."""
    import torch
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([list(ids)]), cache=cache, use_cache=True).logits[0, -1]
        tokens, logits_per_step = [int(logits.argmax())], []
        for _ in range(steps):
            logits = model(input_ids=torch.tensor([[tokens[-1]]]), cache=cache, use_cache=True).logits[0, -1]
            logits_per_step.append(logits.float())
            tokens.append(int(logits.argmax()))
    return tokens, torch.stack(logits_per_step)


@contextmanager
def switched_off(name: str, switch: str, how: str, model_path: Path, config_dir: Path) -> Iterator[Any]:
    """``name`` activated on the CPU with its fast-path setting ``switch`` turned off the way a user would:
    ``how="keyword"`` (``activate_plugin(..., switch=False)``) or ``"environment"``
    (``INFERENCE_PIO_<NAME>__<SWITCH>=0``); no config file. Deactivated on exit."""
    from inference_pio.plugin_system.manager import PluginManager

    environ = {"INFERENCE_PIO_CONFIG": str(config_dir / "none.toml")}
    extra: dict[str, Any] = {}
    if how == "environment":
        environ[f"INFERENCE_PIO_{name.upper()}__{switch.upper()}"] = "0"
    else:
        extra[switch] = False
    pm = PluginManager(environ=environ)
    try:
        yield pm.activate_plugin(name, device="cpu", model_path=str(model_path), max_context=256, **extra)
    finally:
        pm.shutdown()
