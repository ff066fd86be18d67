"""Prompt tokens served from vLLM's prefix cache while capture ran: what the statistics miss.

With prefix caching on, a prompt prefix found in the KV cache is not recomputed, so no capture
hook sees its activations: the statistics cover the tokens the model *computed*. To say which
tokens those are, the stats carry ``tokens_cached``, the prompt tokens taken from the cache
since the last reset while capture was not paused. Then, exactly (once no request is in
flight), for the requests served in that window:

    tokens_prefill + tokens_decode + tokens_cached == Σ prompt_tokens + Σ (completion_tokens - 1)

(each generated token but the last is fed back as one decode token).

The figure comes from vLLM's own per-request count: its output processor counts each request's
cached prompt tokens once, when its first token arrives, into the Prometheus counter
``vllm:prompt_tokens_cached`` of this (the API server's) process. It exists only when vLLM logs
statistics, which is why ``actprune serve`` refuses prefix caching with ``--disable-log-stats``.
The counter never goes back, so a reset or pause records where it stood; with several API
server processes (``--api-server-count``) each counts its own requests and the figure would be
this process's share: ``actprune serve`` refuses that combination too.
"""

from __future__ import annotations

from collections.abc import Callable

METRIC = "vllm:prompt_tokens_cached"


def read_counter(name: str = METRIC) -> float | None:
    """The sum over engines of a Prometheus counter of this process; None when not registered."""
    from prometheus_client import REGISTRY

    total, found = 0.0, False
    for family in REGISTRY.collect():
        if family.name != name:  # prometheus_client names a counter's family without "_total"
            continue
        for sample in family.samples:
            if sample.name == name + "_total":
                total, found = total + sample.value, True
    return total if found else None


class CachedTokens:
    """``tokens_cached`` of the capture window: the counter's growth while capturing.

    ``value = carried + (now - base) - paused`` where ``base`` is the counter at the last reset,
    ``paused`` what it grew by during pauses, and ``carried`` what a snapshot resumed at start-up
    already held. Driven by the service at each reset, pause and resume.
    """

    def __init__(self, enabled: bool, read: Callable[[], float | None] = read_counter) -> None:
        self.enabled = enabled  # prefix caching on: otherwise nothing is cached, the figure is 0
        self._read = read
        self._base = self._now()
        self._paused_at: float | None = None
        self._carried = 0

    def _now(self) -> float:
        return (self._read() or 0.0) if self.enabled else 0.0

    def value(self) -> int | None:
        """The figure, or None when prefix caching is on but vLLM keeps no count (unknown)."""
        now = self._read() if self.enabled else 0.0  # one read: it walks the process's metrics
        if now is None:
            return None
        if self._paused_at is not None:
            now = self._paused_at
        return self._carried + int(round(now - self._base))

    def reset(self, paused: bool) -> None:
        self._base, self._carried = self._now(), 0
        self._paused_at = self._base if paused else None

    def pause(self) -> None:
        if self._paused_at is None:
            self._paused_at = self._now()

    def resume(self) -> None:
        if self._paused_at is not None:
            self._base += self._now() - self._paused_at
            self._paused_at = None

    def carry(self, tokens: int) -> None:
        """Start-up: a resumed snapshot already counted ``tokens``."""
        self._carried += int(tokens)
