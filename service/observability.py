"""Prometheus metrics of one service process (its own registry, so tests can run several apps).

Requests (count and latency by method, route template, status), launches, jobs by status (read
from the database at scrape time, so every replica reports the same truth) and the reconciler's
health: its lag (seconds since its last completed pass), failed passes (in a row and in all) and
per-job errors.
"""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily


class ServiceMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "topk_http_requests_total",
            "HTTP requests handled",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "topk_http_request_duration_seconds",
            "HTTP request latency",
            ["method", "route"],
            registry=self.registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0),
        )
        self.launches = Counter(
            "topk_launches_total", "Ray job submissions made", registry=self.registry
        )
        self._store = None
        self._reconciler = None
        self.registry.register(_StateCollector(self))

    def bind(self, store, reconciler) -> None:
        self._store, self._reconciler = store, reconciler

    def observe_request(self, method: str, route: str, status: int, seconds: float) -> None:
        self.requests.labels(method, route, str(status)).inc()
        self.latency.labels(method, route).observe(seconds)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _StateCollector:
    def __init__(self, metrics: ServiceMetrics):
        self.metrics = metrics

    def describe(self):
        return []

    def collect(self):
        store, reconciler = self.metrics._store, self.metrics._reconciler
        if store is not None:
            try:
                counts = store.count_by_status()
            except Exception:  # the database is down: the rest of the metrics still answer
                counts = None
            yield GaugeMetricFamily(
                "topk_database_up",
                "Whether the job counts could be read from the database",
                value=0.0 if counts is None else 1.0,
            )
            if counts is not None:
                family = GaugeMetricFamily(
                    "topk_jobs", "Jobs and sweeps by status", labels=["status"]
                )
                for status, count in counts.items():
                    family.add_metric([status], count)
                yield family
        if reconciler is not None:
            lag = reconciler.lag_seconds()
            yield GaugeMetricFamily(
                "topk_reconciler_lag_seconds",
                "Seconds since the reconciler's last completed pass (-1: none yet)",
                value=-1.0 if lag is None else lag,
            )
            yield GaugeMetricFamily(
                "topk_reconciler_consecutive_failures",
                "Reconciler passes that failed in a row (0: the last pass completed)",
                value=reconciler.consecutive_failures,
            )
            yield CounterMetricFamily(
                "topk_reconciler_failed_passes",
                "Reconciler passes that failed",
                value=reconciler.failed_passes,
            )
            yield CounterMetricFamily(
                "topk_reconciler_job_errors",
                "Unexpected errors while reconciling one job (the pass went on)",
                value=reconciler.job_errors,
            )
