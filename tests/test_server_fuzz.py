"""A fuzz session: schemathesis generates requests from the server's own OpenAPI document; none may get a 5xx.

The server runs for real (a subprocess on 127.0.0.1) with the tiny GLM checkpoint, so requests reach the
tokenizer, the chat template and the sampler. Bounded in examples per operation and in wall-clock time;
the examples are derandomized, so a failure reproduces on the next run.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.generation import GenerationMode

from inference_pio_glm_4_7_flash.testing import make_tiny_checkpoint

from .server_harness import ServerProcess

MODEL = "glm_4_7_flash"
EXAMPLES = {"POST": 30, "GET": 8}  # per operation and generation mode
TIME_BUDGET = 150.0  # seconds for the whole session (about 40 on an idle 2-core machine); examples past it are skipped


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    root = tmp_path_factory.mktemp("fuzz")
    checkpoint = make_tiny_checkpoint(root / "glm")
    config = root / "config.toml"
    # A short context keeps every generation short: larger max_tokens are refused with 400 before decoding.
    config.write_text(
        f'[server]\nmodels = ["{MODEL}"]\nmax_n = 2\nmax_body_bytes = 1000000\n'
        f'[plugins.{MODEL}]\nmodel_path = "{checkpoint}"\ndevice = "cpu"\nmax_context = 64\n'
        "max_batch_size = 4\nmax_queue = 16\n"
    )
    proc = ServerProcess(config)
    try:
        proc.wait_ready()
        yield proc
    finally:
        assert proc.stop() == 0, proc.log.read_text()[-3000:]


def served_document(url: str) -> dict[str, Any]:
    """The server's OpenAPI document, with ``max_tokens`` narrowed to fit the short context, so that valid
    requests reach generation instead of a context-length 400 (negative cases still send larger ones), and
    without the parameters that valid requests of this short-context server cannot combine freely."""
    doc: dict[str, Any] = httpx.get(f"{url}/openapi.json", timeout=10).json()
    for name in ("ChatCompletionRequest", "CompletionRequest"):
        body = doc["components"]["schemas"][name]
        assert body["properties"]["model"]["enum"] == [MODEL]  # the document names what this server serves
        body["properties"]["max_tokens"] = {"type": "integer", "minimum": 1, "maximum": 24}
        body["required"].append("max_tokens")
    # Offered tools put their system prompt in the context (always past 64 tokens: a 400), and top_logprobs
    # needs logprobs: true; generated freely, they would turn most valid requests into 400s.
    for name in ("tools", "tool_choice", "top_logprobs"):
        del doc["components"]["schemas"]["ChatCompletionRequest"]["properties"][name]
    return doc


class Session:
    """Counts what was sent and collects every 5xx; stops sending once the time budget is spent."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.deadline = time.monotonic() + TIME_BUDGET
        self.sent: dict[str, int] = {}
        self.skipped = 0
        self.errors: list[str] = []
        self.statuses: dict[int, int] = {}

    def fuzz(self, operation: schemathesis.APIOperation, mode: GenerationMode) -> None:
        @settings(
            max_examples=EXAMPLES[operation.method.upper()],
            deadline=None,
            database=None,
            derandomize=True,
            phases=[Phase.explicit, Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        @given(case=operation.as_strategy(generation_mode=mode))
        def send(case: schemathesis.Case) -> None:
            if time.monotonic() > self.deadline:
                self.skipped += 1
                return
            response = case.call(base_url=self.url, timeout=60)
            self.sent[operation.label] = self.sent.get(operation.label, 0) + 1
            self.statuses[response.status_code] = self.statuses.get(response.status_code, 0) + 1
            if response.status_code >= 500:
                self.errors.append(f"{response.status_code} {operation.label} {case.body!r:.300}: {response.text:.300}")

        try:
            send()
        except Unsatisfiable:  # nothing to make invalid (an operation without parameters has no negative cases)
            assert mode is GenerationMode.NEGATIVE, operation.label


def test_fuzzed_requests_never_get_a_server_error(server: ServerProcess) -> None:
    schema = schemathesis.openapi.from_dict(served_document(server.url))
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.label for op in operations} >= {"POST /v1/chat/completions", "POST /v1/completions"}
    session = Session(server.url)
    started = time.monotonic()
    for operation in operations:
        for mode in GenerationMode:
            session.fuzz(operation, mode)
    sent = session.sent
    print(
        f"fuzz: {sum(sent.values())} requests in {time.monotonic() - started:.0f} s {sent}, statuses "
        f"{session.statuses}, {session.skipped} skipped past the {TIME_BUDGET:.0f} s budget"
    )
    assert not session.errors, "\n".join(session.errors[:20])
    assert sent.get("POST /v1/chat/completions", 0) >= 20 and sent.get("POST /v1/completions", 0) >= 20, sent
    # some requests did generate (how many varies with the generated bodies: 5 to 16 seen)
    assert session.statuses.get(200, 0) >= 1, session.statuses
    log = server.log.read_text()
    assert "Traceback" not in log, log[-3000:]
