"""Prometheus metrics of one server process (its own registry, so tests can start several apps)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64, 128, 256)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "inference_pio_requests",
            "HTTP API requests by endpoint, model and status code",
            ["endpoint", "model", "status"],
            registry=r,
        )
        self.prompt_tokens = Counter("inference_pio_prompt_tokens", "Prompt tokens processed", ["model"], registry=r)
        self.completion_tokens = Counter("inference_pio_completion_tokens", "Tokens generated", ["model"], registry=r)
        self.ttft = Histogram(
            "inference_pio_time_to_first_token_seconds",
            "Request arrival to first token",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "inference_pio_inter_token_latency_seconds",
            "Time between streamed deltas",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge(
            "inference_pio_queue_depth", "Requests waiting for a decode slot", ["model"], registry=r
        )
        self.active_batch = Gauge(
            "inference_pio_active_batch_size", "Requests holding a decode slot", ["model"], registry=r
        )
        self.decode_batch = Histogram(
            "inference_pio_decode_batch_size",
            "Requests decoded together per step",
            ["model"],
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.cancelled = Counter(
            "inference_pio_cancelled_requests", "Generations cancelled by client disconnect", ["model"], registry=r
        )

    def watch_scheduler(self, model: str, scheduler: object) -> None:
        """Report a scheduler's queue depth and batch sizes."""
        self.queue_depth.labels(model).set_function(lambda: float(getattr(scheduler, "queue_depth", 0)))
        self.active_batch.labels(model).set_function(lambda: float(getattr(scheduler, "active", 0)))
        observe: Callable[[float], None] = self.decode_batch.labels(model).observe
        scheduler.on_step = observe  # type: ignore[attr-defined]
