"""Prometheus metrics of the HTTP app, in a registry of its own (several apps in one process keep their counts apart).

    metrics = ServeMetrics()
    metrics.request("/describe", 200, 0.41)       # one answered request: route template, status, seconds
    metrics.batch(BatchStats(size=12, seconds=0.9))
    text = metrics.render()                        # GET /metrics: Prometheus text exposition format

Exposed: ``expblip_requests_total{route,status}``, ``expblip_request_seconds{route}`` (latency histogram),
``expblip_batch_size`` (images per generate call), ``expblip_batch_seconds``, ``expblip_queue_images`` (waiting now).
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from expblip.serve.batching import BatchStats

BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
CONTENT_TYPE = CONTENT_TYPE_LATEST


class ServeMetrics:
    """The app's counters and histograms."""

    def __init__(self):
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("expblip_requests", "HTTP requests answered, by route template and status code",
                                ["route", "status"], registry=self.registry)
        self.latency = Histogram("expblip_request_seconds", "Time from request to response, by route template",
                                 ["route"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.batch_size = Histogram("expblip_batch_size", "Images captioned together in one generate call",
                                    buckets=BATCH_BUCKETS, registry=self.registry)
        self.batch_seconds = Histogram("expblip_batch_seconds", "Time of one generate call",
                                       buckets=LATENCY_BUCKETS, registry=self.registry)
        self.queue = Gauge("expblip_queue_images", "Images waiting for a batch", registry=self.registry)

    def watch_queue(self, depth: Callable[[], int]) -> None:
        """Read the queue depth from ``depth()`` whenever /metrics is scraped."""
        self.queue.set_function(depth)

    def request(self, route: str, status: int, seconds: float) -> None:
        self.requests.labels(route=route, status=str(status)).inc()
        self.latency.labels(route=route).observe(seconds)

    def batch(self, stats: BatchStats) -> None:
        self.batch_size.observe(stats.size)
        self.batch_seconds.observe(stats.seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)


def parse_histogram(text: str, name: str) -> dict[float, float]:
    """{upper bound: cumulative count} of an unlabelled histogram in Prometheus text (``+Inf`` as math.inf)."""
    buckets: dict[float, float] = {}
    prefix = f'{name}_bucket{{le="'
    for line in text.splitlines():
        if line.startswith(prefix):
            bound, value = line[len(prefix):].split('"}')
            buckets[float(bound)] = float(value)
    return buckets
