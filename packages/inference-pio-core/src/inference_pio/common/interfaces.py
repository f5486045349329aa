"""The plugin interfaces every model implements, and the typed values they exchange."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from inference_pio.common.metadata import ModelPluginMetadata
from inference_pio.errors import InvalidRequestError
from inference_pio.parsers import ReasoningParser, ToolCall, ToolCallDelta, ToolCallParser, join_tool_calls

if TYPE_CHECKING:
    from inference_pio.common.config_manager import ConfigManager
    from inference_pio.common.memory import MemoryPlan
    from inference_pio.common.schemas import GenerationParams as GenerationParams
    from inference_pio.common.schemas import PluginOptions as PluginOptions
else:

    def __getattr__(name: str) -> Any:
        """``GenerationParams`` and ``PluginOptions`` (pydantic models) load on first use: see ``schemas``."""
        if name in ("GenerationParams", "PluginOptions"):
            from inference_pio.common import schemas

            return getattr(schemas, name)
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


PLUGIN_API_VERSION = "1.0"
"""Version of the plugin API this core implements; plugins declare the range they support."""
DEFAULT_MAX_NEW_TOKENS = 256
"""``GenerationParams.max_new_tokens`` when a request names none; here so the CLI can show it without pydantic."""

FinishReason = Literal["stop", "length", "tool_calls"]
Message = Mapping[str, Any]
"""An OpenAI-style chat message: ``{"role": ..., "content": str | list[part]}``."""


@dataclass(frozen=True)
class Usage:
    """Token counts of one request."""

    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token with its log-probability under the model (log-softmax of its raw logits, before
    temperature, penalties and filters) and the most likely alternatives at that position, best first."""

    token_id: int
    token: str
    logprob: float
    top: tuple[tuple[int, str, float], ...] = ()


@dataclass(frozen=True)
class GenerationResult:
    """What ``generate_text``, ``chat_completion`` and ``infer`` return."""

    text: str
    finish_reason: FinishReason
    usage: Usage
    token_ids: tuple[int, ...] = field(default=(), repr=False)
    reasoning: str | None = None
    """The model's reasoning, split off ``text`` by the plugin's reasoning parser (None: there was none)."""
    tool_calls: tuple[ToolCall, ...] = ()
    """Calls of the functions offered with ``tools=``, parsed out of ``text``."""
    logprobs: tuple[TokenLogprob, ...] = ()
    """One entry per generated token when ``logprobs=`` was asked for."""


@dataclass(frozen=True)
class StreamChunk:
    """One streamed text delta; the last chunk carries the finish reason and usage."""

    text: str
    finish_reason: FinishReason | None = None
    usage: Usage | None = None
    token_ids: tuple[int, ...] = field(default=(), repr=False)  # all generated ids, on the final chunk
    reasoning: str = ""  # reasoning delta (``text`` is the answer's content delta)
    tool_calls: tuple[ToolCallDelta, ...] = ()  # tool-call deltas, as OpenAI streams them
    logprobs: tuple[TokenLogprob, ...] = ()  # the tokens consumed since the previous chunk, when asked for


class _DefaultOptions:
    """``Options`` of a plugin that declares none: ``PluginOptions``, looked up on first use so that defining a
    plugin class (listing plugins does) never imports pydantic."""

    def __get__(self, instance: object, owner: type | None = None) -> type[PluginOptions]:
        from inference_pio.common.schemas import PluginOptions

        return PluginOptions


class ModelPluginInterface(ABC):
    """What every model plugin implements. Construction must stay cheap: heavy work happens in ``load_model``."""

    config_manager: ConfigManager | None = None
    """Set by the manager before ``initialize``; plugins use it to plan memory."""
    memory_plan: MemoryPlan | None = None
    """The dtype/quantization decision of the last ``load_model``, for users to read."""
    Options: ClassVar[type[PluginOptions]] = _DefaultOptions()  # type: ignore[assignment]
    """The plugin's chat options (none by default); ``stream_chat`` accepts them as keyword arguments."""

    @property
    @abstractmethod
    def metadata(self) -> ModelPluginMetadata:
        """The plugin's self-description."""

    @abstractmethod
    def initialize(self, **kwargs: Any) -> None:
        """Prepare resources that do not need the weights (called once per activation)."""

    @abstractmethod
    def load_model(self, config: Mapping[str, Any]) -> None:
        """Load weights and apply optimizations; torch and transformers are imported here, not before."""

    @abstractmethod
    def infer(self, data: Any, **kwargs: Any) -> Any:
        """Run inference on ``data``."""

    @abstractmethod
    def cleanup(self) -> None:
        """Release weights, caches and device memory. Safe to call twice."""

    def supports_config(self, config: Mapping[str, Any]) -> bool:
        """Whether this plugin can run with ``config`` (device kind, quantization)."""
        device = str(config.get("device", "auto")).split(":", 1)[0]
        if device not in ("auto", *self.metadata.supported_devices):
            return False
        quant = config.get("quantization", "auto")
        return quant in ("auto", "none", *self.metadata.supported_quantizations)

    def default_config(self) -> dict[str, Any]:
        """Plugin-level defaults; they sit between built-in defaults and the config file."""
        return {}


class TextModelPluginInterface(ModelPluginInterface):
    """A model that reads and writes text (and possibly reads images)."""

    @abstractmethod
    def tokenize(self, text: str) -> list[int]:
        """Token ids of plain ``text`` (special-token strings stay plain text)."""

    @abstractmethod
    def detokenize(self, ids: Sequence[int]) -> str:
        """Text of ``ids``."""

    @abstractmethod
    def stream_text(self, prompt: str, **params: Any) -> Iterator[StreamChunk]:
        """Continue ``prompt``, yielding text deltas as they are decoded."""

    @abstractmethod
    def stream_chat(self, messages: Sequence[Message], **params: Any) -> Iterator[StreamChunk]:
        """Answer OpenAI-style ``messages``, yielding text deltas as they are decoded."""

    def tool_parser(self, tools: Sequence[Mapping[str, Any]]) -> ToolCallParser | None:
        """A fresh parser of this model's tool-call format for one request offering ``tools`` (OpenAI tool
        objects); None (the default) when the model does not call tools."""
        return None

    def tool_grammar(
        self,
        tools: Sequence[Mapping[str, Any]],
        function: str | None,
        options: Mapping[str, Any],
        parallel: bool = True,
    ) -> str | None:
        """The Lark grammar (llguidance's dialect, ``%json`` for schemas) of one or more calls (exactly one when
        not ``parallel``) in this model's format, what ``tool_choice="required"`` (``function`` None: any of
        ``tools``) or a named function (``function``) enforce by constrained decoding; it includes whatever the
        generation prompt for chat ``options`` leaves open (an unclosed reasoning block). None (the default):
        the model cannot force calls, and such requests are refused."""
        return None

    def reasoning_parser(self, options: Mapping[str, Any]) -> ReasoningParser | None:
        """A fresh parser splitting reasoning from the answer for one request with chat ``options``; None
        (the default) when the model, or these options, produce no separate reasoning."""
        return None

    def generate_text(self, prompt: str, **params: Any) -> GenerationResult:
        """Continue ``prompt``; the non-streaming form of ``stream_text``."""
        return collect(self.stream_text(prompt, **params))

    def chat_completion(self, messages: Sequence[Message], **params: Any) -> GenerationResult:
        """Answer OpenAI-style ``messages``; the non-streaming form of ``stream_chat``."""
        return collect(self.stream_chat(messages, **params))

    def infer(self, data: Any, **kwargs: Any) -> GenerationResult:
        """A string is a chat turn from the user (with ``image=`` / ``images=`` attached); a list is messages."""
        if isinstance(data, str):
            images = kwargs.pop("images", None) or []
            if "image" in kwargs:
                images = [kwargs.pop("image"), *images]
            content: Any = data
            if images:
                content = [*({"type": "image", "image": img} for img in images), {"type": "text", "text": data}]
            return self.chat_completion([{"role": "user", "content": content}], **kwargs)
        if isinstance(data, Sequence):
            return self.chat_completion(data, **kwargs)
        raise InvalidRequestError(
            f"infer() takes a prompt string or a list of chat messages, got {type(data).__name__}", param="data"
        )


def collect(chunks: Iterator[StreamChunk]) -> GenerationResult:
    """Join a stream into one result; the same code path as streaming, so both always agree."""
    parts: list[str] = []
    reasoning: list[str] = []
    calls: list[ToolCallDelta] = []
    finish: FinishReason | None = None
    usage: Usage | None = None
    token_ids: tuple[int, ...] = ()
    logprobs: list[TokenLogprob] = []
    for chunk in chunks:
        parts.append(chunk.text)
        logprobs += chunk.logprobs
        reasoning.append(chunk.reasoning)
        calls += chunk.tool_calls
        if chunk.finish_reason is not None:
            finish, usage, token_ids = chunk.finish_reason, chunk.usage, chunk.token_ids
    if finish is None or usage is None:
        raise RuntimeError("stream ended without a final chunk carrying finish_reason and usage")
    return GenerationResult(
        text="".join(parts),
        finish_reason=finish,
        usage=usage,
        token_ids=token_ids,
        reasoning="".join(reasoning) or None,
        tool_calls=join_tool_calls(calls),
        logprobs=tuple(logprobs),
    )
