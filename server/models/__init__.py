"""vLLM model classes of actprune, registered by the general plugin (:func:`register`).

``register()`` names the class by string, so vLLM imports it only when a checkpoint asks for
it, and teaches transformers' ``AutoConfig`` the ``actprune`` model type, so that vLLM reads
the config of a pruned checkpoint without ``--trust-remote-code``.
"""

from __future__ import annotations

__all__ = ["register"]


def register() -> None:
    from actprune.core.archs import ACTPRUNE_ARCHITECTURE
    from actprune.core.tensor.modeling.configuration_actprune import ActpruneConfig
    from transformers import AutoConfig
    from vllm import ModelRegistry

    AutoConfig.register(ActpruneConfig.model_type, ActpruneConfig, exist_ok=True)
    ModelRegistry.register_model(ACTPRUNE_ARCHITECTURE, "actprune.server.models.actprune:ActpruneForCausalLM")
