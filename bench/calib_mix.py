"""Does a refit calibrated on a mix of domains hold up better out of domain? (issue 13)

The least-squares refit of ``down_proj`` learns its calibration domain: at 20 % of MLP neurons
it is far ahead of FLAP's bias on held-out Wikipedia and level or behind out of domain
(BENCHMARKS.md, issue 13). A user's traffic drifts. This script measures what mixing text of
other domains into the refit's calibration moments does, in domain and out of it:

    G_λ = (1 - λ) · G_wiki / n_wiki + λ · G_other / n_other        (per layer, (I+1, I+1))

G: the second moments of the ``down_proj`` input (with the bias column) that the refit solves
with; n: their token counts. λ = 0 is the shipped refit on the calibration domain alone. The
same kept neurons (the planner's per-layer WIFV widths from the Wikipedia stats) for every λ;
only the refit's moments change.

Texts (``bench/texts.py``): the other domain is scikit-learn's dataset descriptions and the
installed packages' READMEs, each split in halves — the first halves calibrate (``--other-tokens``
in all, half from each), the second halves validate. λ is chosen on validation only: the
geometric mean over the calibration domain's validation rows and the two other-domain halves.
Evaluation, never used to choose: held-out Wikipedia and the three out-of-domain texts.

    .venv/bin/python bench/calib_mix.py --cache /tmp/rq14 [--lambdas 0 0.1 0.25 0.5] [--ratio 0.2]

Uses ``bench/quality.py``'s cache (model, Wikipedia stats and moments); results are appended to
``CACHE/calib_mix.jsonl`` (a rerun computes only what is missing) and printed as a table.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from actprune.pruning.compensate import calibrate
from actprune.pruning.compensate import maths as compensate
from actprune.pruning.data import pack, tokenize
from quality import Bench, perplexities, save_checkpoint
from quality_results import append, load_results
from safetensors.torch import load_file, save_file
from texts import OTHER_TEXTS, halves, ood_texts
from tqdm.auto import tqdm

VAL_SETS = ("val", "val-datasets", "val-readmes")  # where λ is chosen
EVAL_SETS = ("wiki", "opticks", "pydoc", "code")  # never used to choose


def mix_gram(g_a: torch.Tensor, g_b: torch.Tensor, lam: float) -> torch.Tensor:
    """(1 - λ) g_a / n_a + λ g_b / n_b: two (I+1, I+1) moment sums (bias column last, so
    ``g[-1, -1]`` is the token count) as one per-token mixture with weight λ on ``g_b``."""
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"λ must be in [0, 1], got {lam}")
    return (1.0 - lam) * g_a / g_a[-1, -1] + lam * g_b / g_b[-1, -1]


def other_rows(bench: Bench, tokens: int, val_tokens: int, names: list[str]
               ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(calibration rows from the first halves of the texts ``names``, the tokens shared equally;
    validation rows of every other-domain text's second half), (N, L) each."""
    seq, eos = bench.args.seq_len, bench.tok.eos_token_id
    calib, val = [], {}
    for name, load in OTHER_TEXTS.items():
        first, second = halves(load())
        if name in names:
            rows = pack(tokenize(bench.tok, [first]), seq, eos)
            calib.append(rows[: max(1, tokens // len(names) // seq)])
        val[f"val-{name}"] = pack(tokenize(bench.tok, [second]), seq, eos)[: val_tokens // seq]
    return torch.cat(calib), val


@torch.no_grad()
def grams_of(bench: Bench, rows: torch.Tensor, path: Path) -> list[torch.Tensor]:
    """Every layer's ``down_proj`` input moments over ``rows`` (cached at ``path``)."""
    if not path.is_file():
        rec = calibrate.GramRecorder(bench.dense)
        for a in tqdm(range(0, rows.shape[0], 4), desc="other-domain moments", unit="batch"):
            rec.forward(rows[a:a + 4])
        save_file({f"layers.{i}": g.contiguous() for i, g in enumerate(rec.close())}, str(path))
    g = load_file(str(path))
    return [g[f"layers.{i}"] for i in range(len(g))]


def build(bench: Bench, keep: dict[int, list[int]], other: list[torch.Tensor], lam: float,
          ridge: float) -> torch.nn.Module:
    """The dense model with each MLP sliced to ``keep`` and refitted on G_λ."""
    mixed = [mix_gram(g, o, lam) for g, o in zip(bench.grams, other, strict=True)]
    return bench.build(keep, "refit", ridge, grams=mixed)


def geomean(xs: list[float]) -> float:
    return math.exp(sum(map(math.log, xs)) / len(xs))


def table(results: dict[str, dict], prefix: str) -> str:
    """Markdown: each λ's perplexity ÷ dense on every set, the validation mean, ◀ at its minimum."""
    dense = results["dense"]
    rows = {k: r for k, r in results.items() if k.startswith(prefix)}
    if not rows:
        return "(no results yet)"
    ratio = {k: {s: r[s] / dense[s] for s in (*VAL_SETS, *EVAL_SETS)} for k, r in rows.items()}
    vmean = {k: geomean([v[s] for s in VAL_SETS]) for k, v in ratio.items()}
    best = min(vmean, key=vmean.get)
    head = ["λ", *VAL_SETS, "val mean", *EVAL_SETS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for k in sorted(rows, key=lambda k: rows[k]["lam"]):
        mark = " ◀" if k == best else ""
        cells = [f"{rows[k]['lam']:g}{mark}", *(f"{ratio[k][s]:.3f}" for s in VAL_SETS), f"{vmean[k]:.3f}",
                 *(f"{ratio[k][s]:.3f}" for s in EVAL_SETS)]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("| dense perplexity | " + " | ".join(f"{dense[s]:.2f}" for s in VAL_SETS) + " | | "
                 + " | ".join(f"{dense[s]:.2f}" for s in EVAL_SETS) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache", default="/tmp/actprune-quality", help="bench/quality.py's cache")
    p.add_argument("--ratio", type=float, default=0.2, help="share of MLP neurons removed")
    p.add_argument("--strategy", default="wifv")
    p.add_argument("--lambdas", type=float, nargs="+", default=[0.0, 0.1, 0.25, 0.5])
    p.add_argument("--ridge", type=float, default=compensate.DEFAULT_RIDGE)
    p.add_argument("--other-tokens", type=int, default=8192, help="other-domain calibration tokens")
    p.add_argument("--other", nargs="+", choices=sorted(OTHER_TEXTS), default=sorted(OTHER_TEXTS),
                   help="the other-domain texts that calibrate (all of them validate)")
    p.add_argument("--other-val-tokens", type=int, default=2048, help="validation tokens of each other text")
    p.add_argument("--calib-docs", type=int, default=256)
    p.add_argument("--eval-tokens", type=int, default=4096, help="held-out Wikipedia tokens")
    p.add_argument("--ood-tokens", type=int, default=2048, help="tokens of each out-of-domain text")
    p.add_argument("--val-tokens", type=int, default=4096, help="calibration-domain validation tokens")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--markdown", action="store_true", help="print the table and exit")
    p.add_argument("--save", nargs=2, metavar=("LAMBDA", "DIR"), default=None,
                   help="also write the model refitted at λ = LAMBDA as a checkpoint, through the slicer "
                        "(e.g. a start for bench/recovery.py --pruned DIR)")
    args = p.parse_args()
    args.via_server, args.obs_step = False, 8  # what quality.Bench reads besides
    torch.set_num_threads(args.threads)
    path = Path(args.cache) / "calib_mix.jsonl"
    names = "" if sorted(args.other) == sorted(OTHER_TEXTS) else "+".join(sorted(args.other)) + ":"
    prefix = f"{args.strategy}|{args.ratio}|per_layer|ridge={args.ridge}|other={names}{args.other_tokens}|"
    if args.markdown:
        print(table(load_results(path), prefix))
        return
    bench = Bench(args)
    seq, eos = args.seq_len, bench.tok.eos_token_id
    calib_other, val_other = other_rows(bench, args.other_tokens, args.other_val_tokens, args.other)
    bench.rows.pop("ood")  # quality's Opticks rows: here under its own name, with the others
    bench.rows.update(val_other)
    bench.rows.update({n: pack(tokenize(bench.tok, [t]), seq, eos)[: args.ood_tokens // seq]
                       for n, t in ood_texts().items()})
    print("rows: " + ", ".join(f"{k} {tuple(v.shape)}" for k, v in bench.rows.items())
          + f"; other-domain calibration {tuple(calib_other.shape)}")
    other = grams_of(bench, calib_other,
                     Path(args.cache) / f"grams-other-{names.replace(':', '-')}{args.other_tokens}.safetensors")
    done = load_results(path)
    if "dense" not in done:
        append(path, {"key": "dense", **perplexities(bench.dense, bench.rows)})
    keep = bench.keep(args.strategy, args.ratio, "per_layer", args.ridge)
    for lam in args.lambdas:
        key = f"{prefix}{lam:g}"
        if key in done:
            continue
        t0 = time.time()
        rec = {"key": key, "lam": lam, **perplexities(build(bench, keep, other, lam, args.ridge), bench.rows),
               "s": round(time.time() - t0, 1)}
        tqdm.write(json.dumps(rec))
        append(path, rec)
    print(table(load_results(path), prefix))
    if args.save:
        lam, out = float(args.save[0]), Path(args.save[1])
        mixed = [mix_gram(g, o, lam) for g, o in zip(bench.grams, other, strict=True)]
        print(f"wrote {save_checkpoint(bench, f'{args.strategy}|{args.ratio}|refit|per_layer', out, mixed)}")


if __name__ == "__main__":
    main()
