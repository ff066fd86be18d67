"""The offline recorder writes the server's stats format with exact float64 statistics."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from actprune.client.cli import main
from actprune.core.config import read_config
from actprune.core.tensor.hooks import HookRegistry
from actprune.core.wire.stats import REQUIRED_META, Stats, config_hash
from actprune.pruning.checkpoint.hf_io import load_causal_lm, load_tokenizer
from actprune.pruning.data import tokenize
from actprune.pruning.record import budget, decoder_taps, record
from pruning_helpers import SENTENCES


def _tokens(model_dir):
    tok = load_tokenizer(model_dir)
    return tok, budget(tokenize(tok, SENTENCES), 64, None)


def _independent(model, token_lists):
    """Capture raw activations one unpadded sequence at a time; statistics in float64."""
    taps = decoder_taps(model)
    seen: dict[tuple[int, str], list[torch.Tensor]] = {}
    reg = HookRegistry()

    def grab(key):
        def hook(module, args, *rest):
            x = rest[-1] if key[1] == "out" else args[0]
            x = x[0] if isinstance(x, tuple) else x
            seen.setdefault(key, []).append(x.detach().reshape(-1, x.shape[-1]).float().double())

        return hook

    for i, t in enumerate(taps):
        reg.pre_hook("test", t.down_proj, grab((i, "mlp")))
        reg.pre_hook("test", t.o_proj, grab((i, "attn")))
        reg.pre_hook("test", t.layer, grab((i, "in")))
        reg.post_hook("test", t.layer, grab((i, "out")))
    with torch.no_grad():
        for ids in token_lists:
            model(input_ids=torch.tensor([ids]), use_cache=False)
    reg.remove_all()
    return {k: torch.cat(v) for k, v in seen.items()}


@pytest.mark.parametrize("arch", ["qwen3", "llama"])
def test_recorder_stats_equal_independent_float64_statistics(arch, tiny, tiny_llama):
    model_dir = tiny if arch == "qwen3" else tiny_llama
    tok, token_lists = _tokens(model_dir)
    model = load_causal_lm(model_dir)
    cfg = read_config(model_dir)
    stats = record(model, token_lists, model_name="tiny", config=cfg, batch_size=1,
                   pad_id=tok.pad_token_id, progress=False)
    ref = _independent(model, token_lists)
    n_tokens = sum(len(t) for t in token_lists)
    assert stats.meta["tokens_prefill"] == n_tokens and stats.meta["tokens_decode"] == 0
    assert stats.meta["config_hash"] == config_hash(cfg)
    assert set(REQUIRED_META) <= set(stats.meta)
    assert stats.layers == list(range(cfg["num_hidden_layers"]))
    for i in stats.layers:
        for kind in ("mlp", "attn"):
            x = ref[(i, kind)]  # (T, C) float64
            fig = stats.figures(i, kind)
            assert fig.count == n_tokens == x.shape[0]
            np.testing.assert_allclose(fig.mean, x.mean(0).numpy(), rtol=1e-12, atol=1e-15)
            # update_channels squares deviations in float32 before summing in float64, so the
            # variance carries float32 rounding (~1e-7 relative); mean and mean|x| do not.
            np.testing.assert_allclose(fig.var, x.var(0, correction=0).numpy(), rtol=2e-6, atol=1e-12)
            np.testing.assert_allclose(fig.mean_abs, x.abs().mean(0).numpy(), rtol=1e-12, atol=1e-15)
            np.testing.assert_array_equal(fig.max_abs, x.abs().amax(0).float().numpy())
        cos = torch.nn.functional.cosine_similarity(ref[(i, "in")], ref[(i, "out")], dim=-1)
        assert stats.tensors[f"layers.{i}.block.count"] == n_tokens
        np.testing.assert_allclose(stats.block_influence(i), 1.0 - cos.mean().item(), rtol=1e-6)
    assert len(stats.tensors["layers.0.mlp.mean"]) == cfg["intermediate_size"]
    assert len(stats.tensors["layers.0.attn.mean"]) == cfg["num_attention_heads"] * cfg["head_dim"]


def test_recorder_masks_padding_in_batches(tiny):
    tok, token_lists = _tokens(tiny)
    assert len({len(t) for t in token_lists}) > 1  # the batch really is padded
    model = load_causal_lm(tiny)
    cfg = read_config(tiny)
    one = record(model, token_lists, model_name="t", config=cfg, batch_size=1, pad_id=tok.pad_token_id, progress=False)
    many = record(model, token_lists, model_name="t", config=cfg, batch_size=4, pad_id=tok.pad_token_id, progress=False)
    for name, a in one.tensors.items():
        if name.endswith(("count", "near_zero")):
            np.testing.assert_array_equal(many.tensors[name], a, err_msg=name)
        else:
            np.testing.assert_allclose(many.tensors[name], a, rtol=1e-4, atol=1e-6, err_msg=name)


def test_budget_cuts_to_exact_token_count():
    lists = [[1] * 10, [2] * 10, [3] * 10]
    out = budget(lists, max_len=8, max_tokens=20)
    assert [len(x) for x in out] == [8, 8, 4]
    assert sum(map(len, out)) == 20


def test_record_cli_writes_a_loadable_stats_file(tiny, pr_jsonl, tmp_path, capsys):
    out = tmp_path / "s.safetensors"
    rc = main(["record", "--model", str(tiny), "--data", str(pr_jsonl), "--text-field", "response",
               "--max-tokens", "100", "-o", str(out)])
    assert rc == 0
    stats = Stats.load(out)
    assert stats.tokens == 100
    assert stats.meta["model"] == tiny.name


def test_record_cli_names_a_missing_field(tiny, pr_jsonl, tmp_path, capsys):
    rc = main(["record", "--model", str(tiny), "--data", str(pr_jsonl), "--text-field", "answer",
               "-o", str(tmp_path / "s.safetensors")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "no field 'answer'" in err and "response" in err


def test_each_layer_accumulates_on_its_own_device(tiny, tmp_path):
    """With a device_map a model's layers sit on several devices. No second real device here (no
    GPU: the stand-in is PyTorch's "meta" device, which holds shapes, not values), so this checks
    where the accumulators are created; the forward of a spread model runs in bench/gpu.sh."""
    from actprune.pruning.record import Recorder
    from moe_helpers import tiny_moe

    for ckpt in (tiny, tiny_moe(tmp_path)[0]):
        model = load_causal_lm(ckpt, torch.float32)
        last = len(model.model.layers) - 1  # the MoE's is sparse: a router, no MLP group
        model.model.layers[last].to("meta")
        rec = Recorder(model)
        groups = {i: [g for g in (rec.mlp[i], rec.router[i], rec.attn[i], rec.block[i]) if g is not None]
                  for i in (0, last)}
        assert all(t.device.type == "cpu" for g in groups[0] for t in g.values())
        assert len(groups[last]) == 3 and all(t.device.type == "meta" for g in groups[last] for t in g.values())


def test_record_cli_takes_a_device_map(tiny, pr_jsonl, tmp_path):
    out = tmp_path / "s.safetensors"
    assert main(["record", "--model", str(tiny), "--data", str(pr_jsonl), "--text-field", "response",
                 "--max-tokens", "50", "--device-map", "cpu", "-o", str(out)]) == 0
    assert Stats.load(out).tokens == 50
