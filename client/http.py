"""Python client for the actprune routes of a running server: :class:`Client`, :class:`AsyncClient`.

Light on purpose (httpx, numpy, safetensors, pydantic): it runs on a laptop that pulls stats
from GPU pods. Both clients speak the same routes and parse answers with the same functions;
only the sending differs.

- Authentication: ``Authorization: Bearer KEY``; the key is the ``api_key`` argument, else
  ``ACTPRUNE_API_KEY``, else ``VLLM_API_KEY`` (read in :class:`ClientSettings`, nowhere else).
- Retries: when no connection could be made (refused, connect timeout), with exponential
  backoff; and when the server dropped the connection without answering, for every request but
  ``reset`` (the others may run twice). An answer, even a 5xx, is never retried.
- Errors: :class:`ActpruneHTTPError` says the method, URL, status code and what the server
  answered (its JSON ``detail``); :class:`ActpruneConnectionError` says where and how often we tried.

Example::

    with Client("http://pod-1:8000") as c:
        print(c.status().tokens)
        c.stats_file("stats.safetensors")
    merged = merge_from(["http://pod-1:8000", "http://pod-2:8000"])
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

import httpx
from actprune.core.files import atomic_write
from actprune.core.wire.api import (
    PLAN_PATH,
    STATS_PATH,
    STATUS_PATH,
    PauseResponse,
    ResetResponse,
    StatsSummary,
    StatusResponse,
    control_path,
)
from actprune.core.wire.plan import Plan
from actprune.core.wire.stats import Stats, StatsFormatError
from actprune.core.wire.stats_merge import instance_ids, merge
from pydantic import BaseModel, ValidationError

__all__ = [
    "ActpruneClientError",
    "ActpruneConnectionError",
    "ActpruneHTTPError",
    "AsyncClient",
    "Client",
    "ClientSettings",
    "amerge_from",
    "merge_from",
]

_M = TypeVar("_M", bound=BaseModel)
_RETRYABLE = (httpx.ConnectError, httpx.ConnectTimeout)
# The server closed a pooled connection as the request went out (an idle-timeout race): nothing
# was answered, and requests that may run twice (all but reset) are sent again.
_RETRYABLE_IF_IDEMPOTENT = (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError)
# Idle pooled connections are dropped before the server's keep-alive (vLLM: 5 s) can close them.
_LIMITS = httpx.Limits(keepalive_expiry=2.0)
_DETAIL_MAX = 500


class ActpruneClientError(Exception):
    """Base class of every error the client raises on purpose."""


class ActpruneConnectionError(ActpruneClientError):
    """No connection could be made, after every retry."""


class ActpruneHTTPError(ActpruneClientError):
    """The server answered with an error status (or with a body we cannot read)."""

    def __init__(self, method: str, url: str, status_code: int, detail: str) -> None:
        self.method, self.url, self.status_code, self.detail = method, url, status_code, detail
        reason = httpx.codes.get_reason_phrase(status_code)
        super().__init__(f"{method} {url} answered {status_code} {reason}: {detail}")


@dataclass(frozen=True)
class ClientSettings:
    """Everything the client takes from its environment, read in one place."""

    api_key: str | None = field(default=None, repr=False)  # never in logs or tracebacks
    timeout: float = 60.0  # seconds, per request (connect, read, write, pool)
    retries: int = 3  # extra connection attempts after the first
    backoff: float = 0.5  # seconds before the first retry; doubles each time

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> ClientSettings:
        """Settings from ``env`` (default ``os.environ``); non-None ``overrides`` win."""
        env = os.environ if env is None else env
        settings = cls(api_key=env.get("ACTPRUNE_API_KEY") or env.get("VLLM_API_KEY") or None)
        return replace(settings, **{k: v for k, v in overrides.items() if v is not None})

    def __post_init__(self) -> None:
        if self.timeout <= 0:
            raise ValueError(f"timeout must be > 0 seconds, got {self.timeout}")
        if self.retries < 0:
            raise ValueError(f"retries must be >= 0, got {self.retries}")


class _Base:
    """What both clients share: URL handling, headers, and parsing of answers."""

    def __init__(
        self, base_url: str, *, api_key: str | None = None, timeout: float | None = None,
        retries: int | None = None, backoff: float | None = None,
        settings: ClientSettings | None = None,
    ) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must start with http:// or https://, got {base_url!r}")
        self.base_url = base_url.rstrip("/")
        if self.base_url.endswith("/v1"):  # users paste their OpenAI base URL; our routes sit beside it
            self.base_url = self.base_url[: -len("/v1")]
        base = settings or ClientSettings.from_env()
        self.settings = replace(
            base, **{k: v for k, v in
                     {"api_key": api_key, "timeout": timeout, "retries": retries, "backoff": backoff}.items()
                     if v is not None},
        )

    def _headers(self) -> dict[str, str]:
        key = self.settings.api_key
        return {"Authorization": f"Bearer {key}"} if key else {}

    def _url(self, path: str) -> str:
        return self.base_url + path

    def _check(self, r: httpx.Response) -> httpx.Response:
        if r.is_success:
            return r
        raise ActpruneHTTPError(r.request.method, str(r.request.url), r.status_code, _detail(r))

    def _model(self, r: httpx.Response, model: type[_M]) -> _M:
        try:
            return model.model_validate_json(self._check(r).content)
        except ValidationError as e:
            raise ActpruneHTTPError(
                r.request.method, str(r.request.url), r.status_code,
                f"answer is not a valid {model.__name__} ({e.error_count()} errors: "
                f"{_clip(str(e))}); is the server's actprune version compatible?",
            ) from e

    def _stats(self, r: httpx.Response) -> Stats:
        return Stats.from_bytes(self._check(r).content, source=str(r.request.url))

    def _json(self, r: httpx.Response) -> Any:
        try:
            return self._check(r).json()
        except json.JSONDecodeError as e:
            raise ActpruneHTTPError(
                r.request.method, str(r.request.url), r.status_code, f"answer is not JSON: {_clip(r.text)}"
            ) from e

    def _connection_error(self, method: str, path: str, tries: int, e: Exception) -> ActpruneConnectionError:
        what = "could not connect" if isinstance(e, _RETRYABLE) else "no answer (connection dropped)"
        return ActpruneConnectionError(
            f"{method} {self._url(path)}: {what} after {tries} "
            f"{'try' if tries == 1 else 'tries'} ({type(e).__name__}: {e}); is the server up at {self.base_url}?"
        )

    def _delay(self, attempt: int) -> float:
        return self.settings.backoff * (2**attempt)


class Client(_Base):
    """Blocking client for one server. Use as a context manager, or call :meth:`close`."""

    def __init__(self, base_url: str, *, transport: httpx.BaseTransport | None = None, **kw: Any) -> None:
        super().__init__(base_url, **kw)
        self._http = httpx.Client(timeout=self.settings.timeout, transport=transport, limits=_LIMITS)

    def _send(self, method: str, path: str, *, idempotent: bool = True, **kw: Any) -> httpx.Response:
        tries = self.settings.retries + 1
        retryable = _RETRYABLE + _RETRYABLE_IF_IDEMPOTENT if idempotent else _RETRYABLE
        for attempt in range(tries):
            try:
                return self._http.request(method, self._url(path), headers=self._headers(), **kw)
            except retryable as e:
                if attempt == tries - 1:
                    raise self._connection_error(method, path, tries, e) from e
                time.sleep(self._delay(attempt))
            except httpx.TransportError as e:
                raise self._connection_error(method, path, attempt + 1, e) from e
        raise AssertionError("unreachable")

    def stats(self) -> Stats:
        """The full snapshot (every accumulator), validated."""
        return self._stats(self._send("GET", STATS_PATH, params={"format": "safetensors"}))

    def stats_file(self, path: str | os.PathLike[str]) -> Path:
        """Download the snapshot to ``path`` atomically, after checking it is a valid stats file."""
        r = self._send("GET", STATS_PATH, params={"format": "safetensors"})
        self._stats(r)
        return atomic_write(Path(path), r.content)

    def summary(self, k: int | None = None) -> StatsSummary:
        params = {} if k is None else {"k": k}
        return self._model(self._send("GET", STATS_PATH, params=params), StatsSummary)

    def status(self) -> StatusResponse:
        return self._model(self._send("GET", STATUS_PATH), StatusResponse)

    def reset(self) -> ResetResponse:
        return self._model(self._send("POST", control_path("reset"), json={}, idempotent=False), ResetResponse)

    def pause(self) -> PauseResponse:
        return self._model(self._send("POST", control_path("pause"), json={}), PauseResponse)

    def resume(self) -> PauseResponse:
        return self._model(self._send("POST", control_path("resume"), json={}), PauseResponse)

    def plan(self, **fields: Any) -> Plan:
        """Ask the server's planner for a pruning plan from its live stats; ``fields`` are the
        `actprune plan` options (``mlp_ratio=0.3``, ``strategy="wanda_sp"``, ...)."""
        return self._model(self._send("POST", PLAN_PATH, json=fields), Plan)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncClient(_Base):
    """The same routes as :class:`Client`, for asyncio. ``async with AsyncClient(url) as c:``."""

    def __init__(self, base_url: str, *, transport: httpx.AsyncBaseTransport | None = None, **kw: Any) -> None:
        super().__init__(base_url, **kw)
        self._http = httpx.AsyncClient(timeout=self.settings.timeout, transport=transport, limits=_LIMITS)

    async def _send(self, method: str, path: str, *, idempotent: bool = True, **kw: Any) -> httpx.Response:
        tries = self.settings.retries + 1
        retryable = _RETRYABLE + _RETRYABLE_IF_IDEMPOTENT if idempotent else _RETRYABLE
        for attempt in range(tries):
            try:
                return await self._http.request(method, self._url(path), headers=self._headers(), **kw)
            except retryable as e:
                if attempt == tries - 1:
                    raise self._connection_error(method, path, tries, e) from e
                await asyncio.sleep(self._delay(attempt))
            except httpx.TransportError as e:
                raise self._connection_error(method, path, attempt + 1, e) from e
        raise AssertionError("unreachable")

    async def stats(self) -> Stats:
        return self._stats(await self._send("GET", STATS_PATH, params={"format": "safetensors"}))

    async def stats_file(self, path: str | os.PathLike[str]) -> Path:
        r = await self._send("GET", STATS_PATH, params={"format": "safetensors"})
        self._stats(r)
        return atomic_write(Path(path), r.content)

    async def summary(self, k: int | None = None) -> StatsSummary:
        params = {} if k is None else {"k": k}
        return self._model(await self._send("GET", STATS_PATH, params=params), StatsSummary)

    async def status(self) -> StatusResponse:
        return self._model(await self._send("GET", STATUS_PATH), StatusResponse)

    async def reset(self) -> ResetResponse:
        return self._model(await self._send("POST", control_path("reset"), json={}, idempotent=False), ResetResponse)

    async def pause(self) -> PauseResponse:
        return self._model(await self._send("POST", control_path("pause"), json={}), PauseResponse)

    async def resume(self) -> PauseResponse:
        return self._model(await self._send("POST", control_path("resume"), json={}), PauseResponse)

    async def plan(self, **fields: Any) -> Plan:
        return self._model(await self._send("POST", PLAN_PATH, json=fields), Plan)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


def merge_from(urls: Sequence[str], **client_kw: Any) -> Stats:
    """Pull the snapshot of every server (one after another) and merge them exactly. A server
    reached under two URLs (``URL`` and ``URL/v1``, ``localhost`` and ``127.0.0.1``) is found by
    its instance identity and refused (ValueError): its tokens would count twice."""
    parts = []
    for url in _unique(urls):
        with Client(url, **client_kw) as c:
            parts.append((url, c.stats()))
    return _merge_checked(parts)


async def amerge_from(urls: Sequence[str], **client_kw: Any) -> Stats:
    """Like :func:`merge_from`, pulling from all servers concurrently."""
    urls = _unique(urls)

    async def pull(url: str) -> Stats:
        async with AsyncClient(url, **client_kw) as c:
            return await c.stats()

    return _merge_checked(list(zip(urls, await asyncio.gather(*(pull(u) for u in urls)), strict=True)))


def _unique(urls: Sequence[str]) -> list[str]:
    if not urls:
        raise ValueError("merge_from() needs at least one server URL")
    seen = [u.rstrip("/") for u in urls]
    dupes = sorted({u for u in seen if seen.count(u) > 1})
    if dupes:  # pulling a server twice would count its tokens twice
        raise ValueError(f"the same server is listed more than once: {', '.join(dupes)}")
    return seen


def _merge_checked(parts: list[tuple[str, Stats]]) -> Stats:
    """Merge, naming the servers when they do not hold the same model, or when two URLs lead to
    one server (the same ``instance_id`` in their stats' metadata: URL text cannot tell)."""
    seen: dict[str, str] = {}
    for url, s in parts:
        for instance in instance_ids(s):
            if instance in seen:
                raise ValueError(
                    f"{seen[instance]} and {url} are the same server (instance_id {instance!r}); "
                    f"list each server once, or its tokens count twice"
                )
            seen[instance] = url
    url0, first = parts[0]
    for url, s in parts[1:]:
        if s.meta["config_hash"] != first.meta["config_hash"]:
            raise StatsFormatError(
                f"cannot merge: {url0} serves {first.meta['model']} (config_hash "
                f"{first.meta['config_hash']}) but {url} serves {s.meta['model']} (config_hash "
                f"{s.meta['config_hash']}); merge only servers of the same model"
            )
    return merge(s for _, s in parts)


def _detail(r: httpx.Response) -> str:
    """What the server said: its JSON ``detail`` if any, else the start of the body."""
    try:
        body = r.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        return _clip(r.text) or "(empty body)"
    if isinstance(body, dict) and "detail" in body:
        d = body["detail"]
        return _clip(d if isinstance(d, str) else json.dumps(d))
    return _clip(json.dumps(body))


def _clip(s: str) -> str:
    s = s.strip()
    return s if len(s) <= _DETAIL_MAX else s[:_DETAIL_MAX] + "…"
