"""The checks behind the conformance kit. Each raises ``ConformanceError`` saying what a user would hit.

Most checks build the plugin from its factory in this process, with no trust level and no path checks.
``check_discovery`` and ``check_as_installed`` need the distribution installed: they find the plugin
through its entry point in a fresh interpreter, and the latter runs it exactly as a user's install does
(its default trust level, isolated in a worker below ``high``, ``model_path`` validated against that
level's allowed folders). Without ``distribution=`` those two are skipped, with a warning saying so.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Callable, Mapping
from importlib.metadata import PackageNotFoundError
from importlib.metadata import distribution as get_distribution
from pathlib import Path
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
from inference_pio.security.paths import is_hub_id

HEAVY_MODULES = ("torch", "transformers", "tensorflow", "jax")

AS_INSTALLED = """
import json, sys
from inference_pio import PluginManager

name, prompt, max_new_tokens, config = sys.argv[1], sys.argv[2], int(sys.argv[3]), json.loads(sys.argv[4])
pm = PluginManager()
record = pm.get_record(name)
report = {"status": record.status, "error": str(record.error or ""), "trust": str(record.trust),
          "isolated": record.isolated}
if record.status == "ok":
    plugin = pm.activate_plugin(name, **config)
    try:
        report["runs_as"] = type(plugin).__name__
        messages = [{"role": "user", "content": prompt}]
        params = {"max_new_tokens": max_new_tokens, "temperature": 0.0}
        whole = plugin.chat_completion(messages, **params)
        report["text"] = whole.text
        report["streamed"] = "".join(c.text for c in plugin.stream_chat(messages, **params))
    finally:
        pm.shutdown()
print(json.dumps(report))
"""


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
        self.installed: dict[str, Any] | None = None
        self._greedy_chat: str | None = None
        """What ``check_as_installed`` saw: trust level, isolated, the class that ran, the text."""

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

    def _load(self, plugin: ModelPluginInterface, config: dict[str, Any]) -> None:
        """``load_model``, with a hint when it failed because no local checkpoint was given."""
        try:
            plugin.load_model(config)
        except Exception as exc:
            if config.get("model_path"):
                raise
            raise ConformanceError(
                f"load_model failed with no model_path in the kit's config, so the plugin tried its default "
                f"model {self.metadata.model_id!r} ({type(exc).__name__}: {exc}). The kit is meant to run "
                "offline: pass config={'model_path': DIR} with a small local checkpoint (for example one your "
                "package's tiny-checkpoint builder writes into tmp_path)"
            ) from exc

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
        eps = [ep for ep in self._distribution("check_discovery").entry_points if ep.group == ENTRY_POINT_GROUP]
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

    def _distribution(self, check: str) -> Any:
        if self.distribution is None:
            raise ConformanceError(f"{check} needs distribution='your-distribution-name'")
        try:
            return get_distribution(self.distribution)
        except PackageNotFoundError:
            raise ConformanceError(
                f"distribution {self.distribution!r} is not installed in the environment of {sys.executable}. "
                "The kit finds your plugin through its entry point, as a user's install does: install your "
                "project first (pip install -e .), or check the distribution= name against pyproject's "
                "[project] name"
            ) from None

    def check_as_installed(self) -> None:
        """The plugin as a user's ``pip install`` runs it: found through its entry point in a fresh interpreter,
        at its default trust level (no user configuration), isolated in a worker below level ``high``, with
        ``model_path`` validated against that level's allowed folders; greedy chat output equals this process's.

        Below ``high`` a local checkpoint must lie in the Hugging Face cache or a ``[trust] model_dirs`` folder;
        the kit lists the checkpoint's parent folder there in a config file of its own, as a user would."""
        self._distribution("check_as_installed")
        config = dict(self.config)
        try:
            json.dumps(config)
        except TypeError as exc:
            raise ConformanceError(f"check_as_installed passes config to a subprocess as JSON: {exc}") from exc
        model_path = config.get("model_path")
        expected = self._greedy_chat
        if expected is None:  # check_streaming saw it already when run_all ran it
            in_process = self._loaded()
            try:
                messages = [{"role": "user", "content": self.prompt}]
                params = {"max_new_tokens": self.max_new_tokens, "temperature": 0.0}
                expected = in_process.chat_completion(messages, **params).text
            finally:
                in_process.cleanup()
        with tempfile.TemporaryDirectory(prefix="inference-pio-conformance-") as tmp:
            config_file = Path(tmp) / "config.toml"
            roots = [] if not model_path or is_hub_id(str(model_path)) else [str(Path(model_path).resolve().parent)]
            config_file.write_text(f"[trust]\nmodel_dirs = {json.dumps(roots)}\n", encoding="utf-8")
            env = {k: v for k, v in os.environ.items() if not k.startswith("INFERENCE_PIO_")}
            env.update(INFERENCE_PIO_CONFIG=str(config_file), HF_HUB_OFFLINE="1")
            args = [self.metadata.name, self.prompt, str(self.max_new_tokens), json.dumps(config)]
            report = json.loads(self._python(AS_INSTALLED, args, env))
        where = f"plugin {self.metadata.name!r} at its default trust level {report['trust']!r}"
        if report["isolated"]:
            where += " (isolated in a worker process)"
        if report["status"] != "ok":
            raise ConformanceError(f"{where} is {report['status']}: {report['error']}")
        if report["streamed"] != report["text"]:
            raise ConformanceError(f"{where}: streamed {report['streamed']!r} differs from {report['text']!r}")
        if report["text"] != expected:
            raise ConformanceError(
                f"{where} answered {report['text']!r}, in this process {expected!r}: does the plugin depend on "
                "the working directory, environment variables or files outside model_path? The worker has none"
            )
        self.installed = report

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
            self._load(plugin, config)
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
        self._load(plugin, config)
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
            self._greedy_chat = whole.text
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
        """Every check. Without ``distribution=`` discovery and the installed-path check are skipped, with a
        ``UserWarning`` naming them (they would otherwise pass silently)."""
        self.check_metadata()
        if self.distribution is not None:
            self.check_discovery()
        else:
            warnings.warn(
                "conformance: no distribution= given, so check_discovery and check_as_installed (entry point, "
                "default trust level, isolation, model_path validation) were NOT run",
                UserWarning,
                stacklevel=2,
            )
        self.check_light_import()
        self.check_lifecycle()
        self.check_streaming()
        self.check_bad_input()
        if self.distribution is not None:
            self.check_as_installed()

    @staticmethod
    def _python(code: str, args: list[str] | None = None, env: Mapping[str, str] | None = None) -> str:
        proc = subprocess.run(
            [sys.executable, "-c", code, *(args or [])], capture_output=True, text=True, timeout=600, env=env
        )
        if proc.returncode != 0:
            raise ConformanceError(f"subprocess check failed:\n{proc.stderr[-2000:]}")
        return proc.stdout.strip().splitlines()[-1]


def run_conformance(factory: Callable[[], ModelPluginInterface], **kwargs: Any) -> None:
    """Run every check; raises ``ConformanceError`` on the first failure."""
    Conformance(factory, **kwargs).run_all()
