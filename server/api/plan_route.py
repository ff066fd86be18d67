"""``POST /prune/plan``: a pruning plan computed from the live stats of the served model.

The body carries the same fields as ``actprune plan`` (``{"strategy": "importance",
"mlp_ratio": 0.3, ...}``, see :class:`actprune.core.wire.plan_request.PlanRequest`); the answer is the
same plan JSON the CLI writes. The body is validated here rather than by FastAPI so that a
mistake comes back as one readable line (``{"detail": "mlp_ratio: ..."}``, 422); its size and
content type are bounded by :mod:`.body`.

One plan runs at a time: a second request while one is computing gets 429 with
``Retry-After`` (the last plan's duration, in seconds). The snapshot, the plan (which reads the
weight norms once per server, then keeps them) and its serialisation run in worker threads.

A worker thread keeps the event loop free but not the interpreter: planning is Python-heavy
and holds the GIL that the loop needs to stream tokens (measured in ``bench/route_load.py``:
plans back to back slowed generation by a third on 2 cores). So plans asked back to back are
spaced: after a plan that took ``t`` seconds from its snapshot to its JSON (weight reads not
counted: I/O, once per server), the next starts ``PLAN_SPACING * t`` later at the earliest. On a
busy machine a plan takes longer, so they space out further. A plan waits for its turn; it is not
refused.
"""

from __future__ import annotations

import asyncio
import math
import time

import numpy as np
from actprune.core.errors import ActpruneError
from actprune.core.planning.planner import make_plan
from actprune.core.wire.api import ErrorBody
from actprune.core.wire.plan import Plan, format_validation_error
from actprune.core.wire.plan_request import PlanRequest
from actprune.core.wire.stats import Stats
from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from pydantic import ValidationError

from .body import read_json_object, require_json
from .errors import ActpruneRoute, ApiError
from .routes import Service, require_key
from .service import CaptureService

__all__ = ["PLAN_SPACING", "router"]

PLAN_SPACING = 4.0  # back-to-back plans run at most 1/(1 + 4) of the time

router = APIRouter(tags=["actprune"], dependencies=[Depends(require_key)], route_class=ActpruneRoute)


@router.post(
    "/prune/plan",
    response_model=Plan,
    dependencies=[Depends(require_json)],
    summary="Plan structured pruning from the live activation statistics",
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": PlanRequest.model_json_schema(
                ref_template="#/components/schemas/{model}")}},
        }
    },
    responses={
        401: {"model": ErrorBody, "description": "Missing or wrong API key."},
        409: {"model": ErrorBody, "description": "Capture is not enabled, or no tokens yet."},
        413: {"model": ErrorBody, "description": "The body is larger than 1 MiB."},
        415: {"model": ErrorBody, "description": "The body is not declared as application/json."},
        422: {"model": ErrorBody, "description": "The request or the plan is invalid."},
        429: {"model": ErrorBody, "description": "Another plan is being computed; retry after Retry-After s."},
    },
)
async def plan(request: Request, svc: Service) -> Response:
    try:
        req = PlanRequest.model_validate(await read_json_object(request))
    except ValidationError as e:
        raise ApiError(422, format_validation_error(e)) from None
    if req.removes_nothing:
        raise ApiError(422, "nothing to remove: give param_ratio (a share of all parameters), or mlp_ratio, "
                            "head_ratio, expert_ratio, drop_layers or drop_layer_ratio")
    if svc.plan_lock.locked():
        retry = max(1, math.ceil(svc.last_plan_seconds))
        raise ApiError(429, f"another plan is being computed or waiting for its turn; retry in {retry} s",
                       headers={"Retry-After": str(retry)})
    await svc.plan_lock.acquire()  # free: taken at once, no other request runs in between
    # The job owns the lock until its thread is done, even if this request is cancelled.
    job = asyncio.ensure_future(_locked_plan(svc, req))
    return Response(content=await asyncio.shield(job), media_type="application/json")


async def _locked_plan(svc: CaptureService, req: PlanRequest) -> bytes:
    started = time.monotonic()
    try:
        await asyncio.sleep(max(0.0, svc.next_plan_at - started))
        began = time.monotonic()
        stats = await svc.snapshot()
        if stats.tokens == 0:
            raise ApiError(409, "no tokens captured yet: send traffic (actprune collect) before planning")
        try:
            body, reading = await asyncio.to_thread(_plan_json, svc, stats, req)
        except ActpruneError as e:
            raise ApiError(422, str(e)) from None
        now = time.monotonic()
        svc.next_plan_at = now + PLAN_SPACING * max(0.0, now - began - reading)
        return body
    finally:
        svc.last_plan_seconds = time.monotonic() - started
        svc.plan_lock.release()


def _plan_json(svc: CaptureService, stats: Stats, req: PlanRequest) -> tuple[bytes, float]:
    """In a worker thread: the weight norms (read at the first weight-aware plan, then kept),
    the plan and its JSON; and the seconds spent reading weights."""
    norms, reading = svc.weight_norms(), 0.0

    def timed_norms(layer: int, kind: str) -> np.ndarray:
        nonlocal reading
        began = time.monotonic()
        try:
            return norms(layer, kind)
        finally:
            reading += time.monotonic() - began

    plan: Plan = make_plan(stats, svc.hf_config, req, None if norms is None else timed_norms)
    return plan.to_json().encode(), reading  # a dense plan stays the version-1 document
