"""The isolated worker: runs one plugin under OS resource limits and answers the manager over pipes.

Started as ``python -I -m inference_pio.security.worker`` by its supervisor
(:mod:`inference_pio.security.supervisor`), which applies the rlimits before ``exec``, so before any
plugin code runs; the environment is scrubbed and the working directory is the worker's own. The
manager's side of the pipes is :class:`inference_pio.security.isolated.IsolatedPlugin`.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import errno
import json
import os
import sys
import threading
import traceback
from collections.abc import Callable
from typing import IO, Any

from inference_pio.errors import InferencePIOError
from inference_pio.security import wire
from inference_pio.security.gpu import claim_device

CALLS = frozenset({"infer", "generate_text", "chat_completion", "tokenize", "detokenize", "supports_config"})
STREAMS = frozenset({"stream_text", "stream_chat"})
STATS_INTERVAL = 0.2  # seconds between reports of the plugin's runtime stats (while they change)


def breach_of(exc: BaseException) -> str | None:
    """Which resource limit an exception means, if any."""
    if isinstance(exc, MemoryError):
        return "memory"
    if isinstance(exc, OSError):
        if exc.errno == errno.EFBIG:
            return "disk_write_bytes"
        if exc.errno in (errno.EMFILE, errno.ENFILE):
            return "open_files"
        if exc.errno == errno.ENOMEM:
            return "memory"
    if isinstance(exc, RuntimeError) and ("can't allocate memory" in str(exc) or "out of memory" in str(exc)):
        return "memory"
    return None


def error_message(exc: BaseException) -> dict[str, Any]:
    return {
        "error": {
            "type": type(exc).__name__,
            "message": str(exc),
            "param": getattr(exc, "param", None),
            "limit": getattr(exc, "limit", None),
            "value": getattr(exc, "value", None),
            "retry_after": getattr(exc, "retry_after", None),
        }
    }


def build_plugin(spec: dict[str, Any]) -> Any:
    """Rebuild the plugin the way the manager found it: its entry point or directory module, then its factory."""
    from inference_pio.common.interfaces import ModelPluginInterface
    from inference_pio.plugin_system.discovery import find_factory
    from inference_pio.plugin_system.registry import resolve_factory

    factory = find_factory(spec["name"], distribution=spec.get("distribution"), directory=spec.get("directory"))
    plugin = resolve_factory(factory)()
    if not isinstance(plugin, ModelPluginInterface):
        raise TypeError(f"factory of plugin {spec['name']!r} returned {type(plugin).__name__}, not a plugin")
    return plugin


class Worker:
    """Serves many calls and streams at once: this thread reads the manager's requests, each call or stream
    runs in a thread of its own (the plugin's scheduler batches the streams, as it does in process), and
    every message out carries its request's id, so the streams interleave on the one pipe."""

    def __init__(self, spec: dict[str, Any], inp: IO[bytes], out: IO[bytes]) -> None:
        self.spec = spec
        self.inp = inp
        self.out = out
        self.plugin: Any = None
        self._send_lock = threading.Lock()
        self._lock = threading.Lock()
        self._cancelled: dict[int, threading.Event] = {}  # open streams
        self._steps: collections.Counter[int] = collections.Counter()  # decode batch sizes since the last report
        self._stopping = threading.Event()

    def send(self, message: dict[str, Any]) -> None:
        with self._send_lock:
            wire.send(self.out, message)

    def serve(self) -> int:
        while True:
            try:
                message = wire.recv(self.inp)
            except wire.WireError:
                return 0  # the manager is gone
            rid: Any = message.get("id")
            op, method = message.get("op"), message.get("method")
            try:
                if op == "activate":
                    self.send({"id": rid, "ok": self.activate(message["config"])})
                elif op == "call" and method in CALLS and self.plugin is not None:
                    self._start(self.call, rid, message)
                elif op == "stream" and method in STREAMS and self.plugin is not None:
                    cancelled = threading.Event()
                    with self._lock:
                        self._cancelled[rid] = cancelled
                    self._start(self.stream, rid, message, cancelled)
                elif op == "cancel":
                    with self._lock:
                        event = self._cancelled.get(rid)
                    if event is not None:
                        event.set()
                elif op == "stats":
                    self.send({"id": rid, "ok": self.stats()})
                elif op == "shutdown":
                    self.shutdown()
                    self.send({"id": rid, "ok": True})
                    return 0
                else:
                    raise ProtocolError(f"unknown or invalid op {op!r} (method {method!r})")
            except BaseException as exc:
                self.fail(rid, exc)

    def _start(self, target: Callable[..., None], *args: Any) -> None:
        threading.Thread(target=target, args=args, name=f"inference-pio-request-{args[0]}", daemon=True).start()

    def activate(self, config: dict[str, Any]) -> dict[str, Any]:
        """Build and load the plugin; answer what the manager shows of it (memory plan, options, its runtime)."""
        claim_device(config)  # before any plugin code: the GPU and its memory cap are the manager's choice
        plugin = build_plugin(self.spec)
        plugin.initialize(**config)
        plugin.load_model(config)
        self.plugin = plugin
        scheduler = getattr(plugin, "scheduler", None)
        runtime = callable(getattr(scheduler, "stats", None))
        if runtime:
            self._watch(scheduler)
        plan = getattr(plugin, "memory_plan", None)
        try:
            options = plugin.Options.model_json_schema()
        except Exception:  # not a PluginOptions class: the manager shows no options
            options = None
        return {
            "memory_plan": _plain(plan),
            "options": options,
            "runtime": runtime,
            "stats": self.stats(),
        }

    def call(self, rid: int, message: dict[str, Any]) -> None:
        try:
            result = getattr(self.plugin, message["method"])(*message.get("args", []), **message.get("kwargs", {}))
            self.send({"id": rid, "ok": result})
        except BaseException as exc:
            self.fail(rid, exc)

    def stream(self, rid: int, message: dict[str, Any], cancelled: threading.Event) -> None:
        """Start the stream (validation and a full queue are answered before any chunk), then pass its chunks on
        until it ends or the manager cancels it; closing it frees its decode slot."""
        chunks: Any = None
        try:
            chunks = getattr(self.plugin, message["method"])(*message.get("args", []), **message.get("kwargs", {}))
            self.send({"id": rid, "ok": True})
            for chunk in chunks:
                if cancelled.is_set():
                    break
                self.send({"id": rid, "chunk": chunk})
                if cancelled.is_set():
                    break
            _close(chunks)
            self.send({"id": rid, "end": True})
        except BaseException as exc:
            with contextlib.suppress(Exception):
                _close(chunks)
            self.fail(rid, exc)
        finally:
            with self._lock:
                self._cancelled.pop(rid, None)

    def stats(self) -> dict[str, Any] | None:
        """The plugin's runtime's ``stats()`` as a plain object; None when it has no runtime."""
        stats = getattr(getattr(self.plugin, "scheduler", None), "stats", None)
        if not callable(stats):
            return None
        return _plain(stats())

    def _watch(self, scheduler: Any) -> None:
        """Count the decode steps' batch sizes and report them with the runtime's stats a few times a second
        (only when something changed), so the manager's metrics see the worker's batches."""
        before = getattr(scheduler, "on_step", None)

        def on_step(size: int) -> None:
            with self._lock:
                self._steps[size] += 1
            if before is not None:
                before(size)

        scheduler.on_step = on_step

        def report() -> None:
            last: dict[str, Any] | None = None
            while not self._stopping.wait(STATS_INTERVAL):
                try:
                    stats = self.stats()
                    with self._lock:
                        steps, self._steps = self._steps, collections.Counter()
                    if stats != last or steps:
                        self.send({"stats": stats, "steps": sorted(steps.items())})
                        last = stats
                except Exception:
                    return  # the pipe is gone: the manager ended this worker

        threading.Thread(target=report, name="inference-pio-stats", daemon=True).start()

    def shutdown(self) -> None:
        self._stopping.set()
        with self._lock:
            for event in self._cancelled.values():
                event.set()
        if self.plugin is not None:
            self.plugin.cleanup()

    def fail(self, rid: Any, exc: BaseException) -> None:
        """Answer request ``rid`` with ``exc``; a resource limit ends the whole worker, reported first."""
        limit = breach_of(exc)
        if limit is not None:
            try:
                self.send({"breach": {"limit": limit, "message": f"{type(exc).__name__}: {exc}"}})
            finally:
                os._exit(3)
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            os._exit(1)
        if isinstance(exc, BrokenPipeError):
            return  # the manager is gone, and this worker with it
        if not isinstance(exc, InferencePIOError):
            traceback.print_exc()
        with contextlib.suppress(OSError, ValueError, wire.WireError):
            self.send({"id": rid, **error_message(exc)})


class ProtocolError(Exception):
    """The manager sent a request this worker does not understand."""


def _plain(value: Any) -> dict[str, Any] | None:
    """A dataclass instance (a memory plan, runtime stats) as a JSON object; None for anything else."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    return None


def _close(chunks: Any) -> None:
    close = getattr(chunks, "close", None)
    if close is not None:
        close()


def serve(spec: dict[str, Any], inp: IO[bytes], out: IO[bytes]) -> int:
    return Worker(spec, inp, out).serve()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--in", dest="fd_in", type=int, required=True)
    parser.add_argument("--out", dest="fd_out", type=int, required=True)
    parser.add_argument("--spec", required=True)
    args = parser.parse_args(argv)
    spec = json.loads(args.spec)
    for path in reversed(spec.get("sys_path", [])):
        if path not in sys.path:
            sys.path.insert(0, path)
    with os.fdopen(args.fd_in, "rb", buffering=0) as inp, os.fdopen(args.fd_out, "wb", buffering=0) as out:
        return serve(spec, inp, out)


if __name__ == "__main__":
    sys.exit(main())
