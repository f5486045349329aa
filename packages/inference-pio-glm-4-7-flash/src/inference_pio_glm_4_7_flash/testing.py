"""A tiny GLM-4.7-Flash checkpoint of the real architecture (MLA and MoE kept), generated locally.

Random weights, a locally built tokenizer with GLM's special tokens and chat template; it loads
through exactly the same ``from_pretrained`` path as the published weights.
"""

from __future__ import annotations

import pathlib

from inference_pio_glm_4_7_flash.template import CHAT_TEMPLATE, EOS_TOKENS, PLAIN_TOKENS, SPECIAL_TOKENS


def make_tiny_checkpoint(directory: str | pathlib.Path, *, seed: int = 0) -> pathlib.Path:
    """Write the tiny checkpoint into ``directory`` (created if needed) and return its path."""
    import torch
    from transformers import GenerationConfig, Glm4MoeLiteConfig, Glm4MoeLiteForCausalLM

    from inference_pio.testing.tiny_tokenizer import build_tokenizer

    path = pathlib.Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(
        SPECIAL_TOKENS,
        plain_added_tokens=PLAIN_TOKENS,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        chat_template=CHAT_TEMPLATE,
    )
    vocab = tokenizer.get_vocab()
    eos = [vocab[t] for t in EOS_TOKENS]
    config = Glm4MoeLiteConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=4,
        n_routed_experts=8,
        num_experts_per_tok=2,
        n_shared_experts=1,
        kv_lora_rank=32,
        q_lora_rank=48,
        qk_rope_head_dim=16,
        v_head_dim=32,
        qk_nope_head_dim=32,
        max_position_embeddings=2048,
        initializer_range=0.1,
        pad_token_id=vocab["<|endoftext|>"],
        bos_token_id=None,
        eos_token_id=eos,
    )
    torch.manual_seed(seed)
    model = Glm4MoeLiteForCausalLM(config).eval()
    model.generation_config = GenerationConfig(eos_token_id=eos, pad_token_id=vocab["<|endoftext|>"])
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def full_size_config() -> object:
    """The published GLM-4.7-Flash architecture (for benchmarks with random weights; no download)."""
    from transformers import Glm4MoeLiteConfig

    return Glm4MoeLiteConfig(eos_token_id=[151329, 151336, 151338], pad_token_id=151329)
