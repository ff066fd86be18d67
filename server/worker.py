"""Worker-side RPC methods, mixed into vLLM's worker class via ``--worker-extension-cls``.

The API process reaches them with ``engine_client.collective_rpc("actprune_snapshot")``: the
engine core runs them between forward steps on every rank, so a snapshot or a reset never
lands in the middle of a step and all ranks see the same step boundary.

Each worker also saves its own accumulators when it shuts down (:meth:`actprune_persist` says
where): on Ctrl-C the whole process group gets SIGINT and the engine stops before the API
server's last snapshot can reach it, so the API server alone would lose every token since its
last interval. vLLM's worker class owns ``shutdown`` (an extension may not define it), so the
worker instance's ``shutdown`` is wrapped once, at run time. vLLM's worker process of its own
(tensor or pipeline parallelism) turns SIGINT/SIGTERM into SystemExit wherever its main thread
is; ranks do not stop at the same instant, and a rank left running a step its peer never
started waits forever in the step's collective. So such a worker holds the first signal and
lets the stopping engine end it between steps (:class:`_SignalGuard`); a worker inside the
engine's process defers a signal to the end of the step under way. A step cut short all the
same (an exception, a second signal) is taken back before the shard is saved where that is
exact (``Capture.settle_step``), so every rank saves the same step boundary.
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

# The signal handler vLLM's multiprocessing executor installs in each worker process of its own
# (its qualified name): such a worker holds the first signal (_SignalGuard).
VLLM_WORKER_HANDLER = "WorkerProc.worker_main"
HOLD_S = 30.0  # a held signal no engine acted on is handed on after this long


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
            _guard_signals(cap)
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


class _SignalGuard:
    """Wraps this worker process's SIGINT/SIGTERM handlers so that a signal never stops a rank
    where the other ranks cannot follow.

    * A worker process of its own (vLLM's multiprocessing executor, TP or PP > 1: the handler it
      finds is vLLM's ``WorkerProc.worker_main`` one) **holds** the first signal. Ctrl-C reaches
      every process of the group; the engine, stopping, closes its queues, and each worker
      leaves at its next wait for work, after every step the engine sent — the same step
      boundary on every rank. A rank leaving on its own could leave while another has started
      the next step: that rank then waits forever in its next collective (vLLM's CPU all-reduce
      spins on shared memory) until the engine kills it, its shard unsaved. A second signal (the
      engine's SIGTERM after its grace period, a second Ctrl-C) is handed on at once; a held
      signal that no engine acted on within ``HOLD_S`` (one sent to this worker alone) is handed
      on then, at the end of the step under way.
    * Otherwise (the worker inside the engine's process: TP = PP = 1) a signal arriving inside a
      forward step runs its handler when the step ends (``cap.after_step``); a second one, or
      one between steps, at once.
    """

    def __init__(self, cap: Any) -> None:
        self.cap = cap
        self.pending: tuple[Any, int, bool] | None = None  # (handler, signal, held)
        self.due = False  # a held signal's time is up

    def install(self) -> None:
        holding = False
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous = signal.getsignal(sig)
            if callable(previous):
                holding |= _holds(previous)
                signal.signal(sig, self._wrap(previous))
        if holding and signal.getsignal(signal.SIGALRM) in (signal.SIG_DFL, None):  # nobody else's timer
            signal.signal(signal.SIGALRM, self._time_up)
        self.cap.after_step = self._step_end

    def _wrap(self, previous: Any) -> Any:
        hold = _holds(previous)

        def handler(signum: int, frame: Any) -> None:
            if self.pending is not None:  # a second signal: at once
                self.pending = None
                previous(signum, frame)
            elif hold:
                self.pending = (previous, signum, True)
                log.info("actprune: signal %d held: the engine stops this worker between steps (a second "
                         "signal stops it now)", signum)
                if signal.getsignal(signal.SIGALRM) == self._time_up:
                    signal.setitimer(signal.ITIMER_REAL, HOLD_S)
            elif self.cap.in_step:
                self.pending = (previous, signum, False)
            else:
                previous(signum, frame)

        return handler

    def _time_up(self, signum: int, frame: Any) -> None:
        if self.pending is None:
            return
        self.due = True
        if not self.cap.in_step:
            self._hand_on()

    def _step_end(self) -> None:
        if self.pending is not None and (self.due or not self.pending[2]):
            self._hand_on()

    def _hand_on(self) -> None:
        (previous, signum, _), self.pending, self.due = self.pending, None, False
        previous(signum, None)  # vLLM's handler raises SystemExit here, between steps


def _holds(handler: Any) -> bool:
    """Whether ``handler`` is the one vLLM installs in a worker process of its own."""
    return getattr(handler, "__qualname__", "").startswith(VLLM_WORKER_HANDLER)


def _guard_signals(cap: Any) -> None:
    """:class:`_SignalGuard` on this worker. Only the main thread may set handlers: elsewhere
    (Ray actors) nothing changes and a signal costs at most one snapshot interval."""
    if threading.current_thread() is threading.main_thread():
        _SignalGuard(cap).install()
