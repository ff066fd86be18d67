"""Kill anywhere: SIGKILL at random moments during snapshot writes, ``actprune prune``,
``actprune finetune`` checkpointing and ``actprune iterate``. After each kill every file on disk
must be the previous complete version or the new complete version (read back with the real
readers, compared with reference outputs of unkilled runs), and the next run must resume.

- snapshot writes: a child process writes numbered versions of a stats file (``Stats.save``) and
  of a JSON state (``atomic_write``) in a loop, at the name the server gives its snapshot; after
  the kill the server's own start-up (``server.store.recover``) must resume the newest version;
- prune: ``--overwrite`` alternates two plans on one output; every fourth kill waits for the
  moment the old output is renamed aside (the swap), the others are uniform in time;
- finetune and iterate: one run after another with ``--resume`` (iterate resumes by itself),
  each killed at a uniform moment, until a run finishes; it must equal the reference exactly.
"""

from __future__ import annotations

import itertools
import json
import random
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from actprune.core.files import RETIRED_MARK, STAGING_MARK, atomic_temporaries, atomic_write
from actprune.core.wire.stats import Stats
from fault_kit import (
    Fixtures,
    Tally,
    checkpoint_diff,
    cli,
    file_diff,
    kill_group,
    leftovers,
    scrub,
    size_of,
    spawn,
    stats_diff,
    tree_diff,
    wait_for,
)

__all__ = ["kill_finetune", "kill_iterate", "kill_prune", "kill_snapshot_files", "stats_version", "writer_main"]

HERE = Path(__file__).resolve().parent


# ---- snapshot writes, file level ---------------------------------------------------------------
def stats_version(base: Stats, k: int) -> Stats:
    """Version ``k`` of a stats file: ``base`` with k in its token count and in one sum."""
    tensors = dict(base.tensors)
    s = np.array(tensors["layers.0.mlp.sum"], copy=True)
    s[0] = float(k)
    tensors["layers.0.mlp.sum"] = s
    return Stats(tensors=tensors, meta={**base.meta, "tokens_prefill": k, "tokens_decode": 0})


def writer_main(base: str, target: str, state: str, start: int) -> None:
    """The child: versions start, start+1, ... of both files, one line per finished version."""
    stats = Stats.load(base)
    for k in itertools.count(start):
        stats_version(stats, k).save(target)
        atomic_write(state, json.dumps({"version": k, "pad": "x" * 8192}))
        print(k, flush=True)


def kill_snapshot_files(fx: Fixtures, tally: Tally, trials: int, rng: random.Random, work: Path,
                        base_path: Path | None = None) -> None:
    """``base_path``: the stats file the versions derive from (default: recorded on a model)."""
    from actprune.server.store import InstanceFiles, recover

    base_path = base_path or fx.stats(fx.small())
    base = Stats.load(base_path)
    shutil.rmtree(work, ignore_errors=True)
    files = InstanceFiles(work, base.meta["config_hash"], "bench")
    meta = {"pipeline_parallel_size": 1, "tensor_parallel_size": 1}
    state = work / "state.json"
    start, cut_short = 1, 0
    for i in range(trials):
        proc = subprocess.Popen([sys.executable, str(HERE / "faults.py"), "_writer", str(base_path),
                                 str(files.snapshot), str(state), str(start)],
                                stdout=subprocess.PIPE, text=True, start_new_session=True)
        proc.stdout.readline()  # the loop runs: from now on the child is always mid-write or between two
        time.sleep(rng.uniform(0.0, 0.3))
        kill_group(proc)
        done = [int(x) for x in proc.stdout.read().split()]
        last = done[-1] if done else start
        problems, lost = [], 0
        got = Stats.load(files.snapshot) if files.snapshot.is_file() else None
        v = int(got.meta["tokens_prefill"]) if got else -1
        if v not in (last, last + 1):
            problems.append(("snapshot is neither the previous nor the new version", f"version {v}, writer had finished {last}"))
        elif (d := stats_diff(files.snapshot, Stats.from_bytes(stats_version(base, v).to_bytes()))) is not None:
            problems.append(("snapshot content wrong", d))
        try:
            sv = json.loads(state.read_text())["version"]
            if sv not in (last, last + 1):
                problems.append(("JSON state is neither version", f"version {sv}, finished {last}"))
        except Exception as e:
            problems.append(("JSON state torn", f"{type(e).__name__}: {e}"))
        if problems:
            lost = size_of(files.snapshot)
        temporaries = len(atomic_temporaries(files.snapshot))
        cut_short += temporaries
        found = recover(files, meta, lambda s: None)  # the server's start-up
        if found.stats is None or int(found.stats.meta["tokens_prefill"]) != v:
            problems.append(("start-up does not resume the newest version", f"resumed {found.stats and found.stats.tokens}, file {v}"))
        if atomic_temporaries(files.snapshot):
            problems.append(("start-up leaves temporaries", f"{temporaries} before, still there after recover()"))
        tally.trial(problems, lost, f"snapshot-file trial {i} (writer at version {last}, {temporaries} temporary left by the kill)")
        start = max(v, last) + 1
    tally.notes.append(f"file level: {trials} kills of a writer looping Stats.save + atomic_write "
                       f"({start - 1} versions written); {cut_short} snapshot writes cut short, their temporaries "
                       f"removed by the server's start-up; {len(atomic_temporaries(state))} temporaries left beside "
                       f"the JSON state, which nothing removes (as beside iterate.json or a plan)")


# ---- prune -------------------------------------------------------------------------------------
def kill_prune(fx: Fixtures, tally: Tally, trials: int, rng: random.Random, work: Path) -> None:
    model = fx.wide()
    plans = {"a": fx.plan(model, "a", "--mlp-ratio", "0.25", "--head-ratio", "0.5"),
             "b": fx.plan(model, "b", "--mlp-ratio", "0.5")}
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    refs, took = {}, 0.0
    for name, plan in plans.items():
        refs[name] = work / f"ref-{name}"
        t0 = time.monotonic()
        r = cli(["prune", "--model", str(model), "--plan", str(plan), "-o", str(refs[name])])
        took = max(took, time.monotonic() - t0)
        if r.returncode:
            raise RuntimeError(f"reference prune failed: {r.stderr[-1500:]}")
    out, runs = work / "runs" / "out", work / "runs"

    def argv(name: str) -> list[str]:
        return ["prune", "--model", str(model), "--plan", str(plans[name]), "-o", str(out), "--overwrite"]

    runs.mkdir()
    proc = spawn(argv("a"), work / "first.log")  # times the write phase: staging directory to exit
    staging = lambda: any(STAGING_MARK in p.name for p in runs.iterdir())  # noqa: E731
    wait_for(staging, 600, every=0.001)
    t_stage = time.monotonic()
    proc.wait()
    writing = time.monotonic() - t_stage
    current, outcomes = "a", {"previous": 0, "new": 0, "aside": 0, "swap hit": 0}
    for i in range(trials):
        new = "b" if current == "a" else "a"
        targeted = i % 4 == 3
        proc = spawn(argv(new), work / "killed.log")
        if targeted:  # the swap: old output renamed aside, new one not yet in place or old not yet deleted
            wait_for(lambda: any(RETIRED_MARK in p.name for p in runs.iterdir()), 3 * took, every=0.0005)
            delay = "at the swap"
        else:  # one in three uniform over the whole run, the others over the writing
            start = "" if i % 4 == 0 else "writing + "
            if start:
                wait_for(staging, 3 * took, every=0.001)
            d = rng.uniform(0.0, (writing if start else took) * 1.05)
            wait_for(lambda p=proc: p.poll() is not None, d, every=0.001)
            delay = f"{start}{d:.2f}s"
        kill_group(proc)
        problems, lost = [], 0
        aside = [p for p in runs.iterdir() if RETIRED_MARK in p.name]
        outcomes["swap hit"] += targeted and bool(aside)
        if tree_diff(out, refs[current]) is None:
            outcomes["previous"] += 1
        elif tree_diff(out, refs[new]) is None:
            outcomes["new"] += 1
        elif not out.exists() and len(aside) == 1 and tree_diff(aside[0], refs[current]) is None:
            outcomes["aside"] += 1  # killed between the two renames: the next run renames it back
        else:
            problems.append(("output is neither the previous nor the new complete version",
                             f"{tree_diff(out, refs[new])}; repro: kill -9 `actprune {' '.join(argv(new))}` {delay} in"))
            lost = size_of(refs[current])
        left = leftovers(runs)
        r = cli(argv(new), log=work / "rerun.log")
        if r.returncode or (d := tree_diff(out, refs[new])) is not None:
            problems.append(("the next run does not complete", f"exit {r.returncode}: {r.stderr.strip()[-300:]}"))
        still = leftovers(runs)
        if still:
            problems.append(("staging directories a kill left are never removed",
                             f"{len(still)} after the next run ({size_of(runs) - size_of(out)} bytes), e.g. {still[0].name}"))
            for p in still:  # keep later trials independent of this one
                shutil.rmtree(p, ignore_errors=True)
        tally.trial(problems, lost, f"prune trial {i} (kill {delay}; {len(left)} leftovers)")
        current = new
    n_swap, n_uniform = trials // 4, (trials + 3) // 4
    tally.notes.append(f"prune: {trials} kills ({n_uniform} uniform over the run, {trials - n_swap - n_uniform} "
                       f"uniform over the writing, {n_swap} waited for the swap, {outcomes['swap hit']} of which "
                       f"landed while the old output was renamed aside), reference run {took:.1f}s of which "
                       f"writing {writing:.2f}s; "
                       f"output after the kill: previous {outcomes['previous']}, new {outcomes['new']}, missing with the "
                       f"previous complete one renamed aside (.out{RETIRED_MARK}*, put back by the next run) "
                       f"{outcomes['aside']}")


# ---- finetune and iterate: chains of killed runs -----------------------------------------------
def _chain(tally: Tally, trials: int, rng: random.Random, work: Path, argv, inspect, label: str,
           working: tuple[str, ...] = ()) -> None:
    """Run ``argv(run_dir)`` again and again, each killed at a random moment, and
    ``inspect(run_dir, ref_dir, state, log) -> (problems, lost)`` after each kill; a run that
    ends by itself must equal the reference. One kill in four is uniform over the reference's
    whole run; with ``working`` (lines the command prints once its set-up is done) the others
    are uniform over its work after such a line, so that most kills land in the writes."""
    ref, run = work / "ref", work / "run"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    proc, t0 = spawn(argv(ref), work / "ref.log"), time.monotonic()
    said = lambda log: any(w in log.read_text(errors="replace") for w in working)  # noqa: E731
    wait_for(lambda: proc.poll() is not None or said(work / "ref.log"), 3600, every=0.05)
    t_work = time.monotonic()
    if proc.wait():
        raise RuntimeError(f"reference {label} failed: {(work / 'ref.log').read_text()[-1500:]}")
    took, busy = time.monotonic() - t0, time.monotonic() - t_work
    kills, finished, state, n = 0, 0, {}, 0
    while kills < trials:
        n += 1
        log = work / f"run-{n}.log"
        proc = spawn(argv(run), log)
        if working and n % 4:
            wait_for(lambda p=proc, log=log: p.poll() is not None or said(log), 3 * took, every=0.05)
            delay, when = rng.uniform(0.0, busy), "into its work"
        else:
            delay, when = rng.uniform(0.0, took), "after its start"
        ended = wait_for(lambda p=proc: p.poll() is not None, delay, every=0.02)
        if not ended and kill_group(proc):
            kills += 1
            problems, lost = inspect(run, ref, state, log)
            tally.trial(problems, lost, f"{label} trial {kills} (run {n} killed {delay:.1f}s {when})")
            continue
        finished += 1
        problems = _finished(run, ref, log, proc.returncode)
        if problems:
            tally.fail(*problems[0])
        shutil.rmtree(run)
        state.clear()
    r = cli(argv(run), log=work / "final.log")
    for kind, detail in _finished(run, ref, work / "final.log", r.returncode):
        tally.fail(kind, f"resume after the last kill: {detail}")
    tally.notes.append(f"{label}: {kills} kills over {n} runs ({finished} ran to the end between kills), "
                       f"reference run {took:.0f}s" + (f" ({busy:.0f}s of work after set-up)" if working else "")
                       + "; then one run resumed to the end")


def _finished(run: Path, ref: Path, log: Path, rc: int) -> list[tuple[str, str]]:
    if rc:
        return [("a resumed run fails", f"exit {rc}, see {log}: {log.read_text()[-300:]}")]
    problems = []
    if (d := tree_diff(run, ref, swap=(str(run), str(ref)))) is not None:
        problems.append(("resumed result differs from an unkilled run", d))
    if left := leftovers(run):
        problems.append(("staging directories a kill left are never removed", f"{len(left)}, e.g. {left[0].relative_to(run)}"))
    return problems


def _finetune_files(out: Path, ref: Path, state: dict, where: str,
                    swap: tuple[str, str] | None = None) -> tuple[list[tuple[str, str]], int]:
    """Checks of one finetune output directory after a kill (``swap``: the run's and the
    reference's work directories, default ``out`` and ``ref``)."""
    problems, lost, swap = [], 0, swap or (str(out), str(ref))
    ref_log = [json.loads(x) for x in (ref / "finetune_log.jsonl").read_text().splitlines()]
    ckpts = sorted(p for p in (out / "checkpoints").glob("step-*") if (p / "state.json").is_file())
    newest = int(ckpts[-1].name[5:]) if ckpts else 0
    for c in ckpts[-1:]:
        if (d := checkpoint_diff(c)) or len(list(c.iterdir())) != 4:
            problems.append(("newest checkpoint incomplete", f"{where}{c.name}: {d or sorted(x.name for x in c.iterdir())}"))
        else:
            saved = json.loads((c / "state.json").read_text())
            if saved["step"] != newest or saved["history"] != ref_log[: len(saved["history"])]:
                problems.append(("checkpoint content wrong", f"{where}{c.name}: step or history differ from the reference"))
    if newest < state.get("ckpt", 0):
        problems.append(("a saved checkpoint was lost", f"{where}newest is step {newest}, was {state['ckpt']}"))
    for b in (out / "best").glob("step-*"):
        if d := checkpoint_diff(b):
            problems.append(("staged best weights torn", f"{where}{d}"))
    log = out / "finetune_log.jsonl"
    if log.exists():
        try:
            recs = [json.loads(x) for x in log.read_text().splitlines()]
            if not recs or recs != ref_log[: len(recs)]:
                raise ValueError(f"{len(recs)} records, not a prefix of the reference's")
            state["log"] = log.stat().st_size
        except ValueError as e:
            problems.append(("finetune_log.jsonl torn (rewritten in place)",
                             f"{where}{e}; the previous version had {state.get('log', 0)} bytes"))
            lost += state.get("log", 0)
    for name in ("model.safetensors", "config.json", "finetune_config.json"):
        if (out / name).exists() and (d := file_diff(out / name, ref / name, swap)):
            problems.append(("final checkpoint file torn (written in place)", f"{where}{d}"))
    state["ckpt"] = max(newest, state.get("ckpt", 0))
    return problems, lost


def kill_finetune(fx: Fixtures, tally: Tally, trials: int, rng: random.Random, work: Path) -> None:
    model, text = fx.small(), fx.text()

    def argv(out: Path) -> list[str]:
        return ["finetune", "--model", str(model), "--data", str(text), "-o", str(out), "--resume",
                "--max-steps", "12", "--save-every", "1", "--batch-size", "2", "--seq-len", "32",
                "--warmup-steps", "0", "--val-fraction", "0.1", "--eval-every", "3",
                "--early-stop-patience", "50", "--seed", "0"]

    def inspect(run: Path, ref: Path, state: dict, log: Path):
        want = state.get("ckpt", 0)  # the newest checkpoint when this run started
        problems, lost = _finetune_files(run, ref, state, "")
        said = log.read_text(errors="replace")
        m = re.search(r"resumed from \S+ \(step (\d+)\)", said)
        if (m and int(m.group(1)) != want) or ("starting from step 0" in said and want):
            problems.append(("did not resume from the newest checkpoint", f"wanted step {want}, the run said: "
                             f"{(m.group(0) if m else 'starting from step 0')}"))
        return problems, lost

    _chain(tally, trials, rng, work, argv, inspect, "finetune", working=("starting from step", "resumed from"))


def kill_iterate(fx: Fixtures, tally: Tally, trials: int, rng: random.Random, work: Path) -> None:
    model, text = fx.small(), fx.text()
    stats = fx.stats(model)
    ft = json.dumps({"batch_size": 2, "seq_len": 32, "warmup_steps": 0, "val_fraction": 0, "save_every": 1})

    def argv(out: Path) -> list[str]:
        return ["iterate", "--model", str(model), "-o", str(out), "--ratios", "0.2", "0.4",
                "--max-ppl-ratio", "100", "--stats", str(stats), "--calibration", str(text),
                "--calibration-tokens", "1000", "--train-data", str(text), "--finetune-steps", "2",
                "--finetune-config", ft, "--eval-data", str(text), "--eval-tokens", "512", "--eval-seq-len", "64"]

    def inspect(run: Path, ref: Path, state: dict, log: Path):
        problems, lost, swap = [], 0, (str(run), str(ref))
        recorded = 0
        if (run / "iterate.json").exists():
            try:
                got = scrub(json.loads((run / "iterate.json").read_text()), swap)
                want = scrub(json.loads((ref / "iterate.json").read_text()))
                recorded = len(got["steps"])
                if got["steps"] != want["steps"][:recorded] or got["config"] != want["config"]:
                    problems.append(("iterate.json content wrong", "steps or config differ from the reference"))
                state["json"] = (run / "iterate.json").stat().st_size
            except Exception as e:
                problems.append(("iterate.json torn", f"{type(e).__name__}: {e}"))
                lost += state.get("json", 0)
        if recorded < state.get("recorded", 0):
            problems.append(("a finished step was lost", f"{recorded} recorded, was {state['recorded']}"))
        state["recorded"] = max(recorded, state.get("recorded", 0))
        for step in sorted(run.glob("step-*")):
            n, where = int(step.name.split("-")[1]), f"{step.name}/"
            for name in ("stats.safetensors", "plan.json"):
                if (step / name).exists() and (d := file_diff(step / name, ref / step.name / name, swap)):
                    problems.append((f"{name} neither absent nor complete", where + d))
            if (step / "pruned").exists() and (d := tree_diff(step / "pruned", ref / step.name / "pruned", swap=swap)):
                problems.append(("pruned/ neither absent nor complete", where + d))
            rec = step / "recovered"
            if n <= recorded and (d := tree_diff(rec, ref / step.name / "recovered", swap=swap)):
                problems.append(("recovered/ of a finished step differs", where + d))
            elif n > recorded and rec.exists():
                # a step's recovery restarts from scratch after a kill: no history to compare with
                p, _ = _finetune_files(rec, ref / step.name / "recovered", {}, where + "recovered/", swap)
                problems += p
        return problems, lost

    _chain(tally, trials, rng, work, argv, inspect, "iterate")
