"""bench/recovery.py: the scores it reports (perplexity, KL to the cached dense log-probs), the
command line of each row (same data and budget; only the loss and the start differ), the table."""

from __future__ import annotations

import json
import math
import sys
from argparse import Namespace
from pathlib import Path

import torch
from actprune.pruning.fixtures.synthetic import build_checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import recovery  # noqa: E402


def _model(tmp_path: Path, seed: int) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    d = build_checkpoint(tmp_path / f"m{seed}", arch="llama", seed=seed)
    return AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32).eval()


def test_score_is_perplexity_and_kl_against_the_cached_reference(tmp_path):
    torch.manual_seed(0)
    a, b = _model(tmp_path, 1), _model(tmp_path, 2)
    rows = {"t": torch.randint(0, a.config.vocab_size, (2, 9))}
    ref = {"t": recovery.logprobs(a, rows["t"]).half()}
    same, other = recovery.score(a, rows, ref), recovery.score(b, rows, ref)
    assert abs(same["t_kl"]) < 1e-3  # only the float16 rounding of the cache
    assert other["t_kl"] > 10 * max(same["t_kl"], 1e-4)
    lp = recovery.logprobs(b, rows["t"])  # (N, L-1, V)
    nll = -lp.gather(-1, rows["t"][:, 1:, None]).mean().item()
    assert math.isclose(other["t_ppl"], math.exp(nll), rel_tol=1e-5)


def test_rows_share_data_budget_and_seed_and_differ_only_in_loss_and_start():
    args = Namespace(local_steps=16, local_tokens=8192, kd_hidden=5.0, teacher_topk=64, lora=False)
    p = Path
    cmds = {r: recovery.finetune_args(r, args, p("start"), p("dense"), p("d.jsonl"), p("v.jsonl"), p("o"), 16, 1e-4)
            for r in ("plain", "distil", "distil+hidden", "local+distil")}
    common = ["--data", "d.jsonl", "--max-steps", "16", "--batch-size", "4", "--seed", "0", "--val-data", "v.jsonl"]
    for cmd in cmds.values():
        assert all(x in cmd for x in common)
    # every row is validated against the dense teacher; only distillation trains on it
    assert cmds["plain"][cmds["plain"].index("--kd-alpha") + 1] == "0.0"
    assert cmds["distil"][cmds["distil"].index("--kd-alpha") + 1] == "1.0" and "--teacher-topk" in cmds["distil"]
    assert "--local-steps" in cmds["local+distil"] and "--local-steps" not in cmds["distil"]
    # distil+hidden is distil and the hidden-state term, nothing else
    hidden = cmds["distil+hidden"]
    assert hidden[hidden.index("--kd-hidden") + 1] == "5" and hidden[:-2] == cmds["distil"]
    assert all("--kd-hidden" not in c for r, c in cmds.items() if r != "distil+hidden")


def test_topk_0_is_the_live_teacher_and_lora_changes_nothing_else():
    p = Path

    def distil(**kw) -> list[str]:
        args = Namespace(**{"local_steps": 16, "local_tokens": 8192, "kd_hidden": 5.0, "teacher_topk": 64,
                            "lora": False, **kw})
        return recovery.finetune_args("distil", args, p("s"), p("t"), p("d.jsonl"), p("v.jsonl"), p("o"), 16, 1e-4)

    base = distil()
    assert base[base.index("--teacher-topk") + 1] == "64" and "teacher-top64-d" in base[base.index("--teacher-cache") + 1]
    live = distil(teacher_topk=0)  # the teacher in memory: full-vocabulary KL, no cache file
    assert live == base[:-4] and "--teacher-topk" not in live  # base ends: --teacher-topk 64 --teacher-cache F
    k = distil(teacher_topk=1024)
    assert k[k.index("--teacher-topk") + 1] == "1024" and "teacher-top1024-d" in k[k.index("--teacher-cache") + 1]
    assert distil(lora=True) == base + ["--lora"]


def test_teacher_samples_fill_the_budget_and_the_same_seed_gives_the_same_file(tmp_path):
    from actprune.pruning.checkpoint.hf_io import load_tokenizer
    from actprune.pruning.data import tokenize

    d = build_checkpoint(tmp_path / "cache" / "models" / recovery.DENSE_NAME, arch="llama", seed=3)
    tok = load_tokenizer(d)
    docs = recovery.teacher_docs(d, tok, 300, batch=4, new_tokens=32)
    n = [len(ids) + 1 for ids in tokenize(tok, docs)]
    assert sum(n) >= 300 and sum(n) - n[-1] < 300  # the budget, and no sample more than it takes
    assert min(n) > 16 and len(set(docs)) == len(docs)  # sampled, not greedy: no two alike
    assert recovery.teacher_docs(d, tok, 300, batch=4, new_tokens=32) == docs
    assert recovery.teacher_docs(d, tok, 300, batch=4, new_tokens=32, seed=1) != docs
    _, _, general = recovery.budget_data(tmp_path / "cache", tok, 1200, mix=0.25, source="teacher")
    samples = [json.loads(line)["text"] for line in general.read_text().splitlines()]
    assert general.name == "teacher-300.jsonl" and sum(len(ids) + 1 for ids in tokenize(tok, samples)) >= 300


def test_markdown_divides_by_dense_and_shows_accuracy_with_its_error(tmp_path):
    path = tmp_path / "r.jsonl"
    dense = {"key": "dense", "row": "dense", "budget": 0, "wiki_ppl": 10.0, "wiki_kl": 0.0,
             "task": {"acc": 0.7, "acc_stderr": 0.07}}
    plain = {"key": "plain@16384|lr=0.0001", "row": "plain", "budget": 16384, "lr": 1e-4, "wiki_ppl": 12.5, "wiki_kl": 0.25,
             "train_cpu_s": 660}
    path.write_text("".join(json.dumps(r) + "\n" for r in (dense, plain)))
    lines = recovery.markdown(path).splitlines()
    assert "| 0.700 ± 0.070 |" in lines[2]
    assert lines[3].startswith("| plain (lr 0.0001) | 16384 | 1.250 (12.50) | 0.2500 | — | 11.0 | — | — |")


def test_the_learning_rate_is_picked_on_validation_kl_not_validation_perplexity(tmp_path):
    path = tmp_path / "r.jsonl"
    dense = {"key": "dense", "row": "dense", "budget": 0, "wiki_ppl": 10.0, "wiki_kl": 0.0}
    rows = [dense]
    for lr, ppl, kl in ((3e-5, 20.0, 0.40), (1e-4, 19.0, 0.35), (3e-4, 18.0, 0.45)):
        rows.append({"key": f"distil@8192|lr={lr:g}", "row": "distil", "budget": 8192, "lr": lr, "wiki_ppl": 12.0,
                     "wiki_kl": 0.3, "val": {"val_ppl": ppl, "val_kl": kl}})
    rows.append({"key": "plain@8192|lr=0.0001", "row": "plain", "budget": 8192, "lr": 1e-4, "wiki_ppl": 12.0,
                 "wiki_kl": 0.3, "val": {"val_ppl": 18.5}})  # recorded before val_kl: alone in its group
    assert recovery.picked(rows) == {"distil@8192|lr=0.0001", "plain@8192|lr=0.0001"}
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    marked = [ln for ln in recovery.markdown(path).splitlines() if "◀" in ln]
    assert len(marked) == 1 and marked[0].startswith("| distil (lr 0.0001) ◀ |") and "| 19.00 | 0.3500 |" in marked[0]


def test_rows_from_another_start_are_their_own_group_and_named_in_the_table(tmp_path):
    path = tmp_path / "r.jsonl"
    dense = {"key": "dense", "row": "dense", "budget": 0, "wiki_ppl": 10.0, "wiki_kl": 0.0}
    rows = [dense]
    for start, lr, kl in (("", 1e-4, 0.30), ("", 3e-4, 0.40), ("anchored20", 3e-4, 0.50)):
        tag = {"start": start} if start else {}
        rows.append({"key": f"distil@8192|lr={lr:g}" + (f"|start={start}" if start else ""), "row": "distil",
                     "budget": 8192, "lr": lr, **tag, "wiki_ppl": 12.0, "wiki_kl": 0.3,
                     "val": {"val_ppl": 19.0, "val_kl": kl}})
    # the anchored start's one rate is not beaten by the default start's better one
    assert recovery.picked(rows) == {"distil@8192|lr=0.0001", "distil@8192|lr=0.0003|start=anchored20"}
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    names = [ln.split(" | ")[0] for ln in recovery.markdown(path).splitlines()[3:]]
    assert names == ["| distil (lr 0.0001) ◀", "| distil (lr 0.0003)", "| distil from anchored20 (lr 0.0003)"]


def test_a_mixed_budget_takes_its_share_from_the_other_domain_texts_first_halves_only(tmp_path):
    from actprune.pruning.data import wiki_texts
    from texts import OTHER_TEXTS, halves

    def tok(text: str, add_special_tokens: bool = False) -> dict[str, list[str]]:  # one token a word
        return {"input_ids": text.split()}

    def tokens(docs: list[str]) -> int:
        return sum(len(d.split()) + 1 for d in docs)  # as finetune packs them: + EOS

    wiki = set(wiki_texts("train"))
    plain, _, none = recovery.budget_data(tmp_path, tok, 4000)
    docs = [json.loads(line)["text"] for line in plain.read_text().splitlines()]
    assert none is None and set(docs) <= wiki and tokens(docs) >= 4000

    own, _, general = recovery.budget_data(tmp_path, tok, 4000, mix=0.25)
    docs = [json.loads(line)["text"] for line in own.read_text().splitlines()]
    assert set(docs) <= wiki and 3000 <= tokens(docs) < 3000 + max(tokens([d]) for d in docs)
    other = [json.loads(line)["text"] for line in general.read_text().splitlines()]
    firsts, seconds = zip(*(halves(load()) for load in OTHER_TEXTS.values()), strict=True)
    for first, second in zip(firsts, seconds, strict=True):
        mine = [d for d in other if d in first]  # documents are whole paragraphs of a first half
        assert 500 <= tokens(mine) and not any(d in second for d in mine)
    assert len(other) == sum(1 for d in other if any(d in f for f in firsts))
    args = Namespace(local_steps=16, local_tokens=8192, teacher_topk=64, lora=False)
    cmd = recovery.finetune_args("distil", args, Path("s"), Path("d"), own, Path("v"), Path("o"), 4, 1e-4,
                                 (general, 0.25))
    assert cmd[cmd.index("--mix-data") + 1] == str(general) and cmd[cmd.index("--mix-share") + 1] == "0.25"
