"""HTTP routes of actprune, served by vLLM's API server beside the OpenAI API.

vLLM's own API-key middleware only guards paths under /v1 (and a few others), so every route
here depends on :func:`require_key`, which refuses a missing or wrong key with 401 whenever
the server has one, comparing in constant time; POST routes then require a JSON content type
(:mod:`.body`). ``CaptureUnavailable`` becomes a 409 through the exception handler that
:mod:`actprune.server.api.endpoints` installs.

The work of a stats answer (assembling the ranks' shards, the summary, serialisation) runs in a
worker thread, so that polling never stalls the event loop that streams generated tokens.
"""

from __future__ import annotations

import asyncio
import hmac
from typing import Annotated, Literal

from actprune.core.summary import summarize
from actprune.core.wire.api import (
    SAFETENSORS_MEDIA_TYPE,
    ErrorBody,
    PauseResponse,
    ResetResponse,
    StatsSummary,
    StatusResponse,
)
from actprune.core.wire.stats import Stats
from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response

from .body import require_empty_json, require_json
from .errors import ActpruneRoute, ApiError
from .metrics import METRICS_MEDIA_TYPE
from .service import CaptureService

__all__ = ["ApiError", "router"]


def get_service(request: Request) -> CaptureService:
    svc = getattr(request.app.state, "actprune", None)
    if svc is None:
        raise ApiError(503, "actprune is starting up or not initialised on this server")
    return svc


def require_key(request: Request, svc: Annotated[CaptureService, Depends(get_service)]) -> None:
    if not svc.api_keys:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    ok = False
    for key in svc.api_keys:  # compare against every key: no early exit, constant time each
        ok |= hmac.compare_digest(token.encode(), key.encode()) and scheme.lower() == "bearer"
    if not ok:
        raise ApiError(
            401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
            headers={"WWW-Authenticate": "Bearer"},
        )


Service = Annotated[CaptureService, Depends(get_service)]
_errors = {
    401: {"model": ErrorBody, "description": "Missing or wrong API key."},
    409: {"model": ErrorBody, "description": "Capture is not enabled on this server."},
}
router = APIRouter(tags=["actprune"], dependencies=[Depends(require_key)], responses=_errors,
                   route_class=ActpruneRoute)


@router.get(
    "/activations/stats",
    response_model=StatsSummary,
    responses={200: {"content": {SAFETENSORS_MEDIA_TYPE: {}}, "description": "JSON summary, or the stats file"}},
    summary="Activation statistics: a JSON summary, or the full snapshot as safetensors",
)
async def get_stats(
    svc: Service,
    format: Annotated[Literal["json", "safetensors"], Query(description="json (summary) or safetensors (full file)")] = "json",
    k: Annotated[int, Query(ge=0, le=1000, description="least-important units listed per layer")] = 10,
):
    stats = await svc.snapshot()
    if format == "safetensors":
        return Response(
            content=await asyncio.to_thread(stats.to_bytes),
            media_type=SAFETENSORS_MEDIA_TYPE,
            headers={"Content-Disposition": 'attachment; filename="stats.safetensors"'},
        )
    return Response(content=await asyncio.to_thread(_summary_json, stats, k), media_type="application/json")


def _summary_json(stats: Stats, k: int) -> bytes:
    return summarize(stats, k=k, head_dim=int(stats.meta["head_dim"])).model_dump_json().encode()


@router.get("/activations/status", response_model=StatusResponse, summary="Capture state and token counts")
async def get_status(svc: Service) -> StatusResponse:
    return await svc.status()


@router.get(
    "/activations/metrics",
    response_class=Response,
    responses={200: {"content": {METRICS_MEDIA_TYPE: {}}, "description": "Prometheus text format"}},
    summary="actprune's Prometheus series (behind the API key, unlike vLLM's /metrics)",
)
async def get_metrics(svc: Service) -> Response:
    await svc.status()  # fresh token counts, not those of the last background refresh
    return Response(content=svc.metrics.exposition(), media_type=METRICS_MEDIA_TYPE)


_json_body = {  # POST routes without fields still take a JSON body: {} (or none)
    "dependencies": [Depends(require_json), Depends(require_empty_json)],
    "responses": {415: {"model": ErrorBody, "description": "The body is not declared as application/json."}},
    "openapi_extra": {"requestBody": {"content": {"application/json": {"schema": {"type": "object"}}}}},
}


@router.post("/activations/reset", response_model=ResetResponse, summary="Zero every accumulator on every rank",
             **_json_body)
async def reset(svc: Service) -> ResetResponse:
    return ResetResponse(status=await svc.control("reset"))


@router.post("/activations/pause", response_model=PauseResponse, summary="Stop accumulating (keeps the data)",
             **_json_body)
async def pause(svc: Service) -> PauseResponse:
    return PauseResponse(status=await svc.control("pause"))


@router.post("/activations/resume", response_model=PauseResponse, summary="Accumulate again after a pause",
             **_json_body)
async def resume(svc: Service) -> PauseResponse:
    return PauseResponse(status=await svc.control("resume"))
