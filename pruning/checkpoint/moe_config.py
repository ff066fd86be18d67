"""config.json of a sliced mixture-of-experts checkpoint (Qwen3-MoE), for the slicer.

Every sparse layer keeping the same E' experts and every dense layer the same MLP width: the
stock config with ``num_experts`` = E' (and ``intermediate_size`` = the dense width). Otherwise
(per-layer expert counts or dense widths) the actprune architecture: the stock config with
``num_experts`` = the largest E', and ``actprune_layer_widths`` with one entry per layer, a
sparse layer's adding its own ``num_experts`` (its ``intermediate_size`` is the config's dense
width, which a sparse layer does not use: the experts' width is ``moe_intermediate_size``).
transformers' and vLLM's ``Qwen3MoeDecoderLayer`` built from that layer's config then hold E'_i
experts and an (E'_i, hidden) router — the checkpoint's tensors, names unchanged.

What neither form describes is refused: dropped layers (``mlp_only_layers`` and
``decoder_sparse_step`` count layers by index), pruned heads, neurons inside experts, biases.
"""

from __future__ import annotations

from typing import Any

from actprune.core.archs import ACTPRUNE_ARCHITECTURE, ACTPRUNE_MODEL_TYPE, ArchSpec
from actprune.core.errors import ActpruneError
from actprune.core.tensor.modeling import AUTO_MAP
from actprune.core.wire.plan import Plan

__all__ = ["as_actprune", "moe_output_config"]


def moe_output_config(out: dict[str, Any], spec: ArchSpec, plan: Plan, bias: dict[str, bool],
                      error: type[ActpruneError] = ActpruneError) -> dict[str, Any]:
    """``out`` (the source config without actprune keys) made the sliced model's config."""
    moe, src = spec.moe, plan.source
    heads_cut = [(w.num_attention_heads, w.num_key_value_heads) != (s.num_attention_heads, s.num_key_value_heads)
                 for w, s in zip(plan.widths, src.widths, strict=False)]
    neurons_cut = [w.intermediate_size != s.intermediate_size
                   for w, s in zip(plan.widths, src.widths, strict=False) if s.num_experts is not None]
    if plan.dropped_layers or any(bias.values()) or any(heads_cut) or any(neurons_cut):
        raise error("this plan needs pruned heads, dropped layers, neurons inside experts or biases, which "
                    "mixture-of-experts checkpoints do not support yet (docs/moe.md)")
    experts = [w.num_experts for w in plan.widths if w.num_experts is not None]
    dense = [w.intermediate_size for w in plan.widths if w.num_experts is None]
    if experts:
        out[moe.num_experts_key] = max(experts)
        if moe.num_experts_alias in out:  # transformers 5 writes this spelling; keep both equal
            out[moe.num_experts_alias] = out[moe.num_experts_key]
    if len(set(experts)) <= 1 and len(set(dense)) <= 1:
        if dense:
            out["intermediate_size"] = dense[0]
        out["architectures"], out["model_type"] = [spec.architecture], spec.model_type
        return out
    base_width = out["intermediate_size"]
    if dense:
        out["intermediate_size"] = max(dense)
    widths = []
    for w in plan.widths:
        entry = w.model_dump(exclude={"num_experts"})
        if w.num_experts is not None:  # a sparse layer: its experts, and the (unused) dense width
            entry.update(intermediate_size=base_width, num_experts=w.num_experts)
        widths.append(entry)
    return as_actprune(out, spec, widths, bias)


def as_actprune(out: dict[str, Any], spec: ArchSpec, widths: list[dict[str, int]],
                bias: dict[str, bool]) -> dict[str, Any]:
    """``out`` made a config of the actprune architecture over ``spec``'s family: per-layer
    ``widths`` (``actprune_layer_widths``), output ``bias``es, and the modeling files' auto_map."""
    out.update(
        architectures=[ACTPRUNE_ARCHITECTURE],
        model_type=ACTPRUNE_MODEL_TYPE,
        actprune_base_model_type=spec.model_type,
        actprune_base_architecture=spec.architecture,
        actprune_layer_widths=widths,
        actprune_bias=bias,
        auto_map=dict(AUTO_MAP),
    )
    return out
