"""bench/capture_overhead.py's report (bench/overhead_report.py): paired ratios, no wall-clock
ratio when other jobs took CPU, capture's extra CPU split by process, replicas pooled."""

from __future__ import annotations

import sys
from argparse import Namespace
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import capture_overhead  # noqa: E402
import overhead_report  # noqa: E402


def _roles(api: float, engine: float, worker: float) -> dict[str, float]:
    return {"api": api, "engine": engine, "worker": worker}


def _measured(foreign: list[float]) -> dict:
    on = {"rate": [9.0, 9.5, 10.0], "cpu": [0.11, 0.10, 0.12],
          "roles": [_roles(0.01, 0.02, 0.08), _roles(0.01, 0.02, 0.07), _roles(0.01, 0.03, 0.08)]}
    off = {"rate": [10.0, 10.0, 10.0], "cpu": [0.10, 0.10, 0.10], "roles": [_roles(0.01, 0.02, 0.07)] * 3}
    return {"results": {"on": {"B=1 P=16": on}, "off": {"B=1 P=16": off}},
            "load": [1.0, 1.5, 2.0, 2.5], "foreign": foreign}


ARGS = Namespace(max_other_cpu=0.15)


def _row(lines: list[str], workload: str = "B=1 P=16") -> str:
    return next(x for x in lines if x.startswith(f"| {workload} |"))  # the first table's


def test_a_steady_load_gives_paired_median_ratios_with_their_range():
    row = _row(overhead_report.table("compiled", _measured([0.02, 0.05, 0.01]), ARGS))
    assert "| 0.950 (0.900–1.000) |" in row  # wall: median of 9/10, 9.5/10, 10/10
    assert "| 0.909 (0.833–1.000) |" in row  # CPU: off ÷ on CPU per token


def test_other_jobs_taking_cpu_withhold_the_wall_clock_ratio_and_say_why():
    lines = overhead_report.table("compiled", _measured([0.02, 0.40, 0.01]), ARGS)
    assert "0.02, 0.40, 0.01 cores (> 0.15): the wall-clock ratio is withheld" in lines[0]
    assert "| withheld |" in _row(lines) and "0.909" in _row(lines)


def test_the_extra_cpu_per_token_is_split_by_process():
    lines = overhead_report.table("compiled", _measured([0.0, 0.0, 0.0]), ARGS)
    # medians of on − off, ms: API 0, engine 0 (0, 0, 10), worker 10 (10, 0, 10), all 10 (10, 0, 20)
    assert lines[-1] == "| B=1 P=16 | +0.0 | +0.0 | +10.0 | +10.0 |"


def test_cpu_is_counted_by_process_group_and_the_machine_total_grows(tmp_path):
    import subprocess
    import time

    from machine import group_cpu_by_role, machine_busy_seconds

    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"], start_new_session=True)
    try:
        total0 = machine_busy_seconds()
        time.sleep(1.5)
        roles, total = group_cpu_by_role(busy.pid), machine_busy_seconds() - total0
        assert roles["engine"] == roles["worker"] == 0.0  # a process of another name: "api"
        assert 0.5 < roles["api"] <= 2.0 and total >= 0.5 * min(roles["api"], 1.5)
    finally:
        busy.kill()
        busy.wait()


def test_write_puts_the_text_between_the_markers_and_keeps_the_rest(tmp_path):
    doc = tmp_path / "BENCHMARKS.md"
    doc.write_text(f"# B\n\nbefore\n\n{capture_overhead.BEGIN}\nold\n{capture_overhead.END}\n\nafter\n")
    capture_overhead.write_benchmarks("new table", doc)
    text = doc.read_text()
    assert "new table" in text and "old" not in text and text.startswith("# B") and text.endswith("after\n")


def test_the_chat_workload_compares_both_capture_servers_with_plain_vllm_defaults():
    m = _measured([0.0, 0.0, 0.0])
    chat = "chat: 512-token system prompt shared, B=8"
    fast = {"rate": [30.0, 30.0, 30.0], "cpu": [0.02, 0.02, 0.02]}
    for name, r in (("on", m["results"]["on"]["B=1 P=16"]), ("off", m["results"]["off"]["B=1 P=16"]),
                    ("vllm defaults", fast), ("on, prefix caching", {"rate": [27.0] * 3, "cpu": [0.025] * 3})):
        r.setdefault("roles", [_roles(0.0, 0.0, 0.0)] * 3)
        m["results"].setdefault(name, {"B=1 P=16": {"rate": [], "cpu": [], "roles": []}})[chat] = r
    lines = overhead_report.table("compiled", m, ARGS)
    defaults, cached = (next(x for x in lines if x.startswith(f"| {label}")) for label in ("↳ same", "↳ on ="))
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


def test_the_median_interval_is_the_sign_tests_order_statistics():
    from math import comb

    xs = [0.848, 0.885, 0.897, 0.905, 0.935, 0.944, 0.97, 0.98, 1.031, 1.034, 1.035, 1.075]
    # n = 12: P(Bin(12, 1/2) <= 2) = 79/4096 = 1.9 % <= 2.5 %, <= 3 is 7.3 %: the 3rd and 10th
    assert overhead_report.median_interval(xs[::-1]) == (0.897, 1.034)
    assert sum(comb(12, k) for k in range(3)) / 2**12 <= 0.025 < sum(comb(12, k) for k in range(4)) / 2**12
    assert overhead_report.median_interval([1.0, 2.0, 3.0, 4.0, 5.0, 6.0]) == (1.0, 6.0)  # 1/64 <= 2.5 %
    assert overhead_report.median_interval([1.0, 2.0, 3.0, 4.0, 5.0]) is None  # 1/32 > 2.5 %
    wide = overhead_report.median_interval(list(range(40)))
    assert wide == (13, 26)  # n = 40: k = 14 (P(Bin <= 13) = 1.9 %, <= 14 is 4.0 %)


def test_the_table_prints_the_interval_only_with_enough_rounds():
    m = _measured([0.0, 0.0, 0.0])
    assert "| 0.950 (0.900–1.000) | – |" in _row(overhead_report.table("compiled", m, ARGS))
    for side in ("on", "off"):  # six rounds: the interval is min–max
        r = m["results"][side]["B=1 P=16"]
        r["rate"], r["cpu"], r["roles"] = r["rate"] * 2, r["cpu"] * 2, r["roles"] * 2
    m["foreign"] = [0.0] * 6
    assert "| 0.950 (0.900–1.000) | 0.900–1.000 |" in _row(overhead_report.table("compiled", m, ARGS))


def test_grid_picks_the_workloads():
    args = Namespace(grid=[capture_overhead._batch_prompt("8:16"), (1, 16)], prefix=False)
    loads = capture_overhead.workloads(args, "compiled", 1000)
    assert list(loads) == ["B=8 P=16", "B=1 P=16"] and [len(x) for x in loads["B=8 P=16"]] == [16] * 8
    import argparse

    import pytest

    with pytest.raises(argparse.ArgumentTypeError):
        capture_overhead._batch_prompt("8x16")


def test_replicas_are_pooled_per_round_and_each_is_shown_against_the_first_of_its_side():
    m = _measured([0.0] * 3)
    res = m["results"]
    on2 = {"rate": [4.0, 4.75, 10.0], "cpu": [0.11, 0.10, 0.12], "roles": res["on"]["B=1 P=16"]["roles"]}
    off2 = {"rate": [10.0, 10.0, 10.0], "cpu": [0.10, 0.10, 0.10], "roles": res["off"]["B=1 P=16"]["roles"]}
    res["on #2"], res["off #2"] = {"B=1 P=16": on2}, {"B=1 P=16": off2}
    assert overhead_report.instances(res, "on") == ["on", "on #2"]
    lines = overhead_report.table("compiled", m, ARGS)
    # pooled per round: sqrt(9 * 4) / 10, sqrt(9.5 * 4.75) / 10, sqrt(10 * 10) / 10
    assert "| 0.672 (0.600–1.000) |" in _row(lines)
    assert any(x.startswith("| ↳ on #2 / on (identical servers) | 4.8 (4.0–10.0) | 9.5 (9.0–10.0) "
                            "| 0.500 (0.444–1.000) |") for x in lines)
    assert any(x.startswith("| ↳ on #2 / off #2 |") for x in lines)
    assert any(x.startswith("| ↳ off #2 / off (identical servers) | 10.0") for x in lines)
    assert overhead_report.summary(m)["B=1 P=16"]["ratio_wall"] == pytest.approx(0.67175, abs=1e-4)
