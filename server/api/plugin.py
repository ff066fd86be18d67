"""The ``vllm.endpoint_plugins`` entry point: actprune's routes on vLLM's API server.

vLLM loads endpoint plugins only when they are named in ``VLLM_PLUGINS``; ``actprune serve``
sets that. ``attach_router`` runs while vLLM builds the app; ``init_state`` runs once the
engine is up, and is where the snapshot on disk is folded back in and the periodic writer starts.
"""

from __future__ import annotations

import logging
from argparse import Namespace
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

__all__ = ["ActpruneEndpoints"]

log = logging.getLogger("actprune.server")


class ActpruneEndpoints:
    name = "actprune_api"
    required_tasks = ("generate",)

    def attach_router(self, app: FastAPI) -> None:
        from .routes import router
        from .service import CaptureUnavailable

        app.include_router(router)

        async def unavailable(request: Request, exc: Exception) -> JSONResponse:
            return JSONResponse({"detail": str(exc)}, status_code=409)

        app.add_exception_handler(CaptureUnavailable, unavailable)

    async def init_state(self, engine_client: Any, state: Any, args: Namespace) -> None:
        if engine_client is None:  # vLLM's CPU-only render server has no engine
            return
        from ..settings import Settings
        from .service import CaptureService, CaptureUnavailable

        settings = Settings.from_env()
        keys = [k for k in (getattr(args, "api_key", None) or [settings.env_api_key]) if k]
        svc = CaptureService(engine_client, settings, keys)
        state.actprune = svc
        try:
            await svc.resume_from_disk()
        except CaptureUnavailable:
            log.warning("actprune: routes loaded but capture is off (load format is not 'actprune')")
            return
        svc.start_background()
