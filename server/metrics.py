"""Every Prometheus metric the server exports, defined once (prefix `pocketgpt_`).

Each app gets its own CollectorRegistry, so several apps in one process (tests)
never collide on metric names. prometheus_client is thread-safe: the engine thread
records directly.

TTFT and inter-token latency are the engine's: when a token is sampled, not when its SSE
event reaches the client (`--stream-interval` gathers tokens into fewer events).
"""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Enum,
    Gauge,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)

# From 1 ms (an idle GPU's first token) to minutes (a CPU queue); at most 2.5x apart
# up to 5 s.
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05, 0.075, 0.1, 0.25)
_LATENCY_BUCKETS += (0.5, 0.75, 1, 2.5, 5, 10, 30, 60, 120, 300)
# Decode steps take ~1-3 ms on a GPU and ~3-30 ms on a CPU: steps of at most 1.5x there,
# so that p50 and p99 are resolved on both.
_TOKEN_BUCKETS = (0.0005, 0.00075, 0.001, 0.0015, 0.002, 0.003, 0.004, 0.005, 0.0075, 0.01)
_TOKEN_BUCKETS += (0.015, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.25, 0.5, 1, 2.5)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)

FINISH_REASONS = ("stop", "length", "cancelled", "error")
# Exported at zero from the start, so that an error or shedding ratio is 0, not "no data",
# until the first one.
WATCHED_STATUSES = ("200", "429", "499", "500", "503")

SERVER_STATES = ("loading", "ready", "draining", "failed")

# Not a `_created` series beside every counter and histogram: in the text format each is
# one more series to store, and rate() does not need it. (Process-wide; this process is
# the server.)
disable_created_metrics()


class Metrics:
    def __init__(self) -> None:
        self.registry = registry = CollectorRegistry()
        ProcessCollector(registry=registry)  # process_cpu_seconds_total, memory, fds ...

        def counter(name: str, doc: str, labels: tuple[str, ...] = ()) -> Counter:
            return Counter(f"pocketgpt_{name}", doc, labels, registry=registry)

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(f"pocketgpt_{name}", doc, registry=registry)

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(f"pocketgpt_{name}", doc, buckets=buckets, registry=registry)

        self.requests = counter(
            "requests_total",
            "answers to /v1/generate, /v1/completions and /v1/chat/completions (any method) "
            "by HTTP status, the app's guards' refusals included",
            ("status",),
        )
        for status in WATCHED_STATUSES:
            self.requests.labels(status)
        self.finished = counter(
            "request_finished_total",
            "generations ended, by reason (stop, length, cancelled, error)",
            ("reason",),
        )
        for reason in FINISH_REASONS:  # export zeros, so rates work before the first one
            self.finished.labels(reason)
        self.running = gauge("requests_running", "requests holding a KV-cache slot")
        self.waiting = gauge("requests_waiting", "requests queued for a KV-cache slot")
        self.prompt_tokens = counter("prompt_tokens_total", "prompt tokens admitted")
        self.prompt_tokens_shared = counter(
            "prompt_tokens_shared_total",
            "prompt tokens admitted whose K/V were copied, not computed: the prefix a "
            "request's prompt has in common with an earlier one's (n choices of one prompt, "
            "a system prompt)",
        )
        self.generation_tokens = counter("generation_tokens_total", "tokens generated")
        self.time_to_first_token = histogram(
            "time_to_first_token_seconds",
            "arrival to the first token sampled (not sent: see --stream-interval)",
            _LATENCY_BUCKETS,
        )
        self.inter_token_latency = histogram(
            "inter_token_latency_seconds",
            "time between a request's tokens as sampled (not as sent)",
            _TOKEN_BUCKETS,
        )
        self.request_latency = histogram(
            "request_latency_seconds", "arrival to the last token", _LATENCY_BUCKETS
        )
        self.queue_time = histogram(
            "queue_time_seconds",
            "arrival to admission into a slot (of requests admitted)",
            _LATENCY_BUCKETS,
        )
        self.batch_size = histogram("batch_size", "rows in each decode step", _BATCH_BUCKETS)
        self.kv_cache_usage = gauge("kv_cache_usage_ratio", "fraction of KV-cache slots in use")
        self.server_state = Enum(
            "pocketgpt_server_state",
            "what the server is doing: loading, ready, draining (shutting down), or failed "
            "(the load or the engine; /health answers 503)",
            states=list(SERVER_STATES),
            registry=registry,
        )
        self.model_load = gauge(
            "model_load_seconds",
            "seconds from the app's start to ready: weights onto the device, engine warm-up",
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
