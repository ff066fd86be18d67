"""The API-process side of capture: talks to the workers through ``collective_rpc``.

The engine core runs each RPC between forward steps, on every rank, so a snapshot is taken at
one step boundary for all ranks (never half-updated ranks) and a reset zeroes every layer of
every rank before the next step (never a mix of layers from before and after a reset).
"""

from __future__ import annotations

import asyncio
import base64
import logging
import threading
import time
from pathlib import Path
from typing import Any

from actprune.core.archs import spec_for_config
from actprune.core.errors import ActpruneError
from actprune.core.tensor.checkpoint import ColumnNorms
from actprune.core.wire.api import StatusResponse
from actprune.core.wire.stats import Stats, StatsFormatError, config_hash

from ..settings import Settings
from ..snapshot import assemble
from .metrics import CaptureMetrics

__all__ = ["CaptureService", "CaptureUnavailable"]

log = logging.getLogger("vllm.actprune")  # under "vllm": its handlers apply
METRICS_REFRESH_S = 5.0


class CaptureUnavailable(RuntimeError):
    """The server runs without capture (plain vLLM load format)."""


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
        }
        self._column_norms: ColumnNorms | None = None
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
            weights = _weights_dir(self.meta["model_path"])
            if weights is None:
                return None
            try:
                self._column_norms = ColumnNorms(weights, spec_for_config(self.hf_config))
            except ActpruneError:
                return None
        return self._column_norms

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
        return assemble(shards, dict(self.meta, created=time.time()))

    async def status(self) -> StatusResponse:
        st = (await self._rpc("actprune_status"))[0]
        return self._status(st)

    async def control(self, action: str) -> StatusResponse:
        st = (await self._rpc(f"actprune_{action}"))[0]
        return self._status(st)

    def _status(self, st: dict[str, Any]) -> StatusResponse:
        self.metrics.observe_status(int(st["tokens_prefill"]), int(st["tokens_decode"]))
        return StatusResponse(
            capturing=bool(st["started"] and not st["paused"]),
            paused=bool(st["paused"]),
            tokens_prefill=int(st["tokens_prefill"]),
            tokens_decode=int(st["tokens_decode"]),
            window_start=float(st["window_start"]),
            last_snapshot_time=self.last_snapshot_time,
            model=self.meta["model"],
            architecture=self.meta["architecture"],
            config_hash=self.meta["config_hash"],
            tensor_parallel_size=self.meta["tensor_parallel_size"],
            pipeline_parallel_size=self.meta["pipeline_parallel_size"],
            num_layers=self.meta["num_layers"],
            near_zero_threshold=float(st["near_zero_threshold"]),
        )

    # ---- persistence ----------------------------------------------------------------------
    @property
    def snapshot_path(self) -> Path:
        return self.settings.snapshot_dir / f"stats-{self.meta['config_hash']}.safetensors"

    async def write_snapshot(self) -> Path:
        stats = await self.snapshot()
        path = await asyncio.to_thread(stats.save, self.snapshot_path)
        self.last_snapshot_time = time.time()
        self.metrics.snapshot_written(self.last_snapshot_time)
        return path

    async def resume_from_disk(self) -> bool:
        """Fold the last snapshot of this model back into the workers' accumulators."""
        others = [
            p for p in self.settings.snapshot_dir.glob("stats-*.safetensors") if p != self.snapshot_path
        ]
        if others:
            log.warning(
                "actprune: %s holds snapshots of other models (%s); not mixing them with %s",
                self.settings.snapshot_dir, ", ".join(p.name for p in others), self.meta["model"],
            )
        if not self.settings.resume or not self.snapshot_path.is_file():
            return False
        try:
            saved = await asyncio.to_thread(Stats.load, self.snapshot_path)
        except StatsFormatError as e:
            log.error("actprune: cannot resume from %s: %s; starting from zero", self.snapshot_path, e)
            return False
        if saved.meta["config_hash"] != self.meta["config_hash"]:
            log.error("actprune: %s is from another model; starting from zero", self.snapshot_path)
            return False
        # base64 text: bytes arguments do not survive the trip to the workers intact
        await self._rpc("actprune_load", base64.b64encode(saved.to_bytes()).decode("ascii"))
        log.info("actprune: resumed %d tokens from %s", saved.tokens, self.snapshot_path)
        return True

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
        if self.settings.snapshot_interval > 0:
            try:
                path = await self.write_snapshot()
                log.info("actprune: wrote final snapshot %s", path)
            except Exception as e:
                log.error("actprune: final snapshot failed: %s", e)

    async def _loop(self) -> None:
        """Refresh the token gauges every few seconds; write a snapshot every interval."""
        interval = self.settings.snapshot_interval
        tick = min(interval, METRICS_REFRESH_S) if interval > 0 else METRICS_REFRESH_S
        next_write = time.monotonic() + interval
        while True:
            await asyncio.sleep(tick)
            try:
                await self.status()
                if interval > 0 and time.monotonic() >= next_write:
                    await self.write_snapshot()
                    next_write = time.monotonic() + interval
            except asyncio.CancelledError:
                raise
            except Exception as e:  # keep serving; say why
                log.error("actprune: background snapshot/metrics failed: %s", e)


def _weights_dir(model: str) -> Path | None:
    """The served checkpoint's directory: the path itself, or for a Hub id the snapshot vLLM
    already downloaded into the Hugging Face cache (nothing is downloaded here). None when
    neither exists."""
    if Path(model).is_dir():
        return Path(model)
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model, local_files_only=True, allow_patterns=["*.json", "*.safetensors"]))
    except Exception:  # not a Hub id, or not in the cache
        return None
