"""Quality of MLP-neuron pruning on a real model (SmolLM2-135M-Instruct), no fine-tuning.

    .venv/bin/python bench/quality.py --cache /tmp/aq --suite table      # issue 5 table
    .venv/bin/python bench/quality.py --cache /tmp/aq --suite issue7     # published rows + ours
    .venv/bin/python bench/quality.py --cache /tmp/aq --markdown         # print the tables

Setup (cached under --cache): the converted checkpoint (:mod:`actprune.pruning.fixtures.smollm2`);
activation stats and the full per-layer second moments of the ``down_proj`` input over 256
``wiki:calibration`` summaries, from the offline recorder (``--via-server``: the stats come from
``actprune serve`` fed the same summaries through the OpenAI API, pulled with
``Client.stats()``); packed evaluation rows of held-out Wikipedia (``wiki:heldout``) and of an
out-of-domain text (Newton's *Opticks*, Project Gutenberg, shipped in the PyPI package
apache-tvm-ffi), never used for calibration or choices.

A config is ``strategy|ratio|compensation|allocation``: strategy is a planner strategy, or the
baselines ``random`` / ``weight`` (‖gate_j‖² + ‖up_j‖² + ‖down_j‖²), or ``obs`` (greedy optimal
brain surgeon on the second moments, :func:`compensate.obs_select`); compensation ``none``,
``bias`` (FLAP), ``refit`` (ridge least squares, :func:`compensate.refit`), ``seq-local`` /
``seq-dense`` (refit layer by layer with earlier layers pruned, :func:`calibrate.layerwise_refit`);
allocation ``uniform`` or ``per_layer`` (the planner's standardised-score allocation). Pruned
models are built in memory exactly as the slicer writes them (tests check the equality) and
results are appended to ``results.jsonl``, so a rerun only computes what is missing.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from actprune.core.archs import REGISTRY
from actprune.core.planning.planner import make_plan
from actprune.core.tensor.checkpoint import ColumnNorms
from actprune.core.tensor.hf_model import HfModel
from actprune.core.wire.plan_request import PlanRequest
from actprune.core.wire.stats import Stats
from actprune.pruning.compensate import calibrate
from actprune.pruning.compensate import maths as compensate
from actprune.pruning.data import pack, tokenize, wiki_texts
from actprune.pruning.evaluate.perplexity import nll_and_kl
from actprune.pruning.fixtures.smollm2 import ensure_smollm2
from actprune.pruning.record import Recorder, batches
from quality_results import STRATEGIES, append, load_results, markdown, suite
from safetensors.torch import load_file, save_file
from texts import opticks as ood_text
from tqdm.auto import tqdm

# ---- setup ------------------------------------------------------------------------------------
# SmolLM2 is a Llama: the registry's view of its modules (no model needed to walk a layer).
VIEW = HfModel(None, REGISTRY["LlamaForCausalLM"])


def perplexities(model: torch.nn.Module, rows: dict[str, torch.Tensor]) -> dict[str, float]:
    """Perplexity of ``model`` on each named set of packed rows (N, L)."""
    out = {}
    for name, r in rows.items():
        nll, _, tokens = nll_and_kl([model], r, batch_size=2, progress=False)
        out[name] = math.exp(nll[0] / tokens)
    return out


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.args = args
        self.cache = Path(args.cache)
        self.model_dir = ensure_smollm2(self.cache / "models")
        self.config = json.loads((self.model_dir / "config.json").read_text())
        self.norms = ColumnNorms.of(self.model_dir)
        self.tok = AutoTokenizer.from_pretrained(str(self.model_dir))
        self.dense = AutoModelForCausalLM.from_pretrained(str(self.model_dir), dtype=torch.float32).eval()
        eos = self.tok.eos_token_id
        calib_docs = wiki_texts("calibration")
        calib = tokenize(self.tok, calib_docs[: args.calib_docs])
        self.calib_ids = [ids[: args.seq_len] for ids in calib]
        self.calib_rows = pack(self.calib_ids, args.seq_len, eos)  # (N, L) for the layer-wise refit
        self.rows = {
            "wiki": pack(tokenize(self.tok, wiki_texts("heldout")), args.seq_len, eos)[: args.eval_tokens // args.seq_len],
            "ood": pack(tokenize(self.tok, [ood_text()]), args.seq_len, eos)[: args.ood_tokens // args.seq_len],
            # Validation for choices (ridge, allocation): calibration-part summaries the
            # calibration pass never saw; neither evaluation text is ever used to choose.
            "val": pack(tokenize(self.tok, calib_docs[args.calib_docs: args.calib_docs + 64]), args.seq_len,
                        eos)[: args.val_tokens // args.seq_len],
        }
        self.stats, self.grams = self._calibrate()

    def _calibrate(self) -> tuple[Stats, list[torch.Tensor]]:
        tag = "server" if self.args.via_server else "offline"
        sp, gp = self.cache / f"stats-{tag}.safetensors", self.cache / "grams.safetensors"
        if not gp.is_file():
            self._record(sp if not self.args.via_server else None, gp)
        if not sp.is_file():
            self._stats_via_server(sp)
        grams = load_file(str(gp))
        return Stats.load(sp), [grams[f"layers.{i}"] for i in range(len(grams))]

    @torch.no_grad()
    def _record(self, stats_path: Path | None, gram_path: Path) -> None:
        """One offline forward over the calibration summaries: stats and second moments."""
        order = sorted(range(len(self.calib_ids)), key=lambda j: len(self.calib_ids[j]))
        todo = batches([self.calib_ids[j] for j in order], 8, self.tok.pad_token_id or 0)
        rec, gram = Recorder(self.dense), calibrate.GramRecorder(self.dense)
        rec.install()
        for ids, mask in tqdm(todo, desc="calibrating", unit="batch"):
            gram.valid = mask.reshape(-1).bool()
            rec.forward(ids, mask)
        rec.remove()
        save_file({f"layers.{i}": g.contiguous() for i, g in enumerate(gram.close())}, str(gram_path))
        if stats_path is not None:
            rec.stats(str(self.model_dir), self.config).save(stats_path)

    def _stats_via_server(self, path: Path) -> None:
        """Serve the dense model, replay the calibration summaries, pull the stats."""
        import httpx
        from actprune.client.http import Client
        from actprune.server.process import ServerProcess

        args = ["--dtype", "float32", "--max-model-len", str(self.args.seq_len + 8), "--max-num-seqs", "8",
                "--enforce-eager"]
        env = {"VLLM_CPU_KVCACHE_SPACE": "1", "ACTPRUNE_SNAPSHOT_DIR": str(self.cache / "snapshots")}
        with ServerProcess(self.model_dir, args, env=env, log_path=self.cache / "server.log") as srv:
            client = Client(srv.base_url)
            client.reset()
            for ids in tqdm(self.calib_ids, desc="replaying", unit="prompt"):
                body = {"model": str(self.model_dir), "prompt": ids, "max_tokens": 1, "temperature": 0.0}
                httpx.post(srv.base_url + "/v1/completions", json=body, timeout=300).raise_for_status()
            client.stats().save(path)

    # ---- choices --------------------------------------------------------------------------------
    def keep(self, strategy: str, ratio: float, alloc: str, ridge: float) -> dict[int, list[int]]:
        layers = [ly for ly in self.dense.model.layers]
        width = VIEW.mlp(layers[0])[2].in_features
        n_keep = round((1 - ratio) * width)
        if strategy in ("random", "weight", "obs"):
            counts = [n_keep] * len(layers)
            if alloc == "per_layer":  # widths from the planner's standardised wifv scores
                counts = [len(k) for k in self.keep("wifv", ratio, alloc, ridge).values()]
            out = {}
            for i, ly in enumerate(layers):
                n_keep = counts[i]
                gate, up, down = VIEW.mlp(ly)
                if strategy == "random":
                    g = torch.Generator().manual_seed(i)
                    out[i] = sorted(torch.randperm(width, generator=g)[:n_keep].tolist())
                elif strategy == "weight":
                    s = gate.weight.norm(dim=1) ** 2 + up.weight.norm(dim=1) ** 2 + down.weight.norm(dim=0) ** 2
                    out[i] = sorted(torch.argsort(-s)[:n_keep].tolist())
                else:
                    a, b = compensate.moments_from_gram(self.grams[i], down.weight.detach(), range(width))
                    out[i] = compensate.obs_select(a, b, n_keep, ridge, step=self.args.obs_step)
            return out
        if alloc.startswith("recon"):
            return self.keep_recon(strategy, ratio, alloc, ridge)
        if alloc == "sensitivity":  # the shipped path: actprune sensitivity + plan --layer-sensitivity
            return self.keep_sensitivity(strategy, ratio, ridge)
        if alloc.startswith("mix"):  # mixNN: NN % per-layer widths, the rest uniform
            return self.keep_mix(strategy, ratio, int(alloc[3:]) / 100)
        if alloc in ("sens", "sens_cap2"):  # cap: 0.8, or twice the mean ratio
            return self.keep_sens(strategy, ratio, ridge, cap=0.8 if alloc == "sens" else 2 * ratio)
        req = PlanRequest(strategy=strategy, mlp_ratio=ratio, per_layer=alloc == "per_layer")
        plan = make_plan(self.stats, self.config, req, self.norms)
        return {lp.index: lp.mlp_keep for lp in plan.layers}

    def order(self, strategy: str, i: int) -> np.ndarray:
        """Layer i's MLP neurons, best-scored first, by the planner's scores for ``strategy``."""
        from actprune.core.planning.planner import _channel_scores

        w = VIEW.mlp(self.dense.model.layers[i])[2].weight.detach()  # (H, I)
        norms = lambda _l, _k: torch.linalg.vector_norm(w.float(), dim=0).double().numpy()  # noqa: E731
        return np.argsort(-_channel_scores(self.stats, i, "mlp", PlanRequest(strategy=strategy), norms), kind="stable")

    @torch.no_grad()
    def keep_sens(self, strategy: str, ratio: float, ridge: float, cap: float = 0.8) -> dict[int, list[int]]:
        """Widths from each layer's measured sensitivity: prune that layer alone by ``ratio``
        (its best-scored units, refitted), measure the loss increase Δ_i on calibration rows;
        with the model Δ_i(p) = Δ_i · (p / ratio)², the removed fractions minimising Σ Δ_i(p_i)
        at a fixed total are p_i ∝ 1 / Δ_i (capped at ``cap``, water-filled)."""
        from actprune.core.planning.allocation import removed_fractions

        rows = self.calib_rows[:8]  # (8, L) calibration text: no evaluation text is used

        def loss(m: torch.nn.Module) -> float:
            nll, _, tokens = nll_and_kl([m], rows, batch_size=2, progress=False)
            return nll[0] / tokens

        base = loss(self.dense)
        layers = list(self.dense.model.layers)
        orders, deltas = [], []
        for i, ly in enumerate(tqdm(layers, desc="sensitivity", unit="layer")):
            gate, up, down = VIEW.mlp(ly)
            w = down.weight.detach()  # (H, I)
            order = self.order(strategy, i)
            keep = sorted(order[: round((1 - ratio) * w.shape[1])].tolist())
            a, b = compensate.moments_from_gram(self.grams[i], w, keep)
            calibrate.apply_mlp(VIEW, ly, keep, *compensate.refit(a, b, w[:, keep], ridge))
            deltas.append(loss(self.dense) - base)
            ly.mlp.gate_proj, ly.mlp.up_proj, ly.mlp.down_proj = gate, up, down  # restore
            orders.append(order)
        p = removed_fractions(deltas, ratio, cap=cap, floor=1e-9)  # p_i ∝ 1/Δ_i, water-filled under the cap
        tqdm.write("sensitivity Δ: " + " ".join(f"{d:.3f}" for d in deltas))
        tqdm.write("removed fraction: " + " ".join(f"{x:.2f}" for x in p))
        return {i: sorted(o[: round((1 - p[i]) * len(o))].tolist()) for i, o in enumerate(orders)}

    def keep_sensitivity(self, strategy: str, ratio: float, ridge: float) -> dict[int, list[int]]:
        from actprune.pruning.compensate.sensitivity import layer_sensitivity

        uniform = make_plan(self.stats, self.config, PlanRequest(strategy=strategy, mlp_ratio=ratio), self.norms)
        deltas = layer_sensitivity(self.dense, self.calib_rows, {lp.index: lp.mlp_keep for lp in uniform.layers},
                                   ridge=ridge, probe_rows=8)
        tqdm.write("sensitivity Δ: " + " ".join(f"{deltas[i]:.3f}" for i in sorted(deltas)))
        req = PlanRequest(strategy=strategy, mlp_ratio=ratio, per_layer=True,
                          layer_sensitivity=[deltas[i] for i in sorted(deltas)])
        plan = make_plan(self.stats, self.config, req, self.norms)
        return {lp.index: lp.mlp_keep for lp in plan.layers}

    def keep_mix(self, strategy: str, ratio: float, alpha: float) -> dict[int, list[int]]:
        """Removed fraction per layer ``alpha · p_i + (1 - alpha) · ratio``, p_i the planner's
        per-layer allocation; each layer keeps its best-scored units."""
        per = make_plan(self.stats, self.config, PlanRequest(strategy=strategy, mlp_ratio=ratio, per_layer=True),
                        self.norms)
        out = {}
        for lp in per.layers:
            order = self.order(strategy, lp.index)
            p = alpha * (1 - len(lp.mlp_keep) / len(order)) + (1 - alpha) * ratio
            out[lp.index] = sorted(order[: round((1 - p) * len(order))].tolist())
        return out

    def keep_recon(self, strategy: str, ratio: float, alloc: str, ridge: float) -> dict[int, list[int]]:
        """Widths from each layer's refit residual: every layer keeps its best-scored units;
        the widths minimise the summed residual (``recon``) or the summed residual relative
        to the layer's MLP output energy (``recon_rel``), in steps of 32 units."""
        from actprune.core.planning.allocation import allocate_by_cost

        layers = list(self.dense.model.layers)
        costs, orders = [], []
        for i, ly in enumerate(tqdm(layers, desc="error curves", unit="layer")):
            w = VIEW.mlp(ly)[2].weight.detach()  # (H, I)
            width = w.shape[1]
            order = self.order(strategy, i)
            g = self.grams[i]
            energy = float(torch.einsum("hi,ij,hj->", w.double(), g[:width, :width], w.double()))
            curve = {}
            for k in range(max(32, round(width * 0.3) // 32 * 32), width + 1, 32):
                keep = sorted(order[:k].tolist())
                a, b = compensate.moments_from_gram(g, w, keep)
                w_new, bias = compensate.refit(a, b, w[:, keep], ridge)
                err = max(compensate.refit_residual(a, b, energy, w_new, bias), 0.0)
                curve[k] = err / energy if alloc == "recon_rel" else err
            costs.append(curve)
            orders.append(order)
        counts = allocate_by_cost(costs, round((1 - ratio) * sum(len(o) for o in orders)))
        return {i: sorted(orders[i][:c].tolist()) for i, c in enumerate(counts)}

    def build(self, keep: dict[int, list[int]], comp: str, ridge: float,
              grams: list[torch.Tensor] | None = None) -> torch.nn.Module:
        """The dense model pruned to ``keep`` with compensation ``comp``; ``grams``: the refit's
        per-layer moments (default: the calibration pass's)."""
        grams = self.grams if grams is None else grams
        model = copy.deepcopy(self.dense)
        if comp.startswith("seq-") or comp == "lw":  # the shipped layer-wise pass (lw: one-shot)
            chosen: dict[int, float] = {}
            calibrate.layerwise_refit(model, self.calib_rows, keep, ridge=ridge, chosen=chosen,
                                      sequential=False if comp == "lw" else comp.removeprefix("seq-"),
                                      progress=False)
            if ridge == "auto":
                tqdm.write("chosen ridge per layer: " + " ".join(f"{r:g}" for r in chosen.values()))
            return model
        for i, ly in enumerate(model.model.layers):
            w = VIEW.mlp(ly)[2].weight.detach()
            if comp == "none":
                calibrate.apply_mlp(VIEW, ly, keep[i])
            elif comp == "bias":
                mean = self.stats.tensors[f"layers.{i}.mlp.mean"]
                calibrate.apply_mlp(VIEW, ly, keep[i], None, compensate.flap_bias(w, keep[i], mean))
            elif comp == "refit":
                a, b = compensate.moments_from_gram(grams[i], w, keep[i])
                w_new, bias = compensate.refit(a, b, w[:, keep[i]], ridge)
                calibrate.apply_mlp(VIEW, ly, keep[i], w_new, bias)
            else:
                raise ValueError(f"unknown compensation {comp!r}")
        return model

    def perplexity(self, model: torch.nn.Module) -> dict[str, float]:
        return perplexities(model, self.rows)


# ---- suites and results -------------------------------------------------------------------------
def run(bench: Bench, keys: list[str], path: Path) -> None:
    done = load_results(path)
    if "val" not in done.get("dense", {}):
        append(path, {"key": "dense", **bench.perplexity(bench.dense)})
    for key in keys:
        # strategy|ratio|comp|alloc[|ridge=R]: the ridge defaults to --ridge
        strategy, ratio, comp, alloc, *rest = key.split("|")
        ridge = rest[0].removeprefix("ridge=") if rest else bench.args.ridge
        ridge = ridge if ridge == "auto" else float(ridge)
        solves = comp in ("refit", "lw") or comp.startswith("seq-") or strategy == "obs"
        full = f"{strategy}|{ratio}|{comp}|{alloc}" + (f"|ridge={ridge}" if solves else "")
        if full in done and ("val" in done[full] or not bench.args.need_val):
            continue
        t0 = time.time()
        model = bench.build(bench.keep(strategy, float(ratio), alloc, ridge), comp, ridge)
        t1 = time.time()
        rec = {"key": full, "strategy": strategy, "ratio": float(ratio), "comp": comp, "alloc": alloc,
               **bench.perplexity(model), "prune_s": round(t1 - t0, 1), "eval_s": round(time.time() - t1, 1)}
        tqdm.write(json.dumps(rec))
        append(path, rec)
        del model


def save_checkpoint(bench: Bench, key: str, out: Path, grams: list[torch.Tensor] | None = None) -> Path:
    """Write config ``key`` (compensation none/bias/refit) as a checkpoint through the slicer,
    the way `actprune prune` does, e.g. as the starting point of recovery. ``grams``: the
    refit's per-layer moments, when not the calibration's own (``bench/calib_mix.py``'s mix).
    (For the baselines, ``params_after`` in its plan record is the template plan's.)"""
    from actprune.pruning.checkpoint.slicer import slice_checkpoint

    strategy, ratio, comp, alloc = key.split("|")
    keep = bench.keep(strategy, float(ratio), alloc, bench.args.ridge)
    template = strategy if strategy in STRATEGIES else "magnitude"  # then the plan is exact
    req = PlanRequest(strategy=template, mlp_ratio=float(ratio), per_layer=alloc == "per_layer")
    plan = make_plan(bench.stats, bench.config, req, bench.norms)
    layers = [lp.model_copy(update={"mlp_keep": sorted(keep[lp.index])}) for lp in plan.layers]
    widths = [w.model_copy(update={"intermediate_size": len(keep[i])}) for i, w in enumerate(plan.widths)]
    plan = plan.model_copy(update={"layers": layers, "widths": widths,
                                   "uniform": len({len(k) for k in keep.values()}) == 1})
    plan.check(source=key)
    refit = None
    if comp == "refit":
        refit = {}
        for i, ly in enumerate(bench.dense.model.layers):
            w = VIEW.mlp(ly)[2].weight.detach()
            a, b = compensate.moments_from_gram((grams or bench.grams)[i], w, keep[i])
            refit[i] = compensate.refit(a, b, w[:, keep[i]], bench.args.ridge)
    stats = bench.stats if comp == "bias" else None
    return slice_checkpoint(bench.model_dir, plan, out, stats=stats, mlp_refit=refit, overwrite=True)


def evaluate_dir(bench: Bench, d: Path, path: Path) -> None:
    """Perplexity of a checkpoint directory (e.g. what `actprune prune` / `finetune` wrote)."""
    from actprune.pruning.checkpoint.hf_io import load_causal_lm

    key = f"dir:{d.resolve()}"
    if key not in load_results(path):
        rec = {"key": key, **bench.perplexity(load_causal_lm(d, torch.float32))}
        tqdm.write(json.dumps(rec))
        append(path, rec)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache", default="/tmp/actprune-quality")
    p.add_argument("--suite", default="", help="table | issue7 | comma-separated config keys")
    p.add_argument("--results", default=None, help="results JSONL (default: CACHE/results.jsonl)")
    p.add_argument("--via-server", action="store_true", help="stats from `actprune serve` + the OpenAI API")
    p.add_argument("--calib-docs", type=int, default=256)
    p.add_argument("--eval-tokens", type=int, default=4096, help="held-out Wikipedia tokens")
    p.add_argument("--ood-tokens", type=int, default=2048, help="out-of-domain tokens")
    p.add_argument("--val-tokens", type=int, default=4096, help="validation tokens (for choices)")
    p.add_argument("--need-val", action="store_true", help="recompute results recorded before validation")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--ridge", type=float, default=compensate.DEFAULT_RIDGE)
    p.add_argument("--obs-step", type=int, default=8, help="OBS units costed per round")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--eval-dirs", nargs="*", default=[],
                   help="also evaluate these checkpoint directories (sliced / fine-tuned) on the same rows")
    p.add_argument("--save", nargs=2, metavar=("KEY", "DIR"), default=None,
                   help="write config KEY as a checkpoint to DIR through the slicer, then exit")
    p.add_argument("--markdown", action="store_true", help="print the results as tables and exit")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    path = Path(args.results or Path(args.cache) / "results.jsonl")
    if args.markdown:
        print(markdown(path))
        return
    Path(args.cache).mkdir(parents=True, exist_ok=True)
    bench = Bench(args)
    print(f"calibration: {sum(map(len, bench.calib_ids))} tokens ({'server' if args.via_server else 'offline recorder'}); "
          f"eval rows: " + ", ".join(f"{k} {tuple(v.shape)}" for k, v in bench.rows.items()))
    if args.save:
        print(f"wrote {save_checkpoint(bench, args.save[0], Path(args.save[1]))}")
        return
    run(bench, suite(args.suite), path)
    for d in args.eval_dirs:
        evaluate_dir(bench, Path(d), path)
    print(markdown(path))


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
