"""Qwen3-VL's tool-call format, read back from what its template and tokenizer produce; tools in chat."""

from __future__ import annotations

import json
from typing import Any

import pytest

from inference_pio import InvalidRequestError
from inference_pio.parsers import ParsedDelta, join_tool_calls
from inference_pio.runtime.streaming import IncrementalDetokenizer
from inference_pio_qwen3_vl_2b import Qwen3VL2BPlugin
from inference_pio_qwen3_vl_2b.parsers import Qwen3VLToolCallParser

WEATHER = {
    "type": "function",
    "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}},
}
ADD = {"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}


def parse(pieces: list[str]) -> ParsedDelta:
    parser = Qwen3VLToolCallParser([WEATHER, ADD])
    out = ParsedDelta()
    for piece in pieces:
        out += parser.feed(piece)
    return out + parser.finish()


def calls_of(delta: ParsedDelta) -> list[tuple[str, dict[str, Any]]]:
    return [(c.name, json.loads(c.arguments)) for c in join_tool_calls(delta.tool_calls)]


def test_calls_written_by_the_template_are_read_back_token_by_token(plugin: Qwen3VL2BPlugin) -> None:
    arguments = [("get_weather", {"city": "Zürich"}), ("add", {"a": 2.5, "b": [1, {"c": None}], "flag": True})]
    message = {
        "role": "assistant",
        "content": "Checking.",
        "tool_calls": [{"type": "function", "function": {"name": n, "arguments": a}} for n, a in arguments],
    }
    rendered = plugin.tokenizer.apply_chat_template(
        [{"role": "user", "content": "q"}, message], chat_template=plugin.chat_template, tokenize=False
    )
    start = rendered.index("<|im_start|>assistant\n") + len("<|im_start|>assistant\n")
    answer = rendered[start : rendered.index("<|im_end|>", start)]
    detok = IncrementalDetokenizer(plugin.tokenizer)
    pieces = [detok.push(t) for t in plugin.tokenizer.encode(answer, add_special_tokens=False)] + [detok.flush()]
    assert "".join(pieces) == answer
    parsed = parse(pieces)
    assert parsed.content == "Checking."
    assert calls_of(parsed) == arguments
    assert [d.index for d in parsed.tool_calls] == [0, 1]


def test_every_split_parses_the_same() -> None:
    text = 'Sure.\n<tool_call>\n{"name": "add", "arguments": {"a": 1}}\n</tool_call>\n'
    for i in range(len(text) + 1):
        parsed = parse([text[:i], text[i:]])
        assert (parsed.content, calls_of(parsed)) == ("Sure.", [("add", {"a": 1})])
    assert calls_of(parse(list(text))) == [("add", {"a": 1})]


def test_double_encoded_arguments_are_accepted() -> None:
    text = '<tool_call>{"name": "add", "arguments": "{\\"a\\": 1}"}</tool_call>'
    assert calls_of(parse([text])) == [("add", {"a": 1})]


@pytest.mark.parametrize(
    "bad",
    [
        "<tool_call>\n{'name': 'add'}\n</tool_call>",  # not JSON
        '<tool_call>{"arguments": {}}</tool_call>',  # no name
        '<tool_call>{"name": "launch", "arguments": {}}</tool_call>',  # not offered
        '<tool_call>{"name": "add", "arguments": "[1]"}</tool_call>',
        '<tool_call>{"name": "add", "arguments": {"a": 1}}',  # cut off
    ],
)
def test_malformed_calls_are_text(bad: str) -> None:
    text = "Answer: " + bad
    parsed = parse([text])
    assert (parsed.content, parsed.tool_calls) == (text, ())


def test_chat_with_tools_offered_accepted_or_declined(plugin: Qwen3VL2BPlugin) -> None:
    messages: list[dict[str, Any]] = [{"role": "user", "content": "Weather in Oslo?"}]
    plain = plugin.chat_completion(messages, max_new_tokens=4)
    offered = plugin.chat_completion(messages, max_new_tokens=4, tools=[WEATHER])
    declined = plugin.chat_completion(messages, max_new_tokens=4, tools=[WEATHER], tool_choice="none")
    assert offered.usage.prompt_tokens > plain.usage.prompt_tokens == declined.usage.prompt_tokens
    assert plain.reasoning is None  # Qwen3-VL-Instruct does not think
    history = [
        *messages,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "rain"},
    ]
    chunks = list(plugin.stream_chat(history, max_new_tokens=4, tools=[WEATHER], tool_choice="required"))
    assert chunks[-1].finish_reason in ("stop", "length", "tool_calls")
    with pytest.raises(InvalidRequestError) as info:
        plugin.chat_completion(messages, tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "x"}})
    assert info.value.param == "tool_choice"
