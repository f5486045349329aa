"""The parser interfaces: reasoning and tool calls split out of generated text, streamed or whole."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import pytest

from inference_pio.common.interfaces import StreamChunk, Usage, collect
from inference_pio.parsers import (
    DelimitedReasoningParser,
    ParsedDelta,
    ReasoningParser,
    TaggedToolCallParser,
    ToolCallDelta,
    ToolCallParser,
    join_tool_calls,
    parse_stream,
    parse_text,
)

TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}},
    {"type": "function", "function": {"name": "add"}},
]


class JsonToolCalls(TaggedToolCallParser):
    """What a third-party plugin writes: JSON ``{"name", "arguments"}`` inside the tags."""

    def parse_call(self, body: str) -> tuple[str, Mapping[str, Any]] | None:
        obj = json.loads(body)
        return (obj["name"], obj["arguments"]) if isinstance(obj, dict) else None


def run(make: Callable[[], ReasoningParser | ToolCallParser], pieces: list[str]) -> ParsedDelta:
    parser = make()
    out = ParsedDelta()
    for piece in pieces:
        out += parser.feed(piece)
    return out + parser.finish()


def splits(text: str) -> Iterator[list[str]]:
    """The whole text, one character at a time, and cut in two at every boundary."""
    yield [text]
    yield list(text)
    for i in range(len(text) + 1):
        yield [text[:i], text[i:]]


def shape(delta: ParsedDelta) -> tuple[str, str, list[tuple[str, str, str]]]:
    """Everything but the random call ids."""
    return delta.content, delta.reasoning, [(c.id, c.name, c.arguments) for c in join_tool_calls(delta.tool_calls)]


def same_everywhere(
    make: Callable[[], ReasoningParser | ToolCallParser], text: str
) -> tuple[str, str, list[tuple[str, str]]]:
    """Parse ``text`` split every way; all must agree; return the result."""
    results: set[tuple[str, str, tuple[tuple[str, str], ...]]] = set()
    for pieces in splits(text):
        content, reasoning, calls = shape(run(make, pieces))
        assert all(cid.startswith("call_") and len(cid) == 29 for cid, _, _ in calls)
        results.add((content, reasoning, tuple((n, a) for _, n, a in calls)))
    assert len(results) == 1, results
    content, reasoning, calls_t = results.pop()
    return content, reasoning, list(calls_t)


@pytest.mark.parametrize(
    ("text", "reasoning", "content"),
    [
        ("plan it</think>The answer.", "plan it", "The answer."),
        ("\nstep 1\n</think>\nok", "\nstep 1\n", "\nok"),
        ("<think>again</think>x", "again", "x"),  # a repeated opening tag is not reasoning text
        ("cut off while thinking </thi", "cut off while thinking </thi", ""),
        ("", "", ""),
        ("</think>", "", ""),
        ("a</think>b</think>c", "a", "b</think>c"),
    ],
)
def test_reasoning_opened_by_the_prompt_is_split_at_every_boundary(text: str, reasoning: str, content: str) -> None:
    assert same_everywhere(DelimitedReasoningParser, text) == (content, reasoning, [])


@pytest.mark.parametrize(
    ("text", "reasoning", "content"),
    [
        ("<think>r</think>answer", "r", "answer"),
        ("  \n<think>r</think>answer", "r", "answer"),
        ("no thinking here <think>x</think>", "", "no thinking here <think>x</think>"),
        ("<thi", "", "<thi"),
        ("  ", "", "  "),
    ],
)
def test_reasoning_the_model_opens_itself(text: str, reasoning: str, content: str) -> None:
    assert same_everywhere(lambda: DelimitedReasoningParser(inside=False), text) == (content, reasoning, [])


def call(name: str, **args: Any) -> str:
    return "<tool_call>" + json.dumps({"name": name, "arguments": args}) + "</tool_call>"


def test_a_call_after_text_becomes_a_tool_call_and_layout_whitespace_goes() -> None:
    text = "Let me check.\n" + call("get_weather", city="Paris") + "\n"
    content, _, calls = same_everywhere(lambda: JsonToolCalls(TOOLS), text)
    assert content == "Let me check."
    assert calls == [("get_weather", '{"city": "Paris"}')]


def test_parallel_calls_get_consecutive_indices() -> None:
    text = call("get_weather", city="Paris") + "\n" + call("add", a=1, b=[2, 3]) + call("get_weather", city="Oslo")
    parsed = run(lambda: JsonToolCalls(TOOLS), [text])
    assert [d.index for d in parsed.tool_calls] == [0, 1, 2]
    assert len({d.id for d in parsed.tool_calls}) == 3
    assert [(c.name, json.loads(c.arguments)) for c in join_tool_calls(parsed.tool_calls)] == [
        ("get_weather", {"city": "Paris"}),
        ("add", {"a": 1, "b": [2, 3]}),
        ("get_weather", {"city": "Oslo"}),
    ]
    assert parsed.content == ""
    assert same_everywhere(lambda: JsonToolCalls(TOOLS), text)[2] == [
        ("get_weather", '{"city": "Paris"}'),
        ("add", '{"a": 1, "b": [2, 3]}'),
        ("get_weather", '{"city": "Oslo"}'),
    ]


@pytest.mark.parametrize(
    "bad",
    [
        "<tool_call>{not json</tool_call>",
        '<tool_call>{"name": "rm_rf", "arguments": {}}</tool_call>',  # not an offered function
        '<tool_call>{"name": "add", "arguments": [1, 2]}</tool_call>',  # arguments not an object
        '<tool_call>["add"]</tool_call>',
        '<tool_call>{"name": "add", "arguments": {"a": 1}',  # cut off before the end tag
        "<tool_call>",
        "<tool_",
    ],
)
def test_malformed_calls_come_back_as_the_text_they_were(bad: str) -> None:
    text = "Before \n" + bad
    assert same_everywhere(lambda: JsonToolCalls(TOOLS), text) == (text, "", [])


def test_a_malformed_call_between_good_ones_keeps_its_place_in_the_text() -> None:
    text = call("add", a=1) + " <tool_call>oops</tool_call> tail " + call("add", a=2)
    content, _, calls = same_everywhere(lambda: JsonToolCalls(TOOLS), text)
    assert content == "<tool_call>oops</tool_call> tail"  # whitespace after a call is layout
    assert calls == [("add", '{"a": 1}'), ("add", '{"a": 2}')]


@pytest.mark.parametrize("text", ["plain answer  \n", "a < b and <tool> <tool_cal", "x\n\n<tool_call", " \t"])
def test_without_calls_the_content_is_the_text_exactly(text: str) -> None:
    assert same_everywhere(lambda: JsonToolCalls(TOOLS), text) == (text, "", [])


def test_reasoning_and_tool_calls_together() -> None:
    text = "I should look it up.</think>Sure." + call("get_weather", city="Rome")
    parsed = parse_text(text, reasoning=DelimitedReasoningParser(), tools=JsonToolCalls(TOOLS))
    assert (parsed.reasoning, parsed.content) == ("I should look it up.", "Sure.")
    assert [c.name for c in join_tool_calls(parsed.tool_calls)] == ["get_weather"]


def test_a_call_inside_the_reasoning_is_reasoning() -> None:
    text = "maybe " + call("add", a=1) + "</think>done"
    parsed = parse_text(text, reasoning=DelimitedReasoningParser(), tools=JsonToolCalls(TOOLS))
    assert (parsed.reasoning, parsed.content, parsed.tool_calls) == (text[: text.index("</think>")], "done", ())


class _Chunks(Iterator[StreamChunk]):
    def __init__(self, texts: list[str], finish: str = "stop") -> None:
        self._it = iter([*(StreamChunk(t) for t in texts), StreamChunk("", finish, Usage(3, len(texts)), (1, 2))])  # type: ignore[arg-type]
        self.closed = False

    def __next__(self) -> StreamChunk:
        return next(self._it)

    def close(self) -> None:
        self.closed = True


def test_parse_stream_splits_chunks_and_collect_builds_the_result() -> None:
    text = "think</think>Hi " + call("add", a=1, b=2)
    stream = parse_stream(_Chunks(list(text)), reasoning=DelimitedReasoningParser(), tools=JsonToolCalls(TOOLS))
    chunks = list(stream)
    assert chunks[-1].finish_reason == "tool_calls"
    assert chunks[-1].token_ids == (1, 2)
    assert sum(len(c.tool_calls) for c in chunks) == 1
    result = collect(iter(chunks))
    assert (result.text, result.reasoning, result.finish_reason) == ("Hi", "think", "tool_calls")
    assert [(c.type, c.name, json.loads(c.arguments)) for c in result.tool_calls] == [
        ("function", "add", {"a": 1, "b": 2})
    ]
    assert result.tool_calls[0].to_openai()["function"]["name"] == "add"


def test_a_length_cut_keeps_its_finish_reason_and_no_parsers_means_no_change() -> None:
    chunks = list(parse_stream(_Chunks([call("add", a=1)], "length"), reasoning=None, tools=JsonToolCalls(TOOLS)))
    assert chunks[-1].finish_reason == "length"
    plain = _Chunks(["a", "b"])
    assert parse_stream(plain, reasoning=None, tools=None) is plain
    assert collect(plain).reasoning is None


def test_closing_a_parsed_stream_closes_the_source() -> None:
    source = _Chunks(["a", "b", "c"])
    stream = parse_stream(source, reasoning=DelimitedReasoningParser(), tools=None)
    next(stream)
    stream.close()  # type: ignore[attr-defined]
    assert source.closed


def test_tool_call_deltas_have_openais_shape() -> None:
    first = ToolCallDelta(0, "call_1", "add", "")
    rest = ToolCallDelta(0, arguments='{"a": 1}')
    assert first.to_openai() == {
        "index": 0,
        "id": "call_1",
        "type": "function",
        "function": {"name": "add", "arguments": ""},
    }
    assert rest.to_openai() == {"index": 0, "function": {"arguments": '{"a": 1}'}}
    assert [c.to_openai() for c in join_tool_calls([first, rest])] == [
        {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": '{"a": 1}'}}
    ]


def test_parsers_are_abstract_interfaces() -> None:
    with pytest.raises(TypeError):
        ToolCallParser(TOOLS)  # type: ignore[abstract]
    with pytest.raises(TypeError):
        ReasoningParser()  # type: ignore[abstract]
    assert JsonToolCalls(TOOLS).parameter_schema("get_weather", "city") == {}


def test_reasoning_and_tool_calls_cross_the_isolated_workers_pipe() -> None:
    from inference_pio.common.interfaces import GenerationResult
    from inference_pio.parsers import ToolCall
    from inference_pio.security import wire

    chunk = StreamChunk("a", "tool_calls", Usage(1, 2), (3,), "why", (ToolCallDelta(0, "call_1", "add", "{}"),))
    result = GenerationResult("a", "stop", Usage(1, 2), (3,), "why", (ToolCall("call_1", "add", '{"a": 1}'),))
    for value in (chunk, result, StreamChunk("plain"), GenerationResult("b", "length", Usage(1, 1))):
        assert wire.decode(json.loads(json.dumps(wire.encode(value)))) == value


def test_a_parser_bug_on_odd_output_gives_text_not_an_exception() -> None:
    class Buggy(TaggedToolCallParser):
        def parse_call(self, body: str) -> tuple[str, Mapping[str, Any]] | None:
            return body.split()[5], {}  # IndexError on short bodies

    text = "x <tool_call>add</tool_call>"
    assert same_everywhere(lambda: Buggy(TOOLS), text) == (text, "", [])
