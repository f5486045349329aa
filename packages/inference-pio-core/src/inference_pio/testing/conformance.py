"""The checks behind the conformance kit. Each raises ``ConformanceError`` saying what a user would hit."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable, Mapping
from importlib.metadata import distribution as get_distribution
from typing import Any

from inference_pio.common.config_manager import ConfigManager
from inference_pio.common.interfaces import (
    GenerationResult,
    ModelPluginInterface,
    TextModelPluginInterface,
)
from inference_pio.common.metadata import ModelPluginMetadata, validate_metadata
from inference_pio.errors import InvalidRequestError
from inference_pio.plugin_system.registry import ENTRY_POINT_GROUP

HEAVY_MODULES = ("torch", "transformers", "tensorflow", "jax")


class ConformanceError(AssertionError):
    """A plugin does not behave as inference-pio requires."""


class Conformance:
    """Runs the conformance checks for one plugin factory."""

    def __init__(
        self,
        factory: Callable[[], ModelPluginInterface],
        *,
        config: Mapping[str, Any] | None = None,
        distribution: str | None = None,
        prompt: str = "Hello! Who are you?",
        max_new_tokens: int = 8,
    ) -> None:
        self.factory = factory
        self.config = dict(config or {})
        self.distribution = distribution
        self.prompt = prompt
        self.max_new_tokens = max_new_tokens
        self._metadata: ModelPluginMetadata | None = None

    @property
    def metadata(self) -> ModelPluginMetadata:
        if self._metadata is None:
            self.check_metadata()
        assert self._metadata is not None
        return self._metadata

    def _new(self) -> ModelPluginInterface:
        plugin = self.factory()
        if not isinstance(plugin, ModelPluginInterface):
            raise ConformanceError(f"factory returned {type(plugin).__name__}, not a ModelPluginInterface")
        return plugin

    def _resolved(self, plugin: ModelPluginInterface) -> dict[str, Any]:
        return ConfigManager(environ={}).resolve(self.metadata.name, plugin.default_config(), self.config).values

    # -- checks ---------------------------------------------------------------------------------------
    def check_metadata(self) -> None:
        """The metadata validates and is consistent (name pattern, sizes, API range includes this core)."""
        from inference_pio.common.interfaces import PLUGIN_API_VERSION

        meta = validate_metadata(self._new().metadata.model_dump(), source="conformance")
        if not meta.supports_api(PLUGIN_API_VERSION):
            raise ConformanceError(f"plugin_api {meta.plugin_api!r} excludes this core's API {PLUGIN_API_VERSION}")
        self._metadata = meta

    def check_discovery(self) -> None:
        """The distribution declares an entry point that the PluginManager loads, with status ok."""
        if self.distribution is None:
            raise ConformanceError("check_discovery needs distribution='your-dist-name'")
        eps = [ep for ep in get_distribution(self.distribution).entry_points if ep.group == ENTRY_POINT_GROUP]
        if not eps:
            raise ConformanceError(f"{self.distribution} declares no entry point in group {ENTRY_POINT_GROUP!r}")
        code = (
            "import json, sys; from inference_pio import PluginManager\n"
            "rows = [r.as_row() for r in PluginManager(environ={}).list_plugins()]\n"
            "print(json.dumps(rows))"
        )
        rows = json.loads(self._python(code))
        mine = [r for r in rows if r["name"] == self.metadata.name]
        if not mine:
            raise ConformanceError(
                f"plugin {self.metadata.name!r} was not found through entry points; found {[r['name'] for r in rows]}"
            )
        if mine[0]["status"] != "ok":
            raise ConformanceError(f"plugin {self.metadata.name!r} is {mine[0]['status']}: {mine[0]['error']}")

    def check_light_import(self) -> None:
        """Importing the plugin's package (and listing plugins) imports no torch or transformers."""
        module = self.factory.__module__.split(".")[0]
        code = (
            f"import sys, json; import {module}; from inference_pio import PluginManager\n"
            "PluginManager(environ={}).list_plugins()\n"
            f"print(json.dumps([m for m in {HEAVY_MODULES!r} if m in sys.modules]))"
        )
        heavy = json.loads(self._python(code))
        if heavy:
            raise ConformanceError(
                f"importing {module} imported {', '.join(heavy)}; move those imports into "
                "load_model so that listing plugins stays fast"
            )

    def check_lifecycle(self) -> None:
        """initialize -> load_model -> infer -> cleanup works, twice on the same instance."""
        plugin = self._new()
        for round_ in (1, 2):
            config = self._resolved(plugin)
            plugin.initialize(**config)
            plugin.load_model(config)
            try:
                result = plugin.infer(self.prompt, max_new_tokens=self.max_new_tokens)
                if isinstance(plugin, TextModelPluginInterface):
                    self._check_result(result, f"infer (round {round_})")
            finally:
                plugin.cleanup()
        plugin.cleanup()  # cleanup twice must be harmless

    def _check_result(self, result: Any, where: str) -> None:
        if not isinstance(result, GenerationResult):
            raise ConformanceError(f"{where} returned {type(result).__name__}, not GenerationResult")
        if result.finish_reason not in ("stop", "length"):
            raise ConformanceError(f"{where}: finish_reason {result.finish_reason!r} is not 'stop' or 'length'")
        if result.usage.prompt_tokens <= 0 or not 0 < result.usage.completion_tokens <= self.max_new_tokens:
            raise ConformanceError(f"{where}: implausible usage {result.usage}")

    def _loaded(self) -> TextModelPluginInterface:
        plugin = self._new()
        if not isinstance(plugin, TextModelPluginInterface):
            raise ConformanceError("this check applies to TextModelPluginInterface plugins")
        config = self._resolved(plugin)
        plugin.initialize(**config)
        plugin.load_model(config)
        return plugin

    def check_streaming(self) -> None:
        """Streamed deltas concatenate to the non-streaming text, for chat and plain text, greedy."""
        plugin = self._loaded()
        try:
            messages = [{"role": "user", "content": self.prompt}]
            params = {"max_new_tokens": self.max_new_tokens, "temperature": 0.0}
            whole = plugin.chat_completion(messages, **params)
            chunks = list(plugin.stream_chat(messages, **params))
            streamed = "".join(c.text for c in chunks)
            if streamed != whole.text:
                raise ConformanceError(f"stream_chat text {streamed!r} differs from chat_completion {whole.text!r}")
            if chunks[-1].finish_reason != whole.finish_reason or chunks[-1].usage != whole.usage:
                raise ConformanceError("the final stream chunk must carry the same finish_reason and usage")
            text = plugin.generate_text(self.prompt, **params)
            if "".join(c.text for c in plugin.stream_text(self.prompt, **params)) != text.text:
                raise ConformanceError("stream_text differs from generate_text")
        finally:
            plugin.cleanup()

    def check_bad_input(self) -> None:
        """Bad input raises InvalidRequestError with a message, and the plugin keeps working."""
        plugin = self._loaded()
        try:
            cases: list[tuple[str, Callable[[], Any]]] = [
                ("empty prompt", lambda: plugin.generate_text("", max_new_tokens=2)),
                ("empty messages", lambda: plugin.chat_completion([], max_new_tokens=2)),
                ("bad role", lambda: plugin.chat_completion([{"role": "wizard", "content": "hi"}])),
                ("negative max_new_tokens", lambda: plugin.generate_text(self.prompt, max_new_tokens=-1)),
                ("NaN temperature", lambda: plugin.generate_text(self.prompt, temperature=float("nan"))),
                ("unknown parameter", lambda: plugin.generate_text(self.prompt, max_tokenz=3)),
            ]
            for label, call in cases:
                try:
                    result = call()
                    if hasattr(result, "__next__"):
                        list(result)
                except InvalidRequestError as exc:
                    if not str(exc):
                        raise ConformanceError(f"{label}: InvalidRequestError without a message") from exc
                except Exception as exc:
                    raise ConformanceError(
                        f"{label}: raised {type(exc).__name__}: {exc}; expected InvalidRequestError"
                    ) from exc
                else:
                    raise ConformanceError(f"{label} was accepted; it must raise InvalidRequestError")
            self._check_result(
                plugin.generate_text(self.prompt, max_new_tokens=self.max_new_tokens), "generate_text after bad input"
            )
        finally:
            plugin.cleanup()

    def run_all(self) -> None:
        self.check_metadata()
        if self.distribution is not None:
            self.check_discovery()
        self.check_light_import()
        self.check_lifecycle()
        self.check_streaming()
        self.check_bad_input()

    @staticmethod
    def _python(code: str) -> str:
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            raise ConformanceError(f"subprocess check failed:\n{proc.stderr[-2000:]}")
        return proc.stdout.strip().splitlines()[-1]


def run_conformance(factory: Callable[[], ModelPluginInterface], **kwargs: Any) -> None:
    """Run every check; raises ``ConformanceError`` on the first failure."""
    Conformance(factory, **kwargs).run_all()
