"""The refit with anchor text of other domains (``--refit-anchor``): weighted moments are
repeated rows, the mixture weights give each text its share, the layer-by-layer refit with row
weights equals the refit from the second moments of the rows repeated, an anchor of another
"domain" lowers the refit's error there, and the CLIs pass it on and refuse what makes no sense."""

from __future__ import annotations

import pytest
import torch
from actprune.pruning.compensate import calibrate
from actprune.pruning.compensate import maths as compensate
from pruning_helpers import VIEW, load, write_calibration_text
from safetensors.torch import load_file

torch.set_num_threads(2)


def _rows(lo: int, hi: int, n: int, seed: int, t: int = 32) -> torch.Tensor:
    """(n, t) token ids drawn from [lo, hi): a "domain" of its own vocabulary."""
    return torch.randint(lo, hi, (n, t), generator=torch.Generator().manual_seed(seed))


def test_weighted_moments_are_the_moments_of_rows_repeated():
    gen = torch.Generator().manual_seed(0)
    x, t = torch.randn(5, 3, generator=gen), torch.randn(5, 2, generator=gen)
    w = torch.tensor([2.0, 1.0, 0.0, 3.0, 1.0])
    a, b = torch.zeros(4, 4, dtype=torch.float64), torch.zeros(4, 2, dtype=torch.float64)
    compensate.update_moments(a, b, x, t, w)
    idx = torch.tensor([0, 0, 1, 3, 3, 3, 4])
    a_ref, b_ref = torch.zeros_like(a), torch.zeros_like(b)
    compensate.update_moments(a_ref, b_ref, x[idx], t[idx])
    torch.testing.assert_close(a, a_ref)
    torch.testing.assert_close(b, b_ref)


def test_mixture_weights_give_each_text_its_share():
    w = compensate.mixture_weights(6, 2, 0.25)
    assert w.shape == (8,) and float(w.mean()) == pytest.approx(1.0)
    assert float(w[6:].sum() / w.sum()) == pytest.approx(0.25)
    assert torch.equal(compensate.mixture_weights(3, 0, 0.0), torch.ones(3, dtype=torch.float64))
    for bad in ((4, 2, 1.0), (4, 2, -0.1), (0, 2, 0.2), (4, 0, 0.2)):
        with pytest.raises(ValueError):
            compensate.mixture_weights(*bad)


def test_layerwise_refit_with_row_weights_is_the_refit_of_the_rows_repeated(llama_quarter):
    d, plan = llama_quarter
    rows = _rows(3, 100, 4, 1)
    keep = {lp.index: lp.mlp_keep for lp in plan.layers}
    got = calibrate.layerwise_refit(load(d), rows, keep, progress=False, batch=3,  # batches cut across weights
                                    row_weights=torch.tensor([2.0, 1.0, 1.0, 3.0]))
    ref_model = load(d)
    rec = calibrate.GramRecorder(ref_model)
    rec.forward(rows[[0, 0, 1, 2, 3, 3, 3]])
    grams = rec.close()
    for i, (w_new, bias) in got.items():
        w = VIEW.mlp(ref_model.model.layers[i])[2].weight.detach()
        ref_w, ref_b = compensate.refit(*compensate.moments_from_gram(grams[i], w, keep[i]), w[:, keep[i]])
        torch.testing.assert_close(w_new, ref_w, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(bias, ref_b, atol=1e-4, rtol=1e-4)


def _layer0_error(d, keep: list[int], refit: tuple[torch.Tensor, torch.Tensor], rows: torch.Tensor) -> float:
    """Squared error of layer 0's refitted down_proj against the dense one on ``rows``."""
    model, xs = load(d), []
    down = VIEW.mlp(model.model.layers[0])[2]
    h = down.register_forward_pre_hook(lambda _m, a: xs.append(a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        model(input_ids=rows)
    h.remove()
    x = torch.cat(xs)  # (N*T, I)
    w_new, bias = refit
    return float(((x[:, keep] @ w_new.T + bias - x @ down.weight.detach().T) ** 2).sum())


def test_an_anchor_of_another_domain_lowers_the_refit_error_there(llama_quarter):
    d, plan = llama_quarter
    keep = {0: plan.layers[0].mlp_keep}
    traffic, anchor, held_out = _rows(3, 50, 6, 2), _rows(50, 100, 2, 3), _rows(50, 100, 4, 4)
    alone = calibrate.layerwise_refit(load(d), traffic, keep, progress=False)[0]
    mixed = calibrate.layerwise_refit(load(d), torch.cat([traffic, anchor]), keep, progress=False,
                                      row_weights=compensate.mixture_weights(6, 2, 0.25))[0]
    assert _layer0_error(d, keep[0], mixed, held_out) < 0.8 * _layer0_error(d, keep[0], alone, held_out)


def test_cli_prune_mixes_the_anchor_and_refuses_what_makes_no_sense(llama_quarter, tmp_path, capsys):
    from actprune.client.cli import main

    d, plan = llama_quarter
    plan.save(tmp_path / "plan.json")
    data = write_calibration_text(tmp_path / "calib.txt", 40)
    other = tmp_path / "other.txt"
    other.write_text("\n\n".join(f"def f{k}(x):\n    return x * {k} + sum(range({k}))" for k in range(40)))
    base = ["prune", "--model", str(d), "--plan", str(tmp_path / "plan.json"), "--refit", str(data),
            "--refit-seq-len", "32"]

    def down(out):
        return load_file(str(out / "model-00001-of-00001.safetensors"))["model.layers.0.mlp.down_proj.weight"]

    assert main([*base, "-o", str(tmp_path / "plain")]) == 0
    assert main([*base, "-o", str(tmp_path / "zero"), "--refit-anchor", str(other), "--refit-anchor-weight", "0"]) == 0
    assert main([*base, "-o", str(tmp_path / "mixed"), "--refit-anchor", str(other)]) == 0
    assert torch.equal(down(tmp_path / "zero"), down(tmp_path / "plain"))
    assert (down(tmp_path / "mixed") - down(tmp_path / "plain")).abs().max() > 1e-4
    capsys.readouterr()
    for extra, says in ((["--refit-anchor-weight", "0.5"], "needs --refit-anchor"),
                        (["--refit-anchor", str(other), "--refit-anchor-weight", "1"], "[0, 1)"),
                        (["--refit-anchor", str(data)], "another domain")):
        assert main([*base, "-o", str(tmp_path / "x"), *extra]) == 2
        assert says in capsys.readouterr().err
    assert main(["prune", "--model", str(d), "--plan", str(tmp_path / "plan.json"), "-o", str(tmp_path / "x"),
                 "--refit-anchor", str(other)]) == 2
    assert "needs --refit" in capsys.readouterr().err


def test_compress_records_the_anchor_with_its_refits_and_refuses_it_as_validation(llama_quarter, tmp_path, capsys):
    from actprune.client.cli import main
    from actprune.pruning.compress import CompressConfig

    d, _ = llama_quarter
    cfg = CompressConfig(model=d, stats=tmp_path / "s", data="a.txt", output=tmp_path / "o", request={})
    assert "anchor" not in cfg.fit_inputs()  # checkpoints built before the flag stay "made from" it
    cfg.anchor, cfg.anchor_weight = "b.txt", 0.3
    assert cfg.fit_inputs()["anchor"] == "b.txt" and cfg.fit_inputs()["anchor_weight"] == 0.3
    rc = main(["compress", "--model", str(d), "--stats", str(tmp_path / "s"), "--data", "a.txt",
               "--param-ratio", "0.1", "-o", str(tmp_path / "o"), "--val-data", "b.txt", "--refit-anchor", "b.txt"])
    assert rc == 2 and "another domain" in capsys.readouterr().err


def test_an_anchor_too_short_for_one_row_is_named_in_the_error(llama_quarter, tmp_path, capsys):
    from actprune.client.cli import main

    d, plan = llama_quarter
    plan.save(tmp_path / "plan.json")
    short = tmp_path / "short.txt"
    short.write_text("too short")
    rc = main(["prune", "--model", str(d), "--plan", str(tmp_path / "plan.json"), "-o", str(tmp_path / "x"),
               "--refit", str(write_calibration_text(tmp_path / "calib.txt", 40)), "--refit-seq-len", "32",
               "--refit-anchor", str(short)])
    err = capsys.readouterr().err
    assert rc != 0 and "refit anchor" in err and "short.txt" in err
