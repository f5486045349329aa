"""OpenAI request schemas (validated, with limits) and response builders."""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from inference_pio.common.interfaces import DEFAULT_MAX_NEW_TOKENS, GenerationResult
from inference_pio.runtime.chat import MAX_MESSAGES, ROLES  # torch-free: validation only

MAX_STOP = 4
Kind = Literal["chat", "completion"]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class GenerationRequest(BaseModel):
    """What the chat and completion requests share: the model, sampling parameters, ``n``, streaming."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)
    default_max_tokens: ClassVar[int] = DEFAULT_MAX_NEW_TOKENS  # the plugins' own default: server and API agree

    model: str = Field(min_length=1, max_length=256)
    max_tokens: int | None = Field(
        default=None, ge=1, le=1_000_000, description="new tokens at most; null or absent: the endpoint's default"
    )
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=0, le=1_000_000)
    repetition_penalty: float | None = Field(default=None, gt=0.0, le=10.0)
    ignore_eos: bool = False
    n: int = Field(default=1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=0, lt=2**63)
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    logprobs: bool | int | None = None
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> str | list[str] | None:
        stops = [value] if isinstance(value, str) else value or []
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences are allowed")
        if any(not s for s in stops):
            raise ValueError("stop sequences must be non-empty")
        return value

    def unsupported(self) -> tuple[str, str] | None:
        """(param, message) for options this server does not implement, instead of silently ignoring them."""
        if self.presence_penalty or self.frequency_penalty:
            param = "presence_penalty" if self.presence_penalty else "frequency_penalty"
            return param, f"{param} is not supported; use repetition_penalty instead"
        if self.logprobs:
            return "logprobs", "logprobs are not supported by this server"
        return None

    def generation_params(self, seed_offset: int = 0) -> dict[str, Any]:
        params: dict[str, Any] = {"max_new_tokens": self.max_tokens or self.default_max_tokens}
        if self.ignore_eos:
            params["ignore_eos"] = True
        for name in ("temperature", "top_p", "top_k", "repetition_penalty"):
            value = getattr(self, name)
            if value is not None:
                params[name] = value
        if self.stop is not None:
            params["stop"] = [self.stop] if isinstance(self.stop, str) else self.stop
        if self.seed is not None:
            params["seed"] = self.seed + seed_offset
        return params


class ChatMessage(BaseModel):
    """One chat message; the model's plugin checks its content (text, image parts) in detail."""

    model_config = ConfigDict(extra="allow")

    role: str = Field(json_schema_extra={"enum": list(ROLES)})
    content: str | list[dict[str, Any]] | None = None

    @field_validator("role")
    @classmethod
    def _role(cls, value: str) -> str:
        if value not in ROLES:
            raise ValueError(f"role must be one of {', '.join(ROLES)}, got {value!r}")
        return value


class ChatCompletionRequest(GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=1_000_000)
    tools: list[Any] | None = None
    response_format: dict[str, Any] | None = None
    chat_template_kwargs: dict[str, Any] | None = Field(
        default=None, description="options of the model's chat template, checked against the plugin's Options"
    )
    enable_thinking: Any = Field(
        default=None, description="shorthand for chat_template_kwargs.enable_thinking, for models whose Options have it"
    )

    def unsupported(self) -> tuple[str, str] | None:
        if self.tools:
            return "tools", "tool calling is not supported by this server"
        if self.response_format and self.response_format.get("type") not in (None, "text"):
            return "response_format", "only response_format type 'text' is supported"
        return super().unsupported()

    def generation_params(self, seed_offset: int = 0) -> dict[str, Any]:
        params = super().generation_params(seed_offset)
        if self.max_completion_tokens is not None:
            params["max_new_tokens"] = self.max_completion_tokens
        return params


class CompletionRequest(GenerationRequest):
    default_max_tokens: ClassVar[int] = 16  # OpenAI's default for /v1/completions

    prompt: str | list[str]
    echo: bool = False
    suffix: str | None = None

    def unsupported(self) -> tuple[str, str] | None:
        if self.echo:
            return "echo", "echo is not supported by this server"
        if self.suffix:
            return "suffix", "suffix is not supported by this server"
        if isinstance(self.prompt, list) and len(self.prompt) != 1:
            return "prompt", "send one prompt per request (a string or a list of one string)"
        return super().unsupported()

    @property
    def text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage_dict(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def completion_body(
    kind: Kind, rid: str, created: int, model: str, results: Sequence[GenerationResult]
) -> dict[str, Any]:
    """The non-streaming response: one choice per result, usage summed over the choices."""
    choices: list[dict[str, Any]]
    if kind == "chat":
        choices = [
            {
                "index": i,
                "message": {"role": "assistant", "content": r.text},
                "logprobs": None,
                "finish_reason": r.finish_reason,
            }
            for i, r in enumerate(results)
        ]
    else:
        choices = [
            {"index": i, "text": r.text, "logprobs": None, "finish_reason": r.finish_reason}
            for i, r in enumerate(results)
        ]
    return {
        "id": rid,
        "object": "chat.completion" if kind == "chat" else "text_completion",
        "created": created,
        "model": model,
        "choices": choices,
        "usage": usage_dict(results[0].usage.prompt_tokens, sum(r.usage.completion_tokens for r in results)),
    }


def chunk(
    kind: Kind,
    rid: str,
    model: str,
    created: int,
    index: int,
    text: str | None,
    finish: str | None,
    *,
    first: bool = False,
) -> dict[str, Any]:
    if kind == "chat":
        delta: dict[str, Any] = {}
        if first:
            delta["role"] = "assistant"
        if text is not None:
            delta["content"] = text
        choice: dict[str, Any] = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
        return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": [choice]}
    return {
        "id": rid,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [{"index": index, "text": text or "", "logprobs": None, "finish_reason": finish}],
    }


def now() -> int:
    return int(time.time())
