"""Prometheus metrics for /metrics.

Two sources, one page:
- the HTTP process counts what clients see: requests by endpoint and status, prompt and generated
  tokens, time to first token, inter-token latency and request duration (histograms);
- each inference worker (another process; there may be several) publishes its engine's gauges in a
  shared dict (`worker.Shared.stats`): running and queued sequences, the KV pool's blocks (total, used,
  cached), prefix cache queries and hits, preemptions.
  They are exported per worker (label `worker`) and the page is rendered on every scrape.
"""

from __future__ import annotations

import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
STALE_AFTER_S = 10.0  # a worker that has not published for this long is reported down

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1.0, 2.5)
DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)

WORKER_GAUGES = {
    "running": ("ptserve_running_sequences", "Sequences in the running batch (prefilling or decoding)."),
    "queued": ("ptserve_queued_sequences", "Sequences waiting for a slot in the batch."),
    "max_running": ("ptserve_max_running_sequences", "Width of the batch (server.max_concurrent_sequences)."),
    "kv_budget_tokens": ("ptserve_kv_cache_budget_tokens", "Token positions the KV pool holds."),
    "kv_reserved_tokens": ("ptserve_kv_cache_reserved_tokens", "Token positions in blocks held by sequences."),
    "kv_pool_bytes": ("ptserve_kv_cache_pool_bytes", "Bytes of the KV pool, allocated once at start."),
    "kv_blocks_total": ("ptserve_kv_cache_blocks_total", "Blocks of the KV pool."),
    "kv_blocks_used": ("ptserve_kv_cache_blocks_used", "Blocks held by running sequences."),
    "kv_blocks_cached": ("ptserve_kv_cache_blocks_cached", "Blocks holding a cached prompt prefix (in use or not)."),
    "kv_pool_touched_bytes": (
        "ptserve_kv_cache_pool_touched_bytes",
        "Bytes of the KV pool's blocks written at least once (on the CPU, the part resident in memory).",
    ),
}

WORKER_COUNTERS = {
    "prefix_cache_queries": ("ptserve_prefix_cache_queries", "Prompt tokens looked up in the prefix cache."),
    "prefix_cache_hits": ("ptserve_prefix_cache_hits", "Prompt tokens found in the prefix cache."),
    "preemptions": ("ptserve_preemptions", "Sequences sent back to wait because the KV pool was full."),
}


class HttpMetrics:
    """The HTTP process's counters and histograms (one registry per server)."""

    def __init__(self):
        disable_created_metrics()  # no *_created series: they only double the page
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "ptserve_requests", "HTTP requests by endpoint and status.", ["endpoint", "status"], registry=r
        )
        self.prompt_tokens = Counter("ptserve_prompt_tokens", "Prompt tokens of finished requests.", registry=r)
        self.generated_tokens = Counter("ptserve_generation_tokens", "Tokens generated.", registry=r)
        self.ttft = Histogram(
            "ptserve_time_to_first_token_seconds",
            "From request arrival to its first token.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "ptserve_inter_token_latency_seconds", "Time between a request's tokens.", buckets=ITL_BUCKETS, registry=r
        )
        self.duration = Histogram(
            "ptserve_request_duration_seconds",
            "From request arrival to its last byte.",
            ["endpoint"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.workers: Any = {}  # worker name -> gauges; the shared dict once the server runs
        self.registry.register(_WorkerCollector(self))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class TokenClock:
    """Times one request's tokens: TTFT at the first, then the gap per token of each later message."""

    def __init__(self, metrics: HttpMetrics, start: float):
        self.metrics = metrics
        self.start = start
        self.last: float | None = None
        self.tokens: dict[int, int] = {}  # choice index -> completion tokens so far

    def message(self, msg: dict[str, Any]) -> None:
        new = msg["completion_tokens"] - self.tokens.get(msg["index"], 0)
        if new <= 0:
            return
        self.tokens[msg["index"]] = msg["completion_tokens"]
        now = time.monotonic()
        if self.last is None:
            self.metrics.ttft.observe(now - self.start)
        else:
            gap = (now - self.last) / new
            for _ in range(new):  # messages coalesce tokens: each of them waited gap on average
                self.metrics.itl.observe(gap)
        self.last = now
        self.metrics.generated_tokens.inc(new)


class _WorkerCollector:
    def __init__(self, metrics: HttpMetrics):
        self.metrics = metrics

    def describe(self):
        return []

    def collect(self):
        try:
            workers = dict(self.metrics.workers)
        except (OSError, EOFError):  # the manager is gone (shutting down)
            workers = {}
        now = time.time()
        up = GaugeMetricFamily(
            "ptserve_worker_up", "1 when the inference worker published recently.", labels=["worker"]
        )
        for name, stats in sorted(workers.items()):
            up.add_metric([name], 1.0 if now - stats.get("time", 0) < STALE_AFTER_S else 0.0)
        yield up
        for table, family in ((WORKER_GAUGES, GaugeMetricFamily), (WORKER_COUNTERS, CounterMetricFamily)):
            for key, (metric, doc) in table.items():
                series = family(metric, doc, labels=["worker"])
                for name, stats in sorted(workers.items()):
                    if key in stats:
                        series.add_metric([name], float(stats[key]))
                yield series
