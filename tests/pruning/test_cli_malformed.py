"""Malformed plans, stats files and configs through the real `actprune prune` / `plan`: each is
one line on stderr and exit code 2 — never a traceback, a hang, or a slice by the wrong rows."""

from __future__ import annotations

import json
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from actprune.client.cli import main
from actprune.core.planning.planner import make_plan
from actprune.core.wire.plan_request import PlanRequest
from actprune.core.wire.stats import Stats, to_file_arrays
from pruning_helpers import record_stats
from safetensors.numpy import save as st_save


@pytest.fixture(scope="module")
def stats(tiny: Path) -> Stats:
    return record_stats(tiny)


@pytest.fixture(scope="module")
def plan_raw(tiny: Path, stats: Stats) -> dict:
    cfg = json.loads((tiny / "config.json").read_text())
    plan = make_plan(stats, cfg, PlanRequest(mlp_ratio=0.25, head_ratio=0.5, strategy="importance"))
    return json.loads(plan.to_json())


def _run(argv: list[str], capsys) -> str:
    """stderr of a run that must exit 2 with exactly one line."""
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return err


def _edit(fn):
    def apply(raw: dict) -> dict:
        raw = json.loads(json.dumps(raw))
        fn(raw)
        return raw
    return apply


PLANS = [
    # (case, new file content or an edit of the valid plan, message)
    ("version-not-a-number", _edit(lambda r: r.update(format_version="x")), "format_version must be a positive integer"),
    ("version-fraction", _edit(lambda r: r.update(format_version=1.5)), "format_version must be a positive integer"),
    ("version-bool", _edit(lambda r: r.update(format_version=True)), "format_version must be a positive integer"),
    ("version-newer", _edit(lambda r: r.update(format_version=99)), "upgrade actprune"),
    ("head-dim-edited", _edit(lambda r: r["source"].update(head_dim=16)), "source.head_dim is 16"),
    ("hidden-size-edited", _edit(lambda r: r["source"].update(hidden_size=64)), "source.hidden_size is 64"),
    ("source-width-edited", _edit(lambda r: r["source"]["widths"][1].update(intermediate_size=1000)),
     "source.widths[1]"),
    ("more-kv-heads-than-heads", _edit(lambda r: r["source"]["widths"][0].update(num_key_value_heads=8)),
     "does not divide"),
    ("three-billion-layers", _edit(lambda r: r["source"].update(num_hidden_layers=3_000_000_000)),
     "num_hidden_layers"),
    ("layer-index-huge", _edit(lambda r: r["layers"][0].update(index=3_000_000_000)), "layers.0.index"),
    ("zero-kv-heads", _edit(lambda r: r["widths"][0].update(num_key_value_heads=0)), "num_key_value_heads"),
    ("keep-list-of-floats", _edit(lambda r: r["layers"][0].update(mlp_keep=[0.5, 1])), "mlp_keep"),
    ("layers-not-a-list", _edit(lambda r: r.update(layers=5)), "layers"),
    ("key-with-newline", _edit(lambda r: r["source"].update({"a\nb": 1})), "source"),
    ("5000-digit-number", '{"format": "actprune.plan", "format_version": ' + "1" * 5000 + "}", "not JSON"),
    ("deep-nesting", "[" * 100_000 + "]" * 100_000, "not JSON"),
    ("not-utf8", b"\xff\xfe{\x00", "not JSON"),
    ("empty", "", "not JSON"),
    ("a-list", "[1, 2]", "not an actprune plan"),
]


@pytest.mark.parametrize("case, content, message", PLANS, ids=[c[0] for c in PLANS])
def test_malformed_plan_is_one_line_exit_2(tiny, plan_raw, tmp_path, capsys, case, content, message):
    path = tmp_path / "plan.json"
    if callable(content):
        path.write_text(json.dumps(content(plan_raw)))
    else:
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    err = _run(["prune", "--model", str(tiny), "--plan", str(path), "-o", str(tmp_path / "out")], capsys)
    assert message in err, err
    assert not (tmp_path / "out").exists()


def _stats_file(path: Path, tensors: dict, meta: dict) -> Path:
    """Bytes as a writer that skipped validation would leave them."""
    raw = {k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()}
    path.write_bytes(st_save(to_file_arrays(tensors), metadata=raw))
    return path


def _meta(**kw):
    return lambda t, m: (t, {**m, **kw})


def _tensor(name: str, fn):
    def apply(t, m):
        t = dict(t)
        t[name] = fn(np.array(t[name], copy=True))
        return t, m
    return apply


def _nan_at(a: np.ndarray) -> np.ndarray:
    a.reshape(-1)[0] = np.nan
    return a


def _far_layer(t, m):
    t = dict(t)
    t.update({k.replace("layers.0.", "layers.3000000000.", 1): v for k, v in t.items() if k.startswith("layers.0.")})
    return t, m


STATS = [
    ("version-not-a-number", _meta(format_version="x"), "format_version must be an integer"),
    ("tokens-nan", _meta(tokens_prefill=float("nan")), "tokens_prefill must be an integer"),
    ("tokens-negative", _meta(tokens_decode=-5), "tokens_decode must be an integer >= 0"),
    ("tokens-5000-digits", _meta(tokens_prefill="1" * 5000), "tokens_prefill must be an integer"),
    ("tp-size-zero", _meta(tensor_parallel_size=0), "tensor_parallel_size must be an integer >= 1"),
    ("threshold-infinite", _meta(near_zero_threshold=float("inf")), "near_zero_threshold must be a finite"),
    ("count-nan", _tensor("layers.0.mlp.count", _nan_at), "layers.0.mlp.count"),
    ("block-count-nan", _tensor("layers.1.block.count", _nan_at), "layers.1.block.count"),
    ("sum-nan", _tensor("layers.0.attn.sum", _nan_at), "holds NaN"),
    ("near-zero-negative", _tensor("layers.0.mlp.near_zero", lambda a: -a - 1), "near_zero must hold finite counts"),
    ("layer-three-billion", _far_layer, "layer index 3000000000"),
]


@pytest.mark.parametrize("case, edit, message", STATS, ids=[c[0] for c in STATS])
def test_malformed_stats_is_one_line_exit_2(tiny, stats, tmp_path, capsys, case, edit, message):
    tensors, meta = edit(stats.tensors, stats.meta)
    path = _stats_file(tmp_path / "s.safetensors", tensors, meta)
    err = _run(["plan", "--stats", str(path), "--model", str(tiny), "--mlp-ratio", "0.2",
                "-o", str(tmp_path / "p.json")], capsys)
    assert message in err, err


@pytest.mark.parametrize("content", [b"", b"\x00" * 7, b"garbage" * 100, "truncated"])
def test_unreadable_stats_file_is_one_line_exit_2(tiny, stats, tmp_path, capsys, content):
    good = stats.to_bytes()
    path = tmp_path / "s.safetensors"
    path.write_bytes(good[: len(good) // 2] if content == "truncated" else content)
    err = _run(["plan", "--stats", str(path), "--model", str(tiny), "--mlp-ratio", "0.2",
                "-o", str(tmp_path / "p.json")], capsys)
    assert "not a safetensors stats file" in err, err


CONFIGS = [
    ("three-billion-layers", {"num_hidden_layers": 3_000_000_000}, "num_hidden_layers must be an integer in 1..4096"),
    ("more-kv-heads-than-heads", {"num_key_value_heads": 8}, "does not divide"),
    ("zero-heads", {"num_attention_heads": 0}, "num_attention_heads must be an integer"),
    ("head-dim-a-string", {"head_dim": "abc"}, "head_dim must be an integer"),
    ("hidden-size-missing", {"hidden_size": None}, "hidden_size"),
    ("architectures-a-string", {"architectures": "Qwen3ForCausalLM"}, "must be a list of class names"),
    ("widths-wrong-keys", {"actprune_layer_widths": [{"intermediate_size": 8}] * 2}, "actprune_layer_widths[0]"),
]


@pytest.fixture()
def bad_model(tiny: Path, tmp_path: Path):
    def make(edit: dict) -> Path:
        d = shutil.copytree(tiny, tmp_path / "model")
        cfg = {**json.loads((d / "config.json").read_text()), **edit}
        (d / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if v is not None}))
        return d
    return make


@pytest.mark.parametrize("command", ["plan", "prune"])
@pytest.mark.parametrize("case, edit, message", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_malformed_config_is_one_line_exit_2(bad_model, stats, plan_raw, tmp_path, capsys, command, case, edit, message):
    model = bad_model(edit)
    if command == "plan":
        argv = ["plan", "--stats", str(stats.save(tmp_path / "s.safetensors")), "--model", str(model),
                "--mlp-ratio", "0.2", "-o", str(tmp_path / "p.json")]
    else:
        (tmp_path / "plan.json").write_text(json.dumps(plan_raw))
        argv = ["prune", "--model", str(model), "--plan", str(tmp_path / "plan.json"), "-o", str(tmp_path / "out")]
    assert message in _run(argv, capsys)


@pytest.mark.parametrize(("record", "named"), [
    ({"text": 17}, "field 'text' must be a string, got a number"),
    ({"text": None}, "field 'text' must be a string, got null"),
    ({"text": {"a": 1}}, "field 'text' must be a string, got an object"),
    ({"messages": [{"role": "user", "content": 5}]}, "'messages' must be a non-empty list"),
], ids=["number", "null", "object", "content-a-number"])
def test_jsonl_text_that_is_not_a_string_is_one_line_exit_2(tiny, tmp_path, capsys, record, named):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"text": "a fine first record"}) + "\n" + json.dumps(record) + "\n")
    field = ["--text-field", "text"] if "text" in record else []
    err = _run(["record", "--model", str(tiny), "--data", str(data), *field, "--max-tokens", "50",
                "-o", str(tmp_path / "s.safetensors")], capsys)
    assert f"{data}:2: " in err and named in err, err


def _limited_cli(argv: list[str], max_file_bytes: int) -> subprocess.CompletedProcess:
    """``actprune ARGV`` in a child that may not write a file past ``max_file_bytes`` (the
    kernel refuses the write with EFBIG, as a full disk refuses with ENOSPC)."""
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_file_bytes, max_file_bytes))

    code = "import sys; from actprune.client.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True,
                          preexec_fn=limit, timeout=300)


def test_a_write_the_storage_refuses_is_one_line_exit_2(tiny, stats, plan_raw, tmp_path):
    """plan (Python's own write: OSError) and prune (safetensors' Rust writer wraps the error)."""
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps(plan_raw))
    runs = {
        "plan": ["plan", "--stats", str(stats.save(tmp_path / "s.safetensors")), "--model", str(tiny),
                 "--mlp-ratio", "0.2", "-o", str(tmp_path / "p.json")],
        "prune": ["prune", "--model", str(tiny), "--plan", str(plan), "-o", str(tmp_path / "out")],
    }
    for name, argv in runs.items():
        r = _limited_cli(argv, 200)
        err = r.stderr.strip()
        assert r.returncode == 2 and "Traceback" not in err, (name, err[-2000:])
        last = err.splitlines()[-1]
        assert last.startswith(f"actprune {name}: error: ") and "File too large" in last, (name, last)
    assert not (tmp_path / "p.json").exists() and not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # nothing half-written
