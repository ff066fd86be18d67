"""Bad inputs: malformed stats files, plans, configs, JSONL, flags and request bodies through the
real ``actprune`` CLI (in-process, ``client.cli.main``) and the real HTTP routes (in-process,
over the fake engine client of tests/support). Each must give a clear error — exit 2 with one
``error:`` line and no traceback, or a 4xx whose ``detail`` is one line — never a traceback, a
5xx, a hang, or a silently wrong output; an accepted fuzzed plan must slice exactly what it says.

The cases of tests/pruning/test_cli_malformed.py (PLANS, STATS, CONFIGS) and of
tests/server/test_route_limits.py (the parametrized bodies) are imported from those modules and
counted here, not copied; the rest are new, and hypothesis fuzzes plans, stats metadata, JSONL
lines and plan request bodies.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import shutil
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from fault_kit import Fixtures, Tally

__all__ = ["bad_inputs"]

ROOT = Path(__file__).resolve().parent.parent
HANG_S = 120


class _Hang(BaseException):
    pass


def _module(rel: str):
    for p in ("tests/support", "tests/pruning", "tests/core", "tests/server"):
        if str(ROOT / p) not in sys.path:
            sys.path.insert(0, str(ROOT / p))
    spec = importlib.util.spec_from_file_location(Path(rel).stem, ROOT / rel)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class Corpus:
    """Runs inputs and files the outcome of each in the tally, by kind of input."""

    def __init__(self, tally: Tally, work: Path, limit: int = 0) -> None:
        self.tally, self.work, self.kinds, self.limit = tally, work, {}, limit

    def full(self, kind: str) -> bool:
        """A smoke run (``limit``) tries only the first inputs of each kind."""
        return bool(self.limit) and sum(self.kinds.get(kind, {}).values()) >= self.limit

    def _count(self, kind: str, outcome: str) -> None:
        self.tally.inputs += 1
        self.kinds.setdefault(kind, {}).setdefault(outcome, 0)
        self.kinds[kind][outcome] += 1

    def cli(self, kind: str, case: str, argv: list[str], message: str | None = None,
            accept=None) -> None:
        """``accept(rc)`` -> None when exit 0 is right for this input (fuzz), else why not."""
        from actprune.client.cli import main

        if self.full(kind):
            return
        err, out = io.StringIO(), io.StringIO()
        # SIGALRM's timer may be pytest-timeout's: put back what is left of it afterwards
        old = signal.signal(signal.SIGALRM, lambda *a: (_ for _ in ()).throw(_Hang()))
        left, _ = signal.setitimer(signal.ITIMER_REAL, HANG_S)
        started = time.monotonic()
        try:
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
                rc = main(argv)
        except SystemExit as e:  # argparse
            rc = e.code
        except _Hang:
            return self._bad(kind, "hang", case, f"no answer in {HANG_S}s: actprune {_show(argv)}")
        except BaseException as e:
            tb = traceback.format_exc().strip().splitlines()
            return self._bad(kind, "traceback", case, f"{type(e).__name__}: {str(e)[:160]} at {tb[-3].strip()[:120]}; "
                             f"repro: actprune {_show(argv)}")
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)
            if left:
                signal.setitimer(signal.ITIMER_REAL, max(0.001, left - (time.monotonic() - started)))
        text = err.getvalue()
        lines = [x for x in text.splitlines() if "error:" in x]
        if rc == 0 and accept is not None:
            why = accept()
            return self._count(kind, "accepted") if why is None else self._bad(kind, "silently wrong output", case, why)
        if rc != 2 or "Traceback" in text or len(lines) != 1:
            return self._bad(kind, "no clear one-line error", case,
                             f"exit {rc}, {len(lines)} error lines: {text.strip()[-200:]!r}; repro: actprune {_show(argv)}")
        if message and message not in lines[0]:
            return self._bad(kind, "message changed", case, f"wanted {message!r}, got {lines[0][:200]!r}")
        self._count(kind, "clear error")

    def http(self, kind: str, case: str, app, method: str, path: str, message: str | None = None,
             ok: tuple[int, ...] = (), **kw: Any) -> None:
        if self.full(kind):
            return
        try:
            r = self._call(app, method, path, **kw)
        except Exception as e:
            return self._bad(kind, "exception in the app", case, f"{type(e).__name__}: {str(e)[:200]}")
        if r.status_code in ok:
            return self._count(kind, "accepted")
        if r.status_code >= 500 or r.status_code < 400:
            return self._bad(kind, f"HTTP {r.status_code}", case, f"{method} {path} {str(kw)[:150]}: {r.text[:200]!r}")
        try:
            detail = r.json()["detail"]
            assert isinstance(detail, str) and "\n" not in detail and len(detail) < 600
        except Exception:
            return self._bad(kind, "4xx without a one-line detail", case, f"{r.status_code} {r.text[:200]!r}")
        if message and message not in detail:
            return self._bad(kind, "message changed", case, f"wanted {message!r}, got {detail[:200]!r}")
        self._count(kind, f"HTTP {r.status_code}")

    def _bad(self, kind: str, outcome: str, case: str, detail: str) -> None:
        self._count(kind, outcome)
        self.tally.fail(f"{kind}: {outcome}", f"{case}: {detail}")


def _show(argv: list[str]) -> str:
    return " ".join(a if len(a) < 80 else a[:60] + "..." for a in argv)


def bad_inputs(fx: Fixtures, tally: Tally, work: Path, fuzz: int = 40, seed: int = 0, limit: int = 0) -> None:
    """Every input kind; with ``limit``, only its first ``limit`` inputs (a smoke run)."""
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    c = Corpus(tally, work, limit)
    tiny = fx.model("tiny")
    malformed = _module("tests/pruning/test_cli_malformed.py")
    from actprune.core.planning.planner import make_plan
    from actprune.core.wire.plan_request import PlanRequest
    from pruning_helpers import record_stats

    stats = record_stats(tiny)
    cfg = json.loads((tiny / "config.json").read_text())
    plan_raw = json.loads(make_plan(stats, cfg, PlanRequest(mlp_ratio=0.25, head_ratio=0.5, strategy="importance")).to_json())
    _cli_files(c, malformed, tiny, stats, plan_raw, work)
    _jsonl(c, tiny, work)
    _flags(c, tiny, stats, work)
    if fuzz:
        _fuzz_cli(c, tiny, stats, plan_raw, work, fuzz, seed)
    _bodies(c, work, fuzz, seed)
    for kind, outcomes in c.kinds.items():
        tally.notes.append(f"{kind}: {sum(outcomes.values())} inputs — " + ", ".join(f"{k} {v}" for k, v in sorted(outcomes.items())))
    tally.trials = tally.inputs
    tally.survived = sum(n for o in c.kinds.values() for k, n in o.items() if k in ("clear error", "accepted") or k.startswith("HTTP 4"))


def _cli_files(c: Corpus, m, tiny: Path, stats, plan_raw: dict, work: Path) -> None:
    """tests/pruning/test_cli_malformed.py's plans, stats files and configs."""
    for case, content, message in m.PLANS:
        path, out = work / f"plan-{case}.json", work / f"out-{case}"
        if callable(content):
            path.write_text(json.dumps(content(plan_raw)))
        else:
            path.write_bytes(content if isinstance(content, bytes) else content.encode())
        c.cli("plan file (reused)", case, ["prune", "--model", str(tiny), "--plan", str(path), "-o", str(out)], message)
        if out.exists():
            c.tally.fail("plan file (reused): output written for a bad plan", f"{case}: {out}")
    cases = [(case, *edit(stats.tensors, stats.meta), message) for case, edit, message in m.STATS]
    good = stats.to_bytes()
    cases += [(f"unreadable-{i}", None, raw, "not a safetensors stats file")
              for i, raw in enumerate([b"", b"\x00" * 7, b"garbage" * 100, good[: len(good) // 2]])]
    for case, tensors, meta, message in cases:
        path = work / f"stats-{case}.safetensors"
        if tensors is None:
            path.write_bytes(meta)
        else:
            m._stats_file(path, tensors, meta)
        c.cli("stats file (reused)", case, ["plan", "--stats", str(path), "--model", str(tiny), "--mlp-ratio", "0.2",
                                           "-o", str(work / "p.json")], message)
    (work / "plan.json").write_text(json.dumps(plan_raw))
    good_stats = stats.save(work / "good.safetensors")
    for case, edit, message in m.CONFIGS:
        model = work / f"model-{case}"
        shutil.copytree(tiny, model, dirs_exist_ok=True)
        conf = {**json.loads((tiny / "config.json").read_text()), **edit}
        (model / "config.json").write_text(json.dumps({k: v for k, v in conf.items() if v is not None}))
        c.cli("config (reused)", f"plan {case}", ["plan", "--stats", str(good_stats), "--model", str(model),
                                                  "--mlp-ratio", "0.2", "-o", str(work / "p.json")], message)
        c.cli("config (reused)", f"prune {case}", ["prune", "--model", str(model), "--plan", str(work / "plan.json"),
                                                   "-o", str(work / f"out-{case}")], message)


JSONL = [  # (case, file bytes)
    ("not-json", b'{"text": "a"\n'), ("a-list", b"[1, 2]\n"), ("a-string", b'"text"\n'),
    ("field-missing", b'{"prompt": "x"}\n'), ("field-a-number", b'{"text": 5}\n'), ("field-null", b'{"text": null}\n'),
    ("empty-file", b""), ("blank-lines", b"\n\n  \n"), ("not-utf8", b'{"text": "\xff\xfe"}\n'),
    ("deep-nesting", b'{"text": ' + b"[" * 100_000 + b"]" * 100_000 + b"}\n"),
    ("nul-bytes", b'{"text": "a"}\x00\n'), ("5000-digit-number", b'{"text": "a", "n": ' + b"1" * 5000 + b"}\n"),
    ("bom", b'\xef\xbb\xbf{"text": "a b c"}\n'), ("empty-text", b'{"text": ""}\n'),
    ("second-line-bad", b'{"text": "fine words"}\n{"text": \n'),
]


def _jsonl(c: Corpus, tiny: Path, work: Path) -> None:
    for case, raw in JSONL:
        path = work / f"{case}.jsonl"
        path.write_bytes(raw)
        c.cli("JSONL", f"record {case}", ["record", "--model", str(tiny), "--data", str(path), "--text-field", "text",
                                          "--max-tokens", "200", "-o", str(work / "rec.safetensors")])
    for case in ("not-json", "field-missing", "deep-nesting", "5000-digit-number"):
        path = work / f"{case}.jsonl"
        c.cli("JSONL", f"finetune {case}", ["finetune", "--model", str(tiny), "--data", str(path), "--text-field", "text",
                                            "-o", str(work / "ft"), "--max-steps", "1"])
        c.cli("JSONL", f"collect {case}", ["collect", "--base-url", "http://127.0.0.1:9", "--prompts", str(path),
                                           "--retries", "0"])
    c.cli("JSONL", "record missing file", ["record", "--model", str(tiny), "--data", str(work / "nope.jsonl"),
                                           "-o", str(work / "rec.safetensors")])
    c.cli("JSONL", "record a directory", ["record", "--model", str(tiny), "--data", str(work), "-o", str(work / "r.st")])


def _flags(c: Corpus, tiny: Path, stats, work: Path) -> None:
    s, t = str(stats.save(work / "flags.safetensors")), str(tiny)
    plan = ["plan", "--stats", s, "--model", t, "-o", str(work / "fp.json")]
    it = ["iterate", "--model", t, "-o", str(work / "it"), "--stats", s]
    for case, argv in [
        ("plan mlp-ratio 1.5", [*plan, "--mlp-ratio", "1.5"]), ("plan mlp-ratio nan", [*plan, "--mlp-ratio", "nan"]),
        ("plan weights a,b", [*plan, "--mlp-ratio", "0.2", "--weights", "a,b"]),
        ("plan width-multiple 0", [*plan, "--mlp-ratio", "0.2", "--width-multiple", "0"]),
        ("plan tp-size 0", [*plan, "--mlp-ratio", "0.2", "--tp-size", "0"]), ("plan unknown strategy", [*plan, "--mlp-ratio", "0.2", "--strategy", "nope"]),
        ("plan missing model", ["plan", "--stats", s, "--model", str(work / "none"), "--mlp-ratio", "0.2", "-o", "x.json"]),
        ("iterate ratios decreasing", [*it, "--ratios", "0.4", "0.2"]),
        ("iterate finetune-config not JSON", [*it, "--finetune-config", "{"]),
        ("iterate finetune-config wrong type", [*it, "--finetune-config", '{"lr": "x"}', "--ratios", "0.2",
                                                "--finetune-steps", "1", "--eval-data", str(work / "blank-lines.jsonl")]),
        ("finetune batch-size 0", ["finetune", "--model", t, "--data", str(work / "bom.jsonl"), "-o", str(work / "f0"),
                                   "--batch-size", "0"]),
        ("finetune lr -1", ["finetune", "--model", t, "--data", str(work / "bom.jsonl"), "-o", str(work / "f1"), "--lr", "-1"]),
        ("stats show garbage", ["stats", "show", str(work / "stats-unreadable-2.safetensors")]),
        ("eval missing model", ["eval", "--model", str(work / "none"), "--data", str(work / "bom.jsonl"),
                                "-o", str(work / "ev")]),
    ]:
        c.cli("flags and values", case, argv)


def _fuzz_cli(c: Corpus, tiny: Path, stats, plan_raw: dict, work: Path, n: int, seed: int) -> None:
    from actprune.core.wire.plan import Plan
    from hypothesis import given
    from hypothesis import strategies as st

    fmt = _module("tests/core/test_plan_format.py")
    paths = [p for p in fmt._paths(plan_raw) if p]
    cfg = _fuzz_settings(n, seed)
    counter = iter(range(10**9))

    @cfg
    @given(st.lists(st.tuples(st.sampled_from(paths), st.integers(-2, 64) | fmt._fuzz_values()), min_size=1, max_size=3))
    def plans(edits):
        raw = json.loads(json.dumps(plan_raw))
        for path, value in edits:
            fmt._put(raw, path, value, False)
        k = next(counter)
        path, out = work / f"fuzz-plan-{k}.json", work / f"fuzz-out-{k}"
        path.write_text(json.dumps(raw))

        def exact() -> str | None:
            return _sliced_as_planned(Plan.load(path), out)

        c.cli("plan file (fuzzed)", f"{path} ({_show([json.dumps(edits)])})",
              ["prune", "--model", str(tiny), "--plan", str(path), "-o", str(out)], accept=exact)
        shutil.rmtree(out, ignore_errors=True)

    plans()
    malformed = _module("tests/pruning/test_cli_malformed.py")
    keys = ["format", "format_version", "model", "config_hash", "tensor_parallel_size", "near_zero_threshold",
            "tokens_prefill", "tokens_decode", "architecture", "head_dim"]

    @cfg
    @given(st.sampled_from(keys), fmt._fuzz_values())
    def meta(key, value):
        path = work / f"fuzz-stats-{next(counter)}.safetensors"
        malformed._stats_file(path, stats.tensors, {**stats.meta, key: value})
        c.cli("stats metadata (fuzzed)", f"{key}={str(value)[:60]} ({path})",
              ["plan", "--stats", str(path), "--model", str(tiny), "--mlp-ratio", "0.2", "-o", str(work / "fp.json")],
              accept=lambda: None)

    meta()

    @cfg
    @given(st.lists(st.text(max_size=40) | st.dictionaries(st.sampled_from(["text", "x"]), fmt._fuzz_values(), max_size=2)
                    .map(json.dumps), min_size=1, max_size=4))
    def lines(rows):
        path = work / f"fuzz-{next(counter)}.jsonl"
        path.write_text("\n".join(rows))
        c.cli("JSONL (fuzzed)", str(path), ["record", "--model", str(tiny), "--data", str(path), "--text-field", "text",
                                            "--max-tokens", "100", "-o", str(work / "fz.safetensors")], accept=lambda: None)

    lines()


def _fuzz_settings(n: int, seed: int):
    from hypothesis import HealthCheck, settings
    from hypothesis import seed as seeded

    cfg = settings(max_examples=n, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    return lambda fn: seeded(seed)(cfg(fn))


def _sliced_as_planned(plan, out: Path) -> str | None:
    """None when the checkpoint at ``out`` has exactly the parameters the plan promised."""
    from actprune.core.tensor.checkpoint import ShardIndex

    total = ShardIndex(out).parameters()
    return None if total == plan.params_after else f"{out}: {total:,} parameters, the plan says {plan.params_after:,}"


def _bodies(c: Corpus, work: Path, n: int, seed: int) -> None:
    """Request bodies through the real routes: test_route_limits' cases, new ones, and fuzz."""
    import numpy as np

    rl = _module("tests/server/test_route_limits.py")
    from raw_samples import random_raw

    raw = random_raw(np.random.default_rng(5), tokens=120)
    app = rl._app(raw, work / "app")
    c._call = rl.call
    marks = {m.args[0]: m.args[1] for m in rl.test_bad_plan_body_is_422_with_one_short_line.pytestmark if m.name == "parametrize"}
    for body, named in marks[("body", "named")]:
        c.http("request body (reused)", repr(body[:40]), app, "POST", "/prune/plan", named, content=body,
               headers={"Content-Type": "application/json"})
    marks = {m.args[0]: m.args[1] for m in rl.test_post_routes_refuse_bodies_not_declared_as_json_with_415.pytestmark
             if m.name == "parametrize"}
    for path in marks["path"]:
        for kw in marks["kw"]:
            c.http("request body (reused)", f"{path} {str(kw)[:40]}", app, "POST", path, "application/json", **kw)
    for case, method, path, kw in [
        ("format=xml", "GET", "/activations/stats", {"params": {"format": "xml"}}),
        ("k=-1", "GET", "/activations/stats", {"params": {"k": -1}}),
        ("k=1e30", "GET", "/activations/stats", {"params": {"k": "1" + "0" * 30}}),
        ("k=abc", "GET", "/activations/stats", {"params": {"k": "abc"}}),
        *[(f"plan {b}", "POST", "/prune/plan", {"content": b, "headers": {"Content-Type": "application/json"}}) for b in [
            b'{"mlp_ratio": 2}', b'{"strategy": "nope", "mlp_ratio": 0.2}', b"[]", b"null", b'"str"', b"1",
            b'{"strategy": "importance", "mlp_ratio": 0.3, "weights": {"magnitude": -1}}', b'{"mlp_ratio": true}',
            b'{"head_ratio": 0.5, "head_mode": "x"}', b'{"drop_layers": 1000000000}', b"{}",
            b'{"strategy": "importance", "mlp_ratio": 0.3, "per_layer": true, "layer_sensitivity": [1, 2]}',
            b" " * (2 << 20) + b"{}", b'{"mlp_ratio": 0.3, "mlp_ratio": 0.4, "strategy": "importance", "tp_size": 0}']],
        ("reset with a body that is not JSON", "POST", "/activations/reset",
         {"content": b"{", "headers": {"Content-Type": "application/json"}}),
        ("reset with a body of 2 MiB", "POST", "/activations/reset", {"content": b"[" + b"0," * (1 << 20) + b"0]",
                                                                       "headers": {"Content-Type": "application/json"}}),
    ]:
        c.http("request body (new)", case, app, method, path, **kw)
    if not n:
        return
    from hypothesis import given
    from hypothesis import strategies as st

    fmt = _module("tests/core/test_plan_format.py")
    fields = ["strategy", "mlp_ratio", "head_ratio", "head_mode", "drop_layers", "per_layer", "width_multiple",
              "tp_size", "weights", "layer_sensitivity", "param_ratio", "min_mlp_width", "x"]

    @_fuzz_settings(n, seed)
    @given(st.dictionaries(st.sampled_from(fields), st.sampled_from(["importance", "magnitude", 0.25, 0.5, True, 8])
                           | fmt._fuzz_values(), max_size=4))
    def bodies(body):
        c.http("request body (fuzzed)", json.dumps(body)[:120], app, "POST", "/prune/plan", ok=(200,),
               content=json.dumps(body).encode(), headers={"Content-Type": "application/json"})

    bodies()
