"""The server in a fresh virtual environment without torch, serving torch-free plugins: bad requests are 4xx.

The venv gets the core wheel with its ``serve`` extra and the example echo plugin (pip-installed,
isolated at trust ``medium``), plus a slow directory plugin written here (isolated at ``low``) that
holds its worker long enough to fill the waiting queue (429) and to be caught loading (503).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from .server_harness import ServerProcess
from .test_fresh_venv import Venv

SLOW_PLUGIN = '''
"""Answers "slow" after sleeping as many seconds as the last user message says; loading takes 3 s."""
import time
from typing import Any

from inference_pio import (
    GenerationParams, ModelPluginMetadata, StreamChunk, TextModelPluginInterface, Usage, hookimpl,
)

METADATA = ModelPluginMetadata(
    name="slow", version="1.0.0", description="sleeps", model_id="test/slow", architecture="Slow",
    modalities=("text",), parameter_count=1, memory_requirements={"float32": 4}, supported_devices=("cpu",),
    plugin_api=">=1.0,<2", license="MIT",
)


class Slow(TextModelPluginInterface):
    metadata = METADATA

    def initialize(self, **kwargs: Any) -> None: ...
    def load_model(self, config: Any) -> None:
        time.sleep(3)
    def cleanup(self) -> None: ...
    def tokenize(self, text: str) -> list[int]:
        return [1] * len(text.split())
    def detokenize(self, ids: Any) -> str:
        return "slow " * len(ids)

    def _answer(self, seconds: float, params: dict[str, Any]) -> Any:
        GenerationParams.parse(params)
        yield StreamChunk("slow")
        time.sleep(seconds)
        yield StreamChunk("", "stop", Usage(1, 1))

    def stream_text(self, prompt: str, **params: Any) -> Any:
        return self._answer(float(prompt), params)

    def stream_chat(self, messages: Any, **params: Any) -> Any:
        return self._answer(float(messages[-1]["content"]), params)


@hookimpl
def inference_pio_register_plugins(register: Any) -> None:
    register("slow", Slow, METADATA)
'''


@pytest.fixture(scope="module")
def server(wheels: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    root = tmp_path_factory.mktemp("notorch")
    venv = Venv(root / "venv")
    venv.pip(f"{wheels['core']}[serve]", str(wheels["echo"]))
    assert venv.run("python", "-c", "import torch").returncode != 0, "torch must not be installed"
    plugins = root / "plugins"
    plugins.mkdir()
    (plugins / "slow.py").write_text(SLOW_PLUGIN)
    config = root / "config.toml"
    config.write_text(
        '[server]\nmodels = ["echo", "slow"]\n[limits.low]\nwall_seconds = 30\n'
        "[plugins.slow]\nmax_batch_size = 1\nmax_queue = 0\n"  # its worker takes 1 + 0 + 8 requests in flight
    )
    proc = ServerProcess(
        config, python=str(venv.bin / "python"), global_args=("--plugins-dir", str(plugins)), env=venv.env
    )
    try:
        yield proc
    finally:
        assert proc.stop() == 0, proc.log.read_text()[-3000:]


def chat(server: ServerProcess, body: object) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60)


def test_torch_free_server_answers_503_while_loading_then_serves(server: ServerProcess) -> None:
    body = {"model": "echo", "messages": [{"role": "user", "content": "hello world"}]}
    statuses = []
    refused = 0
    while not statuses or statuses[-1] != 200:
        try:
            statuses.append(httpx.get(f"{server.url}/health", timeout=5).status_code)
        except httpx.TransportError:
            assert server.proc.poll() is None, server.log.read_text()[-3000:]
            continue
        if statuses[-1] == 503:
            loading = chat(server, body)
            if loading.status_code == 200:  # loading ended between the two requests
                continue
            assert loading.status_code == 503, loading.text
            assert loading.headers["retry-after"] == "5"
            assert loading.json()["error"]["code"] == "not_ready"
            refused += 1
    assert refused, f"no request was refused while loading (health answers: {statuses})"
    answer = chat(server, body)
    assert answer.status_code == 200, answer.text
    assert answer.json()["choices"][0]["message"]["content"] == "hello world"


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"model": "echo", "messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages[0].role"),
        ({"model": "echo", "messages": [{"role": "system", "content": "hi"}]}, 400, "messages"),  # echo's own check
        ({"model": "gpt-5", "messages": [{"role": "user", "content": "hi"}]}, 404, "model"),
        ({"model": "echo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, 400, "max_tokens"),
        (
            {"model": "echo", "messages": [{"role": "user", "content": "hi"}], "chat_template_kwargs": {"x": 1}},
            400,
            "chat_template_kwargs.x",
        ),
        ({"model": "echo", "messages": [{"role": "user", "content": "hi"}], "temperature": 3}, 400, "temperature"),
        ({"model": "echo", "messages": [{"role": "user", "content": "a\udc90"}]}, 400, "messages[0].content"),
    ],
)
def test_torch_free_server_answers_bad_requests_with_4xx(
    server: ServerProcess, body: dict[str, object], status: int, param: str
) -> None:
    server.wait_ready()
    raw = json.dumps(body).encode()  # ensure_ascii: a lone surrogate travels as its \\u escape
    response = httpx.post(
        f"{server.url}/v1/chat/completions", content=raw, headers={"content-type": "application/json"}, timeout=60
    )
    assert response.status_code == status, response.text
    assert response.json()["error"]["param"] == param


def test_torch_free_server_answers_429_when_the_queue_is_full(server: ServerProcess) -> None:
    server.wait_ready()
    statuses: list[int] = []
    with httpx.stream(
        "POST",
        f"{server.url}/v1/chat/completions",
        json={"model": "slow", "messages": [{"role": "user", "content": "4"}], "stream": True},
        timeout=60,
    ) as holder:
        lines = holder.iter_lines()
        next(lines)  # one request in flight in the worker until this stream ends

        def one() -> None:
            statuses.append(chat(server, {"model": "slow", "messages": [{"role": "user", "content": "2"}]}).status_code)

        threads = [threading.Thread(target=one) for _ in range(10)]  # 8 more fit in flight, the rest are refused
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert [line for line in lines if line.startswith("data: ")][-1] == "data: [DONE]"
    assert 429 in statuses and set(statuses) <= {200, 429}, statuses
    assert "Traceback" not in server.log.read_text()
