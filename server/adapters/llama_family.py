"""vLLM names for the Llama-family decoders: Qwen3, Qwen2/2.5, Llama (SmolLM2 included).

In vLLM these share one layout: ``model.layers[i]`` with ``mlp.down_proj`` (RowParallelLinear,
input = act(gate) * up, sharded over tensor-parallel ranks) and ``self_attn.o_proj``
(RowParallelLinear, input = attention output, heads sharded over ranks); a decoder layer is
called as ``layer(positions, hidden_states, residual)`` and returns ``(hidden, residual)``.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

__all__ = ["ADAPTERS", "VllmAdapter", "adapter_for"]


@dataclass(frozen=True)
class VllmAdapter:
    architecture: str
    layers: str = "model.layers"
    mlp_in: str = "mlp.down_proj"
    attn_in: str = "self_attn.o_proj"
    # Positional index of (hidden_states, residual) in the decoder layer's call.
    hidden_arg: int = 1
    residual_arg: int = 2

    def decoder_layers(self, model: nn.Module) -> list[tuple[int, nn.Module]]:
        """(global index, layer) for the layers this rank owns; pipeline-parallel ranks hold
        placeholders (PPMissingLayer) for the others, which have no MLP."""
        layers = model.get_submodule(self.layers)
        return [
            (i, layer) for i, layer in enumerate(layers) if _has(layer, self.mlp_in)
        ]


def _has(module: nn.Module, path: str) -> bool:
    try:
        module.get_submodule(path)
    except AttributeError:
        return False
    return True


ADAPTERS: dict[str, VllmAdapter] = {
    arch: VllmAdapter(arch)
    for arch in (
        "Qwen3ForCausalLM",
        "Qwen2ForCausalLM",
        "LlamaForCausalLM",
        "MistralForCausalLM",
        "ActpruneForCausalLM",
    )
}


def adapter_for(architecture: str) -> VllmAdapter:
    try:
        return ADAPTERS[architecture]
    except KeyError:
        raise ValueError(
            f"actprune capture does not support architecture {architecture!r}; "
            f"supported: {sorted(ADAPTERS)}"
        ) from None
