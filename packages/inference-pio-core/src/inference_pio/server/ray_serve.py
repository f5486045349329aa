"""``inference-pio serve --ray``: the same OpenAI-compatible server as a Ray Serve application.

Ray Serve brings replicas, routing, autoscaling and restarts; this module only wires our server into it:

- one **ingress** deployment runs the server's own FastAPI app (:func:`~inference_pio.server.app.create_app`:
  the same routes, parsing, errors and streaming as one process). Its plugins are :class:`RemotePlugin`
  stand-ins: a chat or completion stream runs in the model's deployment and comes back chunk by chunk.
- one **model** deployment per served model. Each replica is a :class:`ModelReplica`: a
  :class:`~inference_pio.server.state.ServerState` of that one model, so the plugin is activated through its
  own ``PluginManager`` (trust levels, path validation, isolation) and decodes with its own continuous-batching
  scheduler, exactly as in one process.
- a small named actor (:class:`Board`) where every model replica posts its metrics and identity twice a second,
  so ``/health`` and ``/metrics`` of the endpoint cover every replica (with a ``replica`` label).

A replica that dies is replaced by Ray. A request that had not started on it is sent again (to another
replica); a stream that was running on it ends with a 503 error (an error event once streaming). The
command drains on SIGTERM (Serve's graceful shutdown of every replica), then stops the local Ray it
started. Only ``inference-pio serve --ray`` imports this module (and ray).
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import signal
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
from fastapi import FastAPI
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError

from inference_pio import errors
from inference_pio.common.config_manager import parse_size
from inference_pio.common.interfaces import Message, StreamChunk, TextModelPluginInterface
from inference_pio.common.memory import (
    BYTES_PER_PARAM,
    MemoryPlan,
    checkpoint_parameter_count,
    full_precision_for,
    headroom,
    requirements_for,
)
from inference_pio.common.metadata import GB, ModelPluginMetadata
from inference_pio.plugin_system.manager import PluginManager
from inference_pio.server.app import create_app
from inference_pio.server.errors import APIError
from inference_pio.server.state import ServedModel, ServerSettings, ServerState

log = logging.getLogger("inference_pio.server")

NAMESPACE = "inference_pio"
REPORT_INTERVAL = 0.5  # seconds between a replica's reports to the board
STALE_AFTER = 10.0  # a replica silent this long is gone (killed, or its node lost; loaded hosts report late)
RETRY_SECONDS = 30.0  # how long a request that has not started keeps looking for a live replica
STREAMS = frozenset({"stream_text", "stream_chat"})
REPLICA_KEYS = ("replicas", "min_replicas", "max_replicas", "target_ongoing_requests", "num_cpus", "num_gpus")
RAY_KEYS = (*REPLICA_KEYS, "address", "gpu_memory", "ingress_replicas", "app_name", "models")
REPLICA_GONE = (RayActorError, ActorUnavailableError)


# -- what to deploy -------------------------------------------------------------------------------------
@dataclass
class RayOptions:
    """``[server.ray]`` of the config file, overridden by the command's flags; ``models`` holds the
    per-model tables (``[server.ray.models.NAME]``) with the same replica keys."""

    address: str | None = None
    app_name: str = "inference-pio"
    replicas: int | None = None
    min_replicas: int | None = None
    max_replicas: int | None = None
    target_ongoing_requests: float | None = None
    num_cpus: float | None = None
    num_gpus: float | None = None
    gpu_memory: int | None = None  # bytes of one GPU, to size fractional or multi-GPU replicas
    ingress_replicas: int = 1
    models: dict[str, dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def from_config(cls, section: Mapping[str, Any], flags: Mapping[str, Any], where: str) -> RayOptions:
        """Merge ``section`` (``[server.ray]``) and ``flags`` (None: not given); unknown keys are errors."""
        _check_keys(section, RAY_KEYS, f"[server.ray] in {where}")
        models = section.get("models", {})
        if not isinstance(models, dict) or not all(isinstance(t, dict) for t in models.values()):
            raise errors.ConfigError(f"[server.ray.models] in {where} must hold one table per model")
        for name, table in models.items():
            _check_keys(table, REPLICA_KEYS, f"[server.ray.models.{name}] in {where}")
        values = {k: v for k, v in section.items() if k not in ("models", "gpu_memory")}
        values.update({k: v for k, v in flags.items() if v is not None})
        if "replicas" in flags and flags["replicas"] is not None:
            values.pop("min_replicas", None), values.pop("max_replicas", None)  # the flag wins over autoscaling
        gpu_memory = section.get("gpu_memory")
        size = parse_size(str(gpu_memory)) if isinstance(gpu_memory, str) else gpu_memory
        return cls(**values, gpu_memory=size, models=models)

    def for_model(self, name: str) -> dict[str, Any]:
        """The replica keys for ``name``: its own table over the global ones."""
        general = {k: getattr(self, k) for k in REPLICA_KEYS}
        return {**general, **self.models.get(name, {})}


def _check_keys(table: Mapping[str, Any], known: Sequence[str], where: str) -> None:
    unknown = sorted(set(table) - set(known))
    if unknown:
        raise errors.ConfigError(f"unknown key {unknown[0]!r} in {where}; known keys: {', '.join(sorted(known))}")


@dataclass
class ModelDeployment:
    """How one model is deployed: replicas (fixed or autoscaled) and the resources of each replica."""

    model: ServedModel
    num_replicas: int | None
    autoscaling: dict[str, Any] | None
    actor_options: dict[str, Any]
    max_ongoing_requests: int
    sizing: str  # how the resources were chosen, for the log and /health

    def describe(self) -> str:
        if self.autoscaling:
            count = f"{self.autoscaling['min_replicas']}..{self.autoscaling['max_replicas']} replicas (autoscaled)"
        else:
            count = f"{self.num_replicas} replica{'s' * (self.num_replicas != 1)}"
        return f"{self.model.name}: {count}, each {self.sizing}"


def weights_bytes(metadata: ModelPluginMetadata, config: Mapping[str, Any], device_kind: str) -> int:
    """Bytes the model's weights take on ``device_kind`` (what the replica's memory plan will start from):
    counted from a local checkpoint's safetensors headers, else from the plugin's metadata. Torch-free."""
    quantization = str(config.get("quantization", "auto"))
    dtype = str(config.get("dtype", "auto"))
    precision = quantization if quantization in ("int8", "int4") else dtype
    if precision == "auto":
        precision = full_precision_for(device_kind)
    path = Path(str(config.get("model_path") or ""))
    if config.get("model_path") and path.is_dir() and any(path.glob("*.safetensors")):
        return requirements_for(checkpoint_parameter_count(path))[precision]  # type: ignore[index]
    known = metadata.memory_requirements
    if precision in known:
        return int(known[precision])  # type: ignore[index]
    for other, size in known.items():
        return int(size / BYTES_PER_PARAM[other] * BYTES_PER_PARAM[precision])  # type: ignore[index]
    return 0


def replica_resources(
    metadata: ModelPluginMetadata, config: Mapping[str, Any], keys: Mapping[str, Any], *, gpu_memory: int | None
) -> tuple[dict[str, Any], str]:
    """Ray actor options of one replica (``num_cpus``, ``num_gpus``, ``memory``) and why.

    The config file or the flags decide when they say; otherwise a replica on a CPU asks for one CPU and
    the RAM its weights need (weights plus the memory plan's headroom), and one on a GPU asks for the
    share of a GPU the weights need when ``gpu_memory`` (the size of one GPU) is known (several replicas
    then share a GPU), as many whole GPUs as they need when that is more than one (the model is then split
    over them inside the replica), else one GPU.
    """
    device = str(config.get("device", "auto")).split(":", 1)[0]
    gpu = device == "cuda" or (device == "auto" and keys.get("num_gpus") not in (None, 0))
    weights = weights_bytes(metadata, config, "cuda" if gpu else "cpu")
    need = weights + headroom(weights) if weights else 0
    options: dict[str, Any] = {"num_cpus": 1.0 if keys.get("num_cpus") is None else float(keys["num_cpus"])}
    reasons = [f"{options['num_cpus']:g} CPU"]
    if keys.get("num_gpus") is not None:
        options["num_gpus"] = float(keys["num_gpus"])
        reasons.append(f"{options['num_gpus']:g} GPU (configured)")
    elif gpu and gpu_memory and need:
        share = need / gpu_memory
        options["num_gpus"] = float(math.ceil(share)) if share > 1 else min(1.0, math.ceil(share * 20) / 20)
        reasons.append(
            f"{options['num_gpus']:g} GPU ({need / GB:.2f} GB weights+headroom, GPUs of {gpu_memory / GB:.0f} GB)"
        )
    elif gpu:
        options["num_gpus"] = 1.0
        reasons.append("1 GPU (set [server.ray] gpu_memory to share or size GPUs by the memory plan)")
    if not gpu and need:
        options["memory"] = need
        reasons.append(f"{need / GB:.2f} GB RAM (weights and headroom)")
    return options, ", ".join(reasons)


def plan_deployments(pm: PluginManager, settings: ServerSettings, options: RayOptions) -> list[ModelDeployment]:
    """Decide replicas and resources for every served model (before anything starts)."""
    plans = []
    for model in settings.models:
        plugin = pm.get_plugin(model.name)
        # The device (and the rest) as the flags and the config file say: what the replicas are placed for.
        resolved = pm.config_manager.resolve(model.name, plugin.default_config(), dict(model.config)).values
        keys = options.for_model(model.name)
        actor_options, sizing = replica_resources(plugin.metadata, resolved, keys, gpu_memory=options.gpu_memory)
        batch, queue = int(resolved.get("max_batch_size") or 8), int(resolved.get("max_queue") or 0)
        autoscaling = None
        if keys.get("min_replicas") is not None or keys.get("max_replicas") is not None:
            low = int(keys.get("min_replicas") or 1)
            high = int(keys.get("max_replicas") or max(low, 1))
            if not 0 <= low <= high or high < 1:
                raise errors.ConfigError(
                    f"{model.name}: autoscaling needs 0 <= min_replicas <= max_replicas and max_replicas >= 1, "
                    f"got min_replicas={low}, max_replicas={high}"
                )
            target = float(keys.get("target_ongoing_requests") or batch)
            autoscaling = {"min_replicas": low, "max_replicas": high, "target_ongoing_requests": target}
        replicas = None if autoscaling else int(keys.get("replicas") or 1)
        if replicas is not None and replicas < 1:
            raise errors.ConfigError(f"{model.name}: replicas must be at least 1, got {replicas}")
        # A replica takes what its scheduler can hold (decoding plus waiting); Ray's router queues the rest,
        # so a full replica means "try another one", not a 429.
        ongoing = max(1, batch + queue)
        plans.append(ModelDeployment(model, replicas, autoscaling, actor_options, ongoing, sizing))
    return plans


# -- errors across the process boundary -------------------------------------------------------------------
def encode_error(exc: BaseException) -> dict[str, Any]:
    """An exception as plain data (our error types keep their meaning and fields on the other side)."""
    return {
        "type": type(exc).__name__,
        "message": str(exc),
        "param": getattr(exc, "param", None),
        "retry_after": getattr(exc, "retry_after", None),
        "limit": getattr(exc, "limit", None),
        "value": getattr(exc, "value", None),
    }


def decode_error(data: Mapping[str, Any]) -> Exception:
    kind = getattr(errors, str(data.get("type")), None)
    message = str(data.get("message"))
    if not (isinstance(kind, type) and issubclass(kind, errors.InferencePIOError)):
        return errors.InferencePIOError(f"the model replica raised {data.get('type')}: {message}")
    if issubclass(kind, errors.InvalidRequestError):
        return kind(message, data.get("param"))
    if issubclass(kind, errors.QueueFullError):
        return kind(message, float(data.get("retry_after") or 1.0))
    if issubclass(kind, errors.ResourceLimitExceeded):
        return kind(message, str(data.get("limit")), data.get("value"))
    if issubclass(kind, errors.PluginLoadError):
        return kind(message)
    return kind(message)


# -- the metrics board -------------------------------------------------------------------------------------
class Board:
    """Where model replicas post what they are and their Prometheus metrics (a named Ray actor); it also
    tells them when the application drains."""

    def __init__(self) -> None:
        self.reports: dict[str, tuple[float, dict[str, Any]]] = {}
        self.draining = False

    def post(self, report: dict[str, Any]) -> bool:
        """Keep ``report``; the answer says whether to drain (take no new requests)."""
        self.reports[report["replica"]] = (time.monotonic(), report)
        return self.draining

    def drain(self) -> None:
        self.draining = True

    def forget(self, replica: str) -> None:
        self.reports.pop(replica, None)

    def live(self) -> list[dict[str, Any]]:
        """Reports of replicas heard from within ``STALE_AFTER`` seconds (this actor's clock)."""
        now = time.monotonic()
        for key in [k for k, (seen, _) in self.reports.items() if now - seen > STALE_AFTER]:
            del self.reports[key]
        return [report for _, report in self.reports.values()]


def board_name(app_name: str) -> str:
    return f"{app_name}-board"


def board(app_name: str) -> Any:
    """The application's board (created by the first one to ask; restarted by Ray if it dies)."""
    actor = ray.remote(Board).options(  # type: ignore[attr-defined]
        name=board_name(app_name),
        namespace=NAMESPACE,
        lifetime="detached",
        get_if_exists=True,
        num_cpus=0,
        max_restarts=-1,
    )
    return actor.remote()


def merge_metrics(reports: Sequence[Mapping[str, Any]]) -> bytes:
    """The replicas' metrics as one Prometheus exposition, each sample labelled with its ``replica``."""
    families: dict[str, Metric] = {}
    for report in reports:
        for family in text_string_to_metric_families(report["metrics"]):
            if not family.samples:
                continue
            merged = families.setdefault(
                family.name, Metric(family.name, family.documentation, family.type, family.unit)
            )
            for sample in family.samples:
                merged.samples.append(sample._replace(labels={**sample.labels, "replica": report["replica"]}))
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Fixed(list(families.values())))  # type: ignore[arg-type]
    return generate_latest(registry)


class _Fixed:
    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self.families)


# -- the model deployment ----------------------------------------------------------------------------------
class ModelReplica:
    """One replica of one model: the plugin activated as one server process would, streams on request."""

    def __init__(self, name: str, config: dict[str, Any], app_name: str, plugin_dirs: Sequence[str]) -> None:
        manager = PluginManager()
        for directory in plugin_dirs:
            manager.load_plugins_from_directory(directory)
        self.name = name
        self.state = ServerState(ServerSettings([ServedModel(name, config)]), manager)
        self.state.load()
        if self.state.status != "ready":
            raise errors.PluginLoadError(f"replica of {name!r} could not load its model: {self.state.error}")
        self.plugin = self.state.plugins[name]
        self.requests = Counter(
            "inference_pio_replica_requests",
            "Generations run by this replica, by outcome (finished, cancelled, failed, refused)",
            ["model", "outcome"],
            registry=self.state.metrics.registry,
        )
        context = serve.get_replica_context()
        self.replica = str(context.replica_id.unique_id)
        self.identity = {
            "model": name,
            "replica": self.replica,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "node": ray.get_runtime_context().get_node_id(),
            "memory_plan": self.plugin.memory_plan,
        }
        self.pool = ThreadPoolExecutor(max_workers=256, thread_name_prefix="inference-pio-stream")
        self.board = board(app_name)
        self.stopping = threading.Event()
        self.open = 0  # streams running here
        self.draining = False
        self.post()  # before the constructor returns, so the replica counts as soon as it takes requests
        threading.Thread(target=self._report, name="inference-pio-report", daemon=True).start()

    def post(self) -> Any:
        text = generate_latest(self.state.metrics.registry).decode()
        return self.board.post.remote({**self.identity, "metrics": text, "open": self.open})

    def _report(self) -> None:
        while not self.stopping.wait(REPORT_INTERVAL):
            try:
                self.draining = bool(ray.get(self.post(), timeout=10))
            except Exception:  # the board restarts; the next report finds it again
                log.debug("reporting to the board failed", exc_info=True)

    def info(self) -> dict[str, Any]:
        return dict(self.identity)

    def call(self, method: str, *args: Any) -> Any:
        if method not in ("tokenize", "detokenize"):
            raise errors.InvalidRequestError(f"{method!r} cannot be called on a model replica", "method")
        return getattr(self.plugin, method)(*args)

    async def stream(self, method: str, args: tuple[Any, ...], params: dict[str, Any]) -> AsyncIterator[Any]:
        """``("started", replica)``, then ``("chunk", StreamChunk)``s; ``("error", data)`` ends it early.

        Errors come back as values, so that the ingress can tell a request the plugin refused (a 4xx, or a
        429) from a replica that went away. A cancelled call (the client left) closes the plugin's stream,
        which frees its decode slot.
        """
        loop = asyncio.get_running_loop()
        if method not in STREAMS:
            yield ("error", encode_error(errors.InvalidRequestError(f"unknown stream {method!r}", "method")))
            return
        try:
            if self.draining:
                raise errors.SchedulerStoppedError(
                    f"the server is shutting down: {self.name!r} takes no new requests; retry on another instance"
                )
            chunks = await loop.run_in_executor(self.pool, lambda: getattr(self.plugin, method)(*args, **params))
        except Exception as exc:
            self.requests.labels(self.name, "refused").inc()
            yield ("error", encode_error(exc))
            return
        self.open += 1
        outcome, end = "cancelled", object()
        try:
            yield ("started", self.replica)
            while True:
                item = await loop.run_in_executor(self.pool, next, chunks, end)
                if item is end:
                    break
                yield ("chunk", item)
            outcome = "finished"
        except Exception as exc:
            outcome = "failed"
            yield ("error", encode_error(exc))
        finally:
            # Nothing awaited here: Serve may cancel a cancelled stream again, which would skip the rest.
            self.open -= 1
            self.requests.labels(self.name, outcome).inc()
            close = getattr(chunks, "close", None)
            if close is not None:
                self.pool.submit(close)  # frees the decode slot, in the background

    def check_health(self) -> None:
        """Ray Serve's health check: an isolated plugin whose worker ended cannot serve."""
        if getattr(self.plugin, "alive", True) is False:
            raise errors.PluginLoadError(f"the worker of plugin {self.name!r} is not running")

    def __del__(self) -> None:
        """Serve's graceful shutdown ends here, after the replica's requests finished."""
        stopping = getattr(self, "stopping", None)
        if stopping is None:
            return
        stopping.set()
        try:
            self.board.forget.remote(self.replica)
        except Exception:
            pass
        self.state.shutdown()
        self.pool.shutdown(wait=False)


# -- the ingress -------------------------------------------------------------------------------------------
class RemotePlugin(TextModelPluginInterface):
    """The ingress's stand-in for a model served by its deployment: streams run in a replica.

    ``Options`` and ``metadata`` are the local plugin's (the ingress checks chat options as one process
    does); ``memory_plan`` is the first replica's.
    """

    def __init__(self, name: str, handle: Any, local: Any) -> None:
        self.name = name
        self.handle = handle
        self.local = local
        self.Options = local.Options  # type: ignore[misc]
        self.replica_info: dict[str, Any] = {}

    @property
    def metadata(self) -> ModelPluginMetadata:
        return self.local.metadata  # type: ignore[no-any-return]

    def initialize(self, **kwargs: Any) -> None:
        pass

    def load_model(self, config: Mapping[str, Any]) -> None:
        """Wait until a replica answers (Serve starts them; each one loads its own model)."""
        self.replica_info = self.handle.info.remote().result(timeout_s=600)
        self.memory_plan: MemoryPlan | None = self.replica_info.get("memory_plan")

    def cleanup(self) -> None:
        pass

    def tokenize(self, text: str) -> list[int]:
        return list(self.handle.call.remote("tokenize", text).result())

    def detokenize(self, ids: Sequence[int]) -> str:
        return str(self.handle.call.remote("detokenize", list(ids)).result())

    def stream_text(self, prompt: str, **params: Any) -> Iterator[StreamChunk]:
        return self._stream("stream_text", (prompt,), params)

    def stream_chat(self, messages: Sequence[Message], **params: Any) -> Iterator[StreamChunk]:
        return self._stream("stream_chat", (list(messages),), params)

    def _stream(self, method: str, args: tuple[Any, ...], params: dict[str, Any]) -> Iterator[StreamChunk]:
        """Start a stream on some replica; blocks until it has started (or was refused), so that bad input
        and full queues are answered before anything is streamed, as in one process. A replica that is gone
        before the request started on it does not fail the request: it goes to another one."""
        deadline, pause, tried = time.monotonic() + RETRY_SECONDS, 0.1, 0
        while True:
            generator = self.handle.options(stream=True).stream.remote(method, args, params)
            try:
                kind, payload = next(generator)
            except REPLICA_GONE as exc:
                tried += 1
                if time.monotonic() > deadline:
                    raise APIError(
                        503,
                        f"no replica of {self.name!r} took the request in {RETRY_SECONDS:.0f} s ({tried} tried, "
                        f"the last: {type(exc).__name__}); retry shortly",
                        type_="server_error",
                        code="replica_unavailable",
                        headers={"Retry-After": "5"},
                    ) from exc
                log.warning("%s: a replica went away before the request started; sending it again", self.name)
                time.sleep(pause)
                pause = min(1.0, pause * 2)
                continue
            if kind == "error":
                raise decode_error(payload)
            return RemoteStream(generator, self.name, str(payload))


class RemoteStream(Iterator[StreamChunk]):
    """Chunks of one stream running in a replica; ``close()`` cancels it there (freeing its slot)."""

    def __init__(self, generator: Any, model: str, replica: str) -> None:
        self.generator, self.model, self.replica = generator, model, replica
        self.done = False

    def __next__(self) -> StreamChunk:
        if self.done:
            raise StopIteration
        try:
            kind, payload = next(self.generator)
        except StopIteration:
            self.done = True
            raise
        except REPLICA_GONE as exc:
            self.done = True
            raise APIError(
                503,
                f"the replica {self.replica} of {self.model!r} stopped while generating this answer "
                f"({type(exc).__name__}); the answer is incomplete: send the request again",
                type_="server_error",
                code="replica_failed",
            ) from exc
        if kind == "error":
            self.done = True
            raise decode_error(payload)
        return payload  # type: ignore[no-any-return]

    def close(self) -> None:
        if not self.done:
            self.done = True
            self.generator.cancel()


class RemoteManager(PluginManager):
    """The ingress's plugin manager: activating a model connects to its deployment instead of loading it.
    Everything else (discovery, ``Options``, metadata) is the ordinary manager's."""

    def __init__(self, handles: Mapping[str, Any], plugin_dirs: Sequence[str]) -> None:
        super().__init__()
        self.handles = dict(handles)
        for directory in plugin_dirs:
            self.load_plugins_from_directory(directory)

    def activate_plugin(self, name: str, device: str = "auto", **config: Any) -> RemotePlugin:  # type: ignore[override]
        plugin = RemotePlugin(name, self.handles[name], self.get_plugin(name))
        plugin.load_model(config)
        return plugin

    def shutdown(self) -> None:
        """Replicas shut down themselves (Serve drains each one)."""


@serve.ingress()
class Ingress:
    """The HTTP entry: the server's FastAPI app over :class:`RemotePlugin` stand-ins."""

    def __init__(
        self,
        settings: ServerSettings,
        handles: dict[str, Any],
        app_name: str,
        plugin_dirs: Sequence[str],
        targets: dict[str, str],
    ) -> None:
        self.settings, self.handles, self.app_name = settings, handles, app_name
        self.plugin_dirs, self.targets = list(plugin_dirs), targets
        self.board = board(app_name)

    def __serve_build_asgi_app__(self) -> FastAPI:
        app = create_app(self.settings, RemoteManager(self.handles, self.plugin_dirs))
        state: ServerState = app.state.server
        metrics = state.metrics
        # Scheduler metrics live in the replicas: they come from the board, with a replica label.
        for local in (metrics.queue_depth, metrics.active_batch, metrics.decode_batch):
            metrics.registry.unregister(local)
        # /health and /metrics of one process become those of every replica (same paths, more detail).
        app.router.routes[:] = [r for r in app.router.routes if getattr(r, "path", None) not in ("/health", "/metrics")]

        @app.get("/health")
        async def health() -> Response:
            reports = await self._live()
            body, code = replica_health(state, reports, self.targets)
            return JSONResponse(body, status_code=code)

        @app.get(
            "/metrics",
            response_class=PlainTextResponse,
            responses={200: {"description": "Prometheus text exposition format", "content": {"text/plain": {}}}},
        )
        async def metrics_route() -> Response:
            reports = await self._live()
            text = generate_latest(metrics.registry) + merge_metrics(reports)
            return PlainTextResponse(text, media_type=CONTENT_TYPE_LATEST)

        app.openapi_schema = None
        return app

    async def _live(self) -> list[dict[str, Any]]:
        try:
            return await asyncio.wait_for(asyncio.wrap_future(self.board.live.remote().future()), 5)  # type: ignore[no-any-return]
        except (TimeoutError, RayActorError, ActorUnavailableError):
            self.board = board(self.app_name)  # restarted or replaced; the replicas repost within a second
            return []


def replica_health(
    state: ServerState, reports: Sequence[Mapping[str, Any]], targets: Mapping[str, str]
) -> tuple[dict[str, Any], int]:
    """``/health``: ``ready`` (200) when every model has a live replica, else ``loading`` (503) or
    ``failed`` (500, the ingress could not start); each model lists its live replicas."""
    models: dict[str, Any] = {}
    missing = []
    for model in state.settings.models:
        live = sorted((r for r in reports if r["model"] == model.name), key=lambda r: str(r["replica"]))
        if not live:
            missing.append(model.name)
        models[model.name] = {
            "target": targets.get(model.name),
            "replicas": [
                {
                    "replica": r["replica"],
                    "pid": r["pid"],
                    "host": r["host"],
                    "node": r["node"],
                    "memory_plan": r["memory_plan"].describe() if r.get("memory_plan") else None,
                }
                for r in live
            ],
        }
    status, error = state.status, state.error
    if status == "ready" and missing:
        status, error = "loading", f"no live replica of {', '.join(missing)} (Ray Serve is starting or replacing them)"
    code = {"loading": 503, "ready": 200, "failed": 500}[status]
    return {"status": status, "error": error, "models": sorted(state.plugins), "deployments": models}, code


# -- the command -------------------------------------------------------------------------------------------
def build_application(
    settings: ServerSettings,
    plans: Sequence[ModelDeployment],
    app_name: str,
    plugin_dirs: Sequence[str],
    grace: float,
    environ: Mapping[str, str] | None = None,
) -> Any:
    """The Ray Serve application: one deployment per model, and the ingress bound to their handles. The
    ``INFERENCE_PIO_*``, ``HF_*`` and ``TRANSFORMERS_*`` variables of ``environ`` go to every replica."""
    env = {
        k: v
        for k, v in (os.environ if environ is None else environ).items()
        if k.startswith(("INFERENCE_PIO_", "HF_", "TRANSFORMERS_"))
    }
    runtime_env = {"env_vars": env} if env else {}
    handles = {}
    targets = {}
    for plan in plans:
        deployment: Any = serve.deployment(
            ModelReplica,
            name=f"model-{plan.model.name}",
            ray_actor_options={**plan.actor_options, "runtime_env": runtime_env},
            max_ongoing_requests=plan.max_ongoing_requests,
            graceful_shutdown_timeout_s=grace,
            graceful_shutdown_wait_loop_s=0.5,
            health_check_period_s=5,
            max_constructor_retry_count=2,
        )
        if plan.autoscaling:
            deployment = deployment.options(autoscaling_config=plan.autoscaling)
        else:
            deployment = deployment.options(num_replicas=plan.num_replicas)
        handles[plan.model.name] = deployment.bind(plan.model.name, plan.model.config, app_name, list(plugin_dirs))
        targets[plan.model.name] = plan.describe()
    ingress: Any = serve.deployment(
        Ingress,
        name="ingress",
        ray_actor_options={"num_cpus": 0, "runtime_env": runtime_env},
        max_ongoing_requests=10_000,  # one per open request; the model replicas are the limit
        graceful_shutdown_timeout_s=grace,
        graceful_shutdown_wait_loop_s=0.5,
        max_constructor_retry_count=2,
    )
    return ingress.bind(settings, handles, app_name, list(plugin_dirs), targets)


def app_from_config(args: dict[str, str]) -> Any:
    """A Ray Serve application builder, for Ray's own deployment tools (``serve deploy``, KubeRay's
    RayService): ``import_path: inference_pio.server.ray_serve:app_from_config`` with ``args: {config:
    PATH}`` builds what ``inference-pio serve --ray`` builds from that config file ([server], [server.ray])."""
    import argparse

    from inference_pio.server.cli import settings_from

    environ = dict(os.environ)
    if args.get("config"):
        environ["INFERENCE_PIO_CONFIG"] = str(args["config"])
    pm = PluginManager(environ=environ)
    flags: dict[str, Any] = dict.fromkeys(
        ("name", "model_path", "device", "host", "port", "api_key", "max_batch_size", "max_queue", "max_context")
    )
    settings, net = settings_from(pm, argparse.Namespace(**flags, allow_image_host=[], grace_seconds=None))
    where = str(pm.config_manager.config_file)
    options = RayOptions.from_config(pm.config_manager.section("server", "ray"), {}, where)
    plans = plan_deployments(pm, settings, options)
    return build_application(settings, plans, options.app_name, [], float(net["grace"]), environ)


def local_cpus(plans: Sequence[ModelDeployment]) -> int:
    """Logical CPUs of a local Ray: this machine's, or what the replicas ask for when that is more (Ray
    would otherwise leave them pending forever; the OS shares the cores)."""
    asked: float = sum(
        float(p.actor_options.get("num_cpus", 1)) * ((p.autoscaling or {}).get("max_replicas") or p.num_replicas or 1)
        for p in plans
    )
    return max(os.cpu_count() or 1, math.ceil(asked))


def serve_on_ray(
    pm: PluginManager,
    settings: ServerSettings,
    net: Mapping[str, Any],
    options: RayOptions,
    plugin_dirs: Sequence[str],
    *,
    verbose: bool = False,
) -> int:
    """Run the application until SIGTERM or SIGINT, then drain every replica and stop what was started."""
    plans = plan_deployments(pm, settings, options)
    for plan in plans:
        log.warning("ray: %s", plan.describe())
    level = logging.INFO if verbose else logging.WARNING
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if options.address:
        ray.init(address=options.address, namespace=NAMESPACE, logging_level=level)
    else:
        start_local_ray(local_cpus(plans), level)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):  # after ray.init, whose own SIGTERM handler just exits
        signal.signal(signum, lambda signum, frame: stop.set())
    try:
        # Ray Serve's own logs at WARNING and no access log per request, unless -v.
        logging_config = {"log_level": logging.getLevelName(level), "enable_access_log": verbose}
        serve.start(http_options={"host": net["host"], "port": net["port"]}, logging_config=logging_config)
        board(options.app_name)
        application = build_application(settings, plans, options.app_name, plugin_dirs, float(net["grace"]))
        try:
            serve.run(
                application, name=options.app_name, route_prefix="/", blocking=False, logging_config=logging_config
            )
        except Exception as exc:
            names = ", ".join(m.name for m in settings.models)
            raise errors.InferencePIOError(
                f"Ray Serve could not deploy {names}: {deploy_failure(options, exc)}"
            ) from exc
        where = options.address or "a local Ray"
        log.warning(
            "serving %s on http://%s:%s (Ray Serve on %s)",
            ", ".join(m.name for m in settings.models),
            net["host"],
            net["port"],
            where,
        )
        while not stop.wait(0.5):
            pass
        drain(options, float(net["grace"]))
    finally:
        stop_application(options)
    return 0


def drain(options: RayOptions, grace: float) -> None:
    """Replicas refuse new requests (503 ``shutting_down``, as one process does while stopping), and the
    streams running on them finish, within ``grace`` seconds."""
    log.warning("draining: waiting up to %.0f s for the requests in flight on every replica", grace)
    actor = board(options.app_name)
    ray.get(actor.drain.remote(), timeout=30)
    deadline = time.monotonic() + grace
    time.sleep(2 * REPORT_INTERVAL)  # every replica has heard it
    quiet = 0
    while time.monotonic() < deadline and quiet < 2:
        reports = ray.get(actor.live.remote(), timeout=30)
        quiet = quiet + 1 if all(r.get("open", 0) == 0 for r in reports) else 0
        time.sleep(REPORT_INTERVAL)


def start_local_ray(cpus: int, level: int) -> None:
    """``ray.init`` of a local node (no dashboard). Ray gives its raylet 30 s to register, which a busy
    machine can miss: then what was started is stopped and it is tried once more."""
    for attempt in (1, 2):
        try:
            ray.init(num_cpus=cpus, include_dashboard=False, namespace=NAMESPACE, logging_level=level)
            return
        except Exception as exc:
            try:
                ray.shutdown()
            except Exception:
                pass
            end(descendants(os.getpid()))
            if attempt == 2:
                raise errors.InferencePIOError(
                    f"the local Ray did not start ({exc}). On a busy machine try again, or start Ray yourself "
                    "(ray start --head --num-cpus N) and pass --address auto"
                ) from exc
            log.warning("the local Ray did not start (%s); trying once more", exc)


def end(processes: Sequence[Process], wait: float = 5.0) -> None:
    """SIGKILL whatever of ``processes`` still runs after ``wait`` seconds."""
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline and any(alive(p) for p in processes):
        time.sleep(0.2)
    for process in processes:
        if alive(process):
            log.warning("stopping Ray process %s, still running after ray.shutdown()", process[0])
            try:
                os.kill(process[0], signal.SIGKILL)
            except OSError:
                pass


def deploy_failure(options: RayOptions, exc: BaseException) -> str:
    """What went wrong, from Serve's status of the application's deployments (the replicas' errors)."""
    try:
        app = serve.status().applications.get(options.app_name)
        if app is not None:
            messages = [f"{name}: {d.message}" for name, d in app.deployments.items() if d.message]
            if messages:
                return "; ".join(messages)[-4000:]
    except Exception:
        pass
    return f"{type(exc).__name__}: {exc}"


def stop_application(options: RayOptions) -> None:
    """Delete the application (Serve's graceful shutdown of each replica), then stop the local Ray and every
    process it started: Ray leaves its node agents running for a while after ``ray.shutdown()``."""
    try:
        serve.delete(options.app_name, _blocking=True)
    except Exception:
        log.exception("deleting the Ray Serve application failed")
    try:
        ray.kill(ray.get_actor(board_name(options.app_name), namespace=NAMESPACE))
    except Exception:
        pass
    if options.address:
        ray.shutdown()
        return
    started = descendants(os.getpid())
    serve.shutdown()  # type: ignore[no-untyped-call]
    ray.shutdown()
    end(started)


Process = tuple[int, str]  # pid and start time, so a reused pid is never mistaken for ours


def _stat(pid: int) -> list[str] | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def descendants(root: int) -> list[Process]:
    """Every process below ``root`` (Linux ``/proc``; elsewhere none)."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        fields = _stat(int(entry.name))
        if fields is not None:
            parents.setdefault(int(fields[1]), []).append(int(entry.name))
    found: list[Process] = []
    todo = list(parents.get(root, []))
    while todo:
        pid = todo.pop()
        fields = _stat(pid)
        if fields is not None:
            found.append((pid, fields[19]))
            todo += parents.get(pid, [])
    return found


def alive(process: Process) -> bool:
    fields = _stat(process[0])
    return fields is not None and fields[19] == process[1] and fields[0] != "Z"


__all__ = [
    "Board",
    "Ingress",
    "ModelDeployment",
    "ModelReplica",
    "RayOptions",
    "RemotePlugin",
    "app_from_config",
    "plan_deployments",
    "replica_resources",
    "serve_on_ray",
]
