"""``POST /prune/plan``: a pruning plan computed from the live stats of the served model.

The body carries the same fields as ``actprune plan`` (``{"strategy": "importance",
"mlp_ratio": 0.3, ...}``, see :class:`actprune.core.wire.plan.PlanRequest`); the answer is the
same plan JSON the CLI writes. The body is validated here rather than by FastAPI so that a
mistake comes back as one readable line (``{"detail": "mlp_ratio: ..."}``, 422).
"""

from __future__ import annotations

import asyncio

from actprune.core.errors import ActpruneError
from actprune.core.planning.planner import make_plan
from actprune.core.wire.api import ErrorBody
from actprune.core.wire.plan import Plan, PlanRequest, format_validation_error
from fastapi import APIRouter, Depends, Request
from pydantic import ValidationError

from .routes import ApiError, Service, require_key

__all__ = ["router"]

router = APIRouter(tags=["actprune"], dependencies=[Depends(require_key)])


@router.post(
    "/prune/plan",
    response_model=Plan,
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
        422: {"model": ErrorBody, "description": "The request or the plan is invalid."},
    },
)
async def plan(request: Request, svc: Service) -> Plan:
    try:
        body = await request.json()
    except ValueError:
        raise ApiError(422, "body must be a JSON object such as {\"mlp_ratio\": 0.3}") from None
    if not isinstance(body, dict):
        raise ApiError(422, "body must be a JSON object such as {\"mlp_ratio\": 0.3}")
    try:
        req = PlanRequest.model_validate(body)
    except ValidationError as e:
        raise ApiError(422, format_validation_error(e)) from None
    stats = await svc.snapshot()
    if stats.tokens == 0:
        raise ApiError(409, "no tokens captured yet: send traffic (actprune collect) before planning")
    try:
        return await asyncio.to_thread(make_plan, stats, svc.hf_config, req, svc.column_norms())
    except ActpruneError as e:
        raise ApiError(422, str(e)) from None
