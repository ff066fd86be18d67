"""The refit of a plan: a checkpoint, a plan and calibration text -> the refitted output
projections of every kept unit (:func:`refit_for_plan`, what ``prune --refit`` and ``compress``
run), through the layer-by-layer pass of :mod:`.calibrate`."""

from __future__ import annotations

from pathlib import Path

import torch
from actprune.core.tensor.hf_model import HfModel
from actprune.core.wire.plan import Plan
from actprune.pruning.compensate.calibrate import Refits, layerwise_refit
from actprune.pruning.compensate.maths import DEFAULT_ANCHOR_WEIGHT, DEFAULT_RIDGE, mixture_weights

__all__ = ["refit_for_plan"]


def refit_for_plan(
    model_dir: str | Path,
    plan: Plan,
    data: str,
    *,
    tokens: int = 32768,
    seq_len: int = 512,
    ridge: float | str = DEFAULT_RIDGE,
    sequential: bool | str = False,
    text_field: str | None = None,
    reselect: bool = False,
    attention: bool = True,
    progress: bool = True,
    trust_remote_code: bool = False,
    anchor: str | None = None,
    anchor_weight: float | None = None,
    device: str | None = None,
    reconstruct: int = 0,
    mlp_rows: Refits | None = None,
) -> tuple[Plan, Refits, Refits]:
    """:func:`layerwise_refit` of the kept MLP neurons of ``plan`` (and, with ``attention``, of
    the kept heads' ``o_proj`` columns in layers that lose heads) over ``tokens`` tokens of
    ``data`` (a ``wiki:PART`` name or a .txt/.jsonl file), for ``slice_checkpoint(mlp_refit=,
    attn_refit=)``. Returns the plan (with ``reselect``, the same widths but the OBS-chosen
    neurons), the MLP refits and the attention refits. A plan that drops layers is refused (the
    refit is computed on the model with its layers in place). ``trust_remote_code``: run code
    the checkpoint's ``auto_map`` names (see :mod:`actprune.pruning.checkpoint.trust`).
    ``anchor``: text of other domains (a source like ``data``) mixed into every fit with
    ``anchor_weight`` of its weight (None: ``DEFAULT_ANCHOR_WEIGHT``): the refit then also
    reproduces the dense layers on text unlike ``data``, and holds up better when the traffic
    drifts (docs/plan.md). Its rows: as many as give its tokens that share unweighted (at least
    one; fewer when the anchor is shorter, the weights keep its share). ``device``: where the
    float32 model, the hidden states and the moments live and the solves run
    (:func:`~actprune.pruning.checkpoint.hf_io.compute_device`; None: a GPU when one is
    visible); the refits come back on the CPU. ``reconstruct``: passes of local reconstruction
    after each MLP refit (:mod:`.reconstruct`), whose gate/up rows go into ``mlp_rows`` (for
    ``slice_checkpoint(mlp_rows=)``)."""
    from actprune.pruning.checkpoint.hf_io import load_causal_lm, load_tokenizer
    from actprune.pruning.data import DataError, load_texts, pack, tokenize

    if plan.dropped_layers:
        raise DataError("refit does not support plans that drop layers; plan without --drop-layers")
    plan.refuse_experts("refit")  # before the calibration pass, not after
    tok = load_tokenizer(model_dir, trust_remote_code=trust_remote_code)
    texts = load_texts(data, text_field, tok)
    rows = pack(tokenize(tok, texts), seq_len, tok.eos_token_id)[: max(tokens // seq_len, 1)]  # (N, L)
    weights = None
    anchor_weight = DEFAULT_ANCHOR_WEIGHT if anchor_weight is None else anchor_weight
    if anchor is not None and anchor_weight > 0:
        want = max(1, round(rows.shape[0] * anchor_weight / (1.0 - anchor_weight)))
        try:
            extra = pack(tokenize(tok, load_texts(anchor, None, tok)), seq_len, tok.eos_token_id)[:want]
        except DataError as e:
            raise DataError(f"refit anchor {anchor}: {e}") from None
        weights = mixture_weights(rows.shape[0], extra.shape[0], anchor_weight)  # (N + M,)
        rows = torch.cat([rows, extra])
    model = load_causal_lm(model_dir, torch.float32, trust_remote_code=trust_remote_code,
                           device=device or "auto")
    view = HfModel.of(model)
    full = [view.mlp(ly)[2].in_features for ly in view.layers]
    keep = {lp.index: lp.mlp_keep for lp in plan.layers if len(lp.mlp_keep) < full[lp.index]}
    heads = {lp.index: (lp.heads_keep, lp.kv_heads_keep) for lp in plan.layers
             if attention and len(lp.heads_keep) < plan.source.widths[lp.index].num_attention_heads}
    attn: Refits = {}
    if reconstruct and mlp_rows is None:
        raise ValueError("reconstruct needs mlp_rows, the dict its gate/up rows go into")
    refits = layerwise_refit(model, rows, keep, attention=heads, attn_out=attn, ridge=ridge, sequential=sequential,
                             reselect=reselect, progress=progress, row_weights=weights, reconstruct=reconstruct,
                             mlp_rows=mlp_rows)
    if reselect:
        layers = [lp.model_copy(update={"mlp_keep": sorted(keep[lp.index])}) if lp.index in keep else lp
                  for lp in plan.layers]
        plan = plan.model_copy(update={"layers": layers})
        plan.check(source="refit")
    return plan, refits, attn
