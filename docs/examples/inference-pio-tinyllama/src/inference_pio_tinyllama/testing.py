"""A tiny TinyLlama checkpoint for tests and ``inference-pio demo``: the real architecture
(``LlamaForCausalLM``, grouped-query attention), random weights, and a tokenizer built locally with
TinyLlama's special tokens and chat template. It loads through the same ``from_pretrained`` path as
the published weights, with no download.
"""

from __future__ import annotations

import pathlib

# TinyLlama-1.1B-Chat-v1.0's template (Zephyr style); <|user|> and the other role tags are plain text.
CHAT_TEMPLATE = (
    "{% for message in messages %}\n"
    "{% if message['role'] == 'user' %}\n{{ '<|user|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'system' %}\n{{ '<|system|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n"
    "{% endif %}\n"
    "{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n"
    "{% endfor %}"
)
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")


def make_tiny_checkpoint(directory: str | pathlib.Path, *, seed: int = 0) -> pathlib.Path:
    """Write the tiny checkpoint into ``directory`` (created if needed) and return its path."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    from inference_pio.testing.tiny_tokenizer import build_tokenizer

    path = pathlib.Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(
        SPECIAL_TOKENS,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="</s>",
        chat_template=CHAT_TEMPLATE,
    )
    vocab = tokenizer.get_vocab()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        initializer_range=0.1,
        bos_token_id=vocab["<s>"],
        eos_token_id=vocab["</s>"],
        pad_token_id=vocab["</s>"],
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    model.generation_config = GenerationConfig(
        bos_token_id=vocab["<s>"], eos_token_id=vocab["</s>"], pad_token_id=vocab["</s>"]
    )
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
