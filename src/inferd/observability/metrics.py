"""Every Prometheus metric inferd exports, in one place, under NIM's names.

The front measures what a client sees (queueing, time to first token, inter-token time, end to end)
per model; `/v1/metrics` serves these followed by each engine's own metrics passed through
unchanged (vLLM's are prefixed `vllm:`, so the names never collide). inferd uses its own registry
without the process/GC collectors: engines running Python export those too, and one exposition
must not carry a metric name twice.
"""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)

# `_created` series double the size of a scrape and no dashboard reads them.
disable_created_metrics()  # type: ignore[no-untyped-call]

TTFT_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
    160.0,
    640.0,
)
TPOT_BUCKETS = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.4,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
)
E2E_BUCKETS = (
    0.05,
    0.1,
    0.3,
    0.5,
    0.8,
    1.0,
    1.5,
    2.0,
    2.5,
    5.0,
    10.0,
    15.0,
    20.0,
    30.0,
    40.0,
    50.0,
    60.0,
    120.0,
    240.0,
    480.0,
    960.0,
)
TOKEN_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)


class Metrics:
    """inferd's metrics, in a registry of their own (one per app, so tests do not share state)."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        m = ["model"]
        self.requests_running = Gauge(
            "num_requests_running", "Requests being processed by the engine.", m, registry=r
        )
        self.requests_waiting = Gauge(
            "num_requests_waiting",
            "Requests held by inferd before reaching the engine.",
            m,
            registry=r,
        )
        self.prompt_tokens = Counter("prompt_tokens", "Prompt tokens processed.", m, registry=r)
        self.generation_tokens = Counter("generation_tokens", "Tokens generated.", m, registry=r)
        self.request_success = Counter(
            "request_success",
            "Requests that finished with an answer.",
            [*m, "finished_reason"],
            registry=r,
        )
        self.request_failure = Counter(
            "request_failure",
            "Requests that ended with an error, by HTTP status.",
            [*m, "status"],
            registry=r,
        )
        self.ttft = Histogram(
            "time_to_first_token_seconds",
            "Time to first token (streamed requests).",
            m,
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.tpot = Histogram(
            "time_per_output_token_seconds",
            "Mean time per output token after the first.",
            m,
            buckets=TPOT_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "e2e_request_latency_seconds",
            "End-to-end request latency.",
            m,
            buckets=E2E_BUCKETS,
            registry=r,
        )
        self.request_prompt_tokens = Histogram(
            "request_prompt_tokens",
            "Prompt tokens per request.",
            m,
            buckets=TOKEN_BUCKETS,
            registry=r,
        )
        self.request_generation_tokens = Histogram(
            "request_generation_tokens",
            "Generated tokens per request.",
            m,
            buckets=TOKEN_BUCKETS,
            registry=r,
        )
        self.engine_ready = Gauge(
            "inferd_engine_ready",
            "1 when the model's engine answers its health check.",
            [*m, "engine"],
            registry=r,
        )
        self.engine_restarts = Gauge(
            "inferd_engine_restarts",
            "Times the model's engine was restarted after exiting.",
            [*m, "engine"],
            registry=r,
        )

    def add_model(self, model: str, engine: str) -> None:
        """Create the model's series at zero, so dashboards and alerts see them before traffic."""
        for family in (
            self.requests_running,
            self.requests_waiting,
            self.prompt_tokens,
            self.generation_tokens,
        ):
            family.labels(model)
        self.engine_ready.labels(model, engine).set(0)
        self.engine_restarts.labels(model, engine).set(0)

    def render(self) -> bytes:
        return generate_latest(self.registry)
