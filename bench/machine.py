"""What the benchmarks read of the machine: CPU time of a server's process group by role, the
CPU every core spent busy, a wait for a quiet window, servers stopped while another is
measured, a server's worker process. Linux only (/proc); shared by the decode and capture
benchmarks."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

_TICK = os.sysconf("SC_CLK_TCK")


def group_cpu_by_role(pgid: int) -> dict[str, float]:
    """user + system CPU seconds of the server's process group, by process: ``worker``
    (VLLM::Worker*), ``engine`` (VLLM::EngineCore) and ``api`` (the rest: the API server and
    its helpers). Processes that ended are not counted."""
    out = {"api": 0.0, "engine": 0.0, "worker": 0.0}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            comm, rest = stat.read_text().rsplit(")", 1)
            fields = rest.split()
        except (OSError, ValueError):
            continue  # the process ended meanwhile
        if int(fields[2]) != pgid:  # fields[0] is field 3 of proc(5): state; pgrp is field 5
            continue
        name = comm.split("(", 1)[1]
        role = "worker" if name.startswith("VLLM::Worker") else "engine" if name.startswith("VLLM::Engine") else "api"
        out[role] += (int(fields[11]) + int(fields[12])) / _TICK  # utime, stime
    return out


def group_cpu_seconds(pgid: int) -> float:
    """user + system CPU time of every process in the server's process group (API server,
    engine core, worker). On a shared machine this is steadier than wall time."""
    return sum(group_cpu_by_role(pgid).values())


def machine_busy_seconds() -> float:
    """CPU seconds every core of the machine spent busy since boot (/proc/stat: all but idle
    and iowait): minus the servers' and this process's own, what other jobs took."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / _TICK  # up to steal; guest is inside user


def settle(busy_cores: float = 0.3, window_s: float = 5.0, timeout_s: float = 180.0) -> float:
    """Wait until the machine is quiet — under ``busy_cores`` cores busy over ``window_s`` —
    or ``timeout_s`` has passed; returns the last window's busy cores (printed). Servers that
    have just compiled leave work behind (the first rounds of a run measured 9-10 tokens per
    CPU-second where later ones measured 14-24), which would count against whichever model
    the first round measures."""
    t_end = time.monotonic() + timeout_s
    while True:
        b0 = machine_busy_seconds()
        time.sleep(window_s)
        busy = (machine_busy_seconds() - b0) / window_s
        if busy < busy_cores or time.monotonic() > t_end:
            print(f"machine busy {busy:.2f} cores before the rounds", flush=True)
            return busy


@contextlib.contextmanager
def others_frozen(srvs: dict, running: str, freeze: bool = True):
    """Every server but ``running`` stopped (SIGSTOP to its whole process group) while it is
    measured, continued after. On a small machine an idle vLLM server is not idle: its engine
    and worker threads poll, and on 2 cores they took CPU from the measured one (load average
    ~10 with two servers up and one request stream) — a ratio of two servers that tax each other
    drifts with whatever the other one happens to do. A stopped group uses no CPU at all."""
    frozen = [srv.proc.pid for name, srv in srvs.items() if freeze and name != running]
    for pgid in frozen:
        os.killpg(pgid, signal.SIGSTOP)
    try:
        yield
    finally:
        for pgid in frozen:
            os.killpg(pgid, signal.SIGCONT)


def worker_pid(srv) -> str:
    """The pid of the ``VLLM::Worker`` process of a server (the last one: with TP > 1, rank N - 1)."""
    return subprocess.run(["pgrep", "-s", str(srv.proc.pid), "-f", "VLLM::Worker"],
                          capture_output=True, text=True).stdout.split()[-1]
