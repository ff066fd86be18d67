"""Where capture's extra time goes in a real vLLM worker, native code included: ``perf`` on both.

py-spy (``capture_spy.py``) sees Python frames only: the model's own kernels (oneDNN's JIT
GEMMs, Inductor's fused C++) are one opaque ``OpOverload.__call__`` to it, so it cannot say
whether capture makes them slower. This records the whole machine with ``perf record`` while a
capture-on and a capture-off server (both up, the idle one stopped) take turns at one load,
cuts each turn's window out of the recording and prints, for the ``VLLM::Worker`` process, per
symbol and per group, the CPU time **per generated token** on each side and
their difference — where the extra CPU of a capture step lands: the capture's own ops, the
dispatcher, or the model's kernels running slower beside them. oneDNN is asked for a perf map
of its JIT kernels (``ONEDNN_JIT_PROFILE=2``) so they are named; Inductor's kernels are named
by their ``.so``. Needs ``perf`` (Debian: ``apt-get install linux-perf``) and root or
``perf_event_paranoid`` ≤ 1.

Read the groups with care: a worker busy-polls vLLM's shared-memory queue while it waits for
the engine core (``shm_broadcast``: a ``sched_yield`` loop), so its CPU per token is its step
time, and the polling lands in the Python and kernel groups — which shrink when the model's
kernels take longer (BENCHMARKS.md, issue 15, "The floor, split with perf"). The total and the
groups of real work (GEMMs, vLLM's ops, Inductor's kernels, libtorch) are what compare.

    .venv/bin/python bench/capture_perf.py --workdir /tmp/perf16 [--batch 8] [--rounds 4] [--tokens 128]
    # the MoE benchmark model, the on server sampling 2 % of the steps (what every step pays)
    .venv/bin/python bench/capture_perf.py --workdir /tmp/pm --experts 8 --batch 1 --tokens 512 \
        --rounds 6 --capture '{"step_sample": 0.02}'
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from collections import Counter
from contextlib import ExitStack, contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from capture_overhead import (  # noqa: E402
    add_moe_and_capture_options,
    build_model,
    prompt_ids,
    run_load,
    servers,
    settle,
)
from machine import others_frozen, worker_pid  # noqa: E402

# a symbol's group, first match wins: what a reader asks of the difference
GROUPS = (
    ("oneDNN JIT kernels (the model's GEMMs)", re.compile(r"jit|brgemm|dnnl|onednn|\[unknown\]", re.I)),
    ("inductor kernels (the capture's fold among them)", re.compile(r"\.main\.so|torchinductor|cpp_fused", re.I)),
    ("vLLM C++ ops (attention, norms)", re.compile(r"_C\.abi3|vllm", re.I)),
    ("libtorch (dispatch, eager kernels)", re.compile(r"libtorch|libc10|at::|c10::", re.I)),
    ("Python interpreter", re.compile(r"libpython|python3", re.I)),
    ("libc (malloc) / kernel (page faults)", re.compile(r"libc\.so|libm\.|\[kernel|ld-linux|libgomp|libiomp", re.I)),
)


def group_of(dso: str, sym: str) -> str:
    for name, pat in GROUPS:
        if pat.search(f"{dso} {sym}"):
            return name
    return "other"


def report(data: Path, pid: str, window: tuple[float, float]) -> Counter:
    """(dso, symbol) -> self samples of process ``pid`` in the recording, between the two times
    (CLOCK_MONOTONIC seconds, the recording's clock)."""
    out = subprocess.run(["perf", "report", "-i", str(data), "--pid", pid, "--time", f"{window[0]:.6f},{window[1]:.6f}",
                          "--stdio", "--no-children", "-n", "--sort", "dso,sym", "-g", "none", "--percent-limit", "0"],
                         capture_output=True, text=True, check=True).stdout
    return parse_report(out)


def parse_report(text: str) -> Counter:
    """``perf report --stdio -n --sort dso,sym`` lines -> (dso, symbol) -> samples. oneDNN's JIT
    kernels are named per process and per creation (``[JIT] tid 3097``, ``jit_brgemm_kernel_t.132``
    in one server, ``.100`` in the other): the tid and the serial number are dropped so that the
    two servers' GEMMs compare."""
    counts: Counter = Counter()
    for line in text.splitlines():
        # "  12.34%   567  libfoo.so  [.] symbol", "  8.77%  1779  [JIT] tid 1191  [.] jit_brgemm_kernel_t.114"
        m = re.match(r"\s*[\d.]+%\s+(\d+)\s+(.+?)\s+\[[.k]\]\s+(.*)$", line)  # a dso may hold spaces
        if not m:
            continue
        dso, sym = m.group(2), m.group(3).strip()
        if dso.startswith("[JIT]"):
            dso, sym = "[JIT]", re.sub(r"\.\d+$", "", sym)
        counts[(dso, sym)] += int(m.group(1))
    return counts


@contextmanager
def perf_running(data: Path, freq: int, ready: float):
    """``perf record`` of the whole machine, timestamps on CLOCK_MONOTONIC (= ``time.monotonic``)
    so that each load's window can be cut out of one recording. perf takes tens of seconds to
    start beside vLLM servers (it lists every thread and mapping of the machine first: 44 s
    here), so it starts once, ``ready`` seconds before the first load."""
    perf = subprocess.Popen(["perf", "record", "-F", str(freq), "-a", "-B", "-N", "-k", "CLOCK_MONOTONIC",
                             "-o", str(data), "-q"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(ready)
    if perf.poll() is not None:
        raise SystemExit(f"perf record failed (exit {perf.returncode}): is perf installed, are you root?")
    try:
        yield
    finally:
        perf.send_signal(signal.SIGINT)
        perf.wait(timeout=600)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/actprune-perf"))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=128, help="tokens generated per request")
    ap.add_argument("--ready", type=float, default=75, help="seconds perf is given to start")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--freq", type=int, default=999, help="samples per second")
    ap.add_argument("--top", type=int, default=25, help="symbols listed, largest difference first")
    ap.add_argument("--settle-load", type=float, default=1.5)
    ap.add_argument("--settle-max", type=float, default=240)
    add_moe_and_capture_options(ap)
    args = ap.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    args.hidden, args.layers, args.intermediate, args.dtype = 768, 24, 2048, "float32"
    # the rest of what capture_overhead.servers reads: one server per side, system malloc, 2 GiB KV
    args.preload, args.variant, args.instances, args.kv_gib = None, None, 1, 2
    os.environ["ONEDNN_JIT_PROFILE"] = "2"  # the servers inherit it: /tmp/perf-<pid>.map names JIT kernels
    model, _, vocab = build_model(args)
    prompts = [prompt_ids(args.prompt, 7000 + i, vocab) for i in range(args.batch)]
    shares = {"on": Counter(), "off": Counter()}  # (dso, sym) -> summed ms per token over the rounds
    rounds: dict[str, list[Counter]] = {"on": [], "off": []}  # each round's group -> ms per token
    with ExitStack() as stack:
        srvs = servers(stack, model, "compiled", args, prefix=False)
        for srv in srvs.values():
            run_load(srv, prompts[:2], 4)
            run_load(srv, prompts, 8)
        settle(srvs, args)
        data = args.workdir / "perf.data"
        windows = []  # (name, worker pid, start, end, worker CPU ms per token)
        with perf_running(data, args.freq, args.ready):
            for r in range(args.rounds):
                for name in (["on", "off"] if r % 2 == 0 else ["off", "on"]):
                    with others_frozen(srvs, name):
                        t0 = time.monotonic()
                        rate, _, roles = run_load(srvs[name], [q[:-1] + [1 + r] for q in prompts], args.tokens)
                        windows.append((name, worker_pid(srvs[name]), t0 + 0.5, time.monotonic() - 0.2,
                                        1000.0 * roles["worker"]))
                    print(f"round {r + 1} {name}: {rate:.1f} tok/s, worker {windows[-1][-1]:.2f} CPU ms per token, "
                          f"load {os.getloadavg()[0]:.1f}", flush=True)
    for name, worker, t0, t1, ms in windows:  # each window's shares, scaled by its CPU time per token
        counts = report(data, worker, (t0, t1))
        total = sum(counts.values())
        print(f"{name}: {total} samples in {t1 - t0:.1f} s ({total / (t1 - t0) / args.freq:.2f} cores)", flush=True)
        shares[name].update({k: ms * n / total for k, n in counts.items()})
        mine = Counter()
        for (dso, sym), n in counts.items():
            mine[group_of(dso, sym)] += ms * n / total
        rounds[name].append(mine)
    per = {k: {s: v / args.rounds for s, v in shares[k].items()} for k in shares}  # mean ms per token
    groups = {k: Counter({g: sum(r[g] for r in rounds[k]) / args.rounds for g in set().union(*rounds[k])})
              for k in rounds}  # group -> mean ms per token
    tot_on, tot_off = sum(per["on"].values()), sum(per["off"].values())
    print(f"\nworker CPU ms per generated token (B={args.batch}, P={args.prompt}, {args.rounds} rounds of "
          f"{args.tokens} tokens, perf at {args.freq} Hz): on {tot_on:.2f}, off {tot_off:.2f}, "
          f"on - off {tot_on - tot_off:+.2f} ({args.batch * (tot_on - tot_off):+.2f} ms a step)")
    # medians over the rounds beside the means: one round slowed by the host moves a mean, not a median
    names = set(groups["on"]) | set(groups["off"])
    med = {k: {g: statistics.median(r[g] for r in rounds[k]) for g in names} for k in rounds}
    med_on, med_off = sum(med["on"].values()), sum(med["off"].values())
    print(f"rounds' medians, summed over groups: on {med_on:.2f}, off {med_off:.2f}, on - off {med_on - med_off:+.2f}")
    print("\n| group | on ms/token | off ms/token | on − off | ms a step | medians of rounds: on − off, ms a step |"
          "\n|---|---|---|---|---|---|")
    for g in sorted(names, key=lambda g: -(groups["on"][g] - groups["off"][g])):
        d, dm = groups["on"][g] - groups["off"][g], med["on"][g] - med["off"][g]
        print(f"| {g} | {groups['on'][g]:.3f} | {groups['off'][g]:.3f} | {d:+.3f} | {args.batch * d:+.2f} | "
              f"{args.batch * dm:+.2f} |")
    keys = set(per["on"]) | set(per["off"])
    diff = sorted(keys, key=lambda s: -abs(per["on"].get(s, 0) - per["off"].get(s, 0)))
    print("\n| symbol | dso | on | off | on − off (ms/token) |\n|---|---|---|---|---|")
    for dso, sym in diff[:args.top]:
        a, b = per["on"].get((dso, sym), 0), per["off"].get((dso, sym), 0)
        print(f"| `{sym[:70]}` | {dso[-40:]} | {a:.3f} | {b:.3f} | {a - b:+.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
