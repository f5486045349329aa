"""Incremental detokenization and stop-string matching for streams."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol


class Decoder(Protocol):
    def decode(self, ids: Sequence[int], skip_special_tokens: bool = ...) -> str: ...


class IncrementalDetokenizer:
    """Emits text as tokens arrive, never splitting a multi-byte character.

    A token that ends in the middle of a UTF-8 sequence decodes to U+FFFD; such text is held back
    until the following tokens complete it (or the stream ends).
    """

    def __init__(self, tokenizer: Decoder, *, window: int = 6) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = 0  # ids before this index are fully emitted context
        self.read = 0  # ids before this index have been emitted as text
        self.window = window

    def push(self, token: int) -> str:
        self.ids.append(token)
        before = self.tokenizer.decode(self.ids[self.prefix : self.read], skip_special_tokens=True)
        now = self.tokenizer.decode(self.ids[self.prefix :], skip_special_tokens=True)
        if now.endswith("\ufffd") or len(now) < len(before) or not now.startswith(before):
            return ""
        self.read = len(self.ids)
        if self.read - self.prefix > self.window:  # keep decoding cost constant on long outputs
            self.prefix = self.read - self.window
        return now[len(before) :]

    def flush(self) -> str:
        before = self.tokenizer.decode(self.ids[self.prefix : self.read], skip_special_tokens=True)
        now = self.tokenizer.decode(self.ids[self.prefix :], skip_special_tokens=True)
        self.read = len(self.ids)
        return now[len(before) :] if now.startswith(before) else now


class StopMatcher:
    """Finds stop strings across deltas; holds back text that could be the start of one."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self.pending = ""
        self.hold = max((len(s) - 1 for s in self.stops), default=0)

    def push(self, text: str) -> tuple[str, bool]:
        """Returns (text safe to emit, whether a stop string was hit)."""
        if not self.stops:
            return text, False
        self.pending += text
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out = self.pending[: min(hits)]
            self.pending = ""
            return out, True
        keep = 0
        for n in range(min(self.hold, len(self.pending)), 0, -1):
            tail = self.pending[-n:]
            if any(s.startswith(tail) for s in self.stops):
                keep = n
                break
        out = self.pending[: len(self.pending) - keep]
        self.pending = self.pending[len(self.pending) - keep :]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out
