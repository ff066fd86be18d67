"""actprune's series on vLLM's Prometheus ``/metrics`` (same process, default registry):

    actprune_tokens_captured{phase="prefill"|"decode"}  tokens in the current window
    actprune_snapshots_written_total                    snapshots written to disk
    actprune_snapshot_age_seconds                       seconds since the last one (-1: never)
"""

from __future__ import annotations

import time
from collections.abc import Callable

from prometheus_client import REGISTRY, Counter, Gauge

__all__ = ["CaptureMetrics"]


def _get_or_create(factory: Callable, name: str, *args, **kwargs):
    # The registry is process-global; a second service in the same process reuses the series.
    existing = REGISTRY._names_to_collectors.get(name)  # noqa: SLF001
    return existing if existing is not None else factory(name, *args, **kwargs)


class CaptureMetrics:
    def __init__(self) -> None:
        self.tokens = _get_or_create(Gauge, "actprune_tokens_captured",
                                     "Tokens folded into the activation statistics since the last reset",
                                     ["phase"])
        self.snapshots = _get_or_create(Counter, "actprune_snapshots_written",
                                        "Activation-statistics snapshots written to disk")
        self.age = _get_or_create(Gauge, "actprune_snapshot_age_seconds",
                                  "Seconds since the last snapshot was written (-1 if never)")
        self._last: float | None = None
        self.age.set_function(lambda: -1.0 if self._last is None else time.time() - self._last)

    def observe_status(self, prefill: int, decode: int) -> None:
        self.tokens.labels(phase="prefill").set(prefill)
        self.tokens.labels(phase="decode").set(decode)

    def snapshot_written(self, when: float) -> None:
        self._last = when
        self.snapshots.inc()
