"""The error type of actprune's routes (kept apart so every route module can raise it)."""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute

__all__ = ["ActpruneRoute", "ApiError", "validation_detail"]


class ApiError(HTTPException):
    """An HTTP error of an actprune route. vLLM turns plain HTTPExceptions into OpenAI-style
    ``{"error": ...}`` bodies; this subclass has its own handler so our answers keep the
    documented ``{"detail": "..."}`` (ErrorBody)."""


class ActpruneRoute(APIRoute):
    """The route class of actprune's routers: a request FastAPI cannot validate (a query
    parameter of the wrong type, say) is answered 422 with the one-line ``{"detail": "..."}``
    of every other actprune error, not FastAPI's list of error objects or vLLM's OpenAI error.
    Done per route, so the answer does not depend on which app-wide handler was added last."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handle = super().get_route_handler()

        async def route_handler(request: Request) -> Response:
            try:
                return await handle(request)
            except RequestValidationError as exc:
                return JSONResponse({"detail": validation_detail(exc.errors())}, status_code=422)

        return route_handler


def validation_detail(errors: Any) -> str:
    """One line from FastAPI's validation errors: 'query parameter k: Input should be less than
    or equal to 1000 (got 5000)'; at most the first three, the input echoed cut short."""
    parts = []
    for e in list(errors)[:3]:
        loc = [str(x) for x in e.get("loc", ())]
        where = f"{loc[0]} parameter {'.'.join(loc[1:])}" if len(loc) > 1 and loc[0] in ("query", "path", "header") \
            else ".".join(loc) or "request"
        got = f" (got {str(e['input'])[:40]!r})" if "input" in e and not isinstance(e["input"], dict) else ""
        parts.append(f"{where}: {e.get('msg', 'invalid')}{got}")
    return "; ".join(parts) or "invalid request"
