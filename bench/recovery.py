"""Recovery that transfers (issue 14): plain fine-tuning vs distillation vs local + distillation,
with the dense control, on SmolLM2-135M-Instruct at 20 % of MLP neurons.

    # the start: 20 % of MLP neurons, per-layer WIFV widths + refit, through the slicer
    .venv/bin/python bench/quality.py --cache /tmp/rq14 --threads 1 --save "wifv|0.2|refit|per_layer" /tmp/rq14/pruned20
    nice -n 5 .venv/bin/python bench/recovery.py --cache /tmp/rq14 --budget 16384     # train + evaluate what is missing
    nice -n 5 .venv/bin/python bench/recovery.py --cache /tmp/rq14 --budget 65536 --rows plain,distil
    .venv/bin/python bench/recovery.py --cache /tmp/rq14 --markdown                   # the table

Every trained row sees the same data: the first ``wiki:train`` summaries (in file order) that
fill ``--budget`` tokens, packed into rows of 256 tokens and trained for exactly one epoch
(batch 4 rows, so budget / 1024 optimizer steps), seed 0. ``--mix-other S`` trains on a mix
through ``finetune --mix-data --mix-share S``: the summaries fill (1 - S) of the budget, the
first halves of the other-domain texts of :mod:`texts` (``OTHER_TEXTS``: statistics and
software prose, never evaluation text; the same text ``--refit-anchor`` calibrates on) the
rest, in paragraph documents, equal tokens from each — what a user does who keeps general text
in the recovery data. Validation rows (for choosing the
learning rate) are calibration-part summaries 256–319, never seen by the calibration pass nor by
any evaluation. ``--lr A B C`` trains each row at every rate; the table marks, per row and
budget, the rate of the lowest **validation KL to the dense model** (``val_kl`` of `actprune
finetune`, on the teacher's cached top-64: KL on 65 outcomes), not of the lowest validation
perplexity, which rewards adaptation to the calibration domain. Every trained row gets the dense
model as ``--teacher`` for that: rows without distillation with ``--kd-alpha 0`` (the loss is the
LM loss alone; the teacher's top-k only scores validation). Rows of the table:

- ``dense``, ``pruned``: no training.  ``plain``: LM loss.  ``distil``: KL to the dense model only
  (``--kd-alpha 1``), teacher top-64 cached on disk.  ``distil+hidden``: ``distil`` plus the
  per-layer hidden-state loss (``finetune --kd-hidden BETA``, the live teacher beside the cache;
  BETA from ``--kd-hidden``).  ``local+distil``: block-wise distillation
  of each layer first (``--local-steps``), then ``distil``.  ``dense+plain``: the *dense* model
  trained like ``plain`` — the control: a gain it shows too is adaptation to Wikipedia, not
  recovery of what pruning removed.

Variants of a trained row, each its own row in the table: ``--mix-source teacher`` (the mix share
is the dense model's own unconditional samples, :func:`teacher_docs`, instead of other-domain
text), ``--teacher-topk K`` (the teacher's top-K cached, 64 by default; 0 is the live teacher
and the KL on the full vocabulary), ``--lora`` (LoRA adapters instead of every weight).

Evaluation (never used for a choice): perplexity ÷ dense on held-out Wikipedia and on the three
out-of-domain texts of :mod:`texts`, the mean per-token KL(dense ‖ model) on each, and lm-eval's
accuracy ± standard error on ``actprune_facts`` (40 shipped multiple-choice facts; s.e. ≈ 0.07,
so it only tells a broken model from a working one). The dense log-probabilities are computed
once and cached (float16, ``CACHE/dense_logp-*.safetensors``). Results are appended to
``CACHE/recovery-eEVAL_TOKENS.jsonl``; a rerun trains and evaluates only what is missing.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F
from actprune.pruning.data import pack, tokenize, wiki_texts
from quality_results import append, load_results
from safetensors.torch import load_file, save_file
from texts import OTHER_TEXTS, ood_texts

SEQ_TRAIN, BATCH, EVAL_SEQ = 256, 4, 512
DENSE_NAME = "SmolLM2-135M-Instruct-fp32"
TASK = "actprune_facts"
ROWS = ("dense", "pruned", "plain", "distil", "distil+hidden", "local+distil", "dense+plain")


def finetune_args(row: str, args: argparse.Namespace, start: Path, dense: Path, data: Path, val: Path,
                  out: Path, steps: int, lr: float, mix: tuple[Path, float] | None = None) -> list[str]:
    """The `actprune finetune` command line of one trained row at learning rate ``lr``; ``mix``:
    (general text, its share of the training tokens)."""
    cmd = [str(Path(sys.executable).parent / "actprune"), "finetune", "--model", str(start), "--data", str(data),
           "--val-data", str(val), "-o", str(out), "--max-steps", str(steps), "--batch-size", str(BATCH),
           "--seq-len", str(SEQ_TRAIN), "--lr", str(lr), "--warmup-steps", str(max(1, steps // 10)),
           "--seed", "0", "--eval-every", "0"]
    # Every row gets the teacher, for the validation KL the learning rate is chosen on; without
    # distillation it weighs 0 in the loss.
    name = data.stem + (f"-mix{mix[1]:g}-{mix[0].stem}" if mix else "")  # other-N / teacher-N: their own file
    cmd += ["--teacher", str(dense), "--kd-alpha", "1.0" if "distil" in row else "0.0"]
    if args.teacher_topk:  # one pass for all rows
        k = args.teacher_topk
        cmd += ["--teacher-topk", str(k), "--teacher-cache", str(data.parent / f"teacher-top{k}-{name}.safetensors")]
    if mix:
        cmd += ["--mix-data", str(mix[0]), "--mix-share", f"{mix[1]:g}"]
    if row.startswith("local"):
        cmd += ["--local-steps", str(args.local_steps), "--local-tokens", str(args.local_tokens)]
    if row.endswith("+hidden"):
        cmd += ["--kd-hidden", f"{args.kd_hidden:g}"]
    if args.lora:
        cmd += ["--lora"]  # finetune's defaults: r 16, alpha 32, every linear layer
    return cmd


def fill(tok, texts, budget: int) -> list[str]:
    """The first of ``texts`` that fill ``budget`` tokens as finetune packs them (each + EOS)."""
    docs, total = [], 0
    for text in texts:
        if total >= budget:
            break
        docs.append(text)
        total += len(tokenize(tok, [text])[0]) + 1
    if total < budget:
        raise SystemExit(f"the texts give {total} tokens, short of the {budget} asked for")
    return docs


def paragraphs(text: str, chars: int = 1500) -> list[str]:
    """``text`` cut at paragraph breaks into documents of about ``chars`` characters."""
    docs, cur = [], ""
    for para in text.split("\n\n"):
        cur = f"{cur}\n\n{para}" if cur else para
        if len(cur) >= chars:
            docs.append(cur)
            cur = ""
    return docs + ([cur] if cur.strip() else [])


def other_docs(tok, budget: int) -> list[str]:
    """Documents of the first half of every other-domain text, ``budget`` tokens shared equally;
    a text too short for its share gives all it has and the others fill the rest. When all of
    them hold fewer than ``budget`` tokens (a quarter of 256k is ~2× what they hold), each is
    repeated, in order, as many times as it takes — the passes are printed and go into the
    BENCHMARKS prose, since text seen several times is not the same mix as fresh text."""
    from texts import halves

    pools = [paragraphs(halves(load())[0]) for load in OTHER_TEXTS.values()]
    sizes = [sum(len(ids) + 1 for ids in tokenize(tok, pool)) for pool in pools]
    if (passes := math.ceil(budget / sum(sizes))) > 1:
        print(f"the other-domain texts give {sum(sizes)} tokens for the {budget} asked: "
              f"each is repeated, up to {budget / sum(sizes):.2f} passes", file=sys.stderr, flush=True)
        pools, sizes = [pool * passes for pool in pools], [n * passes for n in sizes]
    shares, left = {}, budget
    for i, k in enumerate(sorted(range(len(pools)), key=sizes.__getitem__)):  # shortest first
        shares[k] = min(sizes[k], left // (len(pools) - i))
        left -= shares[k]
    return [d for k in range(len(pools)) for d in fill(tok, pools[k], shares[k])]  # in OTHER_TEXTS order


def teacher_docs(model_dir: Path, tok, budget: int, *, batch: int = 32, new_tokens: int = SEQ_TRAIN,
                 seed: int = 0) -> list[str]:
    """Samples of the dense model itself, unconditional (from its BOS token), at temperature 1
    with no top-k / top-p cut, filling ``budget`` tokens as finetune packs them: distillation on
    them minimises KL(teacher ‖ student) over the teacher's own distribution — its general
    ability, which no single domain of traffic covers (sequence-level distillation; "self-data
    distillation" for pruned models, Thangarasa et al. 2024). Samples under 16 tokens (an early
    end of turn) are dropped. Seeded: the same ``seed``, ``budget`` and thread count give the
    same file."""
    from actprune.pruning.checkpoint.hf_io import load_causal_lm

    model = load_causal_lm(model_dir, torch.float32).eval()
    bos = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    torch.manual_seed(seed)
    docs, total, t0 = [], 0, time.time()
    while total < budget:
        ids = torch.full((batch, 1), bos)
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0,
                                 top_k=0, top_p=1.0, max_new_tokens=new_tokens, pad_token_id=tok.eos_token_id)
        texts = tok.batch_decode(out[:, 1:], skip_special_tokens=True)
        for text, ids in zip(texts, tokenize(tok, texts), strict=True):
            if len(ids) >= 16 and total < budget:
                docs.append(text)
                total += len(ids) + 1
        print(f"teacher samples: {total}/{budget} tokens, {total / (time.time() - t0):.0f} tokens/s",
              file=sys.stderr, flush=True)
    return docs


def budget_data(cache: Path, tok, budget: int, mix: float = 0.0,
                source: str = "other") -> tuple[Path, Path, Path | None]:
    """JSONL of the first wiki:train summaries filling ``budget`` tokens (as finetune packs them:
    each document + EOS), the validation JSONL, and None — with ``mix`` > 0, the summaries fill
    (1 - mix) of it, and the third file holds the general documents for the rest
    (``finetune --mix-data``): other-domain text (``source`` "other") or the dense model's own
    samples ("teacher", :func:`teacher_docs`)."""
    d = cache / "data"
    d.mkdir(exist_ok=True)
    other = round(budget * mix)
    train, val = d / f"train-{budget - other}.jsonl", d / "val.jsonl"
    general = d / f"{source}-{other}.jsonl" if other else None
    make = (lambda: other_docs(tok, other)) if source == "other" else (
        lambda: teacher_docs(cache / "models" / DENSE_NAME, tok, other))
    for path, docs in ((train, lambda: fill(tok, wiki_texts("train"), budget - other)), (general, make)):
        if path is not None and not path.is_file():
            path.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs()))
    if not val.is_file():
        val.write_text("".join(json.dumps({"text": t}) + "\n" for t in wiki_texts("calibration")[256:320]))
    return train, val, general


def eval_rows(tok, tokens: int) -> dict[str, torch.Tensor]:
    """Packed evaluation rows (N, EVAL_SEQ) of held-out Wikipedia and each out-of-domain text."""
    eos, n = tok.eos_token_id, tokens // EVAL_SEQ
    texts = {"wiki": wiki_texts("heldout"), **{k: [v] for k, v in ood_texts().items()}}
    return {k: pack(tokenize(tok, v), EVAL_SEQ, eos)[:n] for k, v in texts.items()}


@torch.no_grad()
def logprobs(model, rows: torch.Tensor) -> torch.Tensor:
    """(N, L-1, V) next-token log-probabilities, one row at a time (float32)."""
    return torch.cat([F.log_softmax(model(input_ids=r[None], use_cache=False).logits[:, :-1].float(), -1)
                      for r in rows])


def dense_logp(cache: Path, dense_dir: Path, rows: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """(N, L-1, V) float16 dense log-probabilities of each text's rows, computed once; a cache of
    more rows of the same text serves fewer (its first N)."""
    from actprune.pruning.checkpoint.hf_io import load_causal_lm

    out, dense = {}, None
    for name, r in rows.items():
        found = sorted(cache.glob(f"dense_logp-{name}-*x{r.shape[1]}.safetensors"),
                       key=lambda q: int(q.stem.split("-")[-1].split("x")[0]))
        found = [q for q in found if int(q.stem.split("-")[-1].split("x")[0]) >= r.shape[0]]
        path = found[0] if found else cache / f"dense_logp-{name}-{r.shape[0]}x{r.shape[1]}.safetensors"
        if not path.is_file():
            dense = dense or load_causal_lm(dense_dir, torch.float32).eval()
            save_file({"logp": logprobs(dense, r).half()}, str(path))
        out[name] = load_file(str(path))["logp"][: r.shape[0]]
    return out


def score_ref(rows: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> dict[str, float]:
    """The dense model's own scores, from its cached log-probabilities (KL 0 by definition)."""
    out = {}
    for name, r in rows.items():
        nll = -ref[name].float().gather(-1, r[:, 1:, None]).sum().item()
        out[f"{name}_ppl"], out[f"{name}_kl"] = math.exp(nll / r[:, 1:].numel()), 0.0
    return out


@torch.no_grad()
def score(model, rows: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> dict[str, float]:
    """Per text: perplexity and mean KL(dense ‖ model) per predicted token."""
    out = {}
    for name, r in rows.items():
        nll = kl = 0.0
        for i, row in enumerate(r):
            lp = logprobs(model, row[None])[0]  # (L-1, V)
            nll += F.nll_loss(lp, row[1:], reduction="sum").item()
            p = ref[name][i].float()  # (L-1, V) dense log-probs
            kl += (p.exp() * (p - lp)).sum().item()
        n = r.shape[0] * (r.shape[1] - 1)
        out[f"{name}_ppl"], out[f"{name}_kl"] = math.exp(nll / n), kl / n
    return out




def evaluate_model(path: Path, key: str, model_dir: Path, extra: dict, *, tok, rows: dict[str, torch.Tensor],
                   ref: dict[str, torch.Tensor], dense_dir: Path, task: bool = True) -> None:
    """Score one checkpoint on the evaluation rows (and lm-eval's TASK), append its record to
    ``path`` and print it. The dense model's scores come from its cached log-probabilities."""
    from actprune.pruning.checkpoint.hf_io import load_causal_lm
    from actprune.pruning.evaluate.harness import run_tasks

    model = load_causal_lm(model_dir, torch.float32).eval()
    t0 = time.time()
    scores = score_ref(rows, ref) if model_dir == dense_dir else score(model, rows, ref)
    rec = {"key": key, **extra, **scores}
    if task:
        rec["task"] = run_tasks(model, tok, [TASK], batch_size=8)[TASK]
    rec = {**rec, "eval_s": round(time.time() - t0)}
    append(path, rec)
    print(json.dumps(rec), flush=True)


def train(cmd: list[str], out: Path, threads: int = 1) -> dict[str, float]:
    """Run one `actprune finetune` on ``threads`` threads (unless its output exists); its wall and
    CPU seconds."""
    if (out / "model.safetensors").is_file():
        return {}
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    print(" ".join(cmd), flush=True)
    t0, c0 = time.time(), resource.getrusage(resource.RUSAGE_CHILDREN)
    with (out.parent / f"{out.name}.log").open("w") as log:
        subprocess.run(cmd, check=True, env=env, stdout=log, stderr=subprocess.STDOUT)
    c1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {"threads": threads, "train_wall_s": round(time.time() - t0), "train_cpu_s": round(c1.ru_utime + c1.ru_stime - c0.ru_utime - c0.ru_stime)}


def group(r: dict) -> tuple:
    """(row, budget, mix share and source, start, β, top-K, LoRA): the records whose learning
    rates compete."""
    return (r["row"], r.get("budget"), r.get("mix", 0.0), r.get("mix_source"), r.get("start", ""), r.get("kd_hidden"),
            r.get("topk"), r.get("lora", False))


def picked(results: list[dict]) -> set[str]:
    """Keys of the learning rate chosen per (row, budget): the lowest validation KL to the dense
    model where every rate of the group has one, else (rows trained before it was recorded) the
    lowest validation perplexity. Groups of one rate pick it."""
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        if r.get("val"):
            groups.setdefault(group(r), []).append(r)
    out = set()
    for rs in groups.values():
        by = "val_kl" if all("val_kl" in r["val"] for r in rs) else "val_ppl"
        out.add(min(rs, key=lambda r: r["val"][by])["key"])
    return out


def markdown(path: Path) -> str:
    """The table: rows in ROWS order then by budget; perplexity ÷ dense (perplexity), KL, accuracy,
    training CPU time and the validation figures (calibration domain: what choices are made on);
    ◀ marks the learning rate :func:`picked` per row and budget when several were trained."""
    res = load_results(path)
    dense = res.get("dense")
    if dense is None:
        return "(no results yet)"
    texts = [k.removesuffix("_ppl") for k in dense if k.endswith("_ppl")]
    head = ("| model | budget | " + " | ".join(f"{t} ppl ×dense" for t in texts) + " | "
            + " | ".join(f"{t} KL" for t in texts) + f" | {TASK} acc | train CPU-min | val ppl | val KL |")
    lines = [head, "|" + "---|" * (6 + 2 * len(texts))]
    order = {r: i for i, r in enumerate(ROWS)}
    chosen = picked(list(res.values()))
    rates = Counter(group(r) for r in res.values() if r.get("val"))
    for r in sorted(res.values(), key=lambda r: (r.get("budget") or 0, order.get(r["row"], 99), r.get("start", ""),
                                                 r.get("mix", 0.0), r.get("mix_source") or "", r.get("topk", 64) or 1 << 30,
                                                 r.get("lora", False),
                                                 r.get("lr", 0))):
        ppl = " | ".join(f"{r[t + '_ppl'] / dense[t + '_ppl']:.3f} ({r[t + '_ppl']:.2f})" for t in texts)
        kl = " | ".join(f"{r[t + '_kl']:.4f}" for t in texts)
        acc = r.get("task", {})
        task = f"{acc['acc']:.3f} ± {acc['acc_stderr']:.3f}" if acc else "—"
        cpu = f"{r['train_cpu_s'] / 60:.1f}" if "train_cpu_s" in r else "—"
        v = r.get("val") or {}
        val = f"{v['val_ppl']:.2f}" if v else "—"
        val_kl = f"{v['val_kl']:.4f}" if "val_kl" in v else "—"
        name = (r["row"] + (f" from {r['start']}" if r.get("start") else "")
                + (f", {r['mix']:.0%} {'teacher samples' if r.get('mix_source') == 'teacher' else 'other'}"
                   if r.get("mix") else "") + (f", β {r['kd_hidden']:g}" if "kd_hidden" in r else "")
                + ((f", top-{r['topk']}" if r["topk"] else ", full-vocabulary KL") if "topk" in r else "")
                + (", LoRA r 16" if r.get("lora") else "")
                + (f" (lr {r['lr']:g})" if "lr" in r else ""))
        if r["key"] in chosen and rates[group(r)] > 1:
            name += " ◀"
        lines.append(f"| {name} | {r.get('budget') or '—'} | {ppl} | {kl} | {task} | {cpu} | {val} | {val_kl} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache", default="/tmp/rq14")
    p.add_argument("--pruned", default=None,
                   help="start checkpoint (default CACHE/pruned20); another one is named by its directory "
                        "in the results and the table")
    p.add_argument("--budget", type=int, default=16384, help="training tokens per row")
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, of {', '.join(ROWS)}")
    p.add_argument("--lr", type=float, nargs="+", default=[1e-4],
                   help="learning rates; with several, the table marks the one of the lowest validation KL")
    p.add_argument("--local-steps", type=int, default=16)
    p.add_argument("--kd-hidden", type=float, default=5.0, metavar="BETA",
                   help="weight of the hidden-state loss of the distil+hidden row (5: the term starts at the "
                        "size of the KL term on compress's 20 %% model, 0.063 vs 0.30 on validation rows)")
    p.add_argument("--local-tokens", type=int, default=8192)
    p.add_argument("--mix-other", type=float, default=0.0, metavar="S",
                   help="share of the training tokens from other-domain text (texts.OTHER_TEXTS), 0 to 1")
    p.add_argument("--teacher-topk", type=int, default=64, metavar="K",
                   help="the teacher's top-K cached on disk (finetune --teacher-topk); 0: the live teacher, the "
                        "KL on the full vocabulary (rows other than 64 are their own rows)")
    p.add_argument("--lora", action="store_true",
                   help="train LoRA adapters (finetune --lora, r 16) instead of every weight; rows of their own")
    p.add_argument("--mix-source", choices=("other", "teacher"), default="other",
                   help="what the --mix-other share is: other-domain text, or the dense model's own samples "
                        "(unconditional, temperature 1; generated once into CACHE/data/teacher-N.jsonl)")
    p.add_argument("--eval-tokens", type=int, default=4096, help="tokens per evaluation text")
    p.add_argument("--no-task", action="store_true", help=f"skip lm-eval's {TASK}")
    p.add_argument("--threads", type=int, default=1,
                   help="threads of each training run (1: several runs side by side; the CPU-minutes "
                        "in the table are comparable only at equal threads)")
    p.add_argument("--results", default=None, help="results JSONL (default CACHE/recovery-eEVAL_TOKENS.jsonl)")
    p.add_argument("--markdown", action="store_true")
    args = p.parse_args()
    if not 0.0 <= args.mix_other < 1.0:
        p.error(f"--mix-other is a share in [0, 1), got {args.mix_other}")
    if args.mix_source != "other" and not args.mix_other:
        p.error("--mix-source teacher needs --mix-other S > 0 (the share of the budget the samples fill)")
    cache = Path(args.cache)
    path = Path(args.results or cache / f"recovery-e{args.eval_tokens}.jsonl")
    if args.markdown:
        print(markdown(path))
        return
    torch.set_num_threads(args.threads)
    from actprune.pruning.checkpoint.hf_io import load_tokenizer

    dense_dir, start = cache / "models" / DENSE_NAME, Path(args.pruned or cache / "pruned20")
    tok = load_tokenizer(str(dense_dir))
    rows = eval_rows(tok, args.eval_tokens)
    done = load_results(path)

    def evaluate(key: str, model_dir: Path, extra: dict) -> None:
        evaluate_model(path, key, model_dir, extra, tok=tok, rows=rows, ref=ref, dense_dir=dense_dir,
                       task=not args.no_task)

    ref = dense_logp(cache, dense_dir, rows)
    steps = args.budget // (SEQ_TRAIN * BATCH)
    data, val, general = budget_data(cache, tok, args.budget, args.mix_other, args.mix_source)
    mix = {"mix": args.mix_other} if args.mix_other else {}
    if mix and args.mix_source != "other":
        mix["mix_source"] = args.mix_source
    # a start other than the default one: its rows are its own (key, run directory, table row)
    named = {"start": start.name} if args.pruned and start.resolve() != (cache / "pruned20").resolve() else {}
    tag = f"|start={named['start']}" if named else ""
    for row in filter(None, args.rows.split(",")):
        if row in ("dense", "pruned"):  # no training
            key = row + (tag if row == "pruned" else "")
            if key not in done:
                evaluate(key, dense_dir if row == "dense" else start,
                         {"row": row, "budget": 0, **(named if row == "pruned" else {})})
            continue
        for lr in args.lr:
            key = f"{row}@{args.budget}|lr={lr:g}" + (f"|mix={args.mix_other:g}" if mix else "")
            key += f"|src={args.mix_source}" if "mix_source" in mix else ""
            # every row: without distillation K still sets what its validation KL is taken on
            topk = {"topk": args.teacher_topk} if args.teacher_topk != 64 else {}
            key += f"|topk={args.teacher_topk}" if topk else ""
            lora = {"lora": True} if args.lora else {}  # the dense control too: a LoRA control
            key += "|lora" if lora else ""
            hidden = {"kd_hidden": args.kd_hidden} if row.endswith("+hidden") else {}
            key += f"|kd_hidden={args.kd_hidden:g}" if hidden else ""
            key += tag if not row.startswith("dense") else ""
            if key in done:
                continue
            out = cache / "runs" / key.replace("|", "-").replace("@", "-").replace("+", "-")
            out.parent.mkdir(exist_ok=True)
            begin = dense_dir if row.startswith("dense") else start
            cmd = finetune_args(row, args, begin, dense_dir, data, val, out, steps, lr,
                                (general, args.mix_other) if general else None)
            cost = train(cmd, out, args.threads)
            vals = [r for r in map(json.loads, (out / "finetune_log.jsonl").read_text().splitlines())
                    if "val_ppl" in r or "val_loss" in r]
            evaluate(key, out, {"row": row, "budget": args.budget, "lr": lr, **mix, **hidden, **topk, **lora,
                                **({} if row.startswith("dense") else named), "cmd": " ".join(cmd[1:]), **cost,
                                "val": vals[-1] if vals else None})


if __name__ == "__main__":
    main()
