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
LOAD_BUCKETS = (0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0, 640.0)
TOKEN_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)


class Metrics:
    """inferd's metrics, in a registry of their own (one per app, so tests do not share state)."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        model, engine = ["model"], ["model", "engine"]

        def gauge(name: str, doc: str, labels: list[str] = model) -> Gauge:
            return Gauge(name, doc, labels, registry=r)

        def counter(name: str, doc: str, labels: list[str] = model) -> Counter:
            return Counter(name, doc, labels, registry=r)

        def histogram(
            name: str, doc: str, buckets: tuple[float, ...], labels: list[str] = model
        ) -> Histogram:
            return Histogram(name, doc, labels, buckets=buckets, registry=r)

        self.requests_running = gauge(
            "num_requests_running", "Requests being processed by the engine."
        )
        self.requests_waiting = gauge(
            "num_requests_waiting", "Requests held by inferd before reaching the engine."
        )
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens processed.")
        self.generation_tokens = counter("generation_tokens", "Tokens generated.")
        self.request_success = counter(
            "request_success", "Requests that finished with an answer.", [*model, "finished_reason"]
        )
        self.request_failure = counter(
            "request_failure",
            "Requests that ended with an error, by HTTP status.",
            [*model, "status"],
        )
        self.ttft = histogram(
            "time_to_first_token_seconds", "Time to first token (streamed requests).", TTFT_BUCKETS
        )
        self.tpot = histogram(
            "time_per_output_token_seconds",
            "Mean time per output token after the first.",
            TPOT_BUCKETS,
        )
        self.e2e = histogram(
            "e2e_request_latency_seconds", "End-to-end request latency.", E2E_BUCKETS
        )
        self.request_prompt_tokens = histogram(
            "request_prompt_tokens", "Prompt tokens per request.", TOKEN_BUCKETS
        )
        self.request_generation_tokens = histogram(
            "request_generation_tokens", "Generated tokens per request.", TOKEN_BUCKETS
        )
        self.engine_ready = gauge(
            "inferd_engine_ready", "1 when the model's engine answers its health check.", engine
        )
        self.engine_restarts = gauge(
            "inferd_engine_restarts",
            "Times the model's engine was restarted after exiting.",
            engine,
        )
        # A model served by several engines (a combined profile): each one's share.
        self.engine_requests = counter(
            "inferd_engine_requests",
            "Requests given to each of the model's engines (several: a combined profile).",
            engine,
        )
        self.engine_recalls = counter(
            "inferd_engine_recalls",
            "Requests taken back from an engine at a change of turn, before it answered, and "
            "sent to the engine whose turn it is (counted in inferd_engine_requests there).",
            engine,
        )
        # Models on demand (server.loading): engines started on a request, stopped when idle
        # or to make room.
        self.model_loads = counter("inferd_model_loads", "Times a model was loaded on demand.")
        self.model_load_failures = counter(
            "inferd_model_load_failures", "Loads on demand whose engine never became ready."
        )
        self.model_unloads = counter(
            "inferd_model_unloads",
            "Times a model was unloaded, by reason (idle, evicted: to make room).",
            [*model, "reason"],
        )
        self.model_load_seconds = histogram(
            "inferd_model_load_seconds",
            "Seconds from a load's start (room made, engine started) to the engine's readiness.",
            LOAD_BUCKETS,
        )
        self.model_loaded = gauge(
            "inferd_model_loaded", "1 while the model is loaded (models on demand)."
        )

        rail = ["rail", "stage"]  # stage: input, output or check (the /v1/guardrails route)
        self.guardrail_checks = counter(
            "inferd_guardrail_checks", "Texts a guardrail checked.", rail
        )
        self.guardrail_blocks = counter(
            "inferd_guardrail_blocks", "Requests or answers a guardrail blocked.", rail
        )
        self.guardrail_redactions = counter(
            "inferd_guardrail_redactions", "Spans a guardrail redacted.", rail
        )
        self.guardrail_seconds = histogram(
            "inferd_guardrail_seconds",
            "Time a guardrail took per check.",
            (0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0),
            rail,
        )

    def add_model(self, model: str, engine: str) -> None:
        """Create the model's series at zero, so dashboards and alerts see them before traffic
        (histograms too, as vLLM's own are: a latency panel shows an empty histogram, not "no
        data"; and the first request does not pay for making them)."""
        for family in (
            self.requests_running,
            self.requests_waiting,
            self.prompt_tokens,
            self.generation_tokens,
            self.ttft,
            self.tpot,
            self.e2e,
            self.request_prompt_tokens,
            self.request_generation_tokens,
        ):
            family.labels(model)
        self.engine_ready.labels(model, engine).set(0)
        self.engine_restarts.labels(model, engine).set(0)
        self.engine_requests.labels(model, engine)
        self.engine_recalls.labels(model, engine)

    def render(self) -> bytes:
        return generate_latest(self.registry)
