"""Prometheus text for /metrics, from the counters the inference worker reports (it runs in another
process, so the HTTP process asks it on every scrape)."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

GAUGES = {
    "running": ("ptserve_running_sequences", "Sequences in the running batch (prefilling or decoding)."),
    "queued": ("ptserve_queued_sequences", "Sequences waiting for a slot in the batch."),
    "max_running": ("ptserve_max_running_sequences", "Width of the batch (server.max_concurrent_sequences)."),
    "kv_budget_tokens": ("ptserve_kv_cache_budget_tokens", "Token positions the KV cache budget holds."),
}


class _WorkerCollector:
    def __init__(self, stats: dict[str, Any]):
        self.stats = stats

    def collect(self):
        up = GaugeMetricFamily("ptserve_worker_up", "1 when the inference worker answered this scrape.")
        up.add_metric([], 1.0 if self.stats else 0.0)
        yield up
        for key, (name, doc) in GAUGES.items():
            if key in self.stats:
                gauge = GaugeMetricFamily(name, doc)
                gauge.add_metric([], float(self.stats[key]))
                yield gauge


def render(stats: dict[str, Any]) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_WorkerCollector(stats))
    return generate_latest(registry)
