"""A transformers model seen through its registry spec: the modules actprune reads and replaces,
found by the paths in :class:`~actprune.core.archs.HfLayout` (no names spelled here).

    view = HfModel.of(model)          # the spec comes from model.config.architectures
    for i, layer in enumerate(view.layers):
        gate, up, down = view.mlp(layer)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from actprune.core.archs import ArchSpec, spec_for_config
from torch import nn

__all__ = ["HfModel"]


@dataclass(frozen=True)
class HfModel:
    model: nn.Module
    spec: ArchSpec

    @classmethod
    def of(cls, model: nn.Module, spec: ArchSpec | None = None) -> HfModel:
        """The view of a transformers causal LM (spec from its config unless given)."""
        return cls(model, spec or spec_for_config(model.config.to_dict()))

    @property
    def layers(self) -> nn.ModuleList:
        return self.model.get_submodule(self.spec.hf.layers)

    @property
    def embed(self) -> nn.Module:
        return self.model.get_submodule(self.spec.hf.embed)

    @property
    def rotary(self) -> nn.Module:
        return self.model.get_submodule(self.spec.hf.rotary)

    @property
    def final_norm(self) -> nn.Module:
        return self.model.get_submodule(self.spec.hf.final_norm)

    def mlp(self, layer: nn.Module) -> tuple[nn.Linear, nn.Linear, nn.Linear]:
        """(gate_proj, up_proj, down_proj) of one decoder layer."""
        h = self.spec.hf
        return layer.get_submodule(h.gate_proj), layer.get_submodule(h.up_proj), layer.get_submodule(h.down_proj)

    def mlp_block(self, layer: nn.Module) -> nn.Module:
        """The module holding one layer's (gate_proj, up_proj, down_proj): its forward is the
        MLP, ``down(act(gate(x)) * up(x))``, whatever the family's activation."""
        return layer.get_submodule(self.spec.hf.gate_proj.rpartition(".")[0])

    def router(self, layer: nn.Module) -> nn.Module | None:
        """The router of an MoE layer (its output, or the output's first element, is the (T, E)
        router logits); None for a dense layer, also in an MoE model (``mlp_only_layers``)."""
        if self.spec.moe is None:
            return None
        try:
            return layer.get_submodule(self.spec.moe.router)
        except AttributeError:
            return None

    def experts(self, layer: nn.Module) -> tuple[nn.Module, Callable[[int, torch.Tensor], torch.Tensor]] | None:
        """(the experts module, expert e's output for inputs (n, H)) of an MoE layer; None for a
        dense layer. The module's forward takes (x (T, H), top-k ids, top-k weights). Outputs are
        computed in at least float32 from transformers' fused (E, 2I, H) / (E, H, I) weights."""
        moe = self.spec.moe
        if moe is None or self.router(layer) is None:
            return None
        module = layer.get_submodule(moe.experts)
        gate_up, down, act = (getattr(module, n) for n in (moe.hf_gate_up, moe.hf_down, moe.hf_act))

        def expert(e: int, x: torch.Tensor) -> torch.Tensor:
            dt = torch.promote_types(x.dtype, torch.float32)
            gate, up = F.linear(x.to(dt), gate_up[e].to(dt)).chunk(2, dim=-1)  # (n, I) each
            return F.linear(act(gate) * up, down[e].to(dt))  # (n, H)

        return module, expert

    def o_proj(self, layer: nn.Module) -> nn.Linear:
        return layer.get_submodule(self.spec.hf.o_proj)

    def attention(self, layer: nn.Module) -> tuple[nn.Module, nn.Linear, nn.Linear, nn.Linear, nn.Linear]:
        """(attention module, q_proj, k_proj, v_proj, o_proj) of one decoder layer."""
        h = self.spec.hf
        attn = layer.get_submodule(h.o_proj.rpartition(".")[0]) if "." in h.o_proj else layer
        return attn, *(layer.get_submodule(p) for p in (h.q_proj, h.k_proj, h.v_proj, h.o_proj))

    def set_attention(self, layer: nn.Module, q: nn.Module, k: nn.Module, v: nn.Module, o: nn.Module) -> None:
        """Replace one layer's attention projections (sliced, refitted, or the dense ones back)."""
        h = self.spec.hf
        for path, new in ((h.q_proj, q), (h.k_proj, k), (h.v_proj, v), (h.o_proj, o)):
            parent, _, attr = path.rpartition(".")
            setattr(layer.get_submodule(parent) if parent else layer, attr, new)

    def set_mlp(self, layer: nn.Module, gate: nn.Module, up: nn.Module, down: nn.Module) -> None:
        """Replace one layer's MLP projections (a sliced or refitted MLP, or the dense one back)."""
        h = self.spec.hf
        for path, new in ((h.gate_proj, gate), (h.up_proj, up), (h.down_proj, down)):
            parent, _, attr = path.rpartition(".")
            setattr(layer.get_submodule(parent) if parent else layer, attr, new)
