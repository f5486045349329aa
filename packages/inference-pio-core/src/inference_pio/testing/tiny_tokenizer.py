"""Build small byte-level BPE tokenizers locally, for tiny offline checkpoints.

Model packages use this to make tokenizers that carry their model's real special tokens and chat
template, without any download. The merges are learnt from a short built-in corpus.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

CORPUS = """
The quick brown fox jumps over the lazy dog. Hello, world! How are you today?
Describe this image. What is in the picture? A red square on a white background.
Inference runs locally on the CPU or a GPU. Plugins register models through entry points.
def main():\n    print("hello")\n    return 0\n
Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000. Tokens, words, sentences and paragraphs.
Unicode: café, naïve, 你好世界, こんにちは, 🙂 emoji, Grüße, ñandú.
The assistant answers the user's question briefly and helpfully. Thinking step by step.
"""


def build_tokenizer(
    special_tokens: Sequence[str],
    *,
    plain_added_tokens: Sequence[str] = (),
    vocab_size: int = 640,
    pretokenize_regex: str | None = None,
    **fast_kwargs: Any,
) -> Any:
    """A ``PreTrainedTokenizerFast`` with byte-level BPE and ``special_tokens`` appended after the vocabulary.

    ``plain_added_tokens`` (e.g. ``<think>``) are single tokens that are not special: they survive
    ``skip_special_tokens`` when decoding, as in the published tokenizers.

    ``fast_kwargs`` (eos_token, pad_token, chat_template, ...) go to ``PreTrainedTokenizerFast``.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=pretokenize_regex is None)
    if pretokenize_regex is not None:
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(pretokenize_regex), behavior="isolated"), byte_level]
        )
    else:
        tokenizer.pre_tokenizer = byte_level
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tokenizer.train_from_iterator([CORPUS] * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, **fast_kwargs)
    ordered = [t for t in special_tokens]
    for token in ordered:
        if token in plain_added_tokens:
            fast.add_tokens([AddedToken(token, special=False, normalized=False)])
        else:
            fast.add_tokens([AddedToken(token, special=True, normalized=False)], special_tokens=True)
    fast.add_special_tokens({"additional_special_tokens": [t for t in ordered if t not in plain_added_tokens]})
    return fast
