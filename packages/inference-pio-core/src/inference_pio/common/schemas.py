"""The pydantic models of validated values: generation parameters, plugin options, built-in configuration keys.

Kept apart so that importing ``inference_pio`` and listing plugins never import pydantic (about a third of a
cold ``inference-pio plugins``): ``interfaces`` and ``config_manager`` re-export these names and load this
module on first use.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Self

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from inference_pio.common.config_manager import DEFAULT_MAX_QUEUE
from inference_pio.common.interfaces import DEFAULT_MAX_NEW_TOKENS
from inference_pio.errors import InvalidRequestError


class GenerationParams(BaseModel):
    """Validated sampling parameters shared by every text plugin."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_new_tokens: int = Field(default=DEFAULT_MAX_NEW_TOKENS, ge=1, le=1_000_000)
    temperature: float = Field(default=0.0, ge=0.0, le=100.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0)
    stop: tuple[str, ...] = Field(default=(), max_length=16)
    seed: int | None = Field(default=None, ge=0, lt=2**63)
    repetition_penalty: float = Field(default=1.0, gt=0.0, le=100.0)
    ignore_eos: bool = Field(default=False, description="keep generating past end-of-sequence (benchmarks)")
    grammar: str | None = Field(
        default=None, description="an llguidance grammar every new token must follow (runtime.constraints builds them)"
    )
    logprobs: int | None = Field(
        default=None, ge=0, le=20, description="report each new token's log-probability and this many alternatives"
    )

    @field_validator("temperature", "top_p", "repetition_penalty", mode="before")
    @classmethod
    def _finite(cls, value: Any) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError("must be a finite number")
        return value

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_list(cls, value: Any) -> Any:
        if value is None:
            return ()
        if isinstance(value, str):
            value = (value,)
        if any(not isinstance(s, str) or s == "" for s in value):
            raise ValueError("stop sequences must be non-empty strings")
        return tuple(value)

    @classmethod
    def parse(cls, params: Mapping[str, Any]) -> GenerationParams:
        """Validate keyword parameters into an instance, or raise ``InvalidRequestError`` naming the parameter."""
        try:
            return cls.model_validate(dict(params))
        except ValidationError as exc:
            err = exc.errors()[0]
            name = ".".join(str(p) for p in err["loc"]) or "params"
            if err["type"] == "extra_forbidden":
                known = ", ".join(cls.model_fields)
                raise InvalidRequestError(f"unknown generation parameter '{name}'; known: {known}", param=name) from exc
            raise InvalidRequestError(
                f"invalid generation parameter '{name}': {err['msg']} (got {err.get('input')!r})", param=name
            ) from exc


class PluginOptions(BaseModel):
    """A plugin's typed options: switches its chat template reads (``Options`` on the plugin class).

    A plugin declares its own by subclassing (``class Options(PluginOptions): enable_thinking: bool = True``).
    Unknown keys and wrong types are refused (strict: ``"yes"`` is not a bool), so options can never carry
    generation parameters or other keyword arguments past their validation.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        taken = set(cls.model_fields) & {*GenerationParams.model_fields, "messages", "prompt"}
        if taken:
            raise TypeError(f"{cls.__qualname__} declares {sorted(taken)}, names that generation already uses")

    @classmethod
    def parse(cls, values: Mapping[str, Any], prefix: str = "") -> Self:
        """Validate ``values``, or raise ``InvalidRequestError`` naming the key (``prefix`` + key)."""
        try:
            return cls.model_validate(dict(values))
        except ValidationError as exc:
            err = exc.errors()[0]
            name = prefix + ".".join(str(p) for p in err["loc"])
            if err["type"] == "extra_forbidden":
                known = ", ".join(cls.model_fields) or "none"
                message = f"unknown option '{name}' for this model; its options: {known}"
            else:
                message = f"invalid option '{name}': {err['msg']} (got {err.get('input')!r})"
            raise InvalidRequestError(message, name) from exc


class BuiltinConfig(BaseModel):
    """Keys every plugin understands, with their built-in defaults."""

    model_config = ConfigDict(extra="forbid")

    device: str = Field(default="auto", pattern=r"^(auto|cpu|mps|cuda(:\d+)?|cuda:\d+(,cuda:\d+)+)$")
    dtype: str = Field(default="auto", pattern=r"^(auto|float32|bfloat16|float16)$")
    quantization: str = Field(default="auto", pattern=r"^(auto|none|int8|int4)$")
    model_path: str | None = None
    revision: str | None = None
    local_files_only: bool = False
    max_context: int | None = Field(default=None, gt=0, description="cap on prompt + new tokens (KV cache length)")
    max_batch_size: int = Field(default=1, ge=1, le=256, description="decode slots kept in the static KV cache")
    compile: bool | None = Field(default=None, description="compile the decode step (CUDA graphs); None: on CUDA")
    max_queue: int = Field(default=DEFAULT_MAX_QUEUE, ge=0, le=100_000, description="requests waiting for a slot")
    gpu_memory_fraction: float | None = Field(default=None, gt=0.0, le=1.0, description="per-process CUDA cap")
    max_images: int = Field(default=8, ge=0, le=64)
    max_image_pixels: int = Field(default=16_777_216, gt=0, description="pixels accepted per image before refusal")


__all__ = ["BuiltinConfig", "GenerationParams", "PluginOptions"]
