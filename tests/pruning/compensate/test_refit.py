"""MLP compensation: the refit reconstructs layer outputs better than slicing on held-out tokens,
the two calibration passes agree, OBS selection is exact on a hand-made case, and a checkpoint
written with refitted weights equals the masked-and-refitted reference model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from actprune.core.planning.planner import make_plan
from actprune.core.tensor.hooks import HookRegistry
from actprune.core.wire.plan_request import PlanRequest
from actprune.pruning.checkpoint.slicer import slice_checkpoint
from actprune.pruning.compensate import calibrate
from actprune.pruning.compensate import maths as compensate
from actprune.pruning.fixtures.synthetic import build_checkpoint
from pruning_helpers import SHAPE, VIEW, load, logits, record_stats, write_calibration_text

torch.set_num_threads(2)


def _rows(vocab: int, n: int, seed: int, t: int = 48) -> torch.Tensor:
    return torch.randint(3, vocab, (n, t), generator=torch.Generator().manual_seed(seed))  # (N, T)


def _down_inputs(model: torch.nn.Module, rows: torch.Tensor) -> list[torch.Tensor]:
    """Every layer's down_proj input over ``rows``: (N*T, I) per layer."""
    hooks, xs = HookRegistry(), {}
    for i, ly in enumerate(model.model.layers):
        hooks.pre_hook("t", VIEW.mlp(ly)[2],
                       lambda _m, a, i=i: xs.setdefault(i, []).append(a[0].reshape(-1, a[0].shape[-1])))
    logits(model, rows)
    hooks.remove_all()
    return [torch.cat(xs[i]) for i in range(len(xs))]


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    d = build_checkpoint(tmp_path_factory.mktemp("refit") / "llama", arch="llama", **SHAPE)
    plan = make_plan(record_stats(d), json.loads((d / "config.json").read_text()),
                     PlanRequest(strategy="magnitude", mlp_ratio=0.25), d)
    return d, plan, load(d)


def test_refit_reduces_layer_output_error_versus_slicing_on_heldout_tokens(llama):
    d, _, _ = llama
    model = load(d)
    # Real MLPs have redundant neurons; give every neuron of the upper half a noisy twin.
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for ly in model.model.layers:
            gate, up, _ = VIEW.mlp(ly)
            half = gate.out_features // 2
            for lin in (gate, up):
                lin.weight[half:] = lin.weight[:half] + 0.1 * lin.weight[:half].std() * torch.randn(
                    lin.weight[:half].shape, generator=g)
    vocab = model.config.vocab_size
    calib, held = _down_inputs(model, _rows(vocab, 32, 0)), _down_inputs(model, _rows(vocab, 8, 1))
    for i, ly in enumerate(model.model.layers):
        w = VIEW.mlp(ly)[2].weight.detach()
        keep = sorted(torch.randperm(w.shape[1], generator=g)[: 3 * w.shape[1] // 4].tolist())
        gram = torch.zeros(w.shape[1] + 1, w.shape[1] + 1, dtype=torch.float64)
        compensate.update_gram(gram, calib[i])
        w_new, bias = compensate.refit(*compensate.moments_from_gram(gram, w, keep), w[:, keep])
        x = held[i]
        e_slice = compensate.output_error(x, w, keep, w[:, keep], None)
        e_flap = compensate.output_error(x, w, keep, w[:, keep], compensate.flap_bias(w, keep, calib[i].mean(0)))
        e_refit = compensate.output_error(x, w, keep, w_new, bias)
        assert e_refit < 0.7 * e_slice and e_refit < e_flap, (i, e_slice, e_flap, e_refit)


def test_refit_with_huge_ridge_is_slicing_plus_least_squares_bias():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 6, generator=g) + 1.0
    w = torch.randn(3, 6, generator=g)
    keep = [0, 2, 3]
    gram = torch.zeros(7, 7, dtype=torch.float64)
    compensate.update_gram(gram, x)
    w_new, bias = compensate.refit(*compensate.moments_from_gram(gram, w, keep), w[:, keep], ridge=1e9)
    torch.testing.assert_close(w_new, w[:, keep], atol=1e-5, rtol=0)
    resid = x.double() @ w.double().T - x[:, keep].double() @ w[:, keep].double().T  # (T, H)
    torch.testing.assert_close(bias.double(), resid.mean(0), atol=1e-4, rtol=0)


def test_obs_removes_a_duplicated_unit_at_no_cost():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(500, 4, generator=g)
    x = torch.cat([x, x[:, :1]], dim=1)  # unit 4 copies unit 0
    w = torch.randn(3, 5, generator=g)
    gram = torch.zeros(6, 6, dtype=torch.float64)
    compensate.update_gram(gram, x)
    kept = compensate.obs_select(*compensate.moments_from_gram(gram, w, range(5)), 4, ridge=0.0)
    w_new, bias = compensate.refit(*compensate.moments_from_gram(gram, w, kept), w[:, kept], ridge=0.0)
    assert len(kept) == 4 and (0 in kept) != (4 in kept)
    assert compensate.output_error(x, w, kept, w_new, bias) < 1e-8


def test_layerwise_refit_equals_refit_from_full_second_moments(llama):
    d, plan, _ = llama
    rows = _rows(load(d).config.vocab_size, 4, 2)
    keep = {lp.index: lp.mlp_keep for lp in plan.layers}
    rec_model = load(d)
    rec = calibrate.GramRecorder(rec_model)
    rec.forward(rows)
    grams = rec.close()
    got = calibrate.layerwise_refit(load(d), rows, keep, progress=False)
    for i, (w_new, bias) in got.items():
        w = VIEW.mlp(rec_model.model.layers[i])[2].weight.detach()
        a, b = compensate.moments_from_gram(grams[i], w, keep[i])
        ref_w, ref_b = compensate.refit(a, b, w[:, keep[i]])
        torch.testing.assert_close(w_new, ref_w, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(bias, ref_b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("sequential", [False, "dense"])
def test_refitted_checkpoint_equals_masked_and_refitted_reference(llama, tmp_path, sequential):
    d, plan, _ = llama
    model = load(d)
    rows = _rows(model.config.vocab_size, 4, 3)
    refit = calibrate.layerwise_refit(model, rows, {lp.index: lp.mlp_keep for lp in plan.layers},
                                      sequential=sequential, progress=False)
    out = slice_checkpoint(d, plan, tmp_path / "refit", mlp_refit=refit, progress=False)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["actprune_bias"] == {"down_proj": True, "o_proj": False}
    sliced = load(out, trust_remote_code=True)

    ref = load(d)  # masked: removed columns zero, kept columns refitted, bias added
    with torch.no_grad():
        for i, (w_new, bias) in refit.items():
            down = VIEW.mlp(ref.model.layers[i])[2]
            w = torch.zeros_like(down.weight)
            w[:, plan.layers[i].mlp_keep] = w_new
            down.weight.copy_(w)
            down.bias = torch.nn.Parameter(bias.clone())
    ids = _rows(model.config.vocab_size, 2, 4)
    diff = (logits(sliced, ids) - logits(ref, ids)).abs().max().item()
    assert diff <= 1e-5
    assert np.isfinite(diff)


def test_cli_prune_refit_writes_a_checkpoint_with_down_proj_biases(llama, tmp_path, capsys):
    from actprune.client.cli import main

    d, plan, _ = llama
    plan.save(tmp_path / "plan.json")
    data = write_calibration_text(tmp_path / "calib.txt", 40)
    out = tmp_path / "refit"
    rc = main(["prune", "--model", str(d), "--plan", str(tmp_path / "plan.json"), "-o", str(out),
               "--refit", str(data), "--refit-seq-len", "32", "--refit-sequential", "local", "--refit-reselect",
               "--refit-ridge", "auto"])
    assert rc == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["actprune_bias"]["down_proj"] and not cfg["actprune_bias"]["o_proj"]
    record = json.loads((out / "actprune_plan.json").read_text())
    assert record["slice"]["mlp_refit_layers"] == [0, 1, 2, 3]
    assert [len(lp["mlp_keep"]) for lp in record["layers"]] == [len(lp.mlp_keep) for lp in plan.layers]
    assert torch.isfinite(logits(load(out, trust_remote_code=True), _rows(100, 1, 0))).all()
    capsys.readouterr()
    rc = main(["prune", "--model", str(d), "--plan", str(tmp_path / "plan.json"), "-o", str(tmp_path / "x"),
               "--refit", str(data), "--bias-compensation", "--stats", str(data)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "--refit" in err[0]


def test_layerwise_reselect_picks_what_obs_picks_from_full_second_moments(llama):
    d, plan, _ = llama
    rows = _rows(load(d).config.vocab_size, 4, 2)
    rec_model = load(d)
    rec = calibrate.GramRecorder(rec_model)
    rec.forward(rows)
    grams = rec.close()
    keep = {lp.index: lp.mlp_keep for lp in plan.layers}
    calibrate.layerwise_refit(load(d), rows, keep, reselect=True, progress=False)
    for i, kept in keep.items():
        w = VIEW.mlp(rec_model.model.layers[i])[2].weight.detach()
        want = compensate.obs_select(*compensate.moments_from_gram(grams[i], w, range(w.shape[1])),
                                     len(plan.layers[i].mlp_keep), step=8)
        assert kept == want


def test_refit_residual_from_moments_equals_the_direct_error():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(300, 8, generator=g) + 0.5
    w = torch.randn(4, 8, generator=g)
    keep = [1, 2, 5, 6]
    gram = torch.zeros(9, 9, dtype=torch.float64)
    compensate.update_gram(gram, x)
    a, b = compensate.moments_from_gram(gram, w, keep)
    w_new, bias = compensate.refit(a, b, w[:, keep], ridge=0.1)
    energy = float(((x.double() @ w.double().T) ** 2).sum())
    direct = compensate.output_error(x, w, keep, w_new, bias) * x.shape[0] * w.shape[0]
    assert compensate.refit_residual(a, b, energy, w_new, bias) == pytest.approx(direct, rel=1e-6)


def test_choose_ridge_picks_the_least_heldout_error_computed_directly():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(400, 10, generator=g)
    x[:, 1] = x[:, 0] + 0.01 * torch.randn(400, generator=g)  # near-collinear: the ridge matters
    w = torch.randn(3, 10, generator=g)
    keep = [0, 1, 2, 4, 7]
    fit, held = x[:60], x[60:]  # few fit tokens, so the unregularised fit overfits
    moments = []
    for part in (fit, held):
        gram = torch.zeros(11, 11, dtype=torch.float64)
        compensate.update_gram(gram, part)
        moments.append(compensate.moments_from_gram(gram, w, keep))
    energy = float(((held.double() @ w.double().T) ** 2).sum())
    best, errors = compensate.choose_ridge(moments[0], (*moments[1], energy), w[:, keep])
    direct = [compensate.output_error(held, w, keep, *compensate.refit(*moments[0], w[:, keep], r))
              * held.shape[0] * w.shape[0] for r in compensate.RIDGE_GRID]
    np.testing.assert_allclose(errors, direct, rtol=1e-5)
    assert best == compensate.RIDGE_GRID[int(np.argmin(direct))]


def test_layerwise_auto_ridge_refits_each_layer_with_its_chosen_ridge(llama):
    d, plan, _ = llama
    rows = _rows(load(d).config.vocab_size, 10, 3, t=24)  # 10 rows, batch 1: rows 4 and 9 held out
    keep = {lp.index: lp.mlp_keep for lp in plan.layers}
    chosen: dict[int, float] = {}
    got = calibrate.layerwise_refit(load(d), rows, keep, ridge="auto", batch=1, chosen=chosen, progress=False)
    assert set(chosen) == set(got) and set(chosen.values()) <= set(compensate.RIDGE_GRID)
    for r in set(chosen.values()):  # one-shot: each layer's refit depends on its own ridge only
        fixed = calibrate.layerwise_refit(load(d), rows, keep, ridge=r, batch=1, progress=False)
        for i in (i for i, ri in chosen.items() if ri == r):
            torch.testing.assert_close(got[i][0], fixed[i][0], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(got[i][1], fixed[i][1], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="auto"):
        calibrate.layerwise_refit(load(d), rows, keep, ridge="best", progress=False)
