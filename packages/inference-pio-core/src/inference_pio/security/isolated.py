"""``IsolatedPlugin``: the manager's stand-in for a plugin that runs in a limited worker process.

It implements the same interface as an in-process plugin, so ``activate_plugin``,
``execute_plugin`` and streaming work unchanged; every call crosses a pipe to the worker. This
module is the client side of that protocol (requests, streams, errors); starting, stopping and
diagnosing the worker process is :mod:`inference_pio.security.process`.

Many calls and streams share the pipe at once: each carries a request id, one writer thread sends
the requests, and one reader thread hands each message of the worker to its request's queue. The
worker runs the plugin's own scheduler, so concurrent streams are batched as they are in process.
"""

from __future__ import annotations

import itertools
import queue
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Union

from inference_pio import errors
from inference_pio.common.config_manager import DEFAULT_MAX_QUEUE
from inference_pio.common.interfaces import Message, StreamChunk, TextModelPluginInterface
from inference_pio.common.memory import MemoryPlan
from inference_pio.common.metadata import ModelPluginMetadata
from inference_pio.security import wire
from inference_pio.security.policy import ResourceLimits, TrustLevel
from inference_pio.security.process import WorkerProcess, classify, memory_accounting

if TYPE_CHECKING:
    from inference_pio.common.schemas import PluginOptions

EXTRA_REQUESTS = 8  # beyond the plugin's slots and queue: room for short calls (tokenize, ...) beside the streams
SHUTDOWN_SECONDS = 30  # what a deactivated worker gets to end its streams and clean up

ErrorFactory = Callable[[], BaseException]


class _Request:
    """One call or stream in flight: the worker's messages for it arrive in ``messages``, in order."""

    def __init__(self, rid: int, *, stream: bool, deadline: float | None) -> None:
        self.id = rid
        self.stream = stream
        self.deadline = deadline
        self.messages: queue.SimpleQueue[dict[str, Any] | BaseException] = queue.SimpleQueue()
        self.closed = False  # the caller went away: drop what still arrives


class _Connection:
    """One running worker: its process, the requests in flight, a writer and a reader thread.

    It ends exactly once (:meth:`end`): on deactivation, when a caller's wall-clock limit runs out, or
    when the worker dies; every request still in flight then gets the same error.
    """

    def __init__(self, plugin: IsolatedPlugin, process: WorkerProcess) -> None:
        self.plugin = plugin
        self.process = process
        self.ended = False
        self._deactivating = False
        self._error: ErrorFactory | None = None
        self._breach: dict[str, Any] | None = None  # what the worker reported before it exited
        self._requests: dict[int, _Request] = {}
        self._ids = itertools.count(1)
        self._lock = threading.RLock()  # guards the requests, ending, and every use of the process
        self._outbox: queue.SimpleQueue[dict[str, Any] | None] = queue.SimpleQueue()  # safe to use from __del__
        name = plugin.name
        threading.Thread(target=self._write, name=f"inference-pio-{name}-writer", daemon=True).start()
        threading.Thread(target=self._read, name=f"inference-pio-{name}-reader", daemon=True).start()

    # -- requests -------------------------------------------------------------------------------------
    def open(self, message: dict[str, Any], *, stream: bool = False, bounded: bool = True) -> _Request:
        """Send ``message`` as a new request; refuses at once when ``max_requests`` are in flight."""
        with self._lock:
            if self.ended:
                raise self._error() if self._error is not None else self.plugin._not_running()
            if bounded and len(self._requests) >= self.plugin.max_requests:
                raise errors.QueueFullError(
                    f"plugin {self.plugin.name!r} runs isolated and already has {len(self._requests)} requests in "
                    f"flight, its limit (max_requests: its decode slots + max_queue + {EXTRA_REQUESTS}); "
                    "retry shortly",
                    retry_after=1.0,
                )
            request = _Request(next(self._ids), stream=stream, deadline=self.plugin._deadline())
            self._requests[request.id] = request
        self._outbox.put({**message, "id": request.id})
        return request

    def receive(self, request: _Request) -> dict[str, Any]:
        """The next message of ``request``; its error raised here. Past its wall-clock limit the worker is ended."""
        timeout = None if request.deadline is None else max(0.0, request.deadline - time.monotonic())
        try:
            item = request.messages.get(timeout=timeout)
        except queue.Empty:
            limits = self.plugin.limits
            make = self.plugin._breach_error(
                "wall_seconds", limits.wall_seconds, f"took longer than {limits.wall_seconds} s of wall-clock time"
            )
            self.end(make, died=True)
            raise make() from None
        if isinstance(item, BaseException):
            raise item
        if "error" in item:
            _raise(item["error"])
        return item

    def call(self, message: dict[str, Any]) -> Any:
        return self.receive(self.open(message)).get("ok")

    def cancel(self, request: _Request) -> None:
        """Stop a stream early: the worker closes it (freeing its slot) and the others go on. Lock-free, so a
        stream's ``__del__`` may call it from any thread."""
        if not request.closed:
            request.closed = True
            if request.id in self._requests:
                self._outbox.put({"op": "cancel", "id": request.id})

    # -- the threads ----------------------------------------------------------------------------------
    def _write(self) -> None:
        pipe = self.process.to_worker
        while True:
            message = self._outbox.get()
            if message is None or pipe is None:
                return
            try:
                wire.send(pipe, message)
            except (OSError, ValueError, wire.WireError):
                return  # the worker is gone; the reader finds out why

    def _read(self) -> None:
        pipe = self.process.from_worker
        while pipe is not None:
            try:
                message = wire.recv(pipe)
            except (OSError, ValueError, wire.WireError):
                break
            if "breach" in message:
                self._breach = message["breach"]
            elif "stats" in message:
                self.plugin._runtime.update(message.get("stats"), message.get("steps") or ())
            else:
                self._dispatch(message)
        self._lost()

    def _dispatch(self, message: dict[str, Any]) -> None:
        with self._lock:
            request = self._requests.get(message.get("id"))  # type: ignore[arg-type]
            if request is None:
                return
            last = "error" in message or "end" in message or ("ok" in message and not request.stream)
            if last:
                del self._requests[request.id]
        if last or not request.closed:
            request.messages.put(message)

    def _lost(self) -> None:
        """The worker's pipe closed: find out from its supervisor how it ended, and end every request with that."""
        with self._lock:
            if self.ended:
                return  # ended on purpose
            if self._deactivating:
                self.end(self._deactivated, died=False)
                return
            report = self.process.wait()
            tail = self.process.log_tail()
            plugin = self.plugin
            if self._breach is not None:
                limit = str(self._breach.get("limit"))
                make = plugin._breach_error(limit, plugin._limit_value(limit), str(self._breach.get("message")))
            else:
                found, what = classify(report, plugin.limits, tail)
                if found is not None:
                    make = plugin._breach_error(found, plugin._limit_value(found), what)
                else:
                    message = f"the worker of plugin {plugin.name!r} {what}; activate it again. Worker log:\n{tail}"
                    make = lambda: errors.PluginLoadError(message)  # noqa: E731
            self.end(make, died=True)

    def end(self, make: ErrorFactory, *, died: bool) -> None:
        """Stop the worker (at once: it may be hung or over a limit) and fail every request still in flight."""
        with self._lock:
            if self.ended:
                return
            self.ended = True
            self._error = make
            pending = list(self._requests.values())
            self._requests.clear()
            self._outbox.put(None)
            self.process.stop()
            self.process.close_log()
        if died:
            self.plugin._lost(self)  # before the callers hear of it: they may look at the plugin's state
        for request in pending:
            request.messages.put(make())

    def _deactivated(self) -> BaseException:
        return errors.PluginNotActiveError(f"plugin {self.plugin.name!r} was deactivated; activate it again")

    def shutdown(self) -> None:
        """Ask the worker to close its streams and clean up, then end it."""
        self._deactivating = True
        try:
            if self.process.alive:
                request = self.open({"op": "shutdown"}, bounded=False)
                request.messages.get(timeout=SHUTDOWN_SECONDS)
                with self._lock:
                    self.process.wait(10)
        except (errors.InferencePIOError, queue.Empty):
            pass
        self.end(self._deactivated, died=False)


def _raise(error: dict[str, Any]) -> Any:
    """Raise the worker's error as the same type (only types of ``inference_pio.errors``; others are wrapped)."""
    kind = getattr(errors, str(error.get("type")), None)
    message = str(error.get("message"))
    if isinstance(kind, type) and issubclass(kind, errors.InvalidRequestError):
        raise kind(message, error.get("param"))
    if kind is errors.ResourceLimitExceeded:
        raise errors.ResourceLimitExceeded(message, str(error.get("limit")), error.get("value"))
    if kind is errors.QueueFullError:
        raise errors.QueueFullError(message, float(error.get("retry_after") or 1.0))
    if isinstance(kind, type) and issubclass(kind, errors.InferencePIOError):
        raise kind(message)
    raise errors.InferencePIOError(f"plugin raised {error.get('type')}: {message}")


class WorkerRuntime:
    """The worker plugin's runtime (its scheduler) as the server's metrics see an in-process one:
    ``queue_depth`` and ``active`` from the worker's latest report, ``on_step`` called with the batch size
    of every decode step the worker ran (reported a few times a second), ``stats()`` asked of the worker."""

    def __init__(self, plugin: IsolatedPlugin) -> None:
        self._plugin = plugin
        self.on_step: Callable[[int], None] | None = None
        self.last: dict[str, Any] = {}

    @property
    def queue_depth(self) -> int:
        return int(self.last.get("queued", 0))

    @property
    def active(self) -> int:
        return int(self.last.get("active", 0))

    def stats(self) -> dict[str, Any]:
        """The worker's ``RuntimeStats`` fields now (slots, active, queued, steps, tokens, compiled)."""
        stats = self._plugin._connection().call({"op": "stats"})
        self.last = dict(stats or {})
        return self.last

    def update(self, stats: Mapping[str, Any] | None, steps: Sequence[Sequence[int]]) -> None:
        if stats is not None:
            self.last = dict(stats)
        observe = self.on_step
        if observe is not None:
            for size, count in steps:
                for _ in range(int(count)):
                    observe(int(size))


class _WorkerOptions:
    """``IsolatedPlugin.Options``: the plugin's options class, rebuilt from the schema its worker reported
    (``PluginOptions``, no options, before activation)."""

    def __get__(self, instance: IsolatedPlugin | None, owner: type | None = None) -> type[PluginOptions]:
        options = None if instance is None else instance._options
        if options is None:
            from inference_pio.common.schemas import PluginOptions

            return PluginOptions
        return options


def options_class(schema: Mapping[str, Any]) -> type[PluginOptions]:
    """A ``PluginOptions`` subclass with the fields of a JSON schema (``Options.model_json_schema()`` of the
    worker's plugin), so that requests are checked here as in process; the worker checks them again."""
    from pydantic import Field, create_model

    from inference_pio.common.schemas import PluginOptions

    definitions = schema.get("$defs", {})
    required = set(schema.get("required", ()))
    fields: dict[str, Any] = {}
    for key, prop in schema.get("properties", {}).items():
        default = ... if key in required else prop.get("default")
        fields[key] = (_annotation(prop, definitions), Field(default, description=prop.get("description")))
    title = str(schema.get("title") or "Options")
    return create_model(title, __base__=PluginOptions, **fields)  # type: ignore[no-any-return, call-overload]


def _annotation(prop: Mapping[str, Any], definitions: Mapping[str, Any]) -> Any:
    """The Python type of one JSON-schema property (what pydantic writes for bool, int, float, str, Literal,
    lists, dicts, optional values); anything else is ``Any``, left to the worker's check."""
    if "$ref" in prop:
        return _annotation(definitions.get(str(prop["$ref"]).rsplit("/", 1)[-1], {}), definitions)
    if "enum" in prop:
        return Literal[tuple(prop["enum"])]
    if "const" in prop:
        return Literal[prop["const"]]
    choices = prop.get("anyOf") or prop.get("oneOf")
    if choices:
        return Union[tuple(_annotation(c, definitions) for c in choices)]  # noqa: UP007
    kind = prop.get("type")
    if kind == "array":
        return list[_annotation(prop.get("items", {}), definitions)]  # type: ignore[misc]
    if kind == "object":
        return dict[str, Any]
    simple = {"boolean": bool, "integer": int, "number": float, "string": str, "null": type(None)}
    return simple.get(kind, Any) if isinstance(kind, str) else Any


class IsolatedPlugin(TextModelPluginInterface):
    """Runs the plugin ``name`` in a worker subprocess under ``limits``."""

    Options = _WorkerOptions()  # type: ignore[assignment]

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
        self._conn: _Connection | None = None
        self._lock = threading.RLock()  # guards start/stop of the worker
        self.max_requests = 1 + DEFAULT_MAX_QUEUE + EXTRA_REQUESTS
        """Calls and streams in flight in the worker before ``QueueFullError``; set from the configuration's
        ``max_batch_size`` + ``max_queue`` (+ room for short calls) on activation. A plugin with its own
        scheduler refuses first, with its own message, as it does in process."""
        self.settings: dict[str, Any] = {}
        self._runtime = WorkerRuntime(self)
        self.scheduler: WorkerRuntime | None = None
        """The worker's runtime, when its plugin has one (``scheduler`` with ``stats()``), for the server's metrics."""
        self._options: type[PluginOptions] | None = None

    @property
    def metadata(self) -> ModelPluginMetadata:
        return self._metadata

    # -- worker lifecycle ---------------------------------------------------------------------------
    def initialize(self, **kwargs: Any) -> None:
        self.settings = dict(kwargs)

    def load_model(self, config: Mapping[str, Any]) -> None:
        self.cleanup()
        device = str(config.get("device", "auto"))
        slots = int(config.get("max_batch_size") or 1)
        waiting = config.get("max_queue")
        self.max_requests = slots + int(DEFAULT_MAX_QUEUE if waiting is None else waiting) + EXTRA_REQUESTS
        process = WorkerProcess(self.name, self.limits, memory=memory_accounting(device), hf_cache=self.hf_cache)
        process.start(self.spec)
        with self._lock:
            self._conn = _Connection(self, process)
        safe = {k: v for k, v in config.items() if k != "config_manager"}
        info = self._connection().call({"op": "activate", "config": safe})
        plan = info.get("memory_plan")
        self.memory_plan = None if plan is None else MemoryPlan(**{k: _tuples(v) for k, v in plan.items()})
        self._options = None if info.get("options") is None else options_class(info["options"])
        self.scheduler = self._runtime if info.get("runtime") else None
        self._runtime.last = dict(info.get("stats") or {})

    def cleanup(self) -> None:
        with self._lock:
            conn, self._conn = self._conn, None
        if conn is not None:
            conn.shutdown()

    def _lost(self, conn: _Connection) -> None:
        """The worker ``conn`` died or was ended over a limit: the plugin is no longer active."""
        with self._lock:
            if self._conn is not conn:
                return
            self._conn = None
        if self.on_exit is not None:
            self.on_exit()

    @property
    def alive(self) -> bool:
        conn = self._conn
        return conn is not None and not conn.ended and conn.process.alive

    @property
    def process(self) -> WorkerProcess | None:
        conn = self._conn
        return None if conn is None else conn.process

    @property
    def workdir(self) -> Path | None:
        process = self.process
        return None if process is None else process.workdir

    @property
    def in_flight(self) -> int:
        """Calls and streams the worker is serving now."""
        conn = self._conn
        return 0 if conn is None else len(conn._requests)

    def _connection(self) -> _Connection:
        conn = self._conn
        if conn is None or conn.ended:
            raise self._not_running()
        return conn

    def _not_running(self) -> errors.PluginNotActiveError:
        return errors.PluginNotActiveError(f"plugin {self.name!r} has no running worker; activate it again")

    # -- errors -------------------------------------------------------------------------------------------
    def _deadline(self) -> float | None:
        return None if self.limits.wall_seconds is None else time.monotonic() + self.limits.wall_seconds

    def _limit_value(self, limit: str) -> Any:
        return getattr(self.limits, "memory_bytes" if limit == "memory" else limit, None)

    def _breach_error(self, limit: str, value: Any, what: str) -> ErrorFactory:
        shown = f"{value / 2**20:.0f} MiB" if limit in ("memory", "disk_write_bytes") and value else value
        message = (
            f"plugin {self.name!r} (trust level {self.level}) exceeded its {limit} limit ({shown}): {what}. "
            "Its worker was ended; activate the plugin again to continue."
        )
        return lambda: errors.ResourceLimitExceeded(message, limit, value)

    # -- calls ----------------------------------------------------------------------------------------
    def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return self._connection().call({"op": "call", "method": method, "args": list(args), "kwargs": kwargs})

    def _stream(self, method: str, *args: Any, **kwargs: Any) -> Iterator[StreamChunk]:
        """Start a stream: returns once the worker's plugin accepted it (bad input or a full queue raise here)."""
        conn = self._connection()
        request = conn.open({"op": "stream", "method": method, "args": list(args), "kwargs": kwargs}, stream=True)
        try:
            conn.receive(request)
        except BaseException:
            conn.cancel(request)
            raise
        return _WorkerStream(conn, request)

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


def _tuples(value: Any) -> Any:
    """JSON arrays back to the tuples a frozen dataclass holds."""
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


class _WorkerStream(Iterator[StreamChunk]):
    """Chunks of one worker stream; any thread may consume or close it. ``close()`` (or garbage collection)
    cancels it in the worker without waiting; the other streams go on."""

    def __init__(self, conn: _Connection, request: _Request) -> None:
        self._conn = conn
        self._request = request
        self._done = False

    def __next__(self) -> StreamChunk:
        if self._done:
            raise StopIteration
        try:
            message = self._conn.receive(self._request)
        except BaseException:
            self._done = True
            raise
        if "end" in message:
            self._done = True
            raise StopIteration
        return message["chunk"]  # type: ignore[no-any-return]

    def close(self) -> None:
        if not self._done:
            self._done = True
            self._conn.cancel(self._request)

    def __del__(self) -> None:
        self.close()
