"""Where the vLLM module names live: one adapter per architecture, as data.

Capture code asks an adapter for "the decoder layers, the module whose input is the MLP
activation, the module whose input is the attention output" and never spells a name itself.
"""

from __future__ import annotations

from .llama_family import ADAPTERS, VllmAdapter, adapter_for

__all__ = ["ADAPTERS", "VllmAdapter", "adapter_for"]
