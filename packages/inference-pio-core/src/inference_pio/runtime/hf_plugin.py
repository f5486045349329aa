"""``HFTextPlugin``: the shared implementation of text plugins backed by transformers checkpoints.

A model package subclasses it and supplies only what is specific to its model: metadata, the
transformers class, how the processor is loaded and how a chat turns into a :class:`Prompt`.
"""

from __future__ import annotations

import gc
import logging
import re
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import closing
from pathlib import Path
from typing import Any, ClassVar

from inference_pio.common.config_manager import ConfigManager, ResolvedConfig
from inference_pio.common.interfaces import (
    GenerationParams,
    Message,
    StreamChunk,
    TextModelPluginInterface,
    TokenLogprob,
    Usage,
)
from inference_pio.common.memory import MemoryPlan, WeightSizes
from inference_pio.common.metadata import ModelPluginMetadata
from inference_pio.errors import ContextLengthError, InvalidRequestError, ModelLoadError, PluginNotActiveError
from inference_pio.runtime.contract import TokenStream
from inference_pio.security.paths import is_hub_id

log = logging.getLogger("inference_pio.runtime")
DEFAULT_CONTEXT = 4096


def from_pretrained_kwargs(plan: Any, device: str, config: Mapping[str, Any]) -> dict[str, Any]:
    """The ``from_pretrained`` arguments for a memory plan on ``device``: one set for every device.

    ``device_map`` is always given (it needs ``accelerate``, a dependency of the runtime extra), so
    the CPU path that tests run is the path a CUDA user runs. A plan split over GPUs becomes accelerate's
    balanced ``device_map="auto"`` bounded by the plan's per-GPU ``max_memory`` (whole decoder layers per GPU,
    run one GPU after the other); the device the plan chose (``plan.device``) wins over ``device``.
    """
    import transformers

    from inference_pio.runtime.devices import torch_dtype

    kwargs: dict[str, Any] = {
        "dtype": torch_dtype(plan.dtype),
        "use_safetensors": True,
        "trust_remote_code": False,
        "revision": config.get("revision"),
        "local_files_only": bool(config.get("local_files_only")),
        "device_map": getattr(plan, "device", device),
    }
    max_memory = tuple(getattr(plan, "max_memory", ()))
    if len(max_memory) > 1:
        kwargs["device_map"] = "auto"
        kwargs["max_memory"] = {int(gpu.split(":", 1)[1]): int(limit) for gpu, limit in max_memory}
    if plan.quantization != "none":
        kwargs["quantization_config"] = transformers.BitsAndBytesConfig(
            load_in_8bit=plan.quantization == "int8",
            load_in_4bit=plan.quantization == "int4",
            bnb_4bit_compute_dtype=torch_dtype(plan.dtype),
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,  # the plan's NF4 size counts 8-bit block scales
        )
    return kwargs


class HFTextPlugin(TextModelPluginInterface):
    """Loads a transformers checkpoint and generates through the shared :class:`DecodeEngine`."""

    METADATA: ClassVar[ModelPluginMetadata]
    MODEL_CLASS: ClassVar[str]  # name in the transformers namespace, e.g. "Glm4MoeLiteForCausalLM"
    MROPE: ClassVar[bool] = False

    def __init__(self) -> None:
        self.model: Any = None
        self.tokenizer: Any = None
        self.engine: Any = None
        self.settings: dict[str, Any] = {}
        self.eos_ids: frozenset[int] = frozenset()
        self.source: str | None = None
        self.scheduler: Any = None
        self._added_pattern: re.Pattern[str] | None = None
        self._tokenizer_lock = threading.Lock()  # encode may touch tokenizer state; requests arrive on many threads

    @property
    def metadata(self) -> ModelPluginMetadata:
        return self.METADATA

    # -- lifecycle ----------------------------------------------------------------------------------
    def initialize(self, **kwargs: Any) -> None:
        self.settings = dict(kwargs)

    def resolve_source(self, config: Mapping[str, Any]) -> tuple[str, Path | None]:
        """The checkpoint to load: a local directory (checked) or the default hub id."""
        model_path = config.get("model_path")
        if not model_path:
            return self.metadata.model_id, None
        if is_hub_id(model_path):
            return str(model_path), None  # another hub id
        path = Path(model_path).expanduser()
        if path.is_dir():
            path = path.resolve()
            if not (path / "config.json").is_file():
                raise ModelLoadError(
                    f"{path} has no config.json; point model_path at a transformers checkpoint directory"
                )
            return str(path), path
        if path.exists():
            raise ModelLoadError(f"model_path {path} is a file; it must be a checkpoint directory")
        raise ModelLoadError(f"model_path {path} does not exist")

    def load_model(self, config: Mapping[str, Any]) -> None:
        """Load the checkpoint. ``config`` is normally the manager's resolved configuration; a plain dict such
        as ``{"model_path": DIR, "device": "cpu"}`` works too (built-in defaults fill in the rest, and an
        unknown key is a ``ConfigError`` listing the known ones)."""
        import torch

        self.cleanup()
        config, source, device, plan = self._plan(config)
        self.memory_plan = plan
        log.info("%s: loading %s; %s", self.metadata.name, source, plan.describe())

        import transformers

        cls = getattr(transformers, self.MODEL_CLASS)
        kwargs = from_pretrained_kwargs(plan, device, config)
        try:
            model = self.load_pretrained(cls, source, kwargs)
            self.load_processor(source, config)
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"{self.metadata.name}: could not load {source}: {exc}") from exc
        model.eval()
        if device.startswith("cuda"):
            fraction = config.get("gpu_memory_fraction")
            if fraction:
                for gpu in plan.devices:
                    torch.cuda.set_per_process_memory_fraction(float(fraction), torch.device(gpu))
        self.source = source
        self.use_model(
            model,
            max_context=config.get("max_context"),
            max_batch_size=config.get("max_batch_size"),
            max_queue=config.get("max_queue"),
            compile=config.get("compile"),
        )

    def plan_memory(self, config: Mapping[str, Any]) -> MemoryPlan:
        """The memory plan :meth:`load_model` would follow for ``config``, without loading any weight (the
        model is sized on the meta device): ``inference-pio info NAME --plan`` shows it before a download."""
        return self._plan(config)[3]

    def _plan(self, config: Mapping[str, Any]) -> tuple[Mapping[str, Any], str, str, MemoryPlan]:
        from inference_pio.runtime.devices import probe_memory, resolve_device

        if "dtype" not in config:  # a plain dict (not resolved by the manager): defaults filled in, keys checked
            manager = self.config_manager or ConfigManager(environ={})
            config = manager.resolve(self.metadata.name, self.default_config(), {**self.settings, **config}).values
        source, local = self.resolve_source(config)
        device = resolve_device(str(config.get("device", "auto")))
        resolved = ResolvedConfig({**self.settings, **config, "device": device})
        requirements = self.weight_sizes(local) if local else None
        manager = self.config_manager or ConfigManager()
        plan = manager.plan_memory(self.metadata, resolved, requirements, probe=probe_memory)
        return config, source, device, plan

    def weight_sizes(self, directory: Path) -> WeightSizes:
        """How the checkpoint's parameters split under 8/4-bit loading, for the memory plan: transformers'
        bitsandbytes choice (see :func:`~inference_pio.runtime.devices.weight_sizes`). A package that quantizes
        other weights, or leaves some to full precision, overrides this with its own ``skip_modules``/``custom``."""
        from inference_pio.runtime.devices import weight_sizes

        return weight_sizes(self.MODEL_CLASS, directory)

    def load_pretrained(self, cls: Any, source: str, kwargs: dict[str, Any]) -> Any:
        """Build the model: ``cls.from_pretrained(source, **kwargs)``. A model package overrides this where its
        weights need more than transformers does under ``self.memory_plan`` (e.g. weights bitsandbytes cannot
        quantize); the result then goes through :meth:`use_model` as usual."""
        return cls.from_pretrained(source, **kwargs)

    def use_model(
        self,
        model: Any,
        *,
        max_context: int | None = None,
        max_batch_size: int | None = None,
        max_queue: int | None = None,
        compile: bool | None = None,
    ) -> None:
        """Attach an already-built model (``load_model`` and benchmarks with random full-size weights use this).

        Every request, alone or concurrent, runs through one :class:`Scheduler` with ``max_batch_size``
        decode slots and a bounded queue. ``compile`` compiles the decode step (CUDA graphs on a GPU);
        None means on for CUDA, off elsewhere.
        """
        from inference_pio.runtime.engine import DecodeEngine
        from inference_pio.runtime.scheduler import Scheduler

        if self.scheduler is not None:  # a model attached before: its runtime ends first
            self.scheduler.close()
            self.engine.release()
        self.model = model
        text_config = model.config.get_text_config()
        limit = int(getattr(text_config, "max_position_embeddings", DEFAULT_CONTEXT))
        max_len = min(int(max_context or DEFAULT_CONTEXT), limit)
        device = next(model.parameters()).device
        self.engine = DecodeEngine(
            model,
            max_len=max_len,
            max_slots=int(max_batch_size or 1),
            mrope=self.MROPE,
            compile=device.type == "cuda" if compile is None else bool(compile),
        )
        if self.tokenizer is not None:
            self.eos_ids = self.find_eos_ids()
        progress = logging.getLogger("inference_pio.progress")  # shown by the CLI without --verbose
        self.engine.warm_up(lambda line: progress.info("%s: %s", self.metadata.name, line))
        if max_queue is None:
            from inference_pio.common.config_manager import DEFAULT_MAX_QUEUE

            max_queue = DEFAULT_MAX_QUEUE
        constraints = None
        if self.tokenizer is not None:
            from inference_pio.runtime.constraints import Constraints

            constraints = Constraints(self.tokenizer, self.engine.vocab_size, self.eos_ids)
        self.scheduler = Scheduler(self.engine, self.eos_ids, max_queue=int(max_queue), constraints=constraints)

    def load_processor(self, source: str, config: Mapping[str, Any]) -> None:
        """Load the tokenizer (and processor); subclasses with images override this."""
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(
            source,
            revision=config.get("revision"),
            local_files_only=bool(config.get("local_files_only")),
            trust_remote_code=False,
        )

    def find_eos_ids(self) -> frozenset[int]:
        ids: set[int] = set()
        for value in (getattr(self.model.generation_config, "eos_token_id", None), self.tokenizer.eos_token_id):
            if isinstance(value, int):
                ids.add(value)
            elif isinstance(value, (list, tuple)):
                ids.update(int(v) for v in value)
        return frozenset(ids)

    def cleanup(self) -> None:
        device = str(self.engine.device) if self.engine is not None else "cpu"
        if self.scheduler is not None:
            self.scheduler.close()
            self.scheduler = None
        if self.engine is not None:
            self.engine.release()
        self.model = self.engine = self.tokenizer = None
        self._added_pattern = None
        gc.collect()
        if device.startswith("cuda"):
            import torch

            torch.cuda.empty_cache()

    def _require_loaded(self) -> None:
        if self.engine is None:
            raise PluginNotActiveError(f"{self.metadata.name}: no model is loaded; activate the plugin first")

    # -- text ---------------------------------------------------------------------------------------
    def tokenize(self, text: str) -> list[int]:
        """Token ids of ``text`` as plain text: no added or special token (``<|im_start|>``, ``</think>``) can form.

        Text is cut one character into every occurrence of an added token's string, so the
        tokenizer's added-token matcher never sees the whole string.
        """
        self._require_loaded()
        if self._added_pattern is None:
            added = sorted(self.tokenizer.get_added_vocab(), key=len, reverse=True)
            self._added_pattern = re.compile("|".join(re.escape(t) for t in added)) if added else re.compile("(?!)")
        ids: list[int] = []
        start = 0
        while start < len(text):
            match = self._added_pattern.search(text, start)
            end = len(text) if match is None else match.start() + 1
            # No split_special_tokens=True: it flips a flag on the shared tokenizer, a race between threads
            # (the cut above already keeps every added token from forming).
            with self._tokenizer_lock:
                ids += self.tokenizer.encode(text[start:end], add_special_tokens=False)
            start = end
        return ids

    def encode_template(self, text: str) -> list[int]:
        """Tokenize template text, where special-token strings are real special tokens."""
        with self._tokenizer_lock:
            return list(self.tokenizer.encode(text, add_special_tokens=False))

    def detokenize(self, ids: Sequence[int]) -> str:
        self._require_loaded()
        return str(self.tokenizer.decode(list(ids), skip_special_tokens=False))

    def stream_text(self, prompt: str, **params: Any) -> Iterator[StreamChunk]:
        self._require_loaded()
        if not isinstance(prompt, str):
            raise InvalidRequestError(f"prompt must be a string, got {type(prompt).__name__}", "prompt")
        if not prompt.strip():
            raise InvalidRequestError("the prompt is empty", "prompt")
        from inference_pio.runtime.contract import Prompt

        parsed = GenerationParams.parse(params)
        return self.run(Prompt(self.tokenize(prompt)), parsed)

    def stream_chat(self, messages: Sequence[Message], **params: Any) -> Iterator[StreamChunk]:
        self._require_loaded()
        options = self.Options.parse({k: params.pop(k) for k in list(params) if k in self.Options.model_fields})
        from inference_pio.parsers import parse_stream
        from inference_pio.runtime.chat import normalize_tools

        tools = normalize_tools(params.pop("tools", None), params.pop("tool_choice", None))
        tool_parser = self.tool_parser(tools.tools) if tools is not None else None
        if tools is not None and tool_parser is None:
            raise InvalidRequestError(f"{self.metadata.name} does not call tools; send no 'tools'", "tools")
        parallel = params.pop("parallel_tool_calls", None)
        if parallel is not None and not isinstance(parallel, bool):
            raise InvalidRequestError(
                f"parallel_tool_calls must be true or false, got {parallel!r}", "parallel_tool_calls"
            )
        if tools is not None and tools.choice != "auto" and params.get("grammar") is None:
            params["grammar"] = self._tool_grammar(tools, options.model_dump(), parallel is not False)
        parsed = GenerationParams.parse(params)
        prompt = self.prepare_chat(messages, options.model_dump(), tools)
        return parse_stream(
            self.run(prompt, parsed), reasoning=self.reasoning_parser(options.model_dump()), tools=tool_parser
        )

    def _tool_grammar(self, tools: Any, options: Mapping[str, Any], parallel: bool) -> str:
        """The compiled grammar forcing calls for a ``ToolRequest`` with tool_choice "required" or a named function
        (``parallel_tool_calls=False``: exactly one call)."""
        from inference_pio.runtime.constraints import lark_grammar

        text = self.tool_grammar(tools.tools, tools.function, options, parallel)
        if text is None:
            asked = "'required'" if tools.function is None else f"the named function {tools.function!r}"
            raise InvalidRequestError(
                f"{self.metadata.name} cannot force tool calls; send tool_choice 'auto' or 'none' instead of {asked}",
                "tool_choice",
            )
        try:
            return lark_grammar(text)
        except InvalidRequestError as exc:
            raise InvalidRequestError(f"the tools cannot be enforced: {exc}", "tools") from exc

    def prepare_chat(self, messages: Sequence[Message], options: dict[str, Any], tools: Any = None) -> Any:
        """Turn messages (and a ``ToolRequest``) into a :class:`Prompt` with the chat template (text-only default)."""
        from inference_pio.runtime.chat import normalize_messages
        from inference_pio.runtime.contract import Prompt

        norm = normalize_messages(messages, allow_images=False, max_images=0)
        ids: list[int] = []
        for piece in self.render_chat(norm, options, tools):
            ids += self.encode_template(piece)
        return Prompt(ids)

    def render_chat(self, messages: Sequence[Any], options: Mapping[str, Any], tools: Any = None) -> list[str]:
        """The prompt of normalized ``messages`` as pieces to encode one by one (client text stays inert)."""
        from inference_pio.runtime.chat import render_protected

        return render_protected(
            messages,
            lambda msgs, tool_list: self.apply_template(msgs, options, tool_list),
            added_tokens=self.tokenizer.get_added_vocab(),
            tools=tools.tools if tools is not None else (),
            split_reasoning=self.split_reasoning,
        )

    def split_reasoning(self, content: str) -> tuple[str, str] | None:
        """``(reasoning, answer)`` as the chat template reads them out of an assistant message's content, or
        None when it does not (the default); models whose template strips reasoning override this."""
        return None

    def apply_template(
        self, messages: list[dict[str, Any]], options: Mapping[str, Any], tools: list[dict[str, Any]] | None = None
    ) -> str:
        return str(
            self.tokenizer.apply_chat_template(
                messages, tools=tools, tokenize=False, add_generation_prompt=True, **options
            )
        )

    def check_context(self, prompt_tokens: int, params: GenerationParams) -> None:
        limit = self.engine.max_len
        if prompt_tokens >= limit:
            raise ContextLengthError(
                f"the prompt is {prompt_tokens} tokens; the context window is {limit} tokens "
                f"(max_context). Shorten the prompt or activate with a larger max_context.",
                "messages",
            )
        if prompt_tokens + params.max_new_tokens > limit:
            raise ContextLengthError(
                f"prompt ({prompt_tokens} tokens) + max_new_tokens ({params.max_new_tokens}) = "
                f"{prompt_tokens + params.max_new_tokens} exceeds the context window of {limit} tokens; "
                f"ask for at most {limit - prompt_tokens} new tokens",
                "max_new_tokens",
            )

    def run(self, prompt: Any, params: GenerationParams) -> Iterator[StreamChunk]:
        """Validate, then return the stream (validation errors surface before the first chunk)."""
        self.check_context(len(prompt.ids), params)
        tokens = self.scheduler.submit(prompt, params)  # QueueFullError surfaces here
        return _Stream(self._stream(prompt, tokens, params), tokens)

    def _stream(self, prompt: Any, token_source: TokenStream, params: GenerationParams) -> Iterator[StreamChunk]:
        from inference_pio.runtime.streaming import IncrementalDetokenizer, StopMatcher

        detok = IncrementalDetokenizer(self.tokenizer)
        stops = StopMatcher(params.stop)
        generated: list[int] = []
        pending: list[TokenLogprob] = []  # logprobs of tokens whose text has not been sent yet
        finish = "length"
        stopped_by_string = False
        with closing(token_source) as tokens:
            for token in tokens:
                generated.append(token)
                if tokens.finish_reason == "stop" and token in self.eos_ids:  # end-of-sequence: its text is not shown
                    break
                if params.logprobs is not None:
                    pending.append(self._token_logprob(tokens.logprobs[len(generated) - 1]))
                text, stopped_by_string = stops.push(detok.push(token))
                if text:
                    yield StreamChunk(text, logprobs=tuple(pending))
                    pending = []
                if stopped_by_string:
                    finish = "stop"
                    break
        if token_source.finish_reason == "stop":
            finish = "stop"
        if not stopped_by_string:  # emit what was held back (partial characters, stop-string prefixes)
            text, hit = stops.push(detok.flush())
            if hit:
                finish = "stop"
            else:
                text += stops.flush()
            if text:
                yield StreamChunk(text, logprobs=tuple(pending))
                pending = []
        usage = Usage(len(prompt.ids), len(generated))
        yield StreamChunk("", finish, usage, tuple(generated), logprobs=tuple(pending))  # type: ignore[arg-type]

    def _token_logprob(self, entry: tuple[int, float, tuple[tuple[int, float], ...]]) -> TokenLogprob:
        """The runtime's (id, logprob, alternatives) with each token's text."""
        token, logprob, top = entry
        return TokenLogprob(
            token,
            self._token_text(token),
            logprob,
            tuple((alt, self._token_text(alt), value) for alt, value in top),
        )

    def _token_text(self, token: int) -> str:
        return str(self.tokenizer.decode([token], skip_special_tokens=False))


class _Stream(Iterator[StreamChunk]):
    """A chunk stream whose ``close()`` also releases its decode slot when iteration never started
    (closing an unstarted generator would not run its cleanup)."""

    def __init__(self, chunks: Iterator[StreamChunk], tokens: Iterator[int]) -> None:
        self._chunks = chunks
        self._tokens = tokens

    def __next__(self) -> StreamChunk:
        return next(self._chunks)

    def close(self) -> None:
        for part in (self._chunks, self._tokens):
            close = getattr(part, "close", None)
            if close is not None:
                close()
