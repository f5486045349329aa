"""A tiny Qwen3-VL checkpoint of the real architecture, generated locally (random weights).

It loads through exactly the same ``from_pretrained`` path as the published weights and backs
``inference-pio demo`` and the tests.
"""

from __future__ import annotations

import pathlib
from typing import Any

from inference_pio_qwen3_vl_2b.template import CHAT_TEMPLATE, PLAIN_TOKENS, SPECIAL_TOKENS

# Qwen2's pre-tokenizer split: contractions, letters, single digits, punctuation runs, newlines, spaces.
QWEN_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# The published token ids of the image/video placeholders (the tiny tokenizer has its own).
PUBLISHED_IDS = {
    "image_token_id": 151655,
    "video_token_id": 151656,
    "vision_start_token_id": 151652,
    "vision_end_token_id": 151653,
}


def qwen3_vl_config(
    *, text: dict[str, Any], vision: dict[str, Any], mrope_section: list[int], token_ids: dict[str, int]
) -> Any:
    """A ``Qwen3VLConfig`` with the architecture's fixed choices (M-RoPE, 16-px patches, 2x2 merge)."""
    from transformers import Qwen3VLConfig

    rope = {
        "rope_type": "default",
        "rope_theta": 5_000_000.0,
        "mrope_section": mrope_section,
        "mrope_interleaved": True,
    }
    vision = {
        "patch_size": 16,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "hidden_act": "gelu_pytorch_tanh",
        "num_position_embeddings": 2304,
        **vision,
    }
    return Qwen3VLConfig(
        text_config={"rms_norm_eps": 1e-6, "rope_parameters": rope, **text},
        vision_config=vision,
        tie_word_embeddings=True,
        **token_ids,
    )


def full_size_config() -> Any:
    """The published Qwen3-VL-2B-Instruct architecture (for benchmarks with random weights; no download)."""
    text = dict(
        hidden_size=2048,
        intermediate_size=6144,
        num_hidden_layers=28,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=128,
        vocab_size=151936,
        max_position_embeddings=262144,
    )
    vision = dict(
        depth=24,
        hidden_size=1024,
        intermediate_size=4096,
        num_heads=16,
        out_hidden_size=2048,
        deepstack_visual_indexes=[5, 11, 17],
    )
    return qwen3_vl_config(text=text, vision=vision, mrope_section=[24, 20, 20], token_ids=PUBLISHED_IDS)


def make_tiny_checkpoint(directory: str | pathlib.Path, *, seed: int = 0) -> pathlib.Path:
    """Write the tiny checkpoint into ``directory`` (created if needed) and return its path."""
    import torch
    from transformers import GenerationConfig, Qwen3VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from inference_pio.testing.tiny_tokenizer import build_tokenizer

    path = pathlib.Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(
        SPECIAL_TOKENS,
        plain_added_tokens=PLAIN_TOKENS,
        pretokenize_regex=QWEN_SPLIT,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=CHAT_TEMPLATE,
    )
    vocab = tokenizer.get_vocab()
    text = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        vocab_size=len(tokenizer),
        max_position_embeddings=2048,
        initializer_range=0.1,
    )
    vision = dict(
        depth=2,
        hidden_size=64,
        intermediate_size=128,
        num_heads=4,
        out_hidden_size=64,
        deepstack_visual_indexes=[0],
        initializer_range=0.1,
    )
    token_ids = {
        key: vocab[token]
        for key, token in (
            ("image_token_id", "<|image_pad|>"),
            ("video_token_id", "<|video_pad|>"),
            ("vision_start_token_id", "<|vision_start|>"),
            ("vision_end_token_id", "<|vision_end|>"),
        )
    }
    config = qwen3_vl_config(text=text, vision=vision, mrope_section=[2, 3, 3], token_ids=token_ids)
    torch.manual_seed(seed)
    model = Qwen3VLForConditionalGeneration(config).eval()
    model.generation_config = GenerationConfig(
        eos_token_id=[vocab["<|im_end|>"], vocab["<|endoftext|>"]],
        pad_token_id=vocab["<|endoftext|>"],
        bos_token_id=None,
    )
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=16,
        temporal_patch_size=2,
        merge_size=2,
        size={"shortest_edge": 32 * 32, "longest_edge": 128 * 128},
        image_mean=[0.48145466, 0.4578275, 0.40821073],
        image_std=[0.26862954, 0.26130258, 0.27577711],
    )
    image_processor.save_pretrained(path)
    (path / "chat_template.jinja").write_text(CHAT_TEMPLATE, encoding="utf-8")
    return path
