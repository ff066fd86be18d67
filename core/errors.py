"""The one base class of errors a user can fix.

Every mistake in the user's input — a malformed stats file or plan, a checkpoint that does not
fit, a bad flag, an unreadable JSONL line — raises a subclass of :class:`ActpruneError` whose
message names the problem and the fix. The ``actprune`` command prints such an error as one
line and exits with code 2; the HTTP routes answer it with a 4xx and ``{"detail": message}``.
Anything else is a bug or an outage and keeps its traceback.
"""

from __future__ import annotations

__all__ = ["ActpruneError", "UsageError"]


class ActpruneError(ValueError):
    """A mistake the user can fix; the message says what and how."""


class UsageError(ActpruneError):
    """A command-line mistake found by a command itself (a flag out of range, flags that
    contradict each other)."""
