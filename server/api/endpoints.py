"""The ``vllm.endpoint_plugins`` entry point: actprune's routes on vLLM's API server.

vLLM loads endpoint plugins only when they are named in ``VLLM_PLUGINS``; ``actprune serve``
sets that. ``attach_router`` runs while vLLM builds the app; ``init_state`` runs once the
engine is up, and is where the snapshot on disk is folded back in and the periodic writer starts.
"""

from __future__ import annotations

import logging
from argparse import Namespace
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

__all__ = ["ActpruneEndpoints"]

log = logging.getLogger("vllm.actprune")  # under "vllm": its handlers apply


class ActpruneEndpoints:
    name = "actprune_api"
    required_tasks = ("generate",)

    def attach_router(self, app: FastAPI) -> None:
        from .plan_route import router as plan_router
        from .routes import ApiError, router
        from .service import CaptureUnavailable, SnapshotNotSaved

        app.include_router(router)
        app.include_router(plan_router)

        async def unavailable(request: Request, exc: Exception) -> JSONResponse:
            return JSONResponse({"detail": str(exc)}, status_code=409)

        async def api_error(request: Request, exc: ApiError) -> JSONResponse:
            return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)

        async def not_saved(request: Request, exc: Exception) -> JSONResponse:
            # The action took effect on the workers but is not durable yet: say so, retryable.
            return JSONResponse({"detail": str(exc)}, status_code=503, headers={"Retry-After": "5"})

        app.add_exception_handler(CaptureUnavailable, unavailable)
        app.add_exception_handler(SnapshotNotSaved, not_saved)
        app.add_exception_handler(ApiError, api_error)
        _write_snapshot_on_shutdown(app)

    async def init_state(self, engine_client: Any, state: Any, args: Namespace) -> None:
        if engine_client is None:  # vLLM's CPU-only render server has no engine
            return
        from ..settings import Settings
        from ..store import SnapshotInUse
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
        except SnapshotInUse as e:  # two live servers with one identity would overwrite each other
            log.error("actprune: refusing to start: %s", e)
            raise
        except Exception as e:  # a bad snapshot must not stop the server from serving
            log.error("actprune: resuming from %s failed (%s); starting from zero", svc.snapshot_path, e)
        svc.start_background()
        svc.hook_engine_shutdown()


def _write_snapshot_on_shutdown(app: FastAPI) -> None:
    """Wrap vLLM's lifespan: our exit step runs inside it, while the engine is still up."""
    inner = app.router.lifespan_context

    @asynccontextmanager
    async def lifespan(a: FastAPI):
        async with inner(a) as value:
            try:
                yield value
            finally:
                svc = getattr(a.state, "actprune", None)
                if svc is not None:
                    await svc.shutdown()

    app.router.lifespan_context = lifespan
