"""bench/demo.py (`make demo`) end to end on the tiny model, with a real vLLM server: it runs the
recipe that measured best (compress to 20 % of the MLP neurons, refit, distillation from the cached top-64) through
the real commands, and its report shows perplexity ÷ the original's on held-out Wikipedia and
on an out-of-domain text, the KL to the original on both, and decode speed before and after."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

DEMO = Path(__file__).resolve().parents[2] / "bench" / "demo.py"
sys.path.insert(0, str(DEMO.parent))
from demo import mlp_layout  # noqa: E402

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_demo_runs_the_best_recipe_and_reports_in_and_out_of_domain(tmp_path):
    out = tmp_path / "demo"
    # Small token counts: the two vLLM start-ups are most of the time (8.6 min in all at load 20).
    proc = subprocess.run([sys.executable, str(DEMO), "--model", "tiny", "--port", str(_free_port()),
                           "--out", str(out), "--train-tokens", "2048", "--refit-tokens", "2048",
                           "--eval-tokens", "1024", "--max-tokens", "8"], capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    report = (out / "demo_report.md").read_text()
    commands = report[report.index("```bash"):]
    compress = next(c for c in commands.splitlines() if c.startswith("actprune compress "))
    distil = next(c for c in commands.splitlines() if c.startswith("actprune finetune "))
    assert mlp_layout(out / "tiny-qwen3") == "mlp"  # 2 layers: too few to keep the ends whole
    assert "--mlp-ratio 0.2" in compress and "--candidates mlp " in compress
    assert "--data wiki:calibration" in compress and "--refit-anchor" in compress
    plan = json.loads((out / "pruned" / "actprune_plan.json").read_text())
    shape = json.loads((out / "tiny-qwen3" / "config.json").read_text())
    kept = sum(len(lp["mlp_keep"]) for lp in plan["layers"])
    assert all(len(lp["heads_keep"]) == shape["num_attention_heads"] for lp in plan["layers"])  # MLP only
    assert abs(kept / (shape["intermediate_size"] * shape["num_hidden_layers"]) - 0.8) < 0.01  # 20 % of neurons
    assert all(f in distil for f in ("--teacher ", "--teacher-topk 64", "--kd-alpha 1", "--lr 1e-4",
                                     "--mix-data ", "--mix-share 0.25"))
    assert len([c for c in commands.splitlines() if c.startswith("actprune eval ")]) == 2
    assert "chose an MLP-only layout" in report  # the one line on why the demo stays MLP-only

    # The table: three models, perplexity (× the original's) on wiki and pydoc, KL on both, speed.
    rows = {ln.split()[0]: ln.split() for ln in report.splitlines() if ln.split()[:1] in (["original"], ["pruned"],
                                                                                          ["recovered"])}
    assert set(rows) == {"original", "pruned", "recovered"}
    assert rows["original"][3] == rows["original"][5] == "(1.000×)" and rows["original"][6] == "0.0000"
    assert float(rows["pruned"][6]) > 0 and float(rows["pruned"][7]) > 0  # KL on wiki and pydoc
    assert rows["original"][-1] != "-" and rows["recovered"][-1] != "-" and rows["pruned"][-1] == "-"
    for name in ("eval", "eval-pydoc"):  # what the table reads: the two `actprune eval` reports
        models = json.loads((out / name / "results.json").read_text())["models"]
        assert [m["name"] for m in models] == ["tiny-qwen3", "pruned", "recovered"]
    log = [json.loads(x) for x in (out / "recovered" / "finetune_log.jsonl").read_text().splitlines()]
    assert any("val_kl" in e for e in log) and "Distillation's validation" in report
