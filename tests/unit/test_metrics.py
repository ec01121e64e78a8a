"""inferd's own metrics (`observability.metrics`): a model's series exist before its traffic."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from inferd.observability.metrics import Metrics


def _samples(metrics: Metrics) -> dict[str, float]:
    return {
        s.name + str(sorted(s.labels.items())): s.value
        for family in text_string_to_metric_families(metrics.render().decode())
        for s in family.samples
    }


def test_a_models_series_are_written_at_zero_before_its_first_request() -> None:
    metrics = Metrics()
    metrics.add_model("m", "llama.cpp")
    samples = _samples(metrics)
    model = "[('model', 'm')]"
    for name in (
        "num_requests_running",
        "num_requests_waiting",
        "prompt_tokens_total",
        "generation_tokens_total",
        "time_to_first_token_seconds_count",
        "time_per_output_token_seconds_count",
        "e2e_request_latency_seconds_count",
        "request_prompt_tokens_count",
        "request_generation_tokens_count",
    ):
        assert samples[name + model] == 0, name
    assert samples["inferd_engine_ready[('engine', 'llama.cpp'), ('model', 'm')]"] == 0
    bucket = "time_to_first_token_seconds_bucket[('le', '+Inf'), ('model', 'm')]"
    assert samples[bucket] == 0


def test_a_request_counts_in_the_series_made_at_the_start() -> None:
    metrics = Metrics()
    metrics.add_model("m", "llama.cpp")
    metrics.ttft.labels("m").observe(0.05)
    samples = _samples(metrics)
    assert samples["time_to_first_token_seconds_count[('model', 'm')]"] == 1
    assert not any(
        k.startswith("time_to_first_token_seconds_count") and "'m'" not in k for k in samples
    )
