"""The server in front of isolated directory plugins: same API, streams cross threads and a pipe; a
transformers-backed one batches concurrent requests, answers 429 when full, and shows up in /metrics."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    config = tmp_path_factory.mktemp("cfg") / "config.toml"
    config.write_text("[limits.low]\nwall_seconds = 20\n")
    env = {**os.environ, "INFERENCE_PIO_CONFIG": str(config)}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "inference_pio.cli",
            "--plugins-dir",
            str(FIXTURES / "plugins"),
            "serve",
            "fixture_text",
            "--device",
            "cpu",
            "--port",
            str(port),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        assert proc.wait(30) == 0


def test_isolated_plugin_serves_streaming_and_concurrent_requests(server: str) -> None:
    body = {
        "model": "fixture_text",
        "messages": [{"role": "user", "content": "one two three four"}],
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    with httpx.stream("POST", f"{server}/v1/chat/completions", json=body, timeout=30) as response:
        events = [
            json.loads(line[6:])
            for line in response.iter_lines()
            if line.startswith("data: ") and line != "data: [DONE]"
        ]
    text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"])
    assert text == "one two three four"
    assert events[-1]["usage"] == {"prompt_tokens": 4, "completion_tokens": 4, "total_tokens": 8}
    with httpx.Client(timeout=30) as client:
        answers = [
            client.post(
                f"{server}/v1/chat/completions",
                json={"model": "fixture_text", "messages": [{"role": "user", "content": f"request {i}"}], "n": 2},
            ).json()
            for i in range(3)
        ]
    assert [a["choices"][1]["message"]["content"] for a in answers] == [f"request {i}" for i in range(3)]
    bad = httpx.post(
        f"{server}/v1/chat/completions",
        timeout=30,
        json={
            "model": "fixture_text",
            "messages": [{"role": "user", "content": "x"}],
            "temperature": 0,
            "top_p": 0.5,
            "max_tokens": 0,
        },
    )
    assert bad.status_code == 400
    assert bad.json()["error"]["param"] == "max_tokens"


HF_PLUGINS = FIXTURES / "hf_plugins"
SLOTS = 4


@pytest.fixture(scope="module")
def hf_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``inference-pio serve`` of a transformers-backed plugin at medium trust (isolated, as a pip-installed
    third-party plugin runs by default): 4 decode slots, no waiting queue."""
    sys.path.insert(0, str(HF_PLUGINS))
    from fixture_hf import make_checkpoint

    checkpoint = make_checkpoint(tmp_path_factory.mktemp("models") / "tiny-llama")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    config = tmp_path_factory.mktemp("cfg") / "config.toml"
    config.write_text(f'[trust]\ndirectory = "medium"\nmodel_dirs = ["{checkpoint.parent}"]\n')
    log = config.with_suffix(".log")
    args = ["--plugins-dir", str(HF_PLUGINS), "serve", "fixture_hf", "--model-path", str(checkpoint)]
    args += ["--device", "cpu", "--max-batch-size", str(SLOTS), "--max-queue", "0", "--max-context", "1024"]
    env = {**os.environ, "INFERENCE_PIO_CONFIG": str(config), "HF_HUB_OFFLINE": "1"}
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "inference_pio.cli", *args, "--port", str(port)], env=env, stdout=out, stderr=out
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            assert proc.poll() is None, log.read_text()[-3000:]
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        assert proc.wait(60) == 0, log.read_text()[-3000:]


def chat_body(i: int, max_tokens: int, **extra: object) -> dict[str, object]:
    return {
        "model": "fixture_hf",
        "messages": [{"role": "user", "content": f"Hello {i}, how are you today?"}],
        "max_tokens": max_tokens,
        "ignore_eos": True,
        **extra,
    }


def content_lines(response: httpx.Response) -> Iterator[str]:
    """The content deltas of a streamed chat answer, as they arrive."""
    for line in response.iter_lines():
        if line.startswith("data: ") and line != "data: [DONE]":
            event = json.loads(line[6:])
            if "error" in event:
                raise AssertionError(event)
            if event["choices"] and event["choices"][0]["delta"].get("content"):
                yield event["choices"][0]["delta"]["content"]


def metric(url: str, name: str) -> float:
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith(name + "{") and 'model="fixture_hf"' in line:
            return float(line.rpartition(" ")[2])
    raise AssertionError(f"no {name} for fixture_hf in /metrics")


def wait_for(check: Callable[[], bool], seconds: float = 30) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.1)
    return check()


def test_concurrent_streams_to_an_isolated_plugin_are_decoded_together(hf_server: str) -> None:
    first: dict[int, float] = {}
    ended: dict[int, float] = {}
    go = threading.Barrier(SLOTS)

    def run(i: int) -> None:
        go.wait()
        body = {**chat_body(i, 48), "stream": True}
        with httpx.stream("POST", f"{hf_server}/v1/chat/completions", json=body, timeout=120) as response:
            assert response.status_code == 200
            for _ in content_lines(response):
                first.setdefault(i, time.monotonic())
        ended[i] = time.monotonic()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(SLOTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert len(ended) == SLOTS == len(first)
    assert max(first.values()) < min(ended.values())  # all got their first token before any finished
    # the worker's decode steps reach the server's metrics: more than one request per step on average
    assert wait_for(
        lambda: (
            metric(hf_server, "inference_pio_decode_batch_size_sum")
            > metric(hf_server, "inference_pio_decode_batch_size_count")
            > 0
        )
    )
    assert wait_for(lambda: metric(hf_server, "inference_pio_active_batch_size") == 0)


def test_an_isolated_plugin_over_its_queue_answers_429_and_disconnects_free_the_slots(hf_server: str) -> None:
    with contextlib.ExitStack() as holders:
        responses = [
            holders.enter_context(
                httpx.stream(
                    "POST", f"{hf_server}/v1/chat/completions", json={**chat_body(i, 1000), "stream": True}, timeout=120
                )
            )
            for i in range(SLOTS)
        ]
        contents = [content_lines(response) for response in responses]  # kept: dropping one closes its stream
        for content in contents:
            next(content)  # each holds a decode slot, for 1000 tokens (5 s at least)
        refused = httpx.post(f"{hf_server}/v1/chat/completions", json=chat_body(9, 4), timeout=30)
        assert refused.status_code == 429, refused.text
        assert refused.json()["error"]["code"] == "queue_full"
        assert refused.headers["Retry-After"] == "1"
    # the clients went away: their streams were cancelled in the worker, the slots are free again
    assert wait_for(lambda: metric(hf_server, "inference_pio_active_batch_size") == 0)
    answer = httpx.post(f"{hf_server}/v1/chat/completions", json=chat_body(9, 4), timeout=60)
    assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] == 4


def test_an_isolated_plugins_options_are_checked_by_the_server(hf_server: str) -> None:
    bad = httpx.post(
        f"{hf_server}/v1/chat/completions",
        json=chat_body(1, 4, chat_template_kwargs={"style": "loud"}),
        timeout=30,
    )
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "chat_template_kwargs.style", bad.text
    good = httpx.post(
        f"{hf_server}/v1/chat/completions",
        json=chat_body(1, 4, chat_template_kwargs={"style": "terse"}),
        timeout=30,
    )
    assert good.status_code == 200, good.text
