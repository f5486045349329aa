"""GLM-4.7's reasoning and tool-call formats, read back from what its template and tokenizer produce."""

from __future__ import annotations

import json
from typing import Any

import pytest

from inference_pio import InvalidRequestError
from inference_pio.parsers import ParsedDelta, join_tool_calls
from inference_pio.runtime.streaming import IncrementalDetokenizer
from inference_pio_glm_4_7_flash import Glm47FlashPlugin
from inference_pio_glm_4_7_flash.parsers import Glm47ReasoningParser, Glm47ToolCallParser, split_reasoning

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "days": {"type": "integer"},
                "note": {"type": ["string", "null"]},
            },
        },
    },
}
ADD = {"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}


def parse(text: str, pieces: list[str] | None = None) -> ParsedDelta:
    parser = Glm47ToolCallParser([WEATHER, ADD])
    out = ParsedDelta()
    for piece in pieces if pieces is not None else [text]:
        out += parser.feed(piece)
    return out + parser.finish()


def calls_of(delta: ParsedDelta) -> list[tuple[str, dict[str, Any]]]:
    return [(c.name, json.loads(c.arguments)) for c in join_tool_calls(delta.tool_calls)]


def test_calls_written_by_the_template_are_read_back_token_by_token(plugin: Glm47FlashPlugin) -> None:
    """Render assistant calls with the published template, tokenize, stream the tokens back through the
    detokenizer and the parser: the same calls come out."""
    arguments = [
        ("get_weather", {"city": "Zürich 123", "days": 3, "note": "true"}),
        ("add", {"a": 2.5, "b": [1, {"c": None}], "flag": True, "s": "x y"}),
    ]
    message = {
        "role": "assistant",
        "content": "Checking.",
        "tool_calls": [{"type": "function", "function": {"name": n, "arguments": a}} for n, a in arguments],
    }
    rendered = plugin.tokenizer.apply_chat_template([{"role": "user", "content": "q"}, message], tokenize=False)
    answer = rendered[rendered.index("</think>", rendered.index("<|assistant|>")) + len("</think>") :]
    detok = IncrementalDetokenizer(plugin.tokenizer)
    pieces = [detok.push(t) for t in plugin.tokenizer.encode(answer, add_special_tokens=False)] + [detok.flush()]
    assert "".join(pieces) == answer
    parsed = parse(answer, pieces)
    assert parsed.content == "Checking."
    assert calls_of(parsed) == [
        ("get_weather", {"city": "Zürich 123", "days": 3, "note": "true"}),  # string-typed values stay strings
        ("add", {"a": 2.5, "b": [1, {"c": None}], "flag": True, "s": "x y"}),
    ]


def test_every_split_of_parallel_calls_parses_the_same() -> None:
    text = (
        "Sure.\n<tool_call>get_weather<arg_key>city</arg_key><arg_value>Oslo</arg_value>"
        "<arg_key>days</arg_key><arg_value>2</arg_value></tool_call>\n"
        "<tool_call>add\n<arg_key>a</arg_key>\n<arg_value>1</arg_value>\n</tool_call>"
    )
    expected = [("get_weather", {"city": "Oslo", "days": 2}), ("add", {"a": 1})]
    for i in range(len(text) + 1):
        parsed = parse(text, [text[:i], text[i:]])
        assert (parsed.content, calls_of(parsed)) == ("Sure.", expected)
    parsed = parse(text, list(text))
    assert [d.index for d in parsed.tool_calls] == [0, 1]
    assert (parsed.content, calls_of(parsed)) == ("Sure.", expected)


def test_a_call_without_arguments() -> None:
    assert calls_of(parse("<tool_call>add</tool_call>")) == [("add", {})]


@pytest.mark.parametrize(
    "bad",
    [
        "<tool_call><arg_key>a</arg_key><arg_value>1</arg_value></tool_call>",  # no name
        "<tool_call>add<arg_key>a</arg_key></tool_call>",  # key without value
        "<tool_call>add<arg_key>a</arg_key><arg_value>1</arg_value>junk</tool_call>",
        "<tool_call>add<arg_key>a</arg_key><arg_value>1</arg_value><arg_key>a</arg_key><arg_value>2</arg_value>"
        "</tool_call>",  # the same key twice
        "<tool_call>launch<arg_key>a</arg_key><arg_value>1</arg_value></tool_call>",  # not offered
        "<tool_call>add<arg_key>a</arg_key><arg_value>1",  # cut off
    ],
)
def test_malformed_calls_are_text(bad: str) -> None:
    text = "Answer: " + bad
    parsed = parse(text)
    assert (parsed.content, parsed.tool_calls) == (text, ())


@pytest.mark.parametrize(
    ("content", "split"),
    [
        ("no reasoning", None),
        ("<think>\nplan\n</think>\nanswer", ("plan", "answer")),
        ("plan</think>answer", ("plan", "answer")),
        ("a<think>b</think>c</think>\n\nd", ("b", "d")),
    ],
)
def test_history_reasoning_is_split_as_the_template_does(content: str, split: tuple[str, str] | None) -> None:
    assert split_reasoning(content) == split


def test_generated_reasoning_ends_at_the_closing_tag() -> None:
    parser = Glm47ReasoningParser()
    out = parser.feed("Let me think.</thi") + parser.feed("nk>The answer.") + parser.finish()
    assert (out.reasoning, out.content) == ("Let me think.", "The answer.")


def test_chat_with_thinking_returns_the_reasoning_apart(plugin: Glm47FlashPlugin) -> None:
    messages = [{"role": "user", "content": "Hello"}]
    on = plugin.chat_completion(messages, max_new_tokens=12, ignore_eos=True)
    decoded = plugin.detokenize(on.token_ids)
    # random weights rarely close the reasoning: what is not reasoning is the answer, and together they are the output
    parser = Glm47ReasoningParser()
    expected = parser.feed(decoded) + parser.finish()
    assert (on.reasoning or "") + on.text == decoded.replace("</think>", "", 1)
    assert on.reasoning == (expected.reasoning or None)
    chunks = list(plugin.stream_chat(messages, max_new_tokens=12, ignore_eos=True))
    assert "".join(c.reasoning for c in chunks) == (on.reasoning or "")
    assert "".join(c.text for c in chunks) == on.text
    off = plugin.chat_completion(messages, max_new_tokens=12, ignore_eos=True, enable_thinking=False)
    assert off.reasoning is None
    assert off.text == plugin.detokenize(off.token_ids)


def test_tools_are_rendered_into_the_prompt_unless_tool_choice_is_none(plugin: Glm47FlashPlugin) -> None:
    messages = [{"role": "user", "content": "Weather in Oslo?"}]
    plain = plugin.chat_completion(messages, max_new_tokens=2)
    offered = plugin.chat_completion(messages, max_new_tokens=2, tools=[WEATHER], tool_choice="auto")
    declined = plugin.chat_completion(messages, max_new_tokens=2, tools=[WEATHER], tool_choice="none")
    assert offered.usage.prompt_tokens > plain.usage.prompt_tokens == declined.usage.prompt_tokens
    assert offered.finish_reason in ("stop", "length", "tool_calls")
    history: list[dict[str, Any]] = [
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
    assert plugin.chat_completion(history, max_new_tokens=2, tools=[WEATHER]).usage.completion_tokens >= 1


@pytest.mark.parametrize(
    ("params", "param"),
    [
        ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools[0].function.name"),
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "add"}}}, "tool_choice"),
        ({"tool_choice": "required"}, "tool_choice"),
    ],
)
def test_bad_tools_are_clear_errors_and_the_plugin_keeps_working(
    plugin: Glm47FlashPlugin, params: dict[str, Any], param: str
) -> None:
    with pytest.raises(InvalidRequestError) as info:
        plugin.chat_completion([{"role": "user", "content": "hi"}], **params)
    assert info.value.param == param
    assert plugin.chat_completion([{"role": "user", "content": "hi"}], max_new_tokens=2).usage.completion_tokens >= 1
