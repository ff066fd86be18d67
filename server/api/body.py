"""Request bodies of actprune's POST routes: JSON only, bounded, and parsed without surprises.

* ``Content-Type: application/json`` is required (415 otherwise), even on routes whose body is
  empty (``{}``). A web page can make a browser send a cross-site "simple request" (a form
  post, or ``fetch`` with ``text/plain`` or no body) to any address without asking the server
  first; a JSON content type makes the browser ask (CORS preflight), which vLLM refuses unless
  ``--allowed-origins`` says otherwise. That is what keeps a page the operator happens to open
  from resetting a keyless server on their network.
* At most :data:`MAX_BODY_BYTES` are read (413 beyond); the JSON must be an object, and nesting
  too deep for the parser is a 422, never a RecursionError.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import Request

from .errors import ApiError

__all__ = ["MAX_BODY_BYTES", "read_json_object", "require_empty_json", "require_json"]

MAX_BODY_BYTES = 1 << 20  # a plan request is a few hundred bytes; 4096 sensitivities ≈ 100 kB
_EXAMPLE = 'such as {"mlp_ratio": 0.3}'


def require_json(request: Request) -> None:
    """Dependency of every POST route: refuse any body that is not declared as JSON."""
    media_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media_type != "application/json":
        got = f"'{media_type}'" if media_type else "none"
        raise ApiError(
            415, f"Content-Type must be application/json (got {got}); send a JSON body, {{}} when empty",
            headers={"Accept": "application/json"},
        )


async def read_json_object(request: Request, example: str = _EXAMPLE) -> dict[str, Any]:
    """The body as a JSON object: 413 when longer than MAX_BODY_BYTES, 422 when it is not one."""
    return _parse_object(await _read_bounded(request), example)


async def _read_bounded(request: Request) -> bytes:
    """The raw body, 413 past MAX_BODY_BYTES (declared or counted)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise _too_large()
    chunks, size = [], 0
    async for chunk in request.stream():  # counted as it arrives: Content-Length may be absent
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise _too_large()
        chunks.append(chunk)
    return b"".join(chunks)


def _parse_object(raw: bytes, example: str) -> dict[str, Any]:
    try:
        body = json.loads(raw)
    except RecursionError:
        raise ApiError(422, f"body is nested too deeply; send a flat JSON object {example}") from None
    except ValueError:  # also UnicodeDecodeError
        raise ApiError(422, f"body must be a JSON object {example}") from None
    if not isinstance(body, dict):
        raise ApiError(422, f"body must be a JSON object {example}")
    return body


async def require_empty_json(request: Request) -> None:
    """Dependency of the POST routes that take no fields (reset, pause, resume): an empty body or
    ``{}``. Anything else is refused before the action runs, so a mistyped request (a field the
    route does not have, a body cut short) does not reset the counts while looking accepted."""
    raw = await _read_bounded(request)
    if not raw.strip():
        return
    body = _parse_object(raw, "{}")
    if body:
        raise ApiError(422, f"this route takes no fields (got {sorted(body)[:5]}); send {{}}")


def _too_large() -> ApiError:
    return ApiError(413, f"body is larger than {MAX_BODY_BYTES} bytes; actprune's requests are small JSON objects")
