"""The error type of actprune's routes (kept apart so every route module can raise it)."""

from __future__ import annotations

from fastapi import HTTPException

__all__ = ["ApiError"]


class ApiError(HTTPException):
    """An HTTP error of an actprune route. vLLM turns plain HTTPExceptions into OpenAI-style
    ``{"error": ...}`` bodies; this subclass has its own handler so our answers keep the
    documented ``{"detail": "..."}`` (ErrorBody)."""
