"""Whole-model pruning methods reproduced at the same non-embedding parameter count as ours
(issue 13), on SmolLM2-135M-Instruct, no fine-tuning.

    nice .venv/bin/python bench/baselines.py --cache /tmp/cq13b --budget 0.2
    .venv/bin/python bench/baselines.py --cache /tmp/cq13b --markdown

Every baseline is a :class:`Plan` written through the slicer (``slice_checkpoint``, with the
stats for FLAP's bias) and loaded back with transformers, so what is measured is the checkpoint
a user would get. A budget is a fraction of the **non-embedding** parameters (as in
``bench/compress_quality.py``); each method removes that many within one of its steps:

- ``shortgpt``: ShortGPT's block influence (1 - mean cos(residual in, residual out), from the
  calibration stats); the lowest-BI layers dropped, as many as the budget holds (SmolLM2: one
  layer is 1/30 of the non-embedding parameters, so 20 % = 6 layers exactly).
- ``wanda_sp``: structured Wanda, ‖x_j‖₂ · ‖W[:, j]‖₂ summed per neuron / KV group, uniform:
  the planner's ``--param-ratio`` split (every layer gives up the same share of MLP and heads).
- ``flap``: FLAP's fluctuation metric Var[x_j] · ‖W[:, j]‖², standardised within each layer and
  module (attention per channel, then averaged over a head's channels and a KV group's heads, as
  FLAP's "AL-AM" structure), one global ranking of heads and neurons weighted by their parameter
  counts, bias compensation (the removed channels' mean output folded into biases).
- ``taylor``: LLM-Pruner's first-order element importance, Σ |w · ∂L/∂w| over a structure's
  weights (gate/up rows + down column per neuron; q/k/v rows + o columns per KV group), from
  calibration gradients, with the uniform per-layer counts of ``wanda_sp``; no compensation
  (the paper's LoRA recovery is fine-tuning, excluded here); ``taylor|ends``: the paper's default
  layout instead, the first 4 and last 2 layers kept whole (its 4 and 2 of LLaMA-7B's 32), the
  others pruned alike.
- ``ours|all``, ``ours|all-hm``, ``ours|mlp``: three candidates of ``actprune compress``
  (``budget``, ``heads-capped``, ``mlp``: :func:`candidate_requests`, the same code; its fourth,
  ``mlp-ends``, is measured through the real command and ``--score``), built in
  memory as the slicer writes them (``bench/compress_quality.py``'s ``build``), from the
  sensitivity measured at ``--ref-budget`` (20 %; at other budgets the same Δ, as the cost
  model intends). A cached figure of one counts only if its plan is the one compress makes now.
- ``compress``: not built; the row compress would keep of these three, the one with the lowest
  validation perplexity (compress's :func:`choose`; its validation rows are held-out rows of
  ``--data``, here the next 64 calibration summaries that neither probe nor refit read).

Data and choices as in ``bench/compress_quality.py``: calibration = the first ``--calib-docs``
``wiki:calibration`` summaries, validation = the next 64 (every choice), evaluation =
held-out Wikipedia and the three out-of-domain texts of ``bench/texts.py``, never used to choose.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
from actprune.core.archs import LayerShape
from actprune.core.planning.planner import _channel_scores
from actprune.core.planning.scores import standardise
from actprune.core.wire.plan import Plan
from actprune.core.wire.plan_request import PlanRequest
from actprune.pruning.candidates import candidate_requests, choose
from actprune.pruning.checkpoint.hf_io import load_causal_lm
from actprune.pruning.checkpoint.slicer import slice_checkpoint
from actprune.pruning.data import pack, tokenize
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).parent))
from compress_quality import Setup, build  # noqa: E402
from quality_results import append, load_results  # noqa: E402
from texts import ood_texts  # noqa: E402

TEXTS = ("val", "wiki", "opticks", "pydoc", "code")
METHODS = ("compress", "ours|mlp", "ours|all-hm", "ours|all", "shortgpt", "wanda_sp", "flap", "taylor", "taylor|ends")


# ---- plans ------------------------------------------------------------------------------------
def removed_params(s: Setup, budget: float) -> int:
    return round(budget * (s.shape.params() - s.shape.global_params()))


def with_keeps(s: Setup, template: Plan, mlp: dict[int, list[int]],
               heads: dict[int, tuple[list[int], list[int]]]) -> Plan:
    """``template`` (no dropped layers) with other keep lists; widths and counts recomputed."""
    layers = [lp.model_copy(update={"mlp_keep": sorted(mlp[lp.index]), "heads_keep": sorted(heads[lp.index][0]),
                                    "kv_heads_keep": sorted(heads[lp.index][1])}) for lp in template.layers]
    widths = [w.model_copy(update={"intermediate_size": len(lp.mlp_keep), "num_attention_heads": len(lp.heads_keep),
                                   "num_key_value_heads": len(lp.kv_heads_keep)})
              for w, lp in zip(template.widths, layers, strict=True)]
    after = s.shape.params(tuple(LayerShape(w.intermediate_size, w.num_attention_heads, w.num_key_value_heads)
                                 for w in widths))
    plan = template.model_copy(update={"layers": layers, "widths": widths, "params_after": after,
                                       "uniform": len({(w.intermediate_size, w.num_key_value_heads) for w in widths}) == 1,
                                       "bytes_after": after * s.shape.dtype_bytes})
    plan.check(source="baseline")
    return plan


def shortgpt(s: Setup, budget: float) -> Plan:
    per_layer = s.shape.layer_params(s.shape.layers[0])
    return s.plan(drop_layers=round(removed_params(s, budget) / per_layer), layer_strategy="block_influence")


def wanda_sp(s: Setup, budget: float) -> Plan:
    return s.plan(strategy="wanda_sp", param_ratio=removed_params(s, budget) / s.shape.params(), head_mode="kv_groups")


def _group_size(s: Setup, i: int) -> int:
    ly = s.shape.layers[i]
    return ly.num_attention_heads // ly.num_key_value_heads


def flap(s: Setup, budget: float) -> Plan:
    """FLAP's AL-AM: z-scored fluctuation per layer and module, one global greedy cut by params."""
    req = PlanRequest(strategy="wifv")
    units = []  # (z, layer, kind, index, params)
    d, hsz = s.shape.head_dim, s.shape.hidden_size
    for i, ly in enumerate(s.shape.layers):
        zm = standardise(_channel_scores(s.stats, i, "mlp", req, s.norms))  # (I,)
        units += [(float(z), i, "mlp", j, 3 * hsz) for j, z in enumerate(zm)]
        za = standardise(_channel_scores(s.stats, i, "attn", req, s.norms))  # (heads·D,)
        g = _group_size(s, i)
        zg = za.reshape(ly.num_key_value_heads, g * d).mean(axis=1)  # (K, g·D) -> (K,)
        units += [(float(z), i, "kv", k, 2 * hsz * d * (g + 1)) for k, z in enumerate(zg)]
    pools = {(i, "mlp"): set(range(ly.intermediate_size)) for i, ly in enumerate(s.shape.layers)}
    pools |= {(i, "kv"): set(range(ly.num_key_value_heads)) for i, ly in enumerate(s.shape.layers)}
    global_cut(units, pools, removed_params(s, budget))
    mlp = {i: pools[i, "mlp"] for i in range(s.shape.num_layers)}
    kv = {i: pools[i, "kv"] for i in range(s.shape.num_layers)}
    heads = {i: ([k * _group_size(s, i) + h for k in sorted(kv[i]) for h in range(_group_size(s, i))], sorted(kv[i]))
             for i in kv}
    return with_keeps(s, wanda_sp(s, budget), {i: sorted(m) for i, m in mlp.items()}, heads)


def global_cut(units: list[tuple[float, int, str, int, int]], pools: dict[tuple[int, str], set[int]],
               budget: int) -> int:
    """Remove units, lowest score first, from ``pools`` ((layer, kind) -> kept unit indices, in
    place) while each fits in what is left of ``budget``; a pool keeps at least one unit.
    units: (score, layer, kind, index, params). Returns the parameters left unremoved."""
    for _, i, kind, j, p in sorted(units):
        pool = pools[i, kind]
        if p <= budget and len(pool) > 1 and j in pool:
            pool.discard(j)
            budget -= p
    return budget


def group_importance(imp: dict[str, torch.Tensor], kv_heads: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-structure sums of element importances |w · g| of one layer: (I,) per MLP neuron (gate
    and up rows ``g``/``u`` (I, H), down column ``d`` (H, I)) and (K,) per KV group (q rows
    (heads·D, H), o columns (H, heads·D), k/v rows (K·D, H); a group's query heads are contiguous)."""
    mlp = imp["g"].sum(1) + imp["u"].sum(1) + imp["d"].sum(0)  # (I,)
    per_q = (imp["q"].sum(1) + imp["o"].sum(0)).reshape(kv_heads, -1).sum(1)  # (heads·D,) -> (K, g·D) -> (K,)
    per_kv = (imp["k"].sum(1) + imp["v"].sum(1)).reshape(kv_heads, head_dim).sum(1)  # (K·D,) -> (K,)
    return mlp, per_q + per_kv


def taylor_scores(s: Setup, rows: int) -> dict[str, torch.Tensor]:
    """Σ |w · ∂L/∂w| per MLP neuron (``layers.i.mlp``, (I,)) and KV group (``layers.i.kv``, (K,)),
    the gradient of the summed loss over ``rows`` calibration rows; cached."""
    path = s.cache / f"taylor-{s.args.calib_docs}-{rows}.safetensors"
    if path.is_file():
        return load_file(str(path))
    model = s.dense
    for p in model.parameters():
        p.requires_grad_(False)
    lins = [m for ly in model.model.layers for m in (ly.self_attn.q_proj, ly.self_attn.k_proj, ly.self_attn.v_proj,
                                                    ly.self_attn.o_proj, ly.mlp.gate_proj, ly.mlp.up_proj,
                                                    ly.mlp.down_proj)]
    for m in lins:
        m.weight.requires_grad_(True)
    for r in tqdm(s.calib_rows[:rows].split(1), desc="gradients", unit="row"):
        out = model(input_ids=r, labels=r)
        out.loss.backward()
    d, out = s.shape.head_dim, {}
    with torch.no_grad():
        for i, ly in enumerate(model.model.layers):
            a, m = ly.self_attn, ly.mlp
            imp = {n: (lin.weight * lin.weight.grad).abs() for n, lin in
                   (("q", a.q_proj), ("k", a.k_proj), ("v", a.v_proj), ("o", a.o_proj),
                    ("g", m.gate_proj), ("u", m.up_proj), ("d", m.down_proj))}
            out[f"layers.{i}.mlp"], out[f"layers.{i}.kv"] = group_importance(imp, s.shape.layers[i].num_key_value_heads, d)
    for m in lins:
        m.weight.grad = None
        m.weight.requires_grad_(False)
    out = {k: v.double().contiguous() for k, v in out.items()}
    save_file(out, str(path))
    return out


def ends_counts(s: Setup, budget: float, first: int, last: int) -> dict[int, tuple[int, int]]:
    """LLM-Pruner's default layout: the first ``first`` and last ``last`` layers kept whole, the
    others pruned alike (same share of heads, rounded to KV groups; the MLP fills the rest).
    Layer -> (kept neurons, kept KV groups)."""
    n, ly = s.shape.num_layers, s.shape.layers[0]
    pruned = range(first, n - last)
    share = removed_params(s, budget) / (len(pruned) * s.shape.layer_params(ly))
    kv = max(1, math.floor((1 - share) * ly.num_key_value_heads + 0.5))
    freed = s.shape.layer_params(ly) - s.shape.layer_params(LayerShape(ly.intermediate_size,
                                                                      kv * _group_size(s, 0), kv))
    neurons = math.floor((removed_params(s, budget) / len(pruned) - freed) / (3 * s.shape.hidden_size))
    return {i: (ly.intermediate_size - neurons, kv) if i in pruned else (ly.intermediate_size, ly.num_key_value_heads)
            for i in range(n)}


def taylor(s: Setup, budget: float, rows: int, ends: bool = False) -> Plan:
    """Taylor keep lists at the planner's uniform counts, or (``ends``) the paper's layout with the
    first 4 and last 2 layers kept (LLaMA-7B's 4 and 2 of 32)."""
    scores, uni = taylor_scores(s, rows), wanda_sp(s, budget)
    counts = ends_counts(s, budget, 4, 2) if ends else {lp.index: (len(lp.mlp_keep), len(lp.kv_heads_keep))
                                                         for lp in uni.layers}
    mlp, heads = {}, {}
    for i, (c_mlp, c_kv) in counts.items():
        g = _group_size(s, i)
        mlp[i] = torch.argsort(-scores[f"layers.{i}.mlp"])[:c_mlp].tolist()
        kv = sorted(torch.argsort(-scores[f"layers.{i}.kv"])[:c_kv].tolist())
        heads[i] = ([k * g + h for k in kv for h in range(g)], kv)
    return with_keeps(s, uni, mlp, heads)


OURS = {"ours|all": "budget", "ours|all-hm": "heads-capped", "ours|mlp": "mlp"}  # bench name -> compress's


def ours(s: Setup, budget: float, name: str) -> Plan:
    """The compress candidate ``name`` stands for, planned by compress's own
    :func:`candidate_requests` from the sensitivity measured at ``--ref-budget``."""
    ridge, total = s.args.ridge, s.shape.params()
    ref = s.plan(param_ratio=removed_params(s, s.args.ref_budget) / total, head_mode="kv_groups")
    d_mlp, d_attn = s.sensitivity(ref, ridge)  # measured once, at the reference budget
    n, src = s.shape.num_layers, ref.source.widths
    sens = {"layer_sensitivity": [d_mlp.get(i, 0.0) for i in range(n)],
            "head_sensitivity": [d_attn.get(i, 0.0) for i in range(n)],
            "sensitivity_at": {"mlp": 1 - len(ref.layers[0].mlp_keep) / src[0].intermediate_size,
                               "attn": 1 - len(ref.layers[0].heads_keep) / src[0].num_attention_heads}}
    base = {"param_ratio": removed_params(s, budget) / total, "head_mode": "kv_groups"}
    return s.plan(**candidate_requests(base, sens, s.shape)[OURS[name]])


def compress_choice(recs: list[dict]) -> dict | None:
    """The row ``actprune compress`` keeps at one budget: of our candidates, the lowest
    validation perplexity (compress's own :func:`choose`); None until all three are measured."""
    ours_ = {r["method"]: r for r in recs if r["method"] in OURS}
    if len(ours_) < len(OURS):
        return None
    name = {c: m for m, c in OURS.items()}
    best = name[choose({OURS[m]: math.log(r["val"]) for m, r in ours_.items()}, prefer="mlp")]
    return {**ours_[best], "method": "compress", "chosen": best}


def make(s: Setup, method: str, budget: float) -> Plan:
    if method.startswith("ours"):
        return ours(s, budget, method)
    if method.startswith("taylor"):
        return taylor(s, budget, s.args.grad_rows, ends=method.endswith("ends"))
    return {"shortgpt": shortgpt, "wanda_sp": wanda_sp, "flap": flap}[method](s, budget)


def check_cached(rec: dict, plan: Plan) -> None:
    widths = ([w.intermediate_size for w in plan.widths], [w.num_key_value_heads for w in plan.widths])
    if (rec["mlp"], rec["kv_heads"]) != widths or rec["params_removed"] != plan.params_before - plan.params_after:
        raise SystemExit(f"{rec['key']}: the cached result is of another plan than ours now; remove its line")


# ---- evaluation -------------------------------------------------------------------------------
def evaluate(s: Setup, method: str, plan: Plan) -> dict[str, float]:
    if method.startswith("ours"):  # built in memory as the slicer writes it (tests check)
        return s.perplexity(build(s, plan, s.args.ridge))
    out = s.cache / "ckpt"
    slice_checkpoint(s.model_dir, plan, out, stats=s.stats if method == "flap" else None, overwrite=True,
                     progress=False)
    try:
        return s.perplexity(load_causal_lm(out, torch.float32))
    finally:
        shutil.rmtree(out, ignore_errors=True)


def add_ood_rows(s: Setup) -> None:
    eos, L = s.tok.eos_token_id, s.args.seq_len
    s.rows.pop("ood", None)
    for name, text in ood_texts().items():
        s.rows[name] = pack(tokenize(s.tok, [text]), L, eos)[: s.args.ood_tokens // L]


LABELS = {
    "compress": "**`actprune compress`**: the candidate validation picks",
    "ours|mlp": "ours: MLP only, measured-sensitivity widths + refit",
    "ours|all-hm": "ours: heads (≤ measured share) + MLP, allocated, refit",
    "ours|all": "ours: heads + MLP, allocated (each pool ≤ 2 × measured share), refit",
    "shortgpt": "ShortGPT: lowest-block-influence layers dropped",
    "wanda_sp": "Wanda-sp: heads + MLP, uniform",
    "flap": "FLAP: fluctuation, global AL-AM structure, bias",
    "taylor": "LLM-Pruner Taylor: heads + MLP, uniform over all layers",
    "taylor|ends": "LLM-Pruner Taylor: paper layout (first 4, last 2 layers kept)",
}


def markdown(path: Path) -> str:
    """One table: a row per budget and method, cells perplexity ÷ dense, the best of each
    budget's column in bold."""
    res = load_results(path)
    dense = res["dense"]
    lines = ["dense perplexity: " + ", ".join(f"{t} {dense[t]:.2f}" for t in TEXTS), "",
             "| budget | method | removed | " + " | ".join(TEXTS) + " |", "|---|---|---|" + "---|" * len(TEXTS)]
    recs = [r for r in res.values() if r["key"] != "dense"]
    for budget in sorted({r["budget"] for r in recs}):
        rows = [r for r in recs if r["budget"] == budget]
        rows = sorted([*rows, *filter(None, [compress_choice(rows)])], key=lambda r: METHODS.index(r["method"]))
        best = {t: min(r[t] / dense[t] for r in rows if t in r) for t in TEXTS}
        for r in rows:  # a text a record lacks (imported from an earlier run): –
            cells = [f"**{r[t] / dense[t]:.2f}**" if t in r and r[t] / dense[t] == best[t]
                     else f"{r[t] / dense[t]:.2f}" if t in r else "–" for t in TEXTS]
            label = LABELS[r["method"]] + (f" (`{OURS[r['chosen']]}`)" if "chosen" in r else "")
            lines.append(f"| {int(budget * 100)} % | {label} | {r['params_removed'] / 1e6:.2f} M | "
                         + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache", default="/tmp/actprune-baselines")
    p.add_argument("--budget", type=float, nargs="+", default=[0.2], help="fractions of non-embedding params")
    p.add_argument("--methods", nargs="+", default=list(METHODS[1:]), choices=METHODS[1:])
    p.add_argument("--ref-budget", type=float, default=0.2, help="budget ours' sensitivity is measured at")
    p.add_argument("--ridge", type=float, default=1e-2)
    p.add_argument("--grad-rows", type=int, default=8, help="calibration rows for the Taylor gradients")
    p.add_argument("--calib-docs", type=int, default=64)
    p.add_argument("--calib-tokens", type=int, default=8192)
    p.add_argument("--probe-rows", type=int, default=2)
    p.add_argument("--val-tokens", type=int, default=2048)
    p.add_argument("--eval-tokens", type=int, default=4096)
    p.add_argument("--ood-tokens", type=int, default=2048)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--markdown", action="store_true")
    p.add_argument("--dry-run", action="store_true", help="plan only: check cached results, list what is missing")
    p.add_argument("--score", default=None, metavar="DIR", help="score a checkpoint (e.g. compress's OUT) on the rows")
    args = p.parse_args()
    args.mlp_sens = args.heads_at_measured = False  # read by Setup
    torch.set_num_threads(args.threads)
    path = Path(args.cache) / "results.jsonl"
    if args.markdown:
        print(markdown(path))
        return
    s = Setup(args)
    add_ood_rows(s)
    done = load_results(path)
    if "dense" not in done:
        append(path, {"key": "dense", **s.perplexity(s.dense)})
    if args.score:
        ppl = s.perplexity(load_causal_lm(args.score, torch.float32))
        print(json.dumps({"score": args.score, **ppl}))
        print(" | ".join(f"{t} {ppl[t] / load_results(path)['dense'][t]:.3f}" for t in TEXTS))
        return
    for budget in args.budget:
        for method in args.methods:
            key = f"{method}|{budget}"
            if key in done and not method.startswith("ours"):
                continue
            t0 = time.time()
            plan = make(s, method, budget)
            if key in done:  # a cached figure of ours counts only for the plan compress makes now
                check_cached(done[key], plan)
                continue
            if args.dry_run:
                print(f"{key}: to build, {plan.params_before - plan.params_after:,} removed, KV heads "
                      f"{[w.num_key_value_heads for w in plan.widths]}")
                continue
            rec = {"key": key, "method": method, "budget": budget, **evaluate(s, method, plan),
                   "params_removed": plan.params_before - plan.params_after, "dropped": plan.dropped_layers,
                   "kv_heads": [w.num_key_value_heads for w in plan.widths],
                   "mlp": [w.intermediate_size for w in plan.widths], "s": round(time.time() - t0)}
            tqdm.write(json.dumps(rec))
            append(path, rec)
    print(markdown(path))


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
