"""Forced tool calls (``tool_choice="required"`` or a named function) by constrained decoding, on random
weights: every answer is parsed calls of the offered (or named) functions whose arguments validate, streamed
or not; the grammar accepts exactly what the published template writes; an agent round trip answers."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import llguidance
import llguidance.hf
import pytest

from inference_pio import InvalidRequestError, PluginManager
from inference_pio.parsers import join_tool_calls
from inference_pio.runtime.constraints import lark_grammar
from inference_pio.testing.tool_calls import CHOICES, MESSAGES, SEARCH, WEATHER, check_calls
from inference_pio_qwen3_vl_2b import Qwen3VL2BPlugin
from inference_pio_qwen3_vl_2b.tool_grammar import tool_call_grammar

SAMPLING: list[dict[str, Any]] = [{}, {"temperature": 1.0, "seed": 1}, {"temperature": 1.3, "seed": 2}]


@pytest.fixture(scope="module")
def wide(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Qwen3VL2BPlugin]:
    """The plugin with a context that holds the tools' system prompt (the tiny tokenizer spends a token a byte)."""
    pm = PluginManager(environ={"INFERENCE_PIO_CONFIG": str(tmp_path_factory.mktemp("cfg") / "none.toml")})
    plugin = pm.activate_plugin("qwen3_vl_2b", device="cpu", model_path=str(checkpoint), max_context=2048)
    assert isinstance(plugin, Qwen3VL2BPlugin)
    yield plugin
    pm.shutdown()


@pytest.mark.parametrize("sampling", SAMPLING)
@pytest.mark.parametrize(("choice", "tools"), CHOICES)
def test_forced_calls_always_parse_and_validate(
    wide: Qwen3VL2BPlugin, choice: Any, tools: list[dict[str, Any]], sampling: dict[str, Any]
) -> None:
    result = wide.chat_completion(MESSAGES, tools=tools, tool_choice=choice, max_new_tokens=160, **sampling)
    assert (result.text, result.finish_reason) == ("", "tool_calls")
    check_calls(result.tool_calls, tools, choice)


@pytest.mark.parametrize("sampling", SAMPLING[:2])
def test_streamed_forced_calls_arrive_as_openai_deltas(wide: Qwen3VL2BPlugin, sampling: dict[str, Any]) -> None:
    tools = [WEATHER, SEARCH]
    params: dict[str, Any] = {"tools": tools, "tool_choice": "required", "max_new_tokens": 160, **sampling}
    chunks = list(wide.stream_chat(MESSAGES, **params))
    deltas = [d for c in chunks for d in c.tool_calls]
    assert chunks[-1].finish_reason == "tool_calls"
    assert "".join(c.text for c in chunks) == ""
    firsts = {d.index: d for d in reversed(deltas)}
    assert all(d.id is not None and d.name is not None for d in firsts.values())
    streamed = join_tool_calls(deltas)
    check_calls(streamed, tools, "required")
    whole = wide.chat_completion(MESSAGES, **params).tool_calls
    assert [(c.name, c.arguments) for c in streamed] == [(c.name, c.arguments) for c in whole]


def test_agent_round_trip_answers_after_the_tool_result(wide: Qwen3VL2BPlugin) -> None:
    named = {"type": "function", "function": {"name": "get_weather"}}
    forced = wide.chat_completion(MESSAGES, tools=[WEATHER], tool_choice=named, max_new_tokens=120)
    assert [c.name for c in forced.tool_calls] == ["get_weather"]
    history: list[dict[str, Any]] = [
        *MESSAGES,
        {"role": "assistant", "content": None, "tool_calls": [c.to_openai() for c in forced.tool_calls]},
        *(
            {"role": "tool", "tool_call_id": c.id, "content": '{"forecast": "sunny", "high": 24}'}
            for c in forced.tool_calls
        ),
    ]
    answer = wide.chat_completion(history, tools=[WEATHER], max_new_tokens=12)
    assert answer.finish_reason in ("stop", "length")
    assert answer.text and not answer.tool_calls
    assert answer.usage.prompt_tokens > forced.usage.prompt_tokens + forced.usage.completion_tokens


def test_the_grammar_accepts_what_the_template_writes(wide: Qwen3VL2BPlugin) -> None:
    calls = [
        ("get_weather", {"city": "Zürich", "days": 3, "unit": "celsius"}),
        ("search", {"query": 'a "quoted" word', "filters": {"year": 2024, "lang": "fr"}}),
    ]
    message = {
        "role": "assistant",
        "content": "",
        "tool_calls": [{"type": "function", "function": {"name": n, "arguments": a}} for n, a in calls],
    }
    rendered = wide.tokenizer.apply_chat_template(
        [{"role": "user", "content": "q"}, message], chat_template=wide.chat_template, tokenize=False
    )
    start = rendered.index("<|im_start|>assistant\n") + len("<|im_start|>assistant\n")
    answer = rendered[start : rendered.index("<|im_end|>", start)]
    tokenizer = llguidance.hf.from_tokenizer(wide.tokenizer, n_vocab=len(wide.tokenizer))
    ids = wide.tokenizer.encode(answer, add_special_tokens=False)

    def accepts(grammar: str) -> bool:
        matcher = llguidance.LLMatcher(tokenizer, lark_grammar(grammar))
        return bool(matcher.consume_tokens(ids) and matcher.is_accepting())

    assert accepts(tool_call_grammar([WEATHER, SEARCH]))
    assert not accepts(tool_call_grammar([WEATHER, SEARCH], "search"))  # named: that function only
    assert not accepts(tool_call_grammar([WEATHER]))  # an unoffered function
    assert not accepts(tool_call_grammar([WEATHER, SEARCH], parallel=False))  # two calls, one allowed


def test_a_plugin_without_a_tool_grammar_refuses_forced_calls(
    wide: Qwen3VL2BPlugin, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(wide, "tool_grammar", lambda *args: None)
    with pytest.raises(InvalidRequestError, match="cannot force tool calls") as caught:
        wide.stream_chat(MESSAGES, tools=[WEATHER], tool_choice="required")
    assert caught.value.param == "tool_choice"
    assert wide.chat_completion(MESSAGES, tools=[WEATHER], max_new_tokens=4).finish_reason in ("stop", "length")


def test_a_grammar_passed_by_the_caller_wins_over_tool_choice(wide: Qwen3VL2BPlugin) -> None:
    grammar = lark_grammar('start: "yes" | "no"')
    result = wide.chat_completion(MESSAGES, tools=[WEATHER], tool_choice="required", grammar=grammar)
    assert result.text in ("yes", "no")
    assert not result.tool_calls


def test_a_schema_the_grammar_engine_refuses_is_a_tools_error(wide: Qwen3VL2BPlugin) -> None:
    bad = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {"x": 1}}}}
    with pytest.raises(InvalidRequestError, match="the tools cannot be enforced") as caught:
        wide.stream_chat(MESSAGES, tools=[bad], tool_choice="required")
    assert caught.value.param == "tools"


@pytest.mark.parametrize("seed", [4, 5])
def test_without_parallel_calls_exactly_one_call_comes_back(wide: Qwen3VL2BPlugin, seed: int) -> None:
    params: dict[str, Any] = {"tools": [WEATHER, SEARCH], "tool_choice": "required", "max_new_tokens": 160}
    result = wide.chat_completion(MESSAGES, parallel_tool_calls=False, temperature=1.0, seed=seed, **params)
    assert result.finish_reason == "tool_calls"
    assert len(result.tool_calls) == 1
    check_calls(result.tool_calls, [WEATHER, SEARCH], "required")
    with pytest.raises(InvalidRequestError) as caught:
        wide.stream_chat(MESSAGES, parallel_tool_calls="no", **params)
    assert caught.value.param == "parallel_tool_calls"
