"""Parsers that split generated text into content, reasoning and tool calls.

Each model family writes tool calls and reasoning in its own format; its plugin package implements
these interfaces, and the plugin hands out fresh instances per request through
``TextModelPluginInterface.tool_parser(tools)`` and ``.reasoning_parser(options)``. A parser is fed
the text deltas of one generation in order and answers with :class:`ParsedDelta` values; streamed
or not, the same code runs, so both always agree.

Rules every parser keeps: ``feed`` and ``finish`` never raise on model output (a malformed tool call
comes back as plain content), and text split at any character boundary parses the same as whole.
Torch-free; names no model.
"""

from __future__ import annotations

import json
import logging
import secrets
from abc import ABC, abstractmethod
from collections.abc import Generator, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from inference_pio.common.interfaces import StreamChunk

log = logging.getLogger("inference_pio.parsers")


@dataclass(frozen=True)
class ToolCall:
    """One complete function call, OpenAI-shaped: ``arguments`` is the JSON text of an object."""

    id: str
    name: str
    arguments: str
    type: str = "function"

    def to_openai(self) -> dict[str, Any]:
        return {"id": self.id, "type": self.type, "function": {"name": self.name, "arguments": self.arguments}}


@dataclass(frozen=True)
class ToolCallDelta:
    """A piece of tool call ``index`` as OpenAI streams it: the first piece carries ``id`` and ``name``,
    every piece a fragment of ``arguments`` (concatenated in order they form the JSON text)."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""

    def to_openai(self) -> dict[str, Any]:
        """The ``choices[].delta.tool_calls[]`` entry of a chat.completion.chunk."""
        out: dict[str, Any] = {"index": self.index}
        function: dict[str, Any] = {"arguments": self.arguments}
        if self.id is not None:
            out["id"] = self.id
            out["type"] = "function"
        if self.name is not None:
            function["name"] = self.name
        out["function"] = function
        return out


@dataclass(frozen=True)
class ParsedDelta:
    """What one piece of generated text turned out to be."""

    content: str = ""
    reasoning: str = ""
    tool_calls: tuple[ToolCallDelta, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.content or self.reasoning or self.tool_calls)

    def __add__(self, other: ParsedDelta) -> ParsedDelta:
        return ParsedDelta(
            self.content + other.content, self.reasoning + other.reasoning, self.tool_calls + other.tool_calls
        )


def new_call_id() -> str:
    """A fresh tool-call id in OpenAI's style (``call_`` and 24 hex digits)."""
    return "call_" + secrets.token_hex(12)


def join_tool_calls(deltas: Sequence[ToolCallDelta]) -> tuple[ToolCall, ...]:
    """Assemble streamed deltas into complete calls, by index (what a client does with the stream)."""
    calls: dict[int, list[str]] = {}
    for d in deltas:
        entry = calls.setdefault(d.index, ["", "", ""])
        if d.id is not None:
            entry[0] = d.id
        if d.name is not None:
            entry[1] = d.name
        entry[2] += d.arguments
    return tuple(ToolCall(i, n, a) for _, (i, n, a) in sorted(calls.items()))


def _held(text: str, tag: str) -> int:
    """Length of the longest end of ``text`` that could still grow into ``tag`` (held back while streaming)."""
    for size in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:size]):
            return size
    return 0


class ReasoningParser(ABC):
    """Splits reasoning ("thinking") from the answer. One instance per request; it keeps state."""

    @abstractmethod
    def feed(self, text: str) -> ParsedDelta:
        """Take the next text delta; return the ``reasoning`` and ``content`` now known to be final."""

    @abstractmethod
    def finish(self) -> ParsedDelta:
        """The generation ended: return whatever was held back."""


class DelimitedReasoningParser(ReasoningParser):
    """Reasoning between ``start`` and ``end`` tags at the beginning of the output, then the answer.

    ``inside=True`` when the prompt already opened the reasoning (the generation prompt ends in
    ``start``): everything up to ``end`` is reasoning, and output that never closes it is all
    reasoning (it was cut off while thinking). A repeated ``start`` at the very beginning is dropped.
    """

    def __init__(self, start: str = "<think>", end: str = "</think>", *, inside: bool = True) -> None:
        self.start, self.end = start, end
        self._state = "open" if inside else "before"  # before -> (open ->) after
        self._buf = ""
        self._fresh = True  # nothing consumed yet in the current state

    def feed(self, text: str) -> ParsedDelta:
        self._buf += text
        out = ParsedDelta()
        while True:
            if self._state == "before":
                stripped = self._buf.lstrip()
                if stripped.startswith(self.start):
                    self._buf, self._state, self._fresh = stripped[len(self.start) :], "open", True
                    continue
                if self.start.startswith(stripped):  # only whitespace or a prefix of the tag so far
                    return out
                self._state = "after"
            if self._state == "open":
                if self._fresh:
                    stripped = self._buf.lstrip()
                    if self.start.startswith(stripped):
                        return out  # might be a repeated start tag
                    if stripped.startswith(self.start):
                        self._buf = stripped[len(self.start) :]
                    self._fresh = False
                at = self._buf.find(self.end)
                if at < 0:
                    keep = _held(self._buf, self.end)
                    reasoning, self._buf = self._buf[: len(self._buf) - keep], self._buf[len(self._buf) - keep :]
                    return out + ParsedDelta(reasoning=reasoning)
                out += ParsedDelta(reasoning=self._buf[:at])
                self._buf, self._state = self._buf[at + len(self.end) :], "after"
            content, self._buf = self._buf, ""
            return out + ParsedDelta(content=content)

    def finish(self) -> ParsedDelta:
        rest, self._buf = self._buf, ""
        if self._state == "open":
            return ParsedDelta(reasoning=rest)
        return ParsedDelta(content=rest)


class ToolCallParser(ABC):
    """Finds tool calls in the answer. One instance per request; it keeps state.

    ``tools`` are the OpenAI tool objects offered in the request (``{"type": "function",
    "function": {"name", "parameters", ...}}``); parsers use them to type arguments and to tell a call
    of an offered function from text that only looks like one.
    """

    def __init__(self, tools: Sequence[Mapping[str, Any]]) -> None:
        self.functions: dict[str, Mapping[str, Any]] = {}
        for tool in tools:
            function = tool.get("function")
            if isinstance(function, Mapping) and isinstance(function.get("name"), str):
                self.functions[function["name"]] = function

    @abstractmethod
    def feed(self, text: str) -> ParsedDelta:
        """Take the next answer-text delta; return ``content`` and ``tool_calls`` now known to be final."""

    @abstractmethod
    def finish(self) -> ParsedDelta:
        """The generation ended: return whatever was held back (an unfinished call comes back as content)."""

    def parameter_schema(self, function: str, parameter: str) -> Mapping[str, Any]:
        """The JSON schema of one parameter of an offered function ({} when unknown)."""
        params = self.functions.get(function, {}).get("parameters")
        props = params.get("properties") if isinstance(params, Mapping) else None
        schema = props.get(parameter) if isinstance(props, Mapping) else None
        return schema if isinstance(schema, Mapping) else {}


class TaggedToolCallParser(ToolCallParser):
    """Calls written as ``start_tag body end_tag``, any number of them, between answer text.

    A subclass says how to read one ``body`` (:meth:`parse_call`). A call is emitted whole, as one
    delta, once its end tag arrives and its body parses to an offered function with an object of
    arguments; anything else (bad body, unknown function, no end tag before the output ends) is
    returned as the content it was. Whitespace between answer text and calls, and between calls, is
    layout, not content.
    """

    start_tag = "<tool_call>"
    end_tag = "</tool_call>"

    def __init__(self, tools: Sequence[Mapping[str, Any]]) -> None:
        super().__init__(tools)
        self._buf = ""  # undecided text
        self._in_call = False
        self._gap = ""  # trailing whitespace of the answer so far: content, unless a call follows
        self._call_gap = ""  # the whitespace dropped before the current call (restored if it is malformed)
        self._after_call = False  # the last thing seen was a call: whitespace now is layout
        self._count = 0

    @abstractmethod
    def parse_call(self, body: str) -> tuple[str, Mapping[str, Any]] | None:
        """``(function name, arguments)`` of one call's body, or None when it is not a well-formed call."""

    def feed(self, text: str) -> ParsedDelta:
        self._buf += text
        out = ParsedDelta()
        while self._buf:
            if self._in_call:
                at = self._buf.find(self.end_tag)
                if at < 0:
                    return out
                body, self._buf = self._buf[:at], self._buf[at + len(self.end_tag) :]
                self._in_call = False
                out += self._call(body)
                continue
            at = self._buf.find(self.start_tag)
            if at >= 0:
                before, self._buf = self._buf[:at], self._buf[at + len(self.start_tag) :]
                out += self._content(before)
                self._call_gap, self._gap, self._in_call = self._gap, "", True
                continue
            keep = _held(self._buf, self.start_tag)
            ready, self._buf = self._buf[: len(self._buf) - keep], self._buf[len(self._buf) - keep :]
            return out + self._content(ready)
        return out

    def finish(self) -> ParsedDelta:
        rest, self._buf = self._buf, ""
        if self._in_call:  # cut off inside a call: it was text after all
            self._in_call = False
            return ParsedDelta(content=self._call_gap + self.start_tag + rest)
        out = self._content(rest)
        gap, self._gap = self._gap, ""
        return out if self._after_call else out + ParsedDelta(content=gap)

    def _content(self, text: str) -> ParsedDelta:
        """Answer text; its trailing whitespace waits in ``_gap`` until we know whether a call follows."""
        if self._after_call:
            text = text.lstrip()
        body = text.rstrip()
        if not body:
            self._gap += text
            return ParsedDelta()
        emitted = self._gap + body
        self._gap, self._after_call = text[len(body) :], False
        return ParsedDelta(content=emitted)

    def _call(self, body: str) -> ParsedDelta:
        try:
            parsed = self.parse_call(body)
        except Exception:  # model output must never fail a request: a call that cannot be read is text
            log.debug("%s could not read a tool call; returned as text", type(self).__name__, exc_info=True)
            parsed = None
        if parsed is not None:
            name, arguments = parsed
            if name in self.functions and isinstance(arguments, Mapping):
                try:
                    args_json = json.dumps(dict(arguments), ensure_ascii=False)
                except (TypeError, ValueError):
                    args_json = None
                if args_json is not None:
                    self._after_call = True
                    self._count += 1
                    return ParsedDelta(tool_calls=(ToolCallDelta(self._count - 1, new_call_id(), name, args_json),))
        self._after_call = False
        return ParsedDelta(content=self._call_gap + self.start_tag + body + self.end_tag)


def parse_text(
    text: str, *, reasoning: ReasoningParser | None = None, tools: ToolCallParser | None = None
) -> ParsedDelta:
    """Parse a whole generation at once (the non-streaming form of :func:`parse_stream`)."""
    return _Pipeline(reasoning, tools).feed(text) + _Pipeline.finish_of(reasoning, tools)


class _Pipeline:
    """Reasoning first, then tool calls in the answer part."""

    def __init__(self, reasoning: ReasoningParser | None, tools: ToolCallParser | None) -> None:
        self.reasoning, self.tools = reasoning, tools

    def feed(self, text: str) -> ParsedDelta:
        step = self.reasoning.feed(text) if self.reasoning else ParsedDelta(content=text)
        if self.tools is None:
            return step
        return ParsedDelta(reasoning=step.reasoning) + self.tools.feed(step.content)

    @staticmethod
    def finish_of(reasoning: ReasoningParser | None, tools: ToolCallParser | None) -> ParsedDelta:
        step = reasoning.finish() if reasoning else ParsedDelta()
        if tools is None:
            return step
        return ParsedDelta(reasoning=step.reasoning) + tools.feed(step.content) + tools.finish()


def parse_stream(
    chunks: Iterator[StreamChunk], *, reasoning: ReasoningParser | None, tools: ToolCallParser | None
) -> Iterator[StreamChunk]:
    """Run the parsers over a plugin's chunk stream: chunks come out with ``text`` (answer content),
    ``reasoning`` and ``tool_calls`` deltas; when calls were made, a ``stop`` becomes ``tool_calls``.

    Closing the returned stream closes ``chunks`` (which frees the decode slot).
    """
    if reasoning is None and tools is None:
        return chunks
    return _ParsedStream(chunks, _Pipeline(reasoning, tools))


class _ParsedStream(Iterator["StreamChunk"]):
    def __init__(self, chunks: Iterator[StreamChunk], pipeline: _Pipeline) -> None:
        self._chunks = chunks
        self._pipeline = pipeline
        self._gen = self._run()

    def __next__(self) -> StreamChunk:
        return next(self._gen)

    def close(self) -> None:
        self._gen.close()
        close = getattr(self._chunks, "close", None)
        if close is not None:
            close()

    def _run(self) -> Generator[StreamChunk, None, None]:
        from dataclasses import replace

        from inference_pio.common.interfaces import StreamChunk

        called = False
        for chunk in self._chunks:
            step = self._pipeline.feed(chunk.text)
            if chunk.finish_reason is not None:
                step += _Pipeline.finish_of(self._pipeline.reasoning, self._pipeline.tools)
            called = called or bool(step.tool_calls)
            if chunk.finish_reason is None:
                if step or chunk.logprobs:
                    yield StreamChunk(
                        step.content, reasoning=step.reasoning, tool_calls=step.tool_calls, logprobs=chunk.logprobs
                    )
                continue
            finish = "tool_calls" if called and chunk.finish_reason == "stop" else chunk.finish_reason
            yield replace(
                chunk, text=step.content, reasoning=step.reasoning, tool_calls=step.tool_calls, finish_reason=finish
            )
