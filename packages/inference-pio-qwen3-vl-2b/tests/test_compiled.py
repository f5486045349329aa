"""The compiled decode step (what a GPU runs as CUDA graphs) gives the eager step's tokens, with
images (M-RoPE deltas) and two requests sharing the step."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from inference_pio import PluginManager
from inference_pio.testing.fast_path import assert_compiled_matches_eager
from inference_pio_qwen3_vl_2b import Qwen3VL2BPlugin

IMAGE = Image.fromarray((np.random.RandomState(4).rand(70, 90, 3) * 255).astype("uint8"))
REQUESTS: list[list[dict[str, Any]]] = [
    [{"role": "user", "content": "Hello! What is a plugin?"}],
    [{"role": "user", "content": [{"type": "image", "image": IMAGE}, {"type": "text", "text": "Describe it."}]}],
]


@pytest.fixture(scope="module")
def compiled(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Qwen3VL2BPlugin]:
    pm = PluginManager(environ={"INFERENCE_PIO_CONFIG": str(tmp_path_factory.mktemp("cfg") / "none.toml")})
    plugin = pm.activate_plugin(
        "qwen3_vl_2b", device="cpu", model_path=str(checkpoint), max_context=512, max_batch_size=2, compile=True
    )
    assert isinstance(plugin, Qwen3VL2BPlugin)
    assert plugin.engine.compiled_at is not None  # warmed up at activation, before the first request
    yield plugin
    pm.shutdown()


def test_compiled_decode_gives_the_eager_tokens_alone_and_batched(
    plugin: Qwen3VL2BPlugin, compiled: Qwen3VL2BPlugin
) -> None:
    assert_compiled_matches_eager(plugin, compiled, REQUESTS)


def test_compiled_text_continuation_matches_transformers_generate(compiled: Qwen3VL2BPlugin) -> None:
    ids = compiled.tokenize("The quick brown fox")
    result = compiled.generate_text("The quick brown fox", max_new_tokens=16)
    with torch.inference_mode():
        expected = compiled.model.generate(input_ids=torch.tensor([ids]), max_new_tokens=16, do_sample=False)
    assert list(result.token_ids) == expected[0, len(ids) :].tolist()
