"""Worker-side RPC methods, mixed into vLLM's worker class via ``--worker-extension-cls``.

The API process reaches them with ``engine_client.collective_rpc("actprune_snapshot")``: the
engine core runs them between forward steps on every rank, so a snapshot or a reset never
lands in the middle of a step and all ranks see the same step boundary.

Each worker also saves its own accumulators when it shuts down (:meth:`actprune_persist` says
where): on Ctrl-C the whole process group gets SIGINT and the engine stops before the API
server's last snapshot can reach it, so the API server alone would lose every token since its
last interval. vLLM's worker class owns ``shutdown`` (an extension may not define it), so the
worker instance's ``shutdown`` is wrapped once, at run time. A worker process of its own (tensor
parallelism) turns SIGINT/SIGTERM into SystemExit wherever its main thread is, in the middle of
a forward step too, which would leave a torn state: such a signal is handed on when the step
ends (a second one at once). Ranks do not reach a step boundary at the same instant, though:
rank 0 sends the step's output to the engine while rank 1 may already run the next step; if
the signal stops rank 0 there, rank 1's step fails in its next collective. That step is taken
back before the shard is saved (``Capture.settle_step``), so every rank saves the same step
boundary.
"""

from __future__ import annotations

import base64
import logging
import signal
import threading
from pathlib import Path
from typing import Any

from actprune.core.files import atomic_write

from .store import SHARD_FORMAT, SHARD_FORMAT_VERSION, InstanceFiles

__all__ = ["CaptureWorkerExtension"]

log = logging.getLogger("vllm.actprune")  # under "vllm": its handlers apply


class CaptureWorkerExtension:
    def _actprune(self):
        from .loader import get_capture

        cap = get_capture(self.model_runner.model)  # type: ignore[attr-defined]
        if cap is None:
            raise RuntimeError(
                "actprune capture is not active in this worker: start the server with "
                "`actprune serve` (or --load-format actprune)"
            )
        return cap

    def actprune_snapshot(self) -> bytes:
        return self._actprune().snapshot()

    def actprune_reset(self) -> dict[str, Any]:
        cap = self._actprune()
        cap.reset()
        return cap.status()

    def actprune_pause(self) -> dict[str, Any]:
        cap = self._actprune()
        cap.pause()
        return cap.status()

    def actprune_resume(self) -> dict[str, Any]:
        cap = self._actprune()
        cap.resume()
        return cap.status()

    def actprune_status(self) -> dict[str, Any]:
        return self._actprune().status()

    def actprune_load(self, stats_b64: str) -> dict[str, Any]:
        """Fold a saved stats file (base64 of its bytes) into this rank's accumulators."""
        cap = self._actprune()
        cap.load(base64.b64decode(stats_b64))
        return cap.status()

    def actprune_persist(self, directory: str, config_hash: str, instance_id: str, run_id: str) -> str:
        """From now on, write this rank's accumulators to its shard file beside the snapshot
        when the worker shuts down; returns that file's path."""
        cap = self._actprune()
        path = InstanceFiles(Path(directory), config_hash, instance_id).shard(cap.shard.pp_rank, cap.shard.tp_rank)
        meta = {"format": SHARD_FORMAT, "format_version": str(SHARD_FORMAT_VERSION), "run_id": run_id,
                "config_hash": config_hash, "instance_id": instance_id}
        first = getattr(self, "_actprune_exit_shard", None) is None
        self._actprune_exit_shard = (path, meta)
        if first:
            inner = getattr(self, "shutdown", None)

            def shutdown(*args: Any, **kwargs: Any) -> Any:
                self._actprune_save_shard()  # before vLLM's shutdown releases the model
                return inner(*args, **kwargs) if inner is not None else None

            self.shutdown = shutdown
            _defer_signals_to_step_end(cap)
        return str(path)

    def _actprune_save_shard(self) -> None:
        target, self._actprune_exit_shard = getattr(self, "_actprune_exit_shard", None), None
        if target is None:
            return
        path, meta = target
        try:
            cap = self._actprune()
            if not cap.settle_step():  # stopped while folding a step: a torn state
                log.warning("actprune: rank stopped in the middle of a step; not saving %s (the last "
                            "snapshot stands)", path.name)
                return
            atomic_write(path, cap.snapshot(meta))
            log.info("actprune: saved this rank's statistics to %s", path)
        except Exception as e:  # shutting down: say why, never stop the shutdown
            log.error("actprune: could not save %s on shutdown: %s", path, e)


def _defer_signals_to_step_end(cap: Any) -> None:
    """Wrap the SIGINT/SIGTERM handlers of this worker process: a signal arriving inside a
    forward step runs its handler when the step ends (``cap.after_step``); a second signal, or
    one between steps, runs it at once. Only the main thread may set handlers: elsewhere (Ray
    actors) nothing changes and a mid-step signal costs at most one snapshot interval."""
    if threading.current_thread() is not threading.main_thread():
        return
    pending: list[tuple[Any, int]] = []

    def deferring(previous: Any) -> Any:
        def handler(signum: int, frame: Any) -> None:
            if cap.in_step and not pending:
                pending.append((previous, signum))
                return
            previous(signum, frame)

        return handler

    for sig in (signal.SIGINT, signal.SIGTERM):
        previous = signal.getsignal(sig)
        if callable(previous):
            signal.signal(sig, deferring(previous))

    def step_end() -> None:
        if pending:
            previous, signum = pending.pop()
            previous(signum, None)  # vLLM's handler raises SystemExit here, between steps

    cap.after_step = step_end
