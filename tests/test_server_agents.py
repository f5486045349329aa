"""What agent frameworks use, through the server: tool calls, reasoning, structured outputs and logprobs.

A real ``inference-pio serve`` process on 127.0.0.1 serves both tiny checkpoints; the official ``openai``
client drives it through an HTTP client that checks every response body and stream event against OpenAI's
own OpenAPI document (``openai_schema``) before the client sees it. The same plugins in-process are the
reference for what the answers must be (greedy decoding: equal, token for token).
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import openai
import pytest

from inference_pio import PluginManager
from inference_pio.common.interfaces import StreamChunk, Usage, collect
from inference_pio.parsers import ToolCallDelta
from inference_pio.server.serving_chat import OneCallOnly

from .openai_schema import Checked, validate
from .server_harness import ServerProcess

MODELS = ["qwen3_vl_2b", "glm_4_7_flash"]
WEATHER: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather forecast for a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer", "minimum": 1, "maximum": 7}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}
TIME: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"type": "string", "enum": ["UTC", "CET"]}},
            "required": ["zone"],
            "additionalProperties": False,
        },
    },
}
CALENDAR: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_date",
        "parameters": {
            "type": "object",
            "properties": {"style": {"type": "string", "enum": ["iso", "us"]}},
            "required": ["style"],
            "additionalProperties": False,
        },
    },
}
ARGUMENTS = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, TIME, CALENDAR)}
ASK: Any = [{"role": "user", "content": "What is the weather in Paris?"}]
ASK_TIME: Any = [{"role": "user", "content": "What time and day is it?"}]
CLOCK: Any = [TIME, CALENDAR]
"""Forced calls use tools whose arguments hold no free text: random weights would write a string until the
token budget ends (closing an open call at the budget's end is the runtime's, not yet there)."""
PERSON: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "tags": {"type": "array", "items": {"type": "string", "enum": ["a", "b"]}},
    },
    "required": ["name", "age"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def server(checkpoints: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """Contexts of 2048: the tiny tokenizers spend about a token a byte on the tools' system prompt."""
    config = tmp_path_factory.mktemp("srv") / "config.toml"
    config.write_text(f"""
[server]
models = ["qwen3_vl_2b", "glm_4_7_flash"]
max_n = 2

[plugins.qwen3_vl_2b]
model_path = "{checkpoints[0]}"
device = "cpu"
max_context = 2048

[plugins.glm_4_7_flash]
model_path = "{checkpoints[1]}"
device = "cpu"
max_context = 2048
""")
    proc = ServerProcess(config)
    try:
        proc.wait_ready()
        yield proc
    finally:
        assert proc.stop() == 0, proc.log.read_text()[-3000:]


@pytest.fixture(scope="module")
def checked() -> Checked:
    return Checked()


@pytest.fixture(scope="module")
def client(server: ServerProcess, checked: Checked) -> Iterator[openai.OpenAI]:
    http = openai.DefaultHttpxClient(event_hooks={"response": [checked]}, timeout=300)
    yield openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0, http_client=http)
    http.close()


@pytest.fixture(scope="module")
def local(checkpoints: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[PluginManager]:
    pm = PluginManager(environ={"INFERENCE_PIO_CONFIG": str(tmp_path_factory.mktemp("x") / "none.toml")})
    pm.activate_plugin("qwen3_vl_2b", device="cpu", model_path=str(checkpoints[0]), max_context=2048)
    pm.activate_plugin("glm_4_7_flash", device="cpu", model_path=str(checkpoints[1]), max_context=2048)
    yield pm
    pm.shutdown()


def raw(server: ServerProcess, path: str, body: dict[str, Any]) -> httpx.Response:
    """A request the client would not send as is; the answer is validated the same way."""
    response = httpx.post(f"{server.url}{path}", json=body, timeout=300)
    if response.status_code == 200:
        validate("CreateChatCompletionResponse" if "chat" in path else "CreateCompletionResponse", response.json())
    else:
        validate("ErrorResponse", response.json())
    return response


def stream_chat(client: openai.OpenAI, **request: Any) -> tuple[list[Any], str, str, dict[int, dict[str, Any]], Any]:
    """Chunks, content, reasoning, tool calls assembled by index (checking OpenAI's delta rules), finish."""
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **request))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    content, reasoning, finish = "", "", None
    calls: dict[int, dict[str, Any]] = {}
    for c in chunks[:-1]:
        assert c.usage is None and len(c.choices) == 1
        delta = c.choices[0].delta
        if c.choices[0].finish_reason is not None:
            assert finish is None and delta.content is None and not delta.tool_calls  # a finish chunk of its own
            finish = c.choices[0].finish_reason
        content += delta.content or ""
        reasoning += getattr(delta, "reasoning_content", None) or ""
        for d in delta.tool_calls or ():
            assert d.function is not None
            if d.index not in calls:  # the first piece of a call names it whole
                assert d.id and d.type == "function" and d.function.name and d.function.arguments is not None
                calls[d.index] = {"id": d.id, "name": d.function.name, "arguments": ""}
            else:
                assert d.id is None and d.function.name is None
            calls[d.index]["arguments"] += d.function.arguments or ""
    assert finish is not None
    return chunks, content, reasoning, calls, finish


def assert_valid_calls(calls: list[tuple[str, str]], offered: set[str]) -> None:
    assert calls, "no tool call came back"
    for name, arguments in calls:
        assert name in offered
        jsonschema.validate(json.loads(arguments), ARGUMENTS[name])


@pytest.mark.parametrize("model", MODELS)
def test_agent_loop_forced_call_tool_result_answer_and_json_schema(
    client: openai.OpenAI, checked: Checked, model: str
) -> None:
    """The issue's 'done when': a call forced by tool_choice="required" (whole and streamed), the tool's
    result sent back, an answer; then a json_schema answer that validates."""
    before = checked.bodies + checked.events
    whole = client.chat.completions.create(
        model=model, messages=ASK_TIME, tools=CLOCK, tool_choice="required", max_tokens=160
    )
    choice = whole.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    assert choice.message.tool_calls and choice.message.content is None
    calls = [(c.function.name, c.function.arguments) for c in choice.message.tool_calls]  # type: ignore[union-attr]
    assert_valid_calls(calls, {"get_time", "get_date"})

    _, content, _, streamed, finish = stream_chat(
        client, model=model, messages=ASK_TIME, tools=CLOCK, tool_choice="required", max_tokens=160
    )
    assert (finish, content) == ("tool_calls", "")
    assert [(c["name"], c["arguments"]) for c in streamed.values()] == calls  # greedy: the same calls

    history: Any = [
        *ASK_TIME,
        {"role": "assistant", "content": None, "tool_calls": [c.model_dump() for c in choice.message.tool_calls]},
        *(
            {"role": "tool", "tool_call_id": c.id, "content": json.dumps({"result": "12:00 UTC, 2026-11-28"})}
            for c in choice.message.tool_calls
        ),
    ]
    answer = client.chat.completions.create(model=model, messages=history, tools=CLOCK, max_tokens=12)
    assert answer.choices[0].finish_reason in ("stop", "length", "tool_calls")
    assert answer.usage is not None and whole.usage is not None
    assert answer.usage.prompt_tokens > whole.usage.prompt_tokens  # the call and its result are in the prompt

    person = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Describe a person as JSON"}],
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}},
        max_tokens=80,
    )
    jsonschema.validate(json.loads(person.choices[0].message.content or ""), PERSON)
    assert checked.bodies + checked.events > before + 6  # every answer above went through the OpenAPI check


@pytest.mark.parametrize("model", MODELS)
def test_named_tool_choice_calls_that_function_and_forced_calls_equal_the_python_api(
    client: openai.OpenAI, local: PluginManager, model: str
) -> None:
    """Also with ``parallel_tool_calls: false`` (what it drops is tested below: on these tools the tiny
    models make one call)."""
    named: Any = {"type": "function", "function": {"name": "get_date"}}
    request: Any = {"model": model, "messages": ASK_TIME, "tools": CLOCK, "max_tokens": 200, "temperature": 1.0}
    for seed in (1, 2):
        forced = client.chat.completions.create(**request, tool_choice=named, seed=seed).choices[0].message
        assert forced.tool_calls and {c.function.name for c in forced.tool_calls} == {"get_date"}  # type: ignore[union-attr]
    ours = local.get_plugin(model).chat_completion(  # type: ignore[attr-defined]
        ASK_TIME, tools=CLOCK, tool_choice="required", max_new_tokens=200, temperature=1.0, seed=3
    )
    for parallel in (True, False):
        theirs = client.chat.completions.create(
            **request, tool_choice="required", seed=3, parallel_tool_calls=parallel
        ).choices[0]
        assert theirs.finish_reason == ours.finish_reason == "tool_calls"
        assert [(c.function.name, c.function.arguments) for c in theirs.message.tool_calls or ()] == [  # type: ignore[union-attr]
            (c.name, c.arguments) for c in ours.tool_calls
        ]


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize(
    ("response_format", "schema"),
    [
        ({"type": "json_object"}, {"type": "object"}),
        ({"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}, PERSON),
        ({"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}, PERSON),
    ],
    ids=["json_object", "json_schema_strict", "json_schema"],
)
def test_response_format_answers_parse_and_validate_on_random_weights(
    client: openai.OpenAI, model: str, stream: bool, response_format: Any, schema: dict[str, Any]
) -> None:
    request: Any = {
        "model": model,
        "messages": [{"role": "user", "content": "A person, as JSON"}],
        "response_format": response_format,
        "max_tokens": 48,
        "temperature": 1.0,
        "seed": 7,
    }
    if stream:
        content = stream_chat(client, **request)[1]
    else:
        content = client.chat.completions.create(**request).choices[0].message.content or ""
    jsonschema.validate(json.loads(content), schema)


def test_response_format_text_is_plain_and_bad_schemas_are_400s(server: ServerProcess) -> None:
    base: dict[str, Any] = {"model": "qwen3_vl_2b", "messages": ASK, "max_tokens": 4}
    plain = raw(server, "/v1/chat/completions", base).json()
    text = raw(server, "/v1/chat/completions", {**base, "response_format": {"type": "text"}}).json()
    assert text["choices"][0]["message"] == plain["choices"][0]["message"]
    for response_format, param in [
        ({"type": "xml"}, "response_format.type"),
        ({"type": "json_schema"}, "response_format.json_schema"),
        ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "frobnicate"}}}, "response_format"),
    ]:
        response = raw(server, "/v1/chat/completions", {**base, "response_format": response_format})
        assert response.status_code == 400, response.text
        assert response.json()["error"]["param"] == param
    thinking = {"model": "glm_4_7_flash", "messages": ASK, "response_format": {"type": "json_object"}}
    response = raw(server, "/v1/chat/completions", {**thinking, "chat_template_kwargs": {"enable_thinking": True}})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "chat_template_kwargs.enable_thinking"


@pytest.mark.parametrize("model", MODELS)
def test_tool_choice_auto_and_none_answer_as_the_python_api_does(
    client: openai.OpenAI, local: PluginManager, model: str
) -> None:
    plugin: Any = local.get_plugin(model)
    tools: Any = [WEATHER, TIME]
    for choice in ("auto", "none"):
        ours = plugin.chat_completion(ASK, tools=tools, tool_choice=choice, max_new_tokens=24)
        theirs = client.chat.completions.create(
            model=model, messages=ASK, tools=tools, tool_choice=choice, max_tokens=24
        ).choices[0]
        assert theirs.finish_reason == ours.finish_reason
        assert (theirs.message.content or "") == ours.text
        assert getattr(theirs.message, "reasoning_content", None) == ours.reasoning
        assert [(c.function.name, c.function.arguments) for c in theirs.message.tool_calls or ()] == [  # type: ignore[union-attr]
            (c.name, c.arguments) for c in ours.tool_calls
        ]
    no_tools = plugin.chat_completion(ASK, max_new_tokens=24)
    assert ours.text == no_tools.text and ours.reasoning == no_tools.reasoning  # "none": the tools are not offered


@pytest.mark.parametrize("model", MODELS)
def test_tool_calls_in_history_and_the_developer_role_are_accepted(
    client: openai.OpenAI, local: PluginManager, model: str
) -> None:
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    history: Any = [
        {"role": "developer", "content": "Answer briefly."},
        *ASK,
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"},
    ]
    ours = local.get_plugin(model).chat_completion(history, tools=[WEATHER], max_new_tokens=8)  # type: ignore[attr-defined]
    theirs = client.chat.completions.create(model=model, messages=history, tools=[WEATHER], max_tokens=8)  # type: ignore[list-item]
    assert theirs.usage is not None and theirs.usage.prompt_tokens == ours.usage.prompt_tokens
    assert (theirs.choices[0].message.content or "") == ours.text


def test_reasoning_content_whole_streamed_and_switched_off(client: openai.OpenAI, local: PluginManager) -> None:
    glm: Any = local.get_plugin("glm_4_7_flash")
    on = glm.chat_completion(ASK, max_new_tokens=12)
    off = glm.chat_completion(ASK, max_new_tokens=12, enable_thinking=False)
    assert on.reasoning is not None  # thinking is on by default; the random weights never close it
    request: Any = {"model": "glm_4_7_flash", "messages": ASK, "max_tokens": 12}
    whole = client.chat.completions.create(**request).choices[0].message
    assert getattr(whole, "reasoning_content", None) == on.reasoning
    assert (whole.content or "") == on.text
    _, content, reasoning, _, _ = stream_chat(client, **request)
    assert (content, reasoning) == (on.text, on.reasoning)
    plain = client.chat.completions.create(**request, extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    assert getattr(plain.choices[0].message, "reasoning_content", None) == off.reasoning
    assert plain.choices[0].message.content == off.text


@pytest.mark.parametrize("model", MODELS)
def test_chat_logprobs_equal_the_python_api_whole_and_streamed(
    client: openai.OpenAI, checked: Checked, local: PluginManager, model: str
) -> None:
    before = (checked.bodies, checked.events)
    ours = local.get_plugin(model).chat_completion(ASK, max_new_tokens=6, logprobs=3)  # type: ignore[attr-defined]
    request: Any = {"model": model, "messages": ASK, "max_tokens": 6, "logprobs": True, "top_logprobs": 3}
    whole = client.chat.completions.create(**request).choices[0].logprobs
    chunks = stream_chat(client, **request)[0]
    streamed = [e for c in chunks[:-1] if c.choices[0].logprobs for e in c.choices[0].logprobs.content or ()]
    assert whole is not None and whole.content is not None
    for entries in (whole.content, streamed):
        assert len(entries) == len(ours.logprobs) == 6
        for entry, expected in zip(entries, ours.logprobs, strict=True):
            assert (entry.token, entry.logprob) == (expected.token, pytest.approx(expected.logprob, abs=1e-5))
            assert entry.bytes == list(expected.token.encode())
            assert [(t.token, t.logprob) for t in entry.top_logprobs] == [
                (text, pytest.approx(value, abs=1e-5)) for _, text, value in expected.top
            ]
    without = client.chat.completions.create(model=model, messages=ASK, max_tokens=2)
    assert without.choices[0].logprobs is None
    assert checked.bodies == before[0] + 2 and checked.events == before[1] + len(chunks)  # all went through the check


def test_completion_logprobs_equal_the_python_api_whole_and_streamed(
    client: openai.OpenAI, local: PluginManager
) -> None:
    ours = local.get_plugin("qwen3_vl_2b").generate_text("Once upon a", max_new_tokens=5, logprobs=2)  # type: ignore[attr-defined]
    whole = client.completions.create(model="qwen3_vl_2b", prompt="Once upon a", max_tokens=5, logprobs=2)
    lp = whole.choices[0].logprobs
    assert lp is not None
    assert lp.tokens == [e.token for e in ours.logprobs]
    assert lp.token_logprobs == pytest.approx([e.logprob for e in ours.logprobs], abs=1e-5)
    expected_top: Any = [{t: pytest.approx(v, abs=1e-5) for _, t, v in e.top} for e in ours.logprobs]
    assert lp.top_logprobs == expected_top
    offsets = [0]
    for e in ours.logprobs[:-1]:
        offsets.append(offsets[-1] + len(e.token))
    assert lp.text_offset == offsets
    streamed: dict[str, list[Any]] = {"tokens": [], "token_logprobs": [], "text_offset": []}
    for event in client.completions.create(
        model="qwen3_vl_2b", prompt="Once upon a", max_tokens=5, logprobs=2, stream=True
    ):
        part = event.choices[0].logprobs
        assert part is not None
        for key, values in streamed.items():
            values += getattr(part, key) or []
    assert streamed == {"tokens": lp.tokens, "token_logprobs": lp.token_logprobs, "text_offset": lp.text_offset}


@pytest.mark.parametrize(
    ("path", "extra", "param"),
    [
        ("/v1/chat/completions", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ("/v1/chat/completions", {"top_logprobs": 2}, "top_logprobs"),
        ("/v1/completions", {"logprobs": 21}, "logprobs"),
        ("/v1/chat/completions", {"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice"),
        (
            "/v1/chat/completions",
            {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "x"}}},
            "tool_choice",
        ),
        ("/v1/chat/completions", {"tools": [{"type": "function"}]}, "tools[0]"),
        ("/v1/chat/completions", {"tool_choice": "required"}, "tool_choice"),
    ],
)
def test_bad_agent_parameters_are_400s_naming_them(
    server: ServerProcess, path: str, extra: dict[str, Any], param: str
) -> None:
    body = {"model": "qwen3_vl_2b", "max_tokens": 2, **extra}
    body.update({"messages": ASK} if "chat" in path else {"prompt": "Hi"})
    response = raw(server, path, body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"].startswith(param)


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_explicit_nulls_for_nullable_parameters_are_defaults(server: ServerProcess, path: str) -> None:
    nulls = dict.fromkeys(
        [
            "n",
            "stream",
            "temperature",
            "top_p",
            "stop",
            "seed",
            "logprobs",
            "presence_penalty",
            "frequency_penalty",
            "stream_options",
            "user",
            "max_tokens",
        ]
    )
    if "chat" in path:
        nulls.update(dict.fromkeys(["top_logprobs", "tools", "tool_choice", "parallel_tool_calls", "response_format"]))
        body: dict[str, Any] = {"model": "glm_4_7_flash", "messages": ASK, "max_completion_tokens": 3}
    else:
        nulls.update(dict.fromkeys(["echo", "suffix", "best_of", "logit_bias"]))
        body = {"model": "glm_4_7_flash", "prompt": "Once upon", "max_tokens": 3}
    plain = raw(server, path, body).json()
    with_nulls = raw(server, path, {**nulls, **body})
    assert with_nulls.status_code == 200, with_nulls.text
    assert len(with_nulls.json()["choices"]) == 1
    assert with_nulls.json()["choices"][0].get("text") == plain["choices"][0].get("text")


class _Pieces(Iterator[StreamChunk]):
    def __init__(self, items: list[StreamChunk]) -> None:
        self.items, self.closed = iter(items), False

    def __next__(self) -> StreamChunk:
        return next(self.items)

    def close(self) -> None:
        self.closed = True


def test_parallel_tool_calls_false_passes_only_the_first_call_on_and_closes_the_stream() -> None:
    pieces = [
        StreamChunk("", tool_calls=(ToolCallDelta(0, "call_a", "get_weather", '{"city": '),)),
        StreamChunk("", tool_calls=(ToolCallDelta(0, arguments='"Paris"}'), ToolCallDelta(1, "call_b", "get_time"))),
        StreamChunk("", "tool_calls", Usage(3, 4), tool_calls=(ToolCallDelta(1, arguments="{}"),)),
    ]
    inner = _Pieces(pieces)
    one = OneCallOnly(inner)
    result = collect(one)
    assert [(c.id, c.name, c.arguments) for c in result.tool_calls] == [("call_a", "get_weather", '{"city": "Paris"}')]
    assert result.finish_reason == "tool_calls" and result.usage == Usage(3, 4)
    unstarted = _Pieces(pieces)
    OneCallOnly(unstarted).close()  # a client gone before the first piece still frees the decode slot
    assert unstarted.closed


def test_building_a_response_format_grammar_imports_no_torch() -> None:
    """The server builds grammars itself and must stay torch-free (lint-imports allows it this one import)."""
    code = (
        "import sys\n"
        "from inference_pio.server.protocol import ResponseFormat\n"
        "fmt = ResponseFormat.model_validate({'type': 'json_schema', 'json_schema': {'name': 'p', 'schema': {}}})\n"
        "assert fmt.grammar()\n"
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "[]"
