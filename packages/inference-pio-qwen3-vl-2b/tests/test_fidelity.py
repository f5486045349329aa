"""Our decode loop against transformers' own generate on the same tiny checkpoint (float32, CPU)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoTokenizer

from inference_pio_qwen3_vl_2b import Qwen3VL2BPlugin


def random_image(seed: int, size: tuple[int, int]) -> Image.Image:
    pixels = (np.random.RandomState(seed).rand(size[1], size[0], 3) * 255).astype("uint8")
    return Image.fromarray(pixels)


def reference_inputs(checkpoint: Path, messages: list[dict[str, Any]], images: list[Image.Image]) -> dict[str, Any]:
    """Inputs built the way transformers' Qwen3-VL processor builds them: expand the pad string, tokenize once."""
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    inputs: dict[str, Any] = {}
    if images:
        processor = AutoImageProcessor.from_pretrained(checkpoint)
        inputs = dict(processor(images=images, return_tensors="pt"))
        merge = processor.merge_size**2
        for grid in inputs["image_grid_thw"]:
            text = text.replace("<|image_pad|>", "<|placeholder|>" * (int(grid.prod()) // merge), 1)
        text = text.replace("<|placeholder|>", "<|image_pad|>")
    ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
    inputs["input_ids"] = ids
    inputs["attention_mask"] = torch.ones_like(ids)
    if images:
        inputs["mm_token_type_ids"] = (ids == tokenizer.convert_tokens_to_ids("<|image_pad|>")).int()
    return inputs


CASES = {
    "text": ([{"role": "user", "content": [{"type": "text", "text": "Hello! What is a plugin?"}]}], []),
    "system+text": (
        [
            {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
            {"role": "user", "content": [{"type": "text", "text": "Name three colours."}]},
        ],
        [],
    ),
    "image": (
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe this image."}]}],
        [(1, (90, 70))],
    ),
    "two images": (
        [
            {
                "role": "user",
                "content": [
                    {"type": "image"},
                    {"type": "text", "text": "and"},
                    {"type": "image"},
                    {"type": "text", "text": "compare"},
                ],
            }
        ],
        [(2, (64, 64)), (3, (130, 40))],
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_greedy_output_matches_transformers_generate(plugin: Qwen3VL2BPlugin, checkpoint: Path, case: str) -> None:
    template_messages, image_specs = CASES[case]
    images = [random_image(seed, size) for seed, size in image_specs]
    reference = reference_inputs(checkpoint, template_messages, images)
    it = iter(images)
    ours_messages = [
        {
            "role": m["role"],
            "content": [{"type": "image", "image": next(it)} if p["type"] == "image" else p for p in m["content"]],
        }
        for m in template_messages
    ]
    prompt = plugin.prepare_chat(ours_messages, {})
    assert prompt.ids == reference["input_ids"][0].tolist()
    result = plugin.chat_completion(ours_messages, max_new_tokens=24, temperature=0)
    with torch.inference_mode():
        expected = plugin.model.generate(**reference, max_new_tokens=24, do_sample=False)
    expected_new = expected[0, reference["input_ids"].shape[1] :].tolist()
    assert list(result.token_ids) == expected_new
    assert result.usage.prompt_tokens == len(prompt.ids)
    assert result.usage.completion_tokens == len(expected_new)


@pytest.mark.parametrize("case", ["text", "image"])
def test_forward_logits_match_transformers(plugin: Qwen3VL2BPlugin, checkpoint: Path, case: str) -> None:
    template_messages, image_specs = CASES[case]
    images = [random_image(seed, size) for seed, size in image_specs]
    reference = reference_inputs(checkpoint, template_messages, images)
    it = iter(images)
    prompt = plugin.prepare_chat(
        [
            {
                "role": m["role"],
                "content": [{"type": "image", "image": next(it)} if p["type"] == "image" else p for p in m["content"]],
            }
            for m in template_messages
        ],
        {},
    )
    with plugin.engine.lock:
        ours = plugin.engine.prefill(0, prompt, all_logits=True)
    with torch.inference_mode():
        theirs = plugin.model(**reference).logits[0].float()
    assert torch.allclose(ours, theirs, atol=1e-4, rtol=0), (ours - theirs).abs().max()


def test_plain_text_continuation_matches_transformers(plugin: Qwen3VL2BPlugin) -> None:
    prompt = "The quick brown fox"
    ids = plugin.tokenize(prompt)
    result = plugin.generate_text(prompt, max_new_tokens=16)
    with torch.inference_mode():
        expected = plugin.model.generate(input_ids=torch.tensor([ids]), max_new_tokens=16, do_sample=False)
    assert list(result.token_ids) == expected[0, len(ids) :].tolist()
