"""bench/capture_overhead.py's report: paired ratios, and no wall-clock ratio when the load moved."""

from __future__ import annotations

import sys
from argparse import Namespace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import capture_overhead  # noqa: E402


def _measured(load: list[float]) -> dict:
    on = {"rate": [9.0, 9.5, 10.0], "cpu": [0.11, 0.10, 0.12]}
    off = {"rate": [10.0, 10.0, 10.0], "cpu": [0.10, 0.10, 0.10]}
    return {"results": {"on": {"B=1 P=16": on}, "off": {"B=1 P=16": off}}, "load": load}


def test_a_steady_load_gives_paired_median_ratios_with_their_range():
    row = capture_overhead.table("compiled", _measured([1.0, 1.2, 1.1, 1.0]), Namespace(max_load_change=1.0))[-1]
    assert "| 0.950 (0.900–1.000) |" in row  # wall: median of 9/10, 9.5/10, 10/10
    assert "| 0.909 (0.833–1.000) |" in row  # CPU: off ÷ on CPU per token


def test_a_moving_load_withholds_the_wall_clock_ratio_and_says_why():
    lines = capture_overhead.table("compiled", _measured([1.0, 4.0, 2.0, 1.0]), Namespace(max_load_change=1.0))
    assert "withheld" in lines[0] and "moved by 3.0" in lines[0]
    assert "| withheld |" in lines[-1] and "0.909" in lines[-1]


def test_write_puts_the_text_between_the_markers_and_keeps_the_rest(tmp_path):
    doc = tmp_path / "BENCHMARKS.md"
    doc.write_text(f"# B\n\nbefore\n\n{capture_overhead.BEGIN}\nold\n{capture_overhead.END}\n\nafter\n")
    capture_overhead.write_benchmarks("new table", doc)
    text = doc.read_text()
    assert "new table" in text and "old" not in text and text.startswith("# B") and text.endswith("after\n")


def test_the_chat_workload_compares_both_capture_servers_with_plain_vllm_defaults():
    m = _measured([1.0, 1.0, 1.0, 1.0])
    chat = "chat: 512-token system prompt shared, B=8"
    fast = {"rate": [30.0, 30.0, 30.0], "cpu": [0.02, 0.02, 0.02]}
    for name, r in (("on", m["results"]["on"]["B=1 P=16"]), ("off", m["results"]["off"]["B=1 P=16"]),
                    ("vllm defaults", fast), ("on, prefix caching", {"rate": [27.0] * 3, "cpu": [0.025] * 3})):
        m["results"].setdefault(name, {"B=1 P=16": {"rate": [], "cpu": []}})[chat] = r
    lines = capture_overhead.table("compiled", m, Namespace(max_load_change=1.0))
    defaults, cached = lines[-2], lines[-1]
    assert "off = plain vLLM defaults" in defaults and "| 0.317 (0.300–0.333) |" in defaults  # 9.5/30
    assert "capture with prefix caching on" in cached and "| 0.900 (0.900–0.900) |" in cached  # 27/30
    assert "| 0.800 (0.800–0.800) |" in cached  # CPU: 0.02 ÷ 0.025


def test_experts_option_builds_a_qwen3_moe_with_routers_in_every_layer(tmp_path):
    import json

    from actprune.core.archs import model_shape

    args = Namespace(workdir=tmp_path, hidden=256, layers=2, intermediate=256, dtype="float32",
                     experts=4, top_k=2, moe_intermediate=64)
    model, params, vocab = capture_overhead.build_model(args)
    cfg = json.loads((model / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen3MoeForCausalLM"] and cfg["num_experts_per_tok"] == 2
    assert [s.num_experts for s in model_shape(cfg).layers] == [4, 4]  # every layer sparse: routers everywhere
    assert params == model_shape(cfg).params() and vocab == cfg["vocab_size"]
    assert "4 experts of 64, top-2" in capture_overhead._shape_name(args)


def _state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def test_the_servers_not_measured_are_stopped_and_continued_after(tmp_path):
    import subprocess
    import time
    from types import SimpleNamespace

    procs = {n: subprocess.Popen(["sleep", "60"], start_new_session=True) for n in ("on", "off")}
    srvs = {n: SimpleNamespace(proc=p) for n, p in procs.items()}
    try:
        with capture_overhead.others_frozen(srvs, "on"):
            time.sleep(0.2)
            assert _state(procs["off"].pid) == "T" and _state(procs["on"].pid) == "S"
        time.sleep(0.2)
        assert _state(procs["off"].pid) == "S"  # continued
        with capture_overhead.others_frozen(srvs, "on", freeze=False):
            time.sleep(0.2)
            assert _state(procs["off"].pid) == "S"
    finally:
        for p in procs.values():
            p.kill()
            p.wait()
