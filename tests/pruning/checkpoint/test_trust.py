"""Checkpoint code runs only when trusted: foreign ``auto_map`` code is refused without
``--trust-remote-code`` (and never imported), actprune's own modeling files are recognised by
content and loaded from the installed classes, and outputs never carry foreign code."""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path

import pytest
from actprune.client.cli import main
from actprune.core.config import CheckpointError
from actprune.core.planning.planner import make_plan
from actprune.core.tensor.modeling import AUTO_MAP, MODELING_FILES, own_digests
from actprune.core.wire.plan_request import PlanRequest
from actprune.pruning.checkpoint.hf_io import finish_output_dir, load_causal_lm
from actprune.pruning.checkpoint.slicer import slice_checkpoint
from actprune.pruning.checkpoint.trust import foreign_code
from pruning_helpers import record_stats, write_calibration_text

_EVIL = '''import pathlib
pathlib.Path({marker!r}).write_text("executed")
from transformers import Qwen3Config, Qwen3ForCausalLM


class EvilConfig(Qwen3Config):
    pass


class EvilForCausalLM(Qwen3ForCausalLM):
    config_class = EvilConfig
'''


def _config(d: Path) -> dict:
    return json.loads((d / "config.json").read_text())


def _set_config(d: Path, **kw) -> None:
    (d / "config.json").write_text(json.dumps({**_config(d), **kw}, indent=2))


@pytest.fixture()
def marker(tmp_path: Path) -> Path:
    return tmp_path / "MARKER"


@pytest.fixture()
def evil(tiny: Path, tmp_path: Path, marker: Path) -> Path:
    """The tiny Qwen3 checkpoint plus an auto_map whose module writes ``marker`` when imported."""
    d = shutil.copytree(tiny, tmp_path / "evil")
    (d / "evil.py").write_text(_EVIL.format(marker=str(marker)))
    _set_config(d, auto_map={"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilForCausalLM"})
    return d


@pytest.fixture()
def modules_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Trusted remote code is copied into transformers' module cache: keep it in tmp_path."""
    import transformers.dynamic_module_utils as dmu

    monkeypatch.setattr(dmu, "HF_MODULES_CACHE", str(tmp_path / "hf_modules"))
    monkeypatch.setattr(sys, "path", list(sys.path))
    return tmp_path / "hf_modules"


@pytest.fixture(scope="module")
def plan(tiny: Path):
    """An MLP-only, per-layer plan for ``tiny`` (and for copies of it: auto_map is not hashed)."""
    return make_plan(record_stats(tiny), _config(tiny), PlanRequest(mlp_ratio=0.25, per_layer=True,
                                                                     strategy="importance"))


@pytest.fixture()
def pruned(tiny: Path, plan, tmp_path: Path) -> Path:
    """A pruned checkpoint of the actprune architecture (per-layer widths: auto_map + our files)."""
    out = slice_checkpoint(tiny, plan, tmp_path / "pruned", progress=False)
    assert _config(out)["auto_map"] == AUTO_MAP
    return out


def _argv(command: str, model: Path, tmp_path: Path, plan_file: Path, text: Path, tiny: Path) -> list[str]:
    m, o = str(model), str(tmp_path / f"out-{command}")
    return {
        "eval": ["eval", "--model", m, "--data", str(text), "-o", o],
        "record": ["record", "--model", m, "--data", str(text), "-o", o + ".safetensors"],
        "finetune": ["finetune", "--model", m, "--data", str(text), "-o", o],
        "finetune-teacher": ["finetune", "--model", str(tiny), "--teacher", m, "--data", str(text), "-o", o],
        "sensitivity": ["sensitivity", "--model", m, "--plan", str(plan_file), "--data", str(text), "-o", o + ".json"],
        "prune-refit": ["prune", "--model", m, "--plan", str(plan_file), "--refit", str(text), "-o", o],
        "iterate": ["iterate", "--model", m, "-o", o, "--calibration", str(text)],
    }[command]


COMMANDS = ["eval", "record", "finetune", "finetune-teacher", "sensitivity", "prune-refit", "iterate"]


@pytest.mark.parametrize("command", COMMANDS)
def test_commands_refuse_foreign_code_without_the_flag_and_never_import_it(
        command, evil, tiny, plan, marker, tmp_path, capsys):
    plan_file, text = plan.save(tmp_path / "plan.json"), write_calibration_text(tmp_path / "c.txt", 4)
    rc = main(_argv(command, evil, tmp_path, plan_file, text, tiny))
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    assert "--trust-remote-code" in err and "evil.py" in err
    assert not marker.exists()


def test_record_runs_trusted_foreign_code_with_the_flag(evil, marker, tmp_path, modules_cache, capsys):
    text = write_calibration_text(tmp_path / "c.txt", 4)
    rc = main(["record", "--model", str(evil), "--data", str(text), "--max-tokens", "64",
               "-o", str(tmp_path / "s.safetensors"), "--trust-remote-code"])
    assert rc == 0, capsys.readouterr().err
    assert marker.read_text() == "executed"
    assert type(load_causal_lm(evil, trust_remote_code=True)).__name__ == "EvilForCausalLM"


def test_pruned_actprune_checkpoint_loads_from_the_installed_classes_without_the_flag(pruned, tmp_path):
    model = load_causal_lm(pruned)
    assert type(model).__module__ == "actprune.core.tensor.modeling.modeling_actprune"
    # Recognised by content, not by name: the same bytes under other names are ours too.
    renamed = shutil.copytree(pruned, tmp_path / "renamed")
    for f in MODELING_FILES:
        (renamed / f).rename(renamed / f"x_{f}")
    _set_config(renamed, auto_map={k: f"x_{v}" for k, v in AUTO_MAP.items()})
    assert foreign_code(renamed) == []
    assert type(load_causal_lm(renamed)).__module__ == "actprune.core.tensor.modeling.modeling_actprune"


def test_a_tampered_copy_of_our_modeling_file_is_foreign_and_never_runs(pruned, marker, modules_cache, capsys):
    f = pruned / "modeling_actprune.py"
    f.write_text(f.read_text() + f"\nimport pathlib\npathlib.Path({str(marker)!r}).write_text('executed')\n")
    assert foreign_code(pruned) == ["modeling_actprune.py"]
    with pytest.raises(CheckpointError, match="--trust-remote-code"):
        load_causal_lm(pruned)
    rc = main(["eval", "--model", str(pruned), "--data", "x.txt", "-o", str(pruned.parent / "ev")])
    assert rc == 2 and "modeling_actprune.py" in capsys.readouterr().err
    # Even trusted, model_type "actprune" is built from the installed classes, not the copy.
    load_causal_lm(pruned, trust_remote_code=True)
    assert not marker.exists()


@pytest.mark.parametrize("where, auto_map", [
    ("config.json", {"AutoModelForCausalLM": "someone/repo--modeling_x.XForCausalLM"}),
    ("tokenizer_config.json", {"AutoTokenizer": ["tok_x.XTokenizer", None]}),
    ("config.json", "modeling_x.XForCausalLM"),
])
def test_foreign_code_is_found_in_either_config_and_in_other_repositories(tiny, tmp_path, where, auto_map):
    d = shutil.copytree(tiny, tmp_path / "m")
    (d / where).write_text(json.dumps({**json.loads((d / where).read_text()), "auto_map": auto_map}))
    assert foreign_code(d)
    with pytest.raises(CheckpointError, match="--trust-remote-code"):
        load_causal_lm(d)


@pytest.mark.parametrize("per_layer", [False, True])
def test_slicer_output_carries_no_foreign_code(evil, tiny, tmp_path, per_layer):
    (evil / "tokenizer_config.json").write_text(json.dumps(
        {**json.loads((evil / "tokenizer_config.json").read_text()), "auto_map": {"AutoTokenizer": ["evil.T", None]}}))
    stats = record_stats(tiny)
    plan = make_plan(stats, _config(tiny), PlanRequest(mlp_ratio=0.25, per_layer=per_layer, strategy="importance"))
    out = slice_checkpoint(evil, plan, tmp_path / "out", progress=False)
    _assert_only_own_code(out, actprune=per_layer)


def test_finish_output_dir_keeps_our_code_and_drops_foreign_code(evil, pruned, tmp_path):
    # save_pretrained of a model built from trusted remote code copies its module and auto_map.
    dst = tmp_path / "dst"
    dst.mkdir()
    shutil.copy2(evil / "evil.py", dst / "evil.py")
    (dst / "config.json").write_text(json.dumps({**_config(evil), "dtype": "float32"}))
    finish_output_dir(evil, dst)
    _assert_only_own_code(dst, actprune=False)
    assert _config(dst)["torch_dtype"] == "float32"
    # An actprune model gets the installed files and auto_map, whatever its source carried.
    dst2 = tmp_path / "dst2"
    dst2.mkdir()
    cfg = {k: v for k, v in _config(pruned).items() if k != "auto_map"}
    (dst2 / "config.json").write_text(json.dumps({**cfg, "auto_map": {"AutoConfig": "evil.EvilConfig"}}))
    (pruned / "modeling_actprune.py").write_text("# tampered\n")
    finish_output_dir(pruned, dst2)
    _assert_only_own_code(dst2, actprune=True)
    assert _config(dst2)["actprune_layer_widths"] == _config(pruned)["actprune_layer_widths"]


def _assert_only_own_code(out: Path, actprune: bool) -> None:
    py = sorted(p.name for p in out.glob("*.py"))
    assert py == (sorted(MODELING_FILES) if actprune else [])
    assert all(hashlib.sha256((out / f).read_bytes()).hexdigest() in own_digests() for f in py)
    assert _config(out).get("auto_map") == (AUTO_MAP if actprune else None)
    tok = out / "tokenizer_config.json"
    assert not tok.exists() or "auto_map" not in json.loads(tok.read_text())
    assert foreign_code(out) == []
