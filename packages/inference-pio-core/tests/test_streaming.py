"""Incremental detokenization (no broken characters) and stop strings across deltas."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from inference_pio.runtime.streaming import IncrementalDetokenizer, StopMatcher


class ByteTokenizer:
    """One token per UTF-8 byte: the worst case for multi-byte characters."""

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return bytes(ids).decode("utf-8", errors="replace")


@pytest.mark.parametrize("text", ["plain ascii", "café 你好 🙂 done", "🙂🙂🙂", "a" * 50 + "é" * 20])
def test_deltas_never_split_a_character_and_concatenate_to_the_text(text: str) -> None:
    detok = IncrementalDetokenizer(ByteTokenizer())
    deltas = [detok.push(b) for b in text.encode()]
    deltas.append(detok.flush())
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == text


def test_invalid_bytes_are_emitted_at_the_end_rather_than_lost() -> None:
    detok = IncrementalDetokenizer(ByteTokenizer())
    out = "".join(detok.push(b) for b in b"ok\xf0\x9f")
    out += detok.flush()
    assert out.startswith("ok")
    assert out.endswith("\ufffd")


@pytest.mark.parametrize(
    ("pieces", "stops", "emitted", "hit"),
    [
        (["Hel", "lo ST", "OP and more"], ["STOP"], "Hello ", True),
        (["abc", "def"], ["xyz"], "abcdef", False),
        (["a</", "s", "> tail"], ["</s>"], "a", True),
        (["x", "S", "T"], ["STOP"], "x", False),
    ],
)
def test_stop_strings_are_found_across_deltas(pieces: list[str], stops: list[str], emitted: str, hit: bool) -> None:
    matcher = StopMatcher(stops)
    out, found = "", False
    for piece in pieces:
        text, found = matcher.push(piece)
        out += text
        if found:
            break
    if not found:
        assert out + matcher.pending == "".join(pieces)
    assert (out, found) == (emitted, hit)
