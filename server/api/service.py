"""The API-process side of capture: talks to the workers through ``collective_rpc``.

The engine core runs each RPC between forward steps, on every rank, so a snapshot is taken at
one step boundary for all ranks (never half-updated ranks) and a reset zeroes every layer of
every rank before the next step (never a mix of layers from before and after a reset).

Persistence (when the snapshot interval is not 0): the service holds its instance's lock and
writes the snapshot every interval, after every reset, pause and resume before the route
answers, and at shutdown; the workers save their own shards as they stop. What start-up
resumes, and which file is which: :mod:`actprune.server.store`.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import logging
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from actprune.core.archs import spec_for_config
from actprune.core.errors import ActpruneError
from actprune.core.files import fsync_dir
from actprune.core.tensor.checkpoint import ColumnNorms
from actprune.core.wire.api import StatusResponse
from actprune.core.wire.stats import Stats, config_hash

from ..settings import Settings
from ..snapshot import assemble
from ..store import (
    CannotSetAside,
    InstanceFiles,
    InstanceLock,
    Recovered,
    check_fits,
    recover,
    set_aside,
)
from .metrics import CaptureMetrics
from .prefix import CachedTokens

__all__ = ["CaptureService", "CaptureUnavailable", "SnapshotNotSaved", "WeightsUnreadable"]

log = logging.getLogger("vllm.actprune")  # under "vllm": its handlers apply
METRICS_REFRESH_S = 5.0


class CaptureUnavailable(RuntimeError):
    """The server runs without capture (plain vLLM load format)."""


class SnapshotNotSaved(RuntimeError):
    """A reset, pause or resume took effect but could not be written to disk."""


class WeightsUnreadable(ActpruneError):
    """A weight-aware plan cannot read the served checkpoint's weights (a 422, not a 500)."""


_ACTIVATION_ONLY = "choose a strategy from activations alone (importance, magnitude, variance, sparsity)"


class CaptureService:
    def __init__(self, engine_client: Any, settings: Settings, api_keys: list[str]) -> None:
        self.engine = engine_client
        self.settings = settings
        self.api_keys = api_keys
        mc = engine_client.model_config
        hf = mc.hf_config.to_dict()
        self.hf_config = hf
        pc = engine_client.vllm_config.parallel_config
        self.meta: dict[str, Any] = {
            "model": str(mc.served_model_name or mc.model),
            "model_path": str(mc.model),
            "architecture": (mc.architectures or ["unknown"])[0],
            "config_hash": config_hash(hf),
            "num_layers": int(hf.get("num_hidden_layers", 0)),
            "head_dim": int(hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"]),
            "tensor_parallel_size": int(pc.tensor_parallel_size),
            "pipeline_parallel_size": int(pc.pipeline_parallel_size),
            "instance_id": settings.instance_id,
            # on: the stats cover the tokens computed, not those served from the cache (prefix.py)
            "prefix_caching": bool(getattr(getattr(engine_client.vllm_config, "cache_config", None),
                                           "enable_prefix_caching", False)),
        }
        self.cached = CachedTokens(self.meta["prefix_caching"])
        self.files = InstanceFiles(settings.snapshot_dir, self.meta["config_hash"], settings.instance_id)
        self.lock = InstanceLock(self.files)
        self.persisting = settings.snapshot_interval > 0  # off when a bad file could not be set aside
        self._write_lock = asyncio.Lock()  # one snapshot write at a time: they land in the order taken
        self._column_norms: ColumnNorms | None = None
        lc = getattr(engine_client.vllm_config, "load_config", None)
        self._hub = {"revision": getattr(mc, "revision", None), "cache_dir": getattr(lc, "download_dir", None)}
        self.plan_lock = asyncio.Lock()  # one plan at a time: a second one is answered 429
        self.last_plan_seconds = 1.0  # how long the last plan took: the Retry-After of a 429
        self.next_plan_at = 0.0  # time.monotonic() before which a plan waits (plan_route.PLAN_SPACING)
        self.last_snapshot_time: float | None = None
        self.metrics = CaptureMetrics()
        self._task: asyncio.Task | None = None
        self._closed = False
        self._loop_thread: int | None = None

    def column_norms(self) -> ColumnNorms | None:
        """Column norms of the served checkpoint for weight-aware plans (the default, wifv),
        read once per (layer, kind) and kept for every later plan; None when the weights are
        not on this machine as safetensors (the planner then names what is missing)."""
        if self._column_norms is None:
            weights = _weights_dir(self.meta["model_path"], **self._hub)
            if weights is None:
                return None
            try:
                self._column_norms = ColumnNorms(weights, spec_for_config(self.hf_config))
            except ActpruneError:
                return None
        return self._column_norms

    def weight_norms(self) -> Callable[[int, str], np.ndarray] | None:
        """:meth:`column_norms` as the planner takes them, where every failure to read a weight
        is a :class:`WeightsUnreadable` naming the cause and the way out. Quantised checkpoints
        are refused before anything is read: the norms of FP8 (or int) weights without their
        scales are not the model's (nothing is raised unless a weight-aware strategy asks)."""
        quant = self.hf_config.get("quantization_config")
        if quant:
            method = quant.get("quant_method", "?") if isinstance(quant, dict) else "?"

            def refuse(layer: int, kind: str) -> np.ndarray:
                raise WeightsUnreadable(
                    f"the served checkpoint is quantised ({method}): its weight norms would need the "
                    f"quantisation scales, which weight-aware strategies (wifv, wanda_sp) do not apply; "
                    f"{_ACTIVATION_ONLY}, or plan offline on the unquantised checkpoint")
            return refuse
        norms = self.column_norms()
        if norms is None:
            return None

        def read(layer: int, kind: str) -> np.ndarray:
            try:
                return norms(layer, kind)
            except Exception as e:  # any failure to read is the checkpoint's, not a server fault
                raise WeightsUnreadable(
                    f"cannot read the weights of {norms.model_dir} for the weight norms ({type(e).__name__}: "
                    f"{_one_line(e)}); weight-aware strategies need a float16/bfloat16/float32 safetensors "
                    f"checkpoint: {_ACTIVATION_ONLY}") from e
        return read

    # ---- RPC ------------------------------------------------------------------------------
    async def _rpc(self, method: str, *args: Any) -> list[Any]:
        try:
            return await self.engine.collective_rpc(method, args=args)
        except NotImplementedError as e:  # worker extension missing
            raise CaptureUnavailable(
                "activation capture is not enabled on this server; start it with `actprune serve`"
            ) from e
        except Exception as e:
            if "actprune capture is not active" in str(e) or "is not implemented" in str(e):
                raise CaptureUnavailable(str(e)) from e
            raise

    async def snapshot(self) -> Stats:
        shards = await self._rpc("actprune_snapshot")
        meta = dict(self.meta, created=time.time())
        if (cached := self.cached.value()) is not None:
            meta["tokens_cached"] = cached
        return await asyncio.to_thread(assemble, shards, meta)

    async def status(self) -> StatusResponse:
        st = (await self._rpc("actprune_status"))[0]
        return self._status(st)

    async def control(self, action: str) -> StatusResponse:
        """Reset, pause or resume every rank; when persisting, the new state is on disk before
        this returns, so a restart (even after kill -9) keeps it."""
        async with self._write_lock:
            st = (await self._rpc(f"actprune_{action}"))[0]
            if action == "reset":
                self.cached.reset(paused=bool(st["paused"]))
            else:
                (self.cached.pause if action == "pause" else self.cached.resume)()
            if self.persisting:
                try:
                    await self._write()
                except Exception as e:
                    raise SnapshotNotSaved(f"{action} took effect but could not be saved to "
                                           f"{self.snapshot_path} ({e}): a restart would undo it") from e
        return self._status(st)

    def _status(self, st: dict[str, Any]) -> StatusResponse:
        self.metrics.observe_status(int(st["tokens_prefill"]), int(st["tokens_decode"]))
        return StatusResponse(
            capturing=bool(st["started"] and not st["paused"]),
            paused=bool(st["paused"]),
            tokens_prefill=int(st["tokens_prefill"]),
            tokens_decode=int(st["tokens_decode"]),
            tokens_cached=self.cached.value(),
            prefix_caching=self.meta["prefix_caching"],
            tokens_unsampled=int(st.get("tokens_unsampled", 0)),
            step_sample=float(st.get("step_sample", 1.0)),
            window_start=float(st["window_start"]),
            last_snapshot_time=self.last_snapshot_time,
            model=self.meta["model"],
            architecture=self.meta["architecture"],
            config_hash=self.meta["config_hash"],
            tensor_parallel_size=self.meta["tensor_parallel_size"],
            pipeline_parallel_size=self.meta["pipeline_parallel_size"],
            num_layers=self.meta["num_layers"],
            near_zero_threshold=float(st["near_zero_threshold"]),
            instance_id=self.meta["instance_id"],
        )

    # ---- persistence ----------------------------------------------------------------------
    @property
    def snapshot_path(self) -> Path:
        return self.files.snapshot

    async def write_snapshot(self) -> Path:
        async with self._write_lock:
            return await self._write()

    async def _write(self) -> Path:  # under _write_lock
        stats = await self.snapshot()
        path = await asyncio.to_thread(stats.save, self.snapshot_path)
        self.last_snapshot_time = time.time()
        self.metrics.snapshot_written(self.last_snapshot_time)
        return path

    async def resume_from_disk(self) -> bool:
        """Start-up: claim this instance's files (a second live server with the same identity and
        directory raises SnapshotInUse), fold the newest complete state on disk back into every
        rank, write it as the snapshot, and tell the workers where to save their shards when
        they stop. True when something was resumed."""
        if not (self.settings.resume or self.persisting):
            return False
        await self.status()  # CaptureUnavailable before any file is touched
        await asyncio.to_thread(self.lock.acquire)
        others = self.files.other_models()
        if others:
            log.warning("actprune: %s holds snapshots of other models (%s); not mixing them with %s",
                        self.files.directory, ", ".join(p.name for p in others), self.meta["model"])
        check = functools.partial(check_fits, meta=self.meta, hf_config=self.hf_config)
        try:
            found = await asyncio.to_thread(recover, self.files, self.meta, check, resume=self.settings.resume)
            resumed = found.stats is not None and await self._fold(found.stats, found.source)
        except CannotSetAside as e:
            log.error("actprune: %s; persistence is OFF for this run", e)
            self.persisting = False
            return False
        if self.persisting:
            await self._persist_from_now(found)
        return resumed

    async def _fold(self, stats: Stats, source: list[Path]) -> bool:
        try:  # base64 text: bytes arguments do not survive the trip to the workers intact
            await self._rpc("actprune_load", base64.b64encode(stats.to_bytes()).decode("ascii"))
        except CaptureUnavailable:
            raise
        except Exception as e:  # a rank refused it after others took it: all back to zero
            await self._rpc("actprune_reset")
            for path in source:
                await asyncio.to_thread(set_aside, path, "corrupt", f"a worker refused it: {e}")
            return False
        self.cached.carry(int(stats.meta.get("tokens_cached") or 0))
        if stats.meta.get("paused") is True:  # a pause outlives a restart
            await self._rpc("actprune_pause")
            self.cached.pause()
        log.info("actprune: resumed %d tokens from %s", stats.tokens, ", ".join(p.name for p in source))
        return True

    async def _persist_from_now(self, found: Recovered) -> None:
        try:
            await self.write_snapshot()  # holds what was resumed: the shards are spent
        except Exception as e:
            log.error("actprune: cannot write %s (%s); retrying every interval", self.snapshot_path, e)
        else:
            for path in found.spent:
                path.unlink(missing_ok=True)
            fsync_dir(self.files.directory)
        await self._rpc("actprune_persist", str(self.files.directory), self.files.config_hash,
                        self.files.instance_id, uuid.uuid4().hex)

    def close(self) -> None:
        """Release this instance's files (the end of the process does the same)."""
        self.lock.release()

    def start_background(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop())

    def hook_engine_shutdown(self) -> None:
        """Write the final snapshot before the engine stops.

        On SIGTERM vLLM's launcher stops the engine client first (in an executor thread) and
        only then leaves the app's lifespan, when no RPC can reach the workers any more. So the
        engine client's ``shutdown`` is wrapped: it first runs :meth:`shutdown` on the loop."""
        engine, loop = self.engine, asyncio.get_running_loop()
        inner = engine.shutdown

        def shutdown(*args: Any, **kwargs: Any) -> Any:
            if threading.get_ident() != self._loop_thread:
                try:
                    asyncio.run_coroutine_threadsafe(self.shutdown(), loop).result(timeout=120)
                except Exception as e:
                    log.error("actprune: final snapshot failed: %s", e)
            return inner(*args, **kwargs)

        self._loop_thread = threading.get_ident()
        engine.shutdown = shutdown

    async def shutdown(self) -> None:
        """Stop the background task and write a last snapshot (when persistence is on); once."""
        if self._closed:
            return
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            self._task = None
        if self.persisting:
            try:
                path = await self.write_snapshot()
                log.info("actprune: wrote final snapshot %s", path)
            except Exception as e:
                log.error("actprune: final snapshot failed: %s", e)

    async def _loop(self) -> None:
        """Write a snapshot every interval, at a fixed rate: the next write is due one interval
        after the last one *started*, so the time an RPC waits for a busy engine step and the
        time the file takes to write do not add up to a longer period (at 1 s under load they
        did: snapshots 4.7 s old). Between writes, refresh the token gauges every few seconds."""
        interval = self.settings.snapshot_interval
        now = time.monotonic()
        next_write = now + interval if self.persisting else float("inf")
        next_metrics = now + METRICS_REFRESH_S
        while True:
            await asyncio.sleep(max(0.0, min(next_write, next_metrics) - time.monotonic()))
            try:
                now = time.monotonic()
                if self.persisting and now >= next_write:
                    next_write = max(now, next_write) + interval  # behind schedule: no burst of catch-ups
                    await self.write_snapshot()
                    next_write = max(next_write, time.monotonic())  # a write longer than the interval
                if time.monotonic() >= next_metrics:
                    await self.status()
                    next_metrics = time.monotonic() + METRICS_REFRESH_S
            except asyncio.CancelledError:
                raise
            except Exception as e:  # keep serving; say why
                log.error("actprune: background snapshot/metrics failed: %s", e)
                next_metrics = time.monotonic() + METRICS_REFRESH_S


def _weights_dir(model: str, revision: str | None = None, cache_dir: str | None = None) -> Path | None:
    """The served checkpoint's directory: the path itself, or for a Hub id the snapshot vLLM
    already downloaded (nothing is downloaded here) — of the server's ``--revision``, in its
    ``--download-dir`` when given, else in the Hugging Face cache, as vLLM's loader does. None
    when neither exists."""
    if Path(model).is_dir():
        return Path(model)
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model, revision=revision, cache_dir=cache_dir, local_files_only=True,
                                      allow_patterns=["*.json", "*.safetensors"]))
    except Exception:  # not a Hub id, or not in the cache
        return None


def _one_line(e: BaseException, limit: int = 300) -> str:
    text = " ".join(str(e).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"
