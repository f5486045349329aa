"""Our decode loop against transformers' own generate on the tiny GLM-4.7-Flash checkpoint (MLA + MoE)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoTokenizer

from inference_pio_glm_4_7_flash import Glm47FlashPlugin

CASES: dict[str, tuple[list[dict[str, Any]], dict[str, Any]]] = {
    "user": ([{"role": "user", "content": "Hello! What is a plugin?"}], {}),
    "no thinking": ([{"role": "user", "content": "Hello!"}], {"enable_thinking": False}),
    "multi-turn": (
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello there."},
            {"role": "user", "content": "Count to 3."},
        ],
        {},
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_greedy_output_matches_transformers_generate(plugin: Glm47FlashPlugin, checkpoint: Path, case: str) -> None:
    messages, options = CASES[case]
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    ids = tokenizer.apply_chat_template(
        messages, tokenize=True, add_generation_prompt=True, return_dict=False, **options
    )
    assert plugin.prepare_chat(messages, dict(options)).ids == list(ids)
    result = plugin.chat_completion(messages, max_new_tokens=24, **options)
    with torch.inference_mode():
        expected = plugin.model.generate(input_ids=torch.tensor([ids]), max_new_tokens=24, do_sample=False)
    assert list(result.token_ids) == expected[0, len(ids) :].tolist()


def test_forward_logits_match_transformers(plugin: Glm47FlashPlugin) -> None:
    prompt = plugin.prepare_chat(CASES["multi-turn"][0], {})
    with plugin.engine.lock:
        ours = plugin.engine.prefill(0, prompt, all_logits=True)
    with torch.inference_mode():
        theirs = plugin.model(input_ids=torch.tensor([prompt.ids])).logits[0].float()
    assert torch.allclose(ours, theirs, atol=1e-4, rtol=0), (ours - theirs).abs().max()


def test_thinking_switch_changes_the_generation_prompt(plugin: Glm47FlashPlugin) -> None:
    messages = [{"role": "user", "content": "Hi"}]
    on = plugin.tokenizer.decode(plugin.prepare_chat(messages, {}).ids)
    off = plugin.tokenizer.decode(plugin.prepare_chat(messages, {"enable_thinking": False}).ids)
    assert on == "[gMASK]<sop><|user|>Hi<|assistant|><think>"
    assert off == "[gMASK]<sop><|user|>Hi<|assistant|></think>"
