"""The server in front of an isolated (low-trust) directory plugin: same API, streams cross threads and a pipe."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
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
