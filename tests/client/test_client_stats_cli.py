"""`actprune stats pull|show`, pulling from ``fake_vllm`` servers (the real actprune routes over
a fake engine that has served known samples) on loopback HTTP."""

from __future__ import annotations

from actprune.core.summary import summarize
from actprune.core.wire.stats import Stats
from fake_vllm import fake_vllm, serve
from raw_samples import assert_stats_match, concat, stats_from_raw


def test_pull_merges_every_server_into_one_file(tmp_path, capsys, run_cli, raw_a, raw_b):
    out = tmp_path / "stats.safetensors"
    with serve(fake_vllm(raw_a)) as url_a, serve(fake_vllm(raw_b)) as url_b:
        code = run_cli(["stats", "pull", "--base-url", url_a, "--base-url", url_b, "-o", str(out)])
    assert code == 0
    got = Stats.load(out)
    assert got.tokens == 470 and got.meta["merged_from"] == 2
    assert_stats_match(got, stats_from_raw(concat(raw_a, raw_b)))
    assert "pulled 2 servers: tiny/qwen3, 470 tokens, 3 layers" in capsys.readouterr().out


def test_pull_errors_are_one_line_naming_the_server(tmp_path, capsys, run_cli, raw_a):
    out = str(tmp_path / "s.safetensors")
    with serve(fake_vllm(raw_a, api_key="k")) as url:
        assert run_cli(["stats", "pull", "--base-url", url, "-o", out]) == 2
        err = capsys.readouterr().err
        assert "401 Unauthorized" in err and "missing or wrong API key" in err and len(err.splitlines()) == 1
        assert run_cli(["stats", "pull", "--base-url", url, "-o", out, "--api-key", "k"]) == 0
    capsys.readouterr()
    assert run_cli(["stats", "pull", "--base-url", url, "-o", str(tmp_path / "x"), "--retries", "1"]) == 2
    assert "could not connect after 2 tries" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_show_prints_one_row_per_layer_with_the_summary_figures(tmp_path, capsys, run_cli, raw_a):
    stats = stats_from_raw(raw_a)
    path = stats.save(tmp_path / "s.safetensors")
    assert run_cli(["stats", "show", str(path)]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.split()[:2] == ["layer", "tokens"])
    rows = [line.split() for line in lines[header + 1 :]]
    assert [r[0] for r in rows] == ["0", "1", "2"]
    s = summarize(stats)
    for r, ls in zip(rows, s.layers, strict=True):
        assert r[1] == "300" and r[2] == "48" and r[7] == "4"
        assert r[3] == f"{ls.mlp.mean_abs.mean:.4g}" and r[-1] == f"{ls.block_influence:.4g}"
        assert r[6] == f"{100 * ls.mlp.frac_sparse_90:.1f}%"
    assert "tokens 300 (prefill 225, decode 75)" in out and "tiny/qwen3" in out


def test_show_layer_details_and_errors(tmp_path, capsys, run_cli, raw_a):
    path = stats_from_raw(raw_a).save(tmp_path / "s.safetensors")
    assert run_cli(["stats", "show", str(path), "--layer", "1", "--k", "3"]) == 0
    out = capsys.readouterr().out
    weakest = summarize(Stats.load(path), k=3).layers[1].mlp.least_important
    assert "layer 1: 300 tokens" in out and "heads (4 x 8)" in out
    assert f"lowest mean |x|: #{weakest[0].index} " in out and out.count("lowest mean |x|") == 3
    assert run_cli(["stats", "show", str(path), "--layer", "9"]) == 2
    assert "holds layers [0, 1, 2]" in capsys.readouterr().err
    (tmp_path / "bad.safetensors").write_bytes(b"garbage!garbage!")
    assert run_cli(["stats", "show", str(tmp_path / "bad.safetensors")]) == 2
    assert "not a safetensors stats file" in capsys.readouterr().err
