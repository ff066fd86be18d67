"""Fault and load campaign (issue 12): kill anywhere, disk full, bad inputs, load.

    .venv/bin/python bench/faults.py all --trials 20 --server-trials 5 --minutes 5 --write
    .venv/bin/python bench/faults.py kill-prune --trials 2          # a smoke run of one campaign

Campaigns (each prints its row; ``all`` runs them in this order):

    kill-snapshot  SIGKILL a writer looping Stats.save / atomic_write (--trials), then a real
                   `actprune serve` snapshotting every second, restarted after each kill
                   (--server-trials): the file is the previous or the new version, the restart
                   resumes it, counts lost <= one interval
    kill-prune     SIGKILL `actprune prune --overwrite` (uniform moments, every 4th at the swap)
    kill-finetune  SIGKILL `actprune finetune --save-every 1 --resume`, run after run
    kill-iterate   SIGKILL `actprune iterate`, run after run
    disk-full      outputs and snapshots on a small tmpfs (root), else RLIMIT_FSIZE children:
                   a clear error, the last good file kept
    bad-inputs     malformed stats files, plans, configs, JSONL, request bodies (the cases of
                   tests/pruning/test_cli_malformed.py and tests/server/test_route_limits.py
                   reused, plus new ones and hypothesis fuzz): exit 2 + one line, or a 4xx
    load           --streams concurrent streams for --minutes against `actprune serve` with stats
                   polls, plans, pauses and resets: no 5xx, exact token accounting, RSS flat

Prints a table (trials run, faults survived, inputs tried, bytes lost) and every failure with
how to reproduce it; ``--write`` replaces the marked section of BENCHMARKS.md. Work files stay
in --dir (default /tmp/actprune-faults).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchmarks_md import replace_section  # noqa: E402
from fault_kit import Fixtures, Tally  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
NAMES = ("kill-snapshot", "kill-prune", "kill-finetune", "kill-iterate", "disk-full", "bad-inputs", "load")
BEGIN, END = "<!-- faults:begin (bench/faults.py --write) -->", "<!-- faults:end -->"
SECTION = f"""## Fault and load campaign (`bench/faults.py`, issue 12)

`bench/faults.py` injects the faults of issue 12's campaign into the real programs and checks
what is left on disk with the real readers (`Stats.load`, `Plan.load`, `safetensors`, JSON),
against the outputs of unkilled reference runs. "Survived": every check of that trial passed —
the file is the previous or the new complete version, the next run resumes (and ends equal to an
unkilled run), nothing is left behind, counts lost ≤ one interval; for inputs: exit 2 with one
line, or a 4xx, never a traceback, 5xx, hang or silent wrong output. "Bytes lost": bytes of a
previous complete version that a fault destroyed.

```bash
.venv/bin/python bench/faults.py all --trials 20 --server-trials 5 --minutes 5 --write
```

{BEGIN}
{END}
"""


def campaigns() -> dict:
    import fault_disk
    import fault_inputs
    import fault_kills
    import fault_load
    import fault_server

    def snapshot(fx, tally, args, rng, work):
        fault_kills.kill_snapshot_files(fx, tally, args.trials, rng, work / "files")
        if args.server_trials:
            fault_server.kill_server(fx, tally, args.server_trials, rng, work / "server")

    return {
        "kill-snapshot": snapshot,
        "kill-prune": lambda fx, t, a, r, w: fault_kills.kill_prune(fx, t, a.trials, r, w),
        "kill-finetune": lambda fx, t, a, r, w: fault_kills.kill_finetune(fx, t, a.trials, r, w),
        "kill-iterate": lambda fx, t, a, r, w: fault_kills.kill_iterate(fx, t, a.trials, r, w),
        "disk-full": lambda fx, t, a, r, w: fault_disk.disk_full(fx, t, w, server=a.server_trials > 0),
        "bad-inputs": lambda fx, t, a, r, w: fault_inputs.bad_inputs(fx, t, w, fuzz=a.fuzz, seed=a.seed),
        "load": lambda fx, t, a, r, w: fault_load.load(fx, t, w, minutes=a.minutes, streams=a.streams, rng=r),
    }


def run(names: list[str], args: argparse.Namespace) -> list[Tally]:
    table = campaigns()
    fx = Fixtures(args.dir / "fixtures")
    out = []
    for name in names:
        tally, t0 = Tally(name), time.monotonic()
        print(f"== {name}", flush=True)
        try:
            table[name](fx, tally, args, random.Random(f"{args.seed}-{name}"), args.dir / name)
        except Exception as e:  # a campaign that cannot run is a result too
            import traceback

            traceback.print_exc()
            tally.fail("campaign crashed", f"{type(e).__name__}: {str(e)[:300]}")
        tally.seconds = time.monotonic() - t0
        print(json.dumps(tally.row()), flush=True)
        out.append(tally)
    return out


def report(tallies: list[Tally], header: str) -> str:
    lines = [header, "", "| campaign | trials run | faults survived | inputs tried | bytes lost | failures | time |",
             "|---|---|---|---|---|---|---|"]
    for t in tallies:
        r = t.row()
        lines.append(f"| {t.name} | {r['trials']} | {r['survived']} | {r['inputs']} | {r['bytes_lost']:,} | "
                     f"{r['failures']} | {r['seconds'] / 60:.1f} min |")
    total = [sum(t.row()[k] for t in tallies) for k in ("trials", "survived", "inputs", "bytes_lost", "failures")]
    lines.append(f"| **all** | {total[0]} | {total[1]} | {total[2]} | **{total[3]:,}** | {total[4]} | |")
    lines += ["", "Failures (kind × trials — first case):", ""]
    found = False
    for t in tallies:
        for kind, details in t.failures.items():
            found = True
            lines.append(f"- **{t.name}**: {kind} × {len(details)} — {details[0]}")
    if not found:
        lines.append("- none")
    lines += ["", "Notes:", ""] + [f"- {t.name}: {n}" for t in tallies for n in t.notes]
    return "\n".join(lines)


def write_benchmarks(text: str, path: Path = ROOT / "BENCHMARKS.md") -> None:
    replace_section(text, BEGIN, END, SECTION, path)


def describe(argv: list[str], started: float, load_before: tuple, load_after: tuple) -> str:
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (f"`bench/faults.py {' '.join(argv)}` on {time.strftime('%Y-%m-%d %H:%M', time.gmtime(started))} UTC, "
            f"{(time.time() - started) / 60:.0f} min; {platform.machine()} VM, {os.cpu_count()} cores, {mem:.0f} GiB, "
            f"Python {platform.python_version()}, shared with other jobs: load average "
            f"{' / '.join(f'{x:.1f}' for x in load_before)} before, {' / '.join(f'{x:.1f}' for x in load_after)} after.")


def from_json(paths: list[Path]) -> tuple[list[Tally], str]:
    """The tallies of earlier runs (``--json`` files); a campaign of a later file replaces the
    same campaign of an earlier one."""
    by_name, runs = {}, []
    for path in paths:
        saved = json.loads(path.read_text())
        runs.append(saved["run"])
        for r in saved["rows"]:
            t = Tally(r["campaign"], r["trials"], r["survived"], r["inputs"], r["bytes_lost"], r["failures"], r["notes"])
            t.seconds = r["seconds"]
            by_name[t.name] = t
    header = "Runs: " + " Then ".join(runs)
    return [by_name[n] for n in NAMES if n in by_name], header


def main(argv: list[str] | None = None) -> list[Tally]:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_writer"]:  # the child of kill-snapshot
        from fault_kills import writer_main

        writer_main(argv[1], argv[2], argv[3], int(argv[4]))
        return []
    names = list(NAMES)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("command", choices=[*names, "all", "report"],
                    help="a campaign, all of them, or report: the table of earlier runs' --json files (--from)")
    ap.add_argument("--trials", type=int, default=20, help="kills per kill-* campaign")
    ap.add_argument("--server-trials", type=int, default=3,
                    help="kill -9 of a real server in kill-snapshot, and the server case of disk-full (0: none)")
    ap.add_argument("--minutes", type=float, default=5.0, help="duration of the load")
    ap.add_argument("--streams", type=int, default=64, help="concurrent streams of the load")
    ap.add_argument("--fuzz", type=int, default=40, help="hypothesis examples per fuzzed input kind")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dir", type=Path, default=Path("/tmp/actprune-faults"))
    ap.add_argument("--write", action="store_true", help="replace the marked section of BENCHMARKS.md")
    ap.add_argument("--json", type=Path, default=None, help="also write the rows, failures and notes as JSON")
    ap.add_argument("--from", dest="sources", type=Path, nargs="+", default=[], help="for report: --json files")
    args = ap.parse_args(argv)
    if args.command == "report":
        tallies, header = from_json(args.sources)
    else:
        load_before, started = os.getloadavg(), time.time()
        tallies = run(names if args.command == "all" else [args.command], args)
        header = describe(argv, started, load_before, os.getloadavg())
        if args.json:
            rows = [{**t.row(), "failures": t.failures, "notes": t.notes} for t in tallies]
            args.json.write_text(json.dumps({"run": header, "rows": rows}, indent=1))
    text = report(tallies, header)
    print("\n" + text)
    if args.write:
        write_benchmarks(text)
    return tallies


if __name__ == "__main__":
    main()
