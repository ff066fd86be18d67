"""Whole-model budget vs MLP-only on SmolLM2-135M-Instruct, no fine-tuning (issue 13).

    nice .venv/bin/python bench/compress_quality.py --cache /tmp/cq --budget 0.2
    .venv/bin/python bench/compress_quality.py --cache /tmp/cq --markdown

The budget is a fraction of the **non-embedding** parameters (SmolLM2's tied embeddings are a
fifth of the model and are never pruned); the planner's ``param_ratio`` counts every parameter,
so it is converted. Every configuration removes the same number of parameters (within one
MLP step) and is built in memory exactly as the shipped path writes it (``layerwise_refit``
installs what the slicer writes; tests check the equality):

- ``mlp|sens``: MLP neurons only, widths from measured MLP sensitivity (the best MLP-only
  path of issue 7: ``sensitivity`` -> ``plan --per-layer --layer-sensitivity`` -> refit; the
  MLP Δ of the whole-model measurement unless ``--mlp-sens``, to save a pass);
- ``all|uniform``: heads + MLP, the planner's uniform split of ``param_ratio`` (every layer
  loses the same share of MLP and KV groups), MLP and attention refitted;
- ``all|global``: heads + MLP allocated across layers and kinds from measured sensitivities
  (``actprune compress``), MLP and attention refitted;
- ``all|global|noattn``: the same plan, attention sliced without refit (what step 1 adds).

Data: calibration = the first ``--calib-docs`` ``wiki:calibration`` summaries (stats for the
scores, rows for refit and sensitivity); validation = the next 64 summaries (choices: ridge,
head mode); evaluation = held-out Wikipedia (``wiki:heldout``) and Newton's *Opticks* (out of
domain), never used to choose. Results are appended to ``CACHE/results.jsonl``.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch
from actprune.core.archs import model_shape
from actprune.core.planning.planner import make_plan
from actprune.core.tensor.checkpoint import ColumnNorms
from actprune.core.wire.plan import Plan
from actprune.core.wire.plan_request import PlanRequest
from actprune.core.wire.stats import Stats
from actprune.pruning.compensate import calibrate
from actprune.pruning.compensate.sensitivity import layer_sensitivity
from actprune.pruning.data import pack, tokenize, wiki_texts
from actprune.pruning.fixtures.smollm2 import ensure_smollm2
from actprune.pruning.record import Recorder, batches
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).parent))
from quality import perplexities  # noqa: E402
from texts import opticks as ood_text  # noqa: E402


class Setup:
    def __init__(self, args: argparse.Namespace) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.args, self.cache = args, Path(args.cache)
        self.model_dir = ensure_smollm2(self.cache / "models")
        self.config = json.loads((self.model_dir / "config.json").read_text())
        self.shape = model_shape(self.config)
        self.norms = ColumnNorms.of(self.model_dir)
        self.tok = AutoTokenizer.from_pretrained(str(self.model_dir))
        self.dense = AutoModelForCausalLM.from_pretrained(str(self.model_dir), dtype=torch.float32).eval()
        eos, n, L = self.tok.eos_token_id, args.calib_docs, args.seq_len
        docs = wiki_texts("calibration")
        self.calib_ids = [ids[:L] for ids in tokenize(self.tok, docs[:n])]
        self.calib_rows = pack(self.calib_ids, L, eos)[: args.calib_tokens // L]  # (N, L)
        self.rows = {
            "val": pack(tokenize(self.tok, docs[n: n + 64]), L, eos)[: args.val_tokens // L],
            "wiki": pack(tokenize(self.tok, wiki_texts("heldout")), L, eos)[: args.eval_tokens // L],
            "ood": pack(tokenize(self.tok, [ood_text()]), L, eos)[: args.ood_tokens // L],
        }
        self.stats = self._stats()

    @torch.no_grad()
    def _stats(self) -> Stats:
        path = self.cache / f"stats-{self.args.calib_docs}.safetensors"
        if not path.is_file():
            rec = Recorder(self.dense)
            rec.install()
            for ids, mask in tqdm(batches(self.calib_ids, 8, self.tok.pad_token_id or 0), desc="stats"):
                rec.forward(ids, mask)
            rec.remove()
            rec.stats(str(self.model_dir), self.config).save(path)
        return Stats.load(path)

    def plan(self, **fields) -> Plan:
        return make_plan(self.stats, self.config, PlanRequest(**{"strategy": "wifv", **fields}), self.norms)

    def perplexity(self, model: torch.nn.Module) -> dict[str, float]:
        return perplexities(model, self.rows)

    def sensitivity(self, plan: Plan, ridge: float) -> tuple[dict[int, float], dict[int, float]]:
        """(MLP Δ, head Δ) per layer for the plan's keep lists, cached by plan shape and ridge."""
        tag = "-".join(f"{len(lp.mlp_keep)}.{len(lp.heads_keep)}" for lp in plan.layers[:1])
        path = self.cache / f"sens-{tag}-{plan.params_after}-{ridge:g}.json"
        if path.is_file():
            rec = json.loads(path.read_text())
            return {int(k): v for k, v in rec["mlp"].items()}, {int(k): v for k, v in rec["attn"].items()}
        src = plan.source.widths
        keep = {lp.index: lp.mlp_keep for lp in plan.layers if len(lp.mlp_keep) < src[lp.index].intermediate_size}
        heads = {lp.index: (lp.heads_keep, lp.kv_heads_keep) for lp in plan.layers
                 if len(lp.heads_keep) < src[lp.index].num_attention_heads}
        attn: dict[int, float] = {}
        mlp = layer_sensitivity(self.dense, self.calib_rows, keep, heads=heads, attn_out=attn, ridge=ridge,
                                probe_rows=self.args.probe_rows, batch=2)
        path.write_text(json.dumps({"mlp": mlp, "attn": attn}))
        return mlp, attn


def build(s: Setup, plan: Plan, ridge: float, attention: bool = True) -> torch.nn.Module:
    model = copy.deepcopy(s.dense)
    src = plan.source.widths
    keep = {lp.index: lp.mlp_keep for lp in plan.layers if len(lp.mlp_keep) < src[lp.index].intermediate_size}
    heads = {lp.index: (lp.heads_keep, lp.kv_heads_keep) for lp in plan.layers
             if len(lp.heads_keep) < src[lp.index].num_attention_heads}
    if attention:
        calibrate.layerwise_refit(model, s.calib_rows, keep, attention=heads, attn_out={}, ridge=ridge, batch=2,
                                  progress=False)
    else:  # MLP refit, heads plainly sliced
        calibrate.layerwise_refit(model, s.calib_rows, keep, ridge=ridge, batch=2, progress=False)
        from actprune.core.tensor.hf_model import HfModel
        from actprune.pruning.compensate.layers import apply_attention

        view = HfModel.of(model)
        for i, (q, kv) in heads.items():
            apply_attention(view, view.layers[i], q, kv, plan.source.head_dim)
    return model


def configs(s: Setup, budget: float, ridge: float, head_mode: str) -> dict[str, Plan]:
    """Plans removing ``budget`` of the non-embedding parameters."""
    total = s.shape.params()
    embed = s.shape.global_params()
    nonembed = total - embed
    removed = budget * nonembed
    mlp_params = sum(3 * s.shape.hidden_size * ly.intermediate_size for ly in s.shape.layers)
    mlp_ratio = removed / mlp_params
    out = {}
    uniform = s.plan(param_ratio=removed / total, head_mode=head_mode)
    d_mlp2, d_attn = s.sensitivity(uniform, ridge)
    # MLP-only widths: p ∝ Δ^-e uses only the ratios of the Δ, so the MLP Δ of the uniform
    # whole-model plan serve (measured at its MLP share, not at mlp_ratio) unless asked to measure
    d_mlp = s.sensitivity(s.plan(mlp_ratio=mlp_ratio), ridge)[0] if s.args.mlp_sens else d_mlp2
    out["mlp|sens"] = s.plan(mlp_ratio=mlp_ratio, per_layer=True, layer_sensitivity=[d_mlp[i] for i in sorted(d_mlp)])
    out["all|uniform"] = uniform
    src = uniform.source.widths
    at = {"mlp": 1 - len(uniform.layers[0].mlp_keep) / src[0].intermediate_size,
          "attn": 1 - len(uniform.layers[0].heads_keep) / src[0].num_attention_heads}
    n = s.shape.num_layers
    cap = at["attn"] if s.args.heads_at_measured else None  # variant: heads at most as measured
    out["all|global"] = s.plan(param_ratio=removed / total, head_mode=head_mode, head_cap=cap,
                               layer_sensitivity=[d_mlp2.get(i, 0.0) for i in range(n)],
                               head_sensitivity=[d_attn.get(i, 0.0) for i in range(n)], sensitivity_at=at)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache", default="/tmp/actprune-compress")
    p.add_argument("--budget", type=float, nargs="+", default=[0.2], help="fractions of non-embedding params")
    p.add_argument("--ridge", type=float, nargs="+", default=[1e-2])
    p.add_argument("--head-mode", nargs="+", default=["kv_groups"])
    p.add_argument("--mlp-sens", action="store_true", help="measure MLP-only sensitivity at the MLP-only ratio")
    p.add_argument("--heads-at-measured", action="store_true",
                   help="global variant: heads limited to the share their Δ was measured at (results key +|hm)")
    p.add_argument("--only", nargs="*", default=None, help="config names to run (default: all)")
    p.add_argument("--calib-docs", type=int, default=96)
    p.add_argument("--calib-tokens", type=int, default=8192)
    p.add_argument("--probe-rows", type=int, default=4)
    p.add_argument("--val-tokens", type=int, default=2048)
    p.add_argument("--eval-tokens", type=int, default=4096)
    p.add_argument("--ood-tokens", type=int, default=2048)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--markdown", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    path = Path(args.cache) / "results.jsonl"
    if args.markdown:
        print(markdown(path))
        return
    Path(args.cache).mkdir(parents=True, exist_ok=True)
    s = Setup(args)
    done = {json.loads(line)["key"] for line in path.read_text().splitlines()} if path.is_file() else set()
    if "dense" not in done:
        _append(path, {"key": "dense", **s.perplexity(s.dense)})
    for budget in args.budget:
        for ridge in args.ridge:
            for mode in args.head_mode:
                plans = configs(s, budget, ridge, mode)
                plans["all|global|noattn"] = plans["all|global"]
                for name, plan in plans.items():
                    key = f"{name}|{budget}|ridge={ridge:g}|{mode}" + ("|hm" if args.heads_at_measured else "")
                    if key in done or (args.only and name not in args.only):
                        continue
                    t0 = time.time()
                    model = build(s, plan, ridge, attention=not name.endswith("noattn"))
                    rec = {"key": key, **s.perplexity(model), "params_removed": plan.params_before - plan.params_after,
                           "kv_heads": [w.num_key_value_heads for w in plan.widths],
                           "mlp": [w.intermediate_size for w in plan.widths], "s": round(time.time() - t0)}
                    tqdm.write(json.dumps(rec))
                    _append(path, rec)


def _append(path: Path, rec: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(rec) + "\n")


def markdown(path: Path) -> str:
    recs = [json.loads(line) for line in path.read_text().splitlines()]
    dense = next(r for r in recs if r["key"] == "dense")
    lines = ["| config | params removed | val | wiki | ood |", "|---|---|---|---|---|"]
    for r in recs:
        if r["key"] != "dense":
            lines.append(f"| {r['key']} | {r['params_removed']:,} | " + " | ".join(
                f"{r[k] / dense[k]:.3f}" for k in ("val", "wiki", "ood")) + " |")
    return "\n".join(["dense perplexity: " + ", ".join(f"{k} {dense[k]:.2f}" for k in ("val", "wiki", "ood")),
                      *lines])


if __name__ == "__main__":
    main()
