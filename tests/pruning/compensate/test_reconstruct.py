"""Local reconstruction after the refit (:mod:`actprune.pruning.compensate.reconstruct`): it
lowers a pruned MLP's error on rows it never trained on, never leaves it worse than the refit,
and the checkpoint written from it equals the reconstructed model in memory."""

from __future__ import annotations

import json

import pytest
import torch
from actprune.pruning.checkpoint.slicer import slice_checkpoint
from actprune.pruning.compensate import calibrate
from actprune.pruning.compensate.layers import apply_mlp
from actprune.pruning.compensate.reconstruct import HOLD_OUT, reconstruct_mlp
from pruning_helpers import VIEW, load, logits, write_calibration_text

torch.set_num_threads(2)


def _rows(vocab: int, n: int, seed: int, t: int = 48) -> torch.Tensor:
    return torch.randint(3, vocab, (n, t), generator=torch.Generator().manual_seed(seed))  # (N, T)


def _one_layer(d, plan, n_rows=100, t=48):
    """Layer 1 of the tiny model pruned to the plan and refitted, and its dense MLP's inputs and
    outputs on n_rows rows of t tokens: (layer, u (N, T, H), y (N, T, H)). The inputs are drawn
    i.i.d. (a random tiny model's hidden states on random tokens are too few and too unlike
    each other for a held-out row to resemble the training rows, as real text's do)."""
    layer = load(d).model.layers[1]
    block, (gate, up, down) = VIEW.mlp_block(layer), VIEW.mlp(layer)
    g = torch.Generator().manual_seed(0)
    u = torch.randn(n_rows, t, gate.in_features, generator=g)
    keep = plan.layers[1].mlp_keep
    m = calibrate.LayerMoments(down.weight.detach(), torch.as_tensor(keep), hold_out=False)
    fit = torch.arange(n_rows) % HOLD_OUT != HOLD_OUT - 1  # the refit reads the training rows only
    with torch.no_grad():
        y = block(u)
        m.add((torch.nn.functional.silu(gate(u[fit])) * up(u[fit])).reshape(-1, gate.out_features))
    w, b, _ = calibrate._solve(m, {1: keep}, 1, 1e-2, False, 8)
    apply_mlp(VIEW, layer, keep, w, b)
    return layer, u, y


def _held_error(block, u, y) -> float:
    held = torch.arange(u.shape[0]) % HOLD_OUT == HOLD_OUT - 1
    with torch.no_grad():
        return float(((block(u[held]) - y[held]) ** 2).sum() / (y[held] ** 2).sum())


def test_reconstruction_lowers_the_error_on_rows_it_did_not_train_on(llama_quarter):
    d, plan = llama_quarter
    layer, u, y = _one_layer(d, plan)
    block = VIEW.mlp_block(layer)
    refit_error = _held_error(block, u, y)
    with torch.no_grad():  # as layerwise_refit calls it
        rec = reconstruct_mlp(block, u, y, epochs=4, batch_tokens=256)
    assert rec.before == pytest.approx(refit_error, rel=1e-5)
    # a random MLP's neurons are independent, so the kept ones can take over little of the removed
    # ones' work (SmolLM2's layers: 4-8 %); here ~0.3 %, every pass a little better than the last
    assert rec.kept_pass == 4 and rec.after < 0.999 * rec.before
    assert _held_error(block, u, y) == pytest.approx(rec.after, rel=1e-5)  # the kept pass is installed


def test_a_pass_that_does_worse_than_the_refit_is_not_kept(llama_quarter):
    d, plan = llama_quarter
    layer, u, y = _one_layer(d, plan)
    block = VIEW.mlp_block(layer)
    before = {k: v.clone() for k, v in block.state_dict().items()}
    rec = reconstruct_mlp(block, u, y, epochs=1, lr=1.0)  # steps of the weights' own size: a wreck
    assert rec.kept_pass == 0 and rec.after == rec.before
    for k, v in block.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_reconstructed_checkpoint_equals_the_model_in_memory(llama_quarter, tmp_path):
    d, plan = llama_quarter
    model = load(d)
    rows = _rows(model.config.vocab_size, 10, 3)
    keep = {lp.index: lp.mlp_keep for lp in plan.layers}
    mlp_rows: dict = {}
    refit = calibrate.layerwise_refit(model, rows, keep, reconstruct=2, mlp_rows=mlp_rows, progress=False)
    assert sorted(mlp_rows) == sorted(refit) == sorted(keep)
    with torch.no_grad():  # rows that differ from the plain slice, in memory and in mlp_rows alike
        for i, (gate, up) in mlp_rows.items():  # (the tiny model's few tokens rarely let a pass win)
            assert torch.equal(gate, VIEW.mlp(model.model.layers[i])[0].weight)  # what the model holds
            assert torch.equal(up, VIEW.mlp(model.model.layers[i])[1].weight)
            for t, lin in ((gate, VIEW.mlp(model.model.layers[i])[0]), (up, VIEW.mlp(model.model.layers[i])[1])):
                t.add_(0.05 * torch.randn(t.shape, generator=torch.Generator().manual_seed(i)))
                lin.weight.copy_(t)
    out = slice_checkpoint(d, plan, tmp_path / "recon", mlp_refit=refit, mlp_rows=mlp_rows, progress=False)
    record = json.loads((out / "actprune_plan.json").read_text())
    assert record["slice"]["mlp_reconstructed_layers"] == sorted(keep)
    ids = _rows(model.config.vocab_size, 2, 4)
    assert (logits(load(out, trust_remote_code=True), ids) - logits(model, ids)).abs().max().item() <= 1e-5
    plain = slice_checkpoint(d, plan, tmp_path / "plain", mlp_refit=refit, progress=False)  # rows left out
    assert (logits(load(plain, trust_remote_code=True), ids) - logits(model, ids)).abs().max().item() > 1e-4


def test_cli_prune_refit_reconstruct(llama_quarter, tmp_path, capsys):
    from actprune.client.cli import main

    d, plan = llama_quarter
    plan.save(tmp_path / "plan.json")
    data = write_calibration_text(tmp_path / "calib.txt", 60)
    base = ["prune", "--model", str(d), "--plan", str(tmp_path / "plan.json"), "--refit-seq-len", "32"]
    assert main([*base, "-o", str(tmp_path / "out"), "--refit", str(data), "--refit-reconstruct", "2"]) == 0
    assert "reconstruct: 4 MLPs, held-out error" in capsys.readouterr().out
    record = json.loads((tmp_path / "out" / "actprune_plan.json").read_text())
    assert record["slice"]["mlp_reconstructed_layers"] == [0, 1, 2, 3]
    for extra, says in ((["--refit-reconstruct", "2"], "need --refit DATA"),
                        (["--refit", str(data), "--refit-reconstruct", "-1"], ">= 0"),
                        (["--refit", str(data), "--refit-reconstruct", "2", "--refit-sequential", "local"],
                         "not with --refit-sequential")):
        assert main([*base, "-o", str(tmp_path / "bad"), *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and says in err[0], err


def test_too_few_rows_to_hold_any_out_leave_the_refit_and_say_so(llama_quarter, capsys):
    d, plan = llama_quarter
    keep = {lp.index: lp.mlp_keep for lp in plan.layers}
    model, refitted = load(d), load(d)
    rows = _rows(model.config.vocab_size, HOLD_OUT - 1, 5)
    mlp_rows: dict = {}
    calibrate.layerwise_refit(model, rows, keep, reconstruct=3, mlp_rows=mlp_rows)
    assert f"reconstruct: {HOLD_OUT - 1} calibration rows, too few to hold any out" in capsys.readouterr().out
    calibrate.layerwise_refit(refitted, rows, keep, progress=False)
    ids = _rows(model.config.vocab_size, 2, 4)
    assert torch.equal(logits(model, ids), logits(refitted, ids))  # the refit alone
