"""`actprune iterate` on a tiny model: steps, re-collection on the pruned model, the quality
threshold, resume and its refusal of another configuration."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from actprune.client.cli import main as cli
from actprune.core.archs import model_shape
from actprune.core.config import read_config
from actprune.core.wire.stats import Stats
from actprune.pruning.checkpoint.hf_io import load_causal_lm
from actprune.pruning.recover.iterate import IterateError, local_ratio
from pruning_helpers import SENTENCES


def test_local_ratio_reaches_the_target_of_the_original() -> None:
    assert local_ratio(0.2, 1000, 1000) == pytest.approx(0.2)
    # 20 % gone already; 40 % of the original means removing a quarter of what is left
    assert local_ratio(0.4, 1000, 800) == pytest.approx(0.25)
    with pytest.raises(IterateError, match="increasing"):
        local_ratio(0.2, 1000, 800)


@pytest.fixture(scope="module")
def text(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("it") / "text.txt"
    path.write_text("\n".join(SENTENCES * 20) + "\n")
    return path


def _args(tiny: Path, work: Path, text: Path, threshold: float, *extra: str) -> list[str]:
    return ["iterate", "--model", str(tiny), "-o", str(work), "--ratios", "0.2", "0.4",
            "--max-ppl-ratio", str(threshold), "--calibration", str(text), "--calibration-tokens", "1500",
            "--train-data", str(text), "--finetune-steps", "2", "--eval-data", str(text),
            "--eval-tokens", "512", "--eval-seq-len", "64", "--per-layer", "--strategy", "wifv", "--refit",
            "--finetune-config", '{"batch_size": 2, "seq_len": 64, "val_fraction": 0.0, "progress": false}',
            *extra]


def test_iterate_steps_resume_and_threshold(tiny: Path, text: Path, tmp_path: Path, capsys) -> None:
    work = tmp_path / "work"
    assert cli(_args(tiny, work, text, 1000.0)) == 0
    state = json.loads((work / "iterate.json").read_text())
    s1, s2 = state["steps"]
    original = sum(model_shape(read_config(tiny)).mlp_widths)
    for s, target in ((s1, 0.2), (s2, 0.4)):
        assert abs(s["achieved_ratio"] - target) < 0.01, s
        assert s["accepted"] and s["ppl_ratio"] == pytest.approx(s["recovered_perplexity"] / state["original"]["perplexity"])
        widths = model_shape(read_config(s["recovered"])).mlp_widths
        assert sum(widths) == s["mlp_neurons"] == round(original * (1 - s["achieved_ratio"]))
    assert state["final"] == s2["recovered"]
    # step 2 planned from statistics re-collected on step 1's recovered (per-layer) model
    stats2 = Stats.load(work / "step-2-40" / "stats.safetensors")
    assert [stats2.figures(i, "mlp").mean.shape[0] for i in stats2.layers] == model_shape(read_config(s1["recovered"])).mlp_widths
    assert load_causal_lm(state["final"]) is not None

    # A stricter threshold on rerun: no step is recomputed, the loop stops where it is exceeded.
    mtimes = {p: p.stat().st_mtime_ns for p in work.rglob("*.safetensors")}
    strict = min(s1["ppl_ratio"], s2["ppl_ratio"]) * 0.999
    assert cli(_args(tiny, work, text, strict)) == 1
    assert "no step stayed within" in capsys.readouterr().out
    assert json.loads((work / "iterate.json").read_text())["final"] is None
    assert cli(_args(tiny, work, text, s1["ppl_ratio"])) == 0
    state = json.loads((work / "iterate.json").read_text())
    expect = s2["recovered"] if s2["ppl_ratio"] <= s1["ppl_ratio"] else s1["recovered"]
    assert state["final"] == expect and len(state["steps"]) == 2
    assert {p: p.stat().st_mtime_ns for p in work.rglob("*.safetensors")} == mtimes

    # Another configuration in the same directory is refused (--overwrite starts over).
    assert cli(_args(tiny, work, text, 1000.0, "--no-distil")) == 2
    assert "another configuration" in capsys.readouterr().err
    other = tmp_path / "other.txt"
    other.write_text("def f(x):\n    return x + 1\n" * 40)
    assert cli(_args(tiny, work, text, 1000.0, "--refit-anchor", str(other))) == 2  # the anchor is configuration
    assert "another configuration" in capsys.readouterr().err
    assert cli(_args(tiny, work, text, 1000.0, "--refit-anchor", str(text))) == 2  # the calibration text itself
    assert "another domain" in capsys.readouterr().err


def test_iterate_refuses_an_unreadable_record(tiny: Path, text: Path, tmp_path: Path, capsys) -> None:
    # iterate.json is written atomically; one torn or edited by hand is named, not a JSON traceback
    work = tmp_path / "torn"
    work.mkdir()
    (work / "iterate.json").write_text('{"key": "ab')
    assert cli(_args(tiny, work, text, 1000.0)) == 2
    assert "unreadable iterate.json" in capsys.readouterr().err


def test_iterate_refuses_bad_schedules(tiny: Path, text: Path, tmp_path: Path, capsys) -> None:
    args = _args(tiny, tmp_path / "w", text, 1.3)
    args[args.index("0.4")] = "0.1"
    assert cli(args) == 2
    assert "increasing" in capsys.readouterr().err
    assert cli([*_args(tiny, tmp_path / "w2", text, 1.3), "--finetune-config", '{"teacher": "x"}']) == 2
    assert "set by iterate" in capsys.readouterr().err
