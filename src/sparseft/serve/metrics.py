"""The server's counters in Prometheus' text format (`GET /metrics`), on a registry of its own so that two
servers in one process (tests) count apart."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest


class Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter(
            "sparseft_requests",
            "HTTP requests answered, by endpoint and status",
            ["endpoint", "status"],
            registry=r,
        )
        self.finished = Counter(
            "sparseft_finished", "Generations ended, by finish reason", ["reason"], registry=r
        )
        self.tokens = Counter("sparseft_generated_tokens", "Tokens generated", registry=r)
        self.prompt_tokens = Counter("sparseft_prompt_tokens", "Prompt tokens prefilled", registry=r)
        self.queue = Gauge("sparseft_queue_length", "Requests waiting for a slot", registry=r)
        self.running = Gauge("sparseft_running_requests", "Requests in the decoding batch", registry=r)
        self.batch = Histogram(
            "sparseft_batch_size",
            "Requests per decoding step",
            buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32),
            registry=r,
        )
        self.step = Histogram(
            "sparseft_step_seconds",
            "Time per decoding step",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
            registry=r,
        )
        self.first_token = Histogram(
            "sparseft_time_to_first_token_seconds",
            "From a request's arrival to its first token",
            buckets=(0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
            registry=r,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
