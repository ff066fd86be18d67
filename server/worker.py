"""Worker-side RPC methods, mixed into vLLM's worker class via ``--worker-extension-cls``.

The API process reaches them with ``engine_client.collective_rpc("actprune_snapshot")``: the
engine core runs them between forward steps on every rank, so a snapshot or a reset never
lands in the middle of a step and all ranks see the same step boundary.
"""

from __future__ import annotations

import base64
from typing import Any

__all__ = ["CaptureWorkerExtension"]


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
