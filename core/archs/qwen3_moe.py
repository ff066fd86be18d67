"""Qwen3-MoE (Qwen3-30B-A3B, Qwen3-235B-A22B, Qwen3-Coder-30B-A3B): Qwen3's attention (with
``q_norm`` / ``k_norm``) and, in each sparse layer, routed experts instead of the dense MLP.

A sparse layer's ``mlp`` is a router ``mlp.gate`` — an (E, hidden) linear whose softmax picks the
top-k of E experts per token, renormalised when ``norm_topk_prob`` — and the experts
``mlp.experts``; vLLM runs them as one fused kernel (``FusedMoE``), so there is no
``mlp.down_proj`` to hook and capture reads the router's logits instead (docs/moe.md). Layers in
``mlp_only_layers``, and all but every ``decoder_sparse_step``-th, keep a dense Qwen3 MLP.
Expert pruning (docs/moe.md): a plan keeps the same number of routed experts in every sparse
layer (a stock config) or its own number per layer (the actprune architecture, which builds
``decoder_layer`` per layer); the slicer drops the others' ``mlp.experts.{e}.*``, renumbers the
kept ones and keeps their rows of the router ``mlp.gate.weight`` (the registry's
:class:`MoeLayout` names them).
"""

from __future__ import annotations

from .spec import ArchSpec, HfLayout, MoeLayout, VllmLayout

__all__ = ["SPEC"]

SPEC = ArchSpec(
    architecture="Qwen3MoeForCausalLM",
    model_type="qwen3_moe",
    hf=HfLayout(q_norm="self_attn.q_norm", k_norm="self_attn.k_norm"),
    vllm=VllmLayout(router_out="mlp.gate",
                    decoder_layer="vllm.model_executor.models.qwen3_moe:Qwen3MoeDecoderLayer"),
    moe=MoeLayout(),
    # 8 experts of width 64, top-2, renormalised as in Qwen3-30B-A3B; every layer sparse
    tiny_config={"attention_bias": False, "num_experts": 8, "num_experts_per_tok": 2,
                 "moe_intermediate_size": 64, "norm_topk_prob": True, "decoder_sparse_step": 1,
                 "mlp_only_layers": [], "output_router_logits": False},
)
