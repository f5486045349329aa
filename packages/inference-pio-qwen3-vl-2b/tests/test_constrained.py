"""Constrained decoding on random weights: the answer always parses and validates, alone or batched
with unconstrained requests, greedy or sampled; a bad grammar is refused before anything runs."""

from __future__ import annotations

import json
import threading
from typing import Any

import jsonschema
import pytest

from inference_pio.errors import InvalidRequestError
from inference_pio.runtime.constraints import json_schema_grammar, lark_grammar
from inference_pio_qwen3_vl_2b import Qwen3VL2BPlugin

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "tags": {"type": "array", "items": {"type": "string", "enum": ["red", "green"]}},
        "note": {"type": ["string", "null"]},
    },
    "required": ["name", "age", "tags", "note"],
    "additionalProperties": False,
}
MESSAGES = [{"role": "user", "content": "Describe a person as JSON."}]


@pytest.mark.parametrize("sampling", [{}, {"temperature": 1.0, "seed": 1}, {"temperature": 1.3, "seed": 2}])
def test_json_schema_output_parses_and_validates(plugin: Qwen3VL2BPlugin, sampling: dict[str, Any]) -> None:
    result = plugin.chat_completion(MESSAGES, grammar=json_schema_grammar(SCHEMA), max_new_tokens=80, **sampling)
    jsonschema.validate(json.loads(result.text), SCHEMA)
    assert result.finish_reason == "stop"


def test_json_object_mode_gives_an_object(plugin: Qwen3VL2BPlugin) -> None:
    result = plugin.chat_completion(MESSAGES, grammar=json_schema_grammar(None), max_new_tokens=48, temperature=1.0)
    assert isinstance(json.loads(result.text), dict)


def test_a_lark_grammar_is_followed(plugin: Qwen3VL2BPlugin) -> None:
    grammar = lark_grammar('start: "yes" | "no"')
    assert plugin.chat_completion(MESSAGES, grammar=grammar, max_new_tokens=8).text in ("yes", "no")


def test_constrained_and_free_requests_share_steps_without_affecting_each_other(plugin: Qwen3VL2BPlugin) -> None:
    free_alone = plugin.chat_completion(MESSAGES, max_new_tokens=16, ignore_eos=True).token_ids
    results: dict[str, Any] = {}

    def free() -> None:
        results["free"] = plugin.chat_completion(MESSAGES, max_new_tokens=16, ignore_eos=True).token_ids

    def constrained() -> None:
        results["json"] = plugin.chat_completion(MESSAGES, grammar=json_schema_grammar(SCHEMA), max_new_tokens=80)

    threads = [threading.Thread(target=free), threading.Thread(target=constrained)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert results["free"] == free_alone
    jsonschema.validate(json.loads(results["json"].text), SCHEMA)


def test_a_bad_grammar_is_refused_before_anything_runs(plugin: Qwen3VL2BPlugin) -> None:
    with pytest.raises(InvalidRequestError, match="constraint is invalid|cannot be used"):
        plugin.stream_chat(MESSAGES, grammar='{"grammars": [{"lark_grammar": "start: ("}]}')
    with pytest.raises(InvalidRequestError, match="cannot be used"):
        json_schema_grammar({"type": "no-such-type"})
