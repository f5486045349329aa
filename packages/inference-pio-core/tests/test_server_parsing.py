"""Request-body parsing and error translation of the server, without a server: fast checks of the rules
that tests/test_server.py proves end to end."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytest.importorskip("fastapi")

from inference_pio.errors import ContextLengthError, QueueFullError, SchedulerStoppedError
from inference_pio.server.errors import APIError, translate
from inference_pio.server.parsing import MAX_JSON_DEPTH, load_json, parse_request
from inference_pio.server.protocol import ChatCompletionRequest, CompletionRequest


def nested(depth: int) -> bytes:
    return b'{"model": "m", "prompt": "p", "x": ' + b"[" * depth + b"]" * depth + b"}"


def test_nesting_up_to_the_limit_parses_and_one_more_is_a_400() -> None:
    assert load_json(nested(MAX_JSON_DEPTH - 1))["prompt"] == "p"  # the body object itself is one level
    with pytest.raises(APIError) as info:
        load_json(nested(MAX_JSON_DEPTH))
    assert info.value.status == 400
    assert info.value.param == "x" + "[0]" * (MAX_JSON_DEPTH - 1)
    with pytest.raises(APIError, match="more than 64 deep"):
        load_json(nested(100_000))  # deeper than json's own recursion limit


def test_lone_surrogates_are_refused_where_they_are_and_pairs_are_kept() -> None:
    with pytest.raises(APIError) as info:
        load_json(b'{"messages": [{"role": "user", "content": [{"text": "ok"}, {"text": "a\\udc90"}]}]}')
    assert info.value.param == "messages[0].content[1].text"
    with pytest.raises(APIError) as info:
        load_json(b'{"stop": {"\\ud800": 1}}')  # in a key: the object holding it is named
    assert info.value.param == "stop"
    assert load_json(b'{"prompt": "\\ud83d\\ude00"}') == {"prompt": "\U0001f600"}


def test_validation_errors_name_the_field_not_the_union_member() -> None:
    cases = [
        ({"model": "m", "prompt": "p", "stop": 5}, "stop"),
        ({"prompt": "p"}, "model"),
        ({"model": "m", "messages": [{"role": "user"}, {"role": "wizard"}]}, "messages[1].role"),
        ({"model": "m", "messages": [{"role": "user", "content": 3}]}, "messages[0].content"),
        ({"model": "m", "messages": [{"content": "hi"}]}, "messages[0].role"),
    ]
    for body, param in cases:
        model = ChatCompletionRequest if "messages" in body else CompletionRequest
        with pytest.raises(APIError) as info:
            parse_request(model, body, max_n=4)
        assert (info.value.status, info.value.param) == (400, param), body


def test_completions_default_to_16_tokens_whether_max_tokens_is_absent_or_null() -> None:
    absent = parse_request(CompletionRequest, {"model": "m", "prompt": "p"}, max_n=1)
    null = parse_request(CompletionRequest, {"model": "m", "prompt": "p", "max_tokens": None}, max_n=1)
    assert absent.generation_params()["max_new_tokens"] == null.generation_params()["max_new_tokens"] == 16
    chat = parse_request(ChatCompletionRequest, {"model": "m", "messages": [{"role": "user"}]}, max_n=1)
    assert chat.generation_params()["max_new_tokens"] == 256


def test_our_errors_translate_to_their_status_codes() -> None:
    assert translate(ContextLengthError("long", "messages")).status == 400
    full = translate(QueueFullError("full", retry_after=2.4))
    assert (full.status, full.headers) == (429, {"Retry-After": "2"})
    assert translate(SchedulerStoppedError("stopping")).status == 503
    assert json.loads(translate(RuntimeError("bug")).response().body)["error"]["type"] == "server_error"


def test_error_translation_imports_no_runtime_and_no_torch() -> None:
    code = (
        "import sys, inference_pio.server.errors, inference_pio.server.middleware\n"
        "loaded = [m for m in sys.modules if m == 'torch' or m.startswith('inference_pio.runtime')]\n"
        "assert not loaded, loaded\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
