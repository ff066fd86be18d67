"""REAP from the offline recorder: ``reap_sum`` — per expert, Σ routing weight × ‖expert output‖
over the tokens whose top-k holds it — equals a float64 reference computed token by token from
the checkpoint's own per-expert tensors; ``--expert-strategy reap`` keeps the experts of largest
``reap_sum / topk_count``, and stats without ``reap_sum`` (a server's) are refused in one line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from actprune.client.cli import main
from actprune.core.archs import REGISTRY
from actprune.core.config import read_config
from actprune.core.tensor.hf_model import HfModel
from actprune.core.tensor.hooks import HookRegistry
from actprune.core.wire.plan import Plan
from actprune.core.wire.stats import Stats
from actprune.core.wire.stats_merge import merge
from actprune.pruning.checkpoint.hf_io import load_causal_lm, load_tokenizer
from actprune.pruning.data import tokenize
from actprune.pruning.record import budget, record
from moe_helpers import SPARSE, load_f64, tiny_moe
from pruning_helpers import SENTENCES
from safetensors.torch import load_file

MOE = REGISTRY["Qwen3MoeForCausalLM"].moe


@pytest.fixture(scope="module", params=[True, False], ids=["norm_topk", "no_norm_topk"])
def moe(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return tiny_moe(tmp_path_factory.mktemp("moe"), request.param)


def _reference(ckpt: Path, token_lists: list[list[int]]) -> dict[int, np.ndarray]:
    """Σ g_e(x) · ‖f_e(x)‖ per expert in float64, one token at a time: the experts' input from the
    float64 model (the post-attention norm's output), routing from its router logits (softmax,
    top-k, renormalised when norm_topk_prob), f_e from the checkpoint's per-expert tensors."""
    cfg = read_config(ckpt)
    k, renorm = cfg["num_experts_per_tok"], cfg["norm_topk_prob"]
    weights = {n: t.double() for n, t in load_file(ckpt / "model.safetensors").items()}
    model = load_f64(ckpt)
    view, seen, reg = HfModel.of(model), {}, HookRegistry()
    for i in SPARSE:
        reg.pre_hook("test", view.layers[i].mlp, lambda m, a, i=i: seen.setdefault(i, []).append(a[0][0]))
    with torch.no_grad():
        for ids in token_lists:
            model(input_ids=torch.tensor([ids]), use_cache=False)
    reg.remove_all()
    out = {}
    for i in SPARSE:
        x = torch.cat(seen[i])  # (N, H)
        w_name = lambda e, p, i=i: f"model.layers.{i}.{MOE.expert_suffix(e, p)}.weight"  # noqa: E731
        probs = torch.softmax(x @ weights[f"model.layers.{i}.{MOE.router}.weight"].T, dim=-1)  # (N, E)
        total = np.zeros(probs.shape[1])
        for t in range(x.shape[0]):
            top = torch.argsort(-probs[t])[:k]
            g = probs[t, top] / (probs[t, top].sum() if renorm else 1.0)
            for e, ge in zip(top.tolist(), g.tolist(), strict=True):
                h = torch.nn.functional.silu(weights[w_name(e, "gate_proj")] @ x[t]) * (weights[w_name(e, "up_proj")] @ x[t])
                total[e] += ge * float(torch.linalg.vector_norm(weights[w_name(e, "down_proj")] @ h))
        out[i] = total
    return out


def test_recorded_reap_sum_equals_a_float64_reference_with_padding_masked(moe):
    ckpt, stats_file = moe
    tok = load_tokenizer(ckpt)
    token_lists = budget(tokenize(tok, SENTENCES), 64, None)
    assert len({len(t) for t in token_lists}) > 1  # batches of 4 really are padded
    stats = record(load_causal_lm(ckpt), token_lists, model_name="moe", config=read_config(ckpt),  # float32
                   batch_size=4, pad_id=tok.pad_token_id, progress=False)
    want = _reference(ckpt, token_lists)
    for i in SPARSE:
        got = stats.router(i)["reap_sum"]
        assert got.dtype == np.float64 and (got > 0).all()
        np.testing.assert_allclose(got, want[i], rtol=1e-4)
    assert "reap_sum" not in (stats.router(1) or {})  # the dense layer has no router


def _plan(moe, tmp_path: Path, stats: Path, *flags: str) -> int:
    ckpt, _ = moe
    rc = main(["plan", "--stats", str(stats), "--model", str(ckpt), "--expert-ratio", "0.5", *flags,
               "-o", str(tmp_path / "plan.json")])
    return rc


def test_reap_strategy_keeps_the_experts_of_largest_mean_weighted_output_norm(moe, tmp_path):
    _, stats_file = moe
    assert _plan(moe, tmp_path, stats_file, "--expert-strategy", "reap") == 0
    plan, stats = Plan.load(tmp_path / "plan.json"), Stats.load(stats_file)
    for i in SPARSE:
        g = stats.router(i)
        saliency = g["reap_sum"] / g["topk_count"]  # every expert was picked on these texts
        assert plan.layers[i].experts_keep == sorted(np.argsort(-saliency, kind="stable")[:4].tolist())
    # REAP ranks differently from the mean routing weight on this model (else the test shows little)
    assert _plan(moe, tmp_path, stats_file) == 0
    assert Plan.load(tmp_path / "plan.json").layers[0].experts_keep != plan.layers[0].experts_keep or \
        Plan.load(tmp_path / "plan.json").layers[2].experts_keep != plan.layers[2].experts_keep


def test_stats_without_reap_sum_are_refused_for_reap_in_one_line(moe, tmp_path, capsys):
    _, stats_file = moe
    stats = Stats.load(stats_file)
    served = Stats({n: a for n, a in stats.tensors.items() if not n.endswith(".reap_sum")}, dict(stats.meta))
    served.save(tmp_path / "served.safetensors")  # what a server's snapshot holds
    capsys.readouterr()
    assert _plan(moe, tmp_path, tmp_path / "served.safetensors", "--expert-strategy", "reap") == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "expert_strategy" in err and "actprune record" in err, err
    # merging keeps reap_sum only when every part has it (else it sums over only some tokens)
    assert merge([stats, stats]).router(0)["reap_sum"] == pytest.approx(2 * stats.router(0)["reap_sum"])
    assert "reap_sum" not in merge([stats, served]).router(0)


def test_a_malformed_reap_sum_is_refused_on_load(moe):
    from actprune.core.wire.stats import StatsFormatError

    stats = Stats.load(moe[1])
    for bad, message in ((-stats.router(0)["reap_sum"], "finite values >= 0"),
                         (stats.router(0)["reap_sum"][:3], "one width")):
        tensors = {**stats.tensors, "layers.0.router.reap_sum": np.ascontiguousarray(bad)}
        with pytest.raises(StatsFormatError, match=message):
            Stats.from_bytes(Stats(tensors, dict(stats.meta)).to_bytes())
