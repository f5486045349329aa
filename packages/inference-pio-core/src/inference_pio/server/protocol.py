"""OpenAI request schemas (validated, with limits) and response builders."""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from inference_pio.common.interfaces import DEFAULT_MAX_NEW_TOKENS, GenerationResult, StreamChunk, TokenLogprob
from inference_pio.errors import InvalidRequestError
from inference_pio.runtime.chat import MAX_MESSAGES, ROLES  # torch-free: validation only

MAX_STOP = 4
MAX_LOGPROBS = 20
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
    user: str | None = None

    @field_validator("n", "stream", "ignore_eos", mode="before")
    @classmethod
    def _null_is_default(cls, value: Any, info: ValidationInfo) -> Any:
        """An explicit ``null`` (OpenAI's API description allows it for these) means the default."""
        if value is None:
            return cls.model_fields[info.field_name or ""].default
        return value

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


class JSONSchemaFormat(BaseModel):
    """``response_format.json_schema``: the schema is enforced by the grammar whether ``strict`` or not."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None

    def grammar(self) -> str | None:
        """The constrained-decoding grammar of this format (None for text); a 400 for unusable schemas."""
        if self.type == "text":
            return None
        if self.type == "json_schema" and self.json_schema is None:
            raise InvalidRequestError(
                "response_format type 'json_schema' needs a 'json_schema' object", "response_format.json_schema"
            )
        schema = self.json_schema.schema_ if self.json_schema is not None and self.type == "json_schema" else None
        from inference_pio.runtime.constraints import json_schema_grammar  # torch-free

        try:
            return json_schema_grammar(schema)  # None: any JSON object
        except ImportError as exc:  # llguidance comes with the runtime extra
            raise InvalidRequestError(
                f"response_format {self.type!r} needs constrained decoding, which this installation lacks ({exc}); "
                "install inference-pio-core[runtime]",
                "response_format",
            ) from exc


class ChatCompletionRequest(GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=1_000_000)
    tools: list[Any] | None = Field(default=None, description="functions the model may call (checked by the plugin)")
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = Field(default=None, description="false: at most one call per answer")
    response_format: ResponseFormat | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    chat_template_kwargs: dict[str, Any] | None = Field(
        default=None, description="options of the model's chat template, checked against the plugin's Options"
    )
    enable_thinking: Any = Field(
        default=None, description="shorthand for chat_template_kwargs.enable_thinking, for models whose Options have it"
    )

    def unsupported(self) -> tuple[str, str] | None:
        if self.top_logprobs is not None and not self.logprobs:
            return "top_logprobs", "top_logprobs needs logprobs: true"
        return super().unsupported()

    def generation_params(self, seed_offset: int = 0) -> dict[str, Any]:
        params = super().generation_params(seed_offset)
        if self.max_completion_tokens is not None:
            params["max_new_tokens"] = self.max_completion_tokens
        if self.logprobs:
            params["logprobs"] = self.top_logprobs or 0
        if self.tools is not None:
            params["tools"] = self.tools
        if self.tool_choice is not None:
            params["tool_choice"] = self.tool_choice
        return params


class CompletionRequest(GenerationRequest):
    default_max_tokens: ClassVar[int] = 16  # OpenAI's default for /v1/completions

    prompt: str | list[str]
    echo: bool | None = False
    suffix: str | None = None
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)

    def unsupported(self) -> tuple[str, str] | None:
        if self.echo:
            return "echo", "echo is not supported by this server"
        if self.suffix:
            return "suffix", "suffix is not supported by this server"
        if isinstance(self.prompt, list) and len(self.prompt) != 1:
            return "prompt", "send one prompt per request (a string or a list of one string)"
        return super().unsupported()

    def generation_params(self, seed_offset: int = 0) -> dict[str, Any]:
        params = super().generation_params(seed_offset)
        if self.logprobs is not None:
            params["logprobs"] = self.logprobs
        return params

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


def _token_bytes(token: str) -> list[int]:
    return list(token.encode("utf-8"))


def chat_logprobs(entries: Sequence[TokenLogprob]) -> dict[str, Any]:
    """``choices[].logprobs`` of a chat answer: one ``content`` entry per token, alternatives best first."""
    content = [
        {
            "token": e.token,
            "logprob": e.logprob,
            "bytes": _token_bytes(e.token),
            "top_logprobs": [{"token": t, "logprob": lp, "bytes": _token_bytes(t)} for _, t, lp in e.top],
        }
        for e in entries
    ]
    return {"content": content, "refusal": None}


def completion_logprobs(entries: Sequence[TokenLogprob], offset: int = 0) -> dict[str, Any]:
    """``choices[].logprobs`` of a completion; ``text_offset`` counts characters of the generated text from
    ``offset`` (the characters streamed before these tokens)."""
    offsets: list[int] = []
    for e in entries:
        offsets.append(offset)
        offset += len(e.token)
    return {
        "tokens": [e.token for e in entries],
        "token_logprobs": [e.logprob for e in entries],
        "top_logprobs": [{t: lp for _, t, lp in e.top} for e in entries],
        "text_offset": offsets,
    }


def chat_message(result: GenerationResult) -> dict[str, Any]:
    """The assistant message of a whole answer: content (null when it only called tools), reasoning, calls."""
    content = result.text if result.text or not result.tool_calls else None
    message: dict[str, Any] = {"role": "assistant", "content": content, "refusal": None}
    if result.reasoning is not None:
        message["reasoning_content"] = result.reasoning
    if result.tool_calls:
        message["tool_calls"] = [call.to_openai() for call in result.tool_calls]
    return message


def completion_body(
    kind: Kind, rid: str, created: int, model: str, results: Sequence[GenerationResult], *, logprobs: bool = False
) -> dict[str, Any]:
    """The non-streaming response: one choice per result, usage summed over the choices."""
    choices: list[dict[str, Any]]
    if kind == "chat":
        choices = [
            {
                "index": i,
                "message": chat_message(r),
                "logprobs": chat_logprobs(r.logprobs) if logprobs else None,
                "finish_reason": r.finish_reason,
            }
            for i, r in enumerate(results)
        ]
    else:
        choices = [
            {
                "index": i,
                "text": r.text,
                "logprobs": completion_logprobs(r.logprobs) if logprobs else None,
                "finish_reason": r.finish_reason,
            }
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


def chat_delta(item: StreamChunk) -> dict[str, Any]:
    """``choices[].delta`` of one streamed piece: reasoning, content and tool-call pieces it carries."""
    delta: dict[str, Any] = {}
    if item.reasoning:
        delta["reasoning_content"] = item.reasoning
    if item.text:
        delta["content"] = item.text
    if item.tool_calls:
        delta["tool_calls"] = [d.to_openai() for d in item.tool_calls]
    return delta


def chat_chunk(
    rid: str,
    model: str,
    created: int,
    index: int,
    delta: dict[str, Any],
    finish: str | None,
    logprobs: Sequence[TokenLogprob] | None = None,
) -> dict[str, Any]:
    """A ``chat.completion.chunk``; ``logprobs`` None: not asked for (the choice's logprobs is null)."""
    choice: dict[str, Any] = {
        "index": index,
        "delta": delta,
        "logprobs": chat_logprobs(logprobs) if logprobs is not None else None,
        "finish_reason": finish,
    }
    return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": [choice]}


def completion_chunk(
    rid: str,
    model: str,
    created: int,
    index: int,
    text: str,
    finish: str | None,
    logprobs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    choice = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}
    return {"id": rid, "object": "text_completion", "created": created, "model": model, "choices": [choice]}


def now() -> int:
    return int(time.time())
