"""`actprune plan` and `actprune prune` end to end; user mistakes exit 2 with one line."""

from __future__ import annotations

import json

import pytest
from actprune.client.cli import main
from actprune.core.wire.plan import Plan


@pytest.fixture()
def stats_file(stats_for, tmp_path):
    return stats_for["qwen3"].save(tmp_path / "stats.safetensors")


def test_plan_then_prune_writes_a_loadable_checkpoint(checkpoints, stats_file, tmp_path, capsys):
    model = checkpoints["qwen3"]
    rc = main(["plan", "--stats", str(stats_file), "--model", str(model), "--strategy", "wifv",
               "--mlp-ratio", "0.3", "--weights", "0.2,0.5,0.3", "--per-layer", "-o", str(tmp_path / "plan.json")])
    assert rc == 0 and "parameters" in capsys.readouterr().out
    plan = Plan.load(tmp_path / "plan.json")
    assert plan.provenance.request["mlp_ratio"] == 0.3 and plan.provenance.weights.variance == 0.5
    rc = main(["prune", "--model", str(model), "--plan", str(tmp_path / "plan.json"), "-o", str(tmp_path / "out"),
               "--bias-compensation", "--stats", str(stats_file)])
    assert rc == 0
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["actprune_bias"] == {"down_proj": True, "o_proj": True}


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--mlp-ratio", "1.5"], "mlp_ratio"),
        (["--strategy", "nope", "--mlp-ratio", "0.1"], "choose one of"),
        (["--weights", "1,2"], "--weights"),
        (["--drop-layers", "1", "--drop-layer-ratio", "0.5"], "not both"),
        ([], "nothing to remove: give --param-ratio"),  # a forgotten flag, not a plan that removes nothing
        (["--mlp-ratio", "0"], "nothing to remove"),
    ],
)
def test_plan_mistakes_exit_2_with_one_line_naming_the_problem(checkpoints, stats_file, tmp_path, capsys, extra, message):
    rc = main(["plan", "--stats", str(stats_file), "--model", str(checkpoints["qwen3"]),
               "-o", str(tmp_path / "p.json"), *extra])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and len(err.strip().splitlines()) == 1


def test_prune_mistakes_exit_2(checkpoints, tmp_path, capsys):
    (tmp_path / "bad.json").write_text('{"format": "something.else"}')
    rc = main(["prune", "--model", str(checkpoints["qwen3"]), "--plan", str(tmp_path / "bad.json"), "-o", str(tmp_path / "o")])
    assert rc == 2 and "not an actprune plan" in capsys.readouterr().err
    rc = main(["prune", "--model", str(checkpoints["qwen3"]), "--plan", str(tmp_path / "bad.json"),
               "-o", str(tmp_path / "o"), "--bias-compensation"])
    assert rc == 2 and "--stats" in capsys.readouterr().err
