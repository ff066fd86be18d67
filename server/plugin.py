"""The ``vllm.general_plugins`` entry point.

vLLM calls ``register()`` in every process it starts (API server, engine core, workers), maybe
more than once: it must be idempotent and cheap. It imports the loader module lazily — that
module registers the ``actprune`` load format and the ``actprune::*`` custom ops.
"""

from __future__ import annotations

__all__ = ["register"]

_registered = False


def register() -> None:
    global _registered
    if _registered:
        return
    _registered = True
    from . import loader  # noqa: F401  (registers the load format on import)
    from .models import register as register_models  # ActpruneForCausalLM, by name (lazy)

    register_models()
