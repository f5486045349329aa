"""``IsolatedPlugin``: the manager's stand-in for a plugin that runs in a limited worker process.

It implements the same interface as an in-process plugin, so ``activate_plugin``,
``execute_plugin`` and streaming work unchanged; every call crosses a pipe to the worker. This
module is the client side of that protocol (requests, streams, queueing, errors); starting,
stopping and diagnosing the worker process is :mod:`inference_pio.security.process`.
"""

from __future__ import annotations

import select
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from inference_pio import errors
from inference_pio.common.interfaces import Message, StreamChunk, TextModelPluginInterface
from inference_pio.common.metadata import ModelPluginMetadata
from inference_pio.security import wire
from inference_pio.security.policy import ResourceLimits, TrustLevel
from inference_pio.security.process import WorkerProcess, classify, memory_accounting


class IsolatedPlugin(TextModelPluginInterface):
    """Runs the plugin ``name`` in a worker subprocess under ``limits``."""

    def __init__(
        self,
        name: str,
        metadata: ModelPluginMetadata,
        *,
        level: TrustLevel,
        limits: ResourceLimits,
        hf_cache: Path,
        distribution: str | None = None,
        directory: str | None = None,
        on_exit: Callable[[], None] | None = None,
    ) -> None:
        self.name = name
        self._metadata = metadata
        self.level = level
        self.limits = limits
        self.hf_cache = hf_cache
        self.spec = {
            "name": name,
            "distribution": distribution,
            "directory": directory,
            "sys_path": [p for p in sys.path if p and Path(p).is_dir()],
        }
        self.on_exit = on_exit
        self.process: WorkerProcess | None = None
        self._lock = threading.RLock()  # guards start/stop of the worker
        self._busy = threading.Lock()  # owned by the call or stream using the pipe; any thread may release it
        self._waiting = 0
        self.max_waiting = 8  # callers queued behind the running one before QueueFullError
        self.settings: dict[str, Any] = {}

    @property
    def metadata(self) -> ModelPluginMetadata:
        return self._metadata

    # -- worker lifecycle ---------------------------------------------------------------------------
    def initialize(self, **kwargs: Any) -> None:
        self.settings = dict(kwargs)

    def load_model(self, config: Mapping[str, Any]) -> None:
        self.cleanup()
        device = str(config.get("device", "auto"))
        self.process = WorkerProcess(self.name, self.limits, memory=memory_accounting(device), hf_cache=self.hf_cache)
        self.process.start(self.spec)
        safe = {k: v for k, v in config.items() if k != "config_manager"}
        self._request({"op": "activate", "config": safe})

    def cleanup(self) -> None:
        with self._lock:
            process, self.process = self.process, None
            if process is None:
                return
            if process.alive and process.to_worker is not None:
                try:
                    wire.send(process.to_worker, {"op": "shutdown"})
                    process.wait(10)
                except (OSError, wire.WireError):
                    pass
            process.stop()
            process.close_log()

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.alive

    @property
    def workdir(self) -> Path | None:
        return None if self.process is None else self.process.workdir

    @property
    def _to(self) -> Any:
        return None if self.process is None else self.process.to_worker

    @property
    def _from(self) -> Any:
        return None if self.process is None else self.process.from_worker

    # -- calls ----------------------------------------------------------------------------------------
    def _deadline(self) -> float | None:
        return None if self.limits.wall_seconds is None else time.monotonic() + self.limits.wall_seconds

    def _receive(self, deadline: float | None) -> dict[str, Any]:
        assert self.process is not None
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        ready, _, _ = select.select([self._from], [], [], timeout)
        if not ready:
            self._breach(
                "wall_seconds",
                self.limits.wall_seconds,
                f"took longer than {self.limits.wall_seconds} s of wall-clock time",
            )
        try:
            message = wire.recv(self._from)
        except wire.WireError:
            return self._died()  # type: ignore[no-any-return]
        if "breach" in message:
            limit = message["breach"]["limit"]
            self._breach(
                limit,
                getattr(self.limits, "memory_bytes" if limit == "memory" else limit, None),
                message["breach"]["message"],
            )
        if "error" in message:
            self._raise(message["error"])
        return message

    def _died(self) -> Any:
        """The worker's pipe closed: ask the supervisor how it ended and raise the matching error."""
        assert self.process is not None
        report = self.process.wait()
        tail = self.process.log_tail()
        limit, what = classify(report, self.limits, tail)
        if limit is not None:
            self._breach(limit, getattr(self.limits, "memory_bytes" if limit == "memory" else limit), what)
        self._finish()
        raise errors.PluginLoadError(
            f"the worker of plugin {self.name!r} {what}; activate it again. Worker log:\n{tail}"
        )

    def _breach(self, limit: str, value: Any, what: str) -> Any:
        self._finish()
        shown = f"{value / 2**20:.0f} MiB" if limit in ("memory", "disk_write_bytes") and value else value
        raise errors.ResourceLimitExceeded(
            f"plugin {self.name!r} (trust level {self.level}) exceeded its {limit} limit ({shown}): {what}. "
            "Its worker was ended; activate the plugin again to continue.",
            limit,
            value,
        )

    def _finish(self) -> None:
        if self.process is not None:
            self.process.stop()  # at once: the worker may be hung or over a limit
        self.cleanup()
        if self.on_exit is not None:
            self.on_exit()

    @staticmethod
    def _raise(error: dict[str, Any]) -> Any:
        kind = getattr(errors, str(error.get("type")), None)
        message = str(error.get("message"))
        if isinstance(kind, type) and issubclass(kind, errors.InvalidRequestError):
            raise kind(message, error.get("param"))
        if kind is errors.ResourceLimitExceeded:
            raise errors.ResourceLimitExceeded(message, str(error.get("limit")), error.get("value"))
        if isinstance(kind, type) and issubclass(kind, errors.InferencePIOError):
            raise kind(message)
        raise errors.InferencePIOError(f"plugin raised {error.get('type')}: {message}")

    def _acquire(self) -> None:
        """Take the worker's pipe; a bounded number of callers may wait for it."""
        if self._busy.acquire(blocking=False):
            return
        with self._lock:
            if self._waiting >= self.max_waiting:
                raise errors.QueueFullError(
                    f"plugin {self.name!r} runs isolated and serves one call at a time; {self._waiting} callers "
                    "are already waiting. Retry shortly."
                )
            self._waiting += 1
        try:
            self._busy.acquire()
        finally:
            with self._lock:
                self._waiting -= 1

    def _request(self, message: dict[str, Any]) -> Any:
        self._acquire()
        try:
            return self._exchange(message)
        finally:
            self._busy.release()

    def _exchange(self, message: dict[str, Any]) -> Any:
        if not self.alive:
            raise errors.PluginNotActiveError(f"plugin {self.name!r} has no running worker; activate it again")
        try:
            wire.send(self._to, message)
        except (OSError, wire.WireError):
            self._died()
        return self._receive(self._deadline()).get("ok")

    def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return self._request({"op": "call", "method": method, "args": list(args), "kwargs": kwargs})

    def _stream(self, method: str, *args: Any, **kwargs: Any) -> Iterator[StreamChunk]:
        """Start a stream; the worker is held by it until it ends, is closed, or is garbage-collected."""
        self._acquire()
        try:
            if not self.alive:
                raise errors.PluginNotActiveError(f"plugin {self.name!r} has no running worker; activate it again")
            wire.send(self._to, {"op": "stream", "method": method, "args": list(args), "kwargs": kwargs})
            deadline = self._deadline()
            first = self._receive(deadline)  # errors in validation surface before the first chunk
        except BaseException:
            self._busy.release()
            raise
        return _WorkerStream(self, first, deadline)

    # -- the plugin interface ---------------------------------------------------------------------------
    def infer(self, data: Any, **kwargs: Any) -> Any:
        return self._call("infer", data, **kwargs)

    def tokenize(self, text: str) -> list[int]:
        return list(self._call("tokenize", text))

    def detokenize(self, ids: Sequence[int]) -> str:
        return str(self._call("detokenize", list(ids)))

    def stream_text(self, prompt: str, **params: Any) -> Iterator[StreamChunk]:
        return self._stream("stream_text", prompt, **params)

    def stream_chat(self, messages: Sequence[Message], **params: Any) -> Iterator[StreamChunk]:
        return self._stream("stream_chat", list(messages), **params)


class _WorkerStream(Iterator[StreamChunk]):
    """Chunks of one worker stream. Owns the worker's pipe until the stream is finished or closed, so
    concurrent callers queue instead of interleaving messages (consumers may switch threads)."""

    def __init__(self, plugin: IsolatedPlugin, first: dict[str, Any], deadline: float | None) -> None:
        self._plugin = plugin
        self._message: dict[str, Any] | None = first
        self._deadline = deadline
        self._open = True

    def __next__(self) -> StreamChunk:
        if not self._open or self._message is None:
            raise StopIteration
        message = self._message
        if "chunk" not in message:
            self._release()
            raise StopIteration
        try:
            self._message = None
            self._message = self._plugin._receive(self._deadline)
        except BaseException:
            self._release()
            raise
        return message["chunk"]  # type: ignore[no-any-return]

    def close(self) -> None:
        """Stop early: ask the worker to cancel and drain what it already sent."""
        if not self._open:
            return
        try:
            message = self._message
            if self._plugin.alive and message is not None and "end" not in message:
                wire.send(self._plugin._to, {"op": "cancel"})
                while "end" not in message:
                    message = self._plugin._receive(self._deadline)
        except (errors.InferencePIOError, OSError, wire.WireError):
            pass
        finally:
            self._release()

    def _release(self) -> None:
        if self._open:
            self._open = False
            self._plugin._busy.release()

    def __del__(self) -> None:
        self.close()
