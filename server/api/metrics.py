"""actprune's Prometheus series, served at ``GET /activations/metrics`` (behind the API key):

    actprune_tokens_captured{phase="prefill"|"decode"}  tokens in the current window
    actprune_snapshots_written_total                    snapshots written to disk
    actprune_snapshot_age_seconds                       seconds since the last one (-1: never)

Not on vLLM's ``/metrics``: vLLM mounts that one outside its API-key check, on purpose (scrapers
of vLLM's own series carry no key), and a server with a key must not show actprune's figures to
whoever asks. So the series live in a registry of their own, one per service (no process-global
state), and every actprune route, this one included, takes the same key.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

__all__ = ["METRICS_MEDIA_TYPE", "CaptureMetrics"]

METRICS_MEDIA_TYPE = CONTENT_TYPE_LATEST


class CaptureMetrics:
    def __init__(self) -> None:
        self.tokens = {"prefill": 0, "decode": 0}
        self.snapshots = 0
        self._last: float | None = None
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(self)

    def observe_status(self, prefill: int, decode: int) -> None:
        self.tokens = {"prefill": prefill, "decode": decode}

    def snapshot_written(self, when: float) -> None:
        self._last = when
        self.snapshots += 1

    def collect(self) -> Iterator[Metric]:
        """The prometheus_client collector protocol: the series at the moment of the scrape."""
        tokens = GaugeMetricFamily("actprune_tokens_captured",
                                   "Tokens folded into the activation statistics since the last reset",
                                   labels=["phase"])
        for phase, n in self.tokens.items():
            tokens.add_metric([phase], float(n))
        yield tokens
        yield CounterMetricFamily("actprune_snapshots_written", "Activation-statistics snapshots written to disk",
                                  value=self.snapshots)
        yield GaugeMetricFamily("actprune_snapshot_age_seconds",
                                "Seconds since the last snapshot was written (-1 if never)",
                                value=-1.0 if self._last is None else time.time() - self._last)

    def exposition(self) -> bytes:
        """The series in Prometheus' text format."""
        return generate_latest(self.registry)
