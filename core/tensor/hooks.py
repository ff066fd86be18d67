"""The one object that owns every hook actprune puts on a model.

Nothing else in actprune calls ``register_forward_hook`` / ``register_forward_pre_hook``.
Handles are grouped by a name so that capture (vLLM) and the offline recorder (transformers)
can install, disable and remove their hooks without knowing about each other.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn
from torch.utils.hooks import RemovableHandle

__all__ = ["HookRegistry"]


class HookRegistry:
    """Register, disable and remove forward hooks, grouped by owner name."""

    def __init__(self) -> None:
        self._handles: dict[str, list[RemovableHandle]] = {}
        self._disabled: set[str] = set()

    def pre_hook(
        self, group: str, module: nn.Module, fn: Callable[..., Any], *, with_kwargs: bool = False
    ) -> RemovableHandle:
        """``fn(module, args[, kwargs])`` before ``module.forward``."""
        h = module.register_forward_pre_hook(self._gate(group, fn), with_kwargs=with_kwargs)
        self._handles.setdefault(group, []).append(h)
        return h

    def post_hook(
        self, group: str, module: nn.Module, fn: Callable[..., Any], *, with_kwargs: bool = False
    ) -> RemovableHandle:
        """``fn(module, args[, kwargs], output)`` after ``module.forward``."""
        h = module.register_forward_hook(self._gate(group, fn), with_kwargs=with_kwargs)
        self._handles.setdefault(group, []).append(h)
        return h

    def _gate(self, group: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        # Disabling is a Python-level switch read when the hook runs. Inside a compiled graph
        # that read happens once at trace time, so vLLM capture pauses with a device flag
        # instead (see actprune.server.capture); this switch serves eager models.
        def hook(*args: Any) -> Any:
            if group in self._disabled:
                return None
            return fn(*args)

        return hook

    def disable(self, group: str) -> None:
        self._disabled.add(group)

    def enable(self, group: str) -> None:
        self._disabled.discard(group)

    def remove(self, group: str) -> int:
        """Remove every hook of ``group``; returns how many were removed."""
        handles = self._handles.pop(group, [])
        for h in handles:
            h.remove()
        self._disabled.discard(group)
        return len(handles)

    def remove_all(self) -> None:
        for group in list(self._handles):
            self.remove(group)

    def count(self, group: str | None = None) -> int:
        if group is not None:
            return len(self._handles.get(group, []))
        return sum(len(v) for v in self._handles.values())
