"""The echo plugin: a complete TextModelPluginInterface in a few lines."""

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from inference_pio import (
    GenerationParams,
    InvalidRequestError,
    ModelPluginMetadata,
    StreamChunk,
    TextModelPluginInterface,
    Usage,
)


class EchoPlugin(TextModelPluginInterface):
    def __init__(self) -> None:
        self.vocab: dict[str, int] | None = None

    @property
    def metadata(self) -> ModelPluginMetadata:
        from inference_pio_echo.hooks import METADATA

        return METADATA

    def initialize(self, **kwargs: Any) -> None:
        self.settings = kwargs

    def load_model(self, config: Mapping[str, Any]) -> None:
        self.vocab = {}  # a real plugin loads weights here (and imports torch here, not at module level)

    def cleanup(self) -> None:
        self.vocab = None

    def tokenize(self, text: str) -> list[int]:
        assert self.vocab is not None, "load_model first"
        return [self.vocab.setdefault(word, len(self.vocab)) for word in text.split()]

    def detokenize(self, ids: Sequence[int]) -> str:
        assert self.vocab is not None, "load_model first"
        words = {i: w for w, i in self.vocab.items()}
        return " ".join(words[i] for i in ids)

    def _echo(self, text: str, prompt_tokens: int, params: dict[str, Any]) -> Iterator[StreamChunk]:
        parsed = GenerationParams.parse(params)
        words = text.split()
        out = words[: parsed.max_new_tokens]
        finish = "stop" if len(out) == len(words) else "length"

        def stream() -> Iterator[StreamChunk]:
            for i, word in enumerate(out):
                yield StreamChunk(word if i == 0 else " " + word)
            yield StreamChunk("", finish, Usage(prompt_tokens, max(len(out), 1)))

        return stream()

    def stream_text(self, prompt: str, **params: Any) -> Iterator[StreamChunk]:
        if not isinstance(prompt, str) or not prompt.strip():
            raise InvalidRequestError("the prompt is empty", "prompt")
        return self._echo(prompt, len(self.tokenize(prompt)), params)

    def stream_chat(self, messages: Sequence[Mapping[str, Any]], **params: Any) -> Iterator[StreamChunk]:
        if not messages:
            raise InvalidRequestError("messages is empty", "messages")
        for m in messages:
            if m.get("role") not in ("system", "user", "assistant", "tool"):
                raise InvalidRequestError(f"unknown role {m.get('role')!r}", "messages")
        users = [m for m in messages if m["role"] == "user" and isinstance(m.get("content"), str)]
        if not users or not users[-1]["content"].strip():
            raise InvalidRequestError("no user message with text", "messages")
        prompt_tokens = sum(len(str(m.get("content", "")).split()) for m in messages)
        return self._echo(users[-1]["content"], prompt_tokens, params)


def create_echo_plugin() -> EchoPlugin:
    return EchoPlugin()
