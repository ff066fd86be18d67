"""Load: ``streams`` concurrent streaming requests for ``minutes`` against a real
``actprune serve`` (tiny Qwen3, eager, snapshots every 2 s), with stats polls (JSON summary and
the full file), plans, malformed requests, pauses and resets mixed in.

The run is a sequence of epochs of ~20 s; between two epochs the streams are held back until
none is in flight (a quiet point), where the server's token count is checked:

- exactly, after an epoch without a live pause or reset: the count before plus, for every
  request, prompt tokens + generated tokens - 1 (the last generated token is never fed back);
  after a pause taken at a quiet point: unchanged;
- within bounds, after an epoch with a reset or a pause/resume sent while streams run: requests
  wholly on one side of the control call are counted wholly or not at all, the others in part;

and the stats file (``GET /activations/stats?format=safetensors``, read with ``Stats``) must hold
that count in every layer. What the clients sent and received is counted on the client: token-id
prompts (their length is known) and every streamed token (``logprobs.tokens``) against the
usage the server reports. No 5xx anywhere; the RSS of the server's processes sampled every 5 s.
"""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from actprune.client.http import ActpruneHTTPError, AsyncClient
from fault_kit import Fixtures, Tally
from fault_server import serve, snapshot_file

__all__ = ["load"]

EPOCH_S = 20.0
WORDS = ["the castle", "the harbour", "the museum", "the cathedral", "pruning", "the river", "Paris", "the square"]
BAD = [  # malformed requests sent under load: each must be a 4xx
    ("POST", "/prune/plan", {"content": b"[" * 100_000, "headers": {"Content-Type": "application/json"}}),
    ("POST", "/prune/plan", {"content": b'{"mlp_ratio": 1e999}', "headers": {"Content-Type": "application/json"}}),
    ("POST", "/activations/reset", {"content": b"{}", "headers": {"Content-Type": "text/plain"}}),
    ("GET", "/activations/stats", {"params": {"format": "xml"}}),
    ("POST", "/v1/completions", {"json": {"model": "nope", "prompt": "x"}}),
]


@dataclass
class Run:
    tally: Tally
    model: str
    gate: asyncio.Event = field(default_factory=asyncio.Event)
    stop: bool = False
    in_flight: int = 0
    done: list[tuple[float, float, int, int]] = field(default_factory=list)  # (sent, ended, prompt, generated)
    answers: Counter = field(default_factory=Counter)
    rss: list[tuple[float, float]] = field(default_factory=list)
    opened: float = 0.0  # when the streams were last let go after a quiet point

    def since_open(self) -> str:
        return f"{time.monotonic() - self.opened:.1f}s after the streams were let go from a quiet point"

    def answer(self, route: str, code: int, detail: str = "") -> None:
        self.answers[f"{route} {code}"] += 1
        self.tally.inputs += 1
        if code >= 500:
            self.tally.fail(f"HTTP {code} under load", f"{route}: {detail[:200]}")


async def _sse_lines(r: httpx.Response):
    """Server-sent event lines, split at LF only (httpx's aiter_lines also splits at U+2028,
    U+0085, ... which a generated token may hold, unescaped, inside its JSON)."""
    buf = b""
    async for chunk in r.aiter_bytes():
        buf += chunk
        *lines, buf = buf.split(b"\n")
        for line in lines:
            yield line.rstrip(b"\r")
    if buf:
        yield buf


async def _stream(run: Run, http: httpx.AsyncClient, rng: random.Random) -> tuple[int, int]:
    k = rng.randint(1, 48)
    common = {"model": run.model, "max_tokens": k, "ignore_eos": True, "stream": True,
              "stream_options": {"include_usage": True}, "temperature": rng.choice([0.0, 0.8])}
    if rng.random() < 0.75:
        ids = [rng.randrange(3, 500) for _ in range(rng.randint(1, 64))]
        route, body = "/v1/completions", {**common, "prompt": ids, "logprobs": 0, "return_tokens_as_token_ids": True}
    else:
        ids = None
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 12)))
        route, body = "/v1/chat/completions", {**common, "messages": [{"role": "user", "content": f"Tell me about {words}."}],
                                                "logprobs": True, "top_logprobs": 0}
    got, usage = 0, None
    async with http.stream("POST", route, json=body) as r:
        if r.status_code != 200:
            run.answer(route, r.status_code, (await r.aread()).decode(errors="replace"))
            raise RuntimeError(f"HTTP {r.status_code}")
        async for line in _sse_lines(r):
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            usage = chunk.get("usage") or usage
            for ch in chunk.get("choices") or []:
                lp = ch.get("logprobs") or {}
                got += len(lp.get("tokens") or lp.get("content") or [])
    run.answer(route, 200)
    sent = len(ids) if ids is not None else usage["prompt_tokens"]
    if usage is None or (usage["prompt_tokens"], usage["completion_tokens"]) != (sent, k) or got != k:
        run.tally.fail("clients' count differs from the server's usage",
                       f"{route}: sent {sent} prompt tokens, asked {k}, received {got}; usage {usage}")
    return usage["prompt_tokens"], usage["completion_tokens"]


async def _worker(run: Run, http: httpx.AsyncClient, seed: int) -> None:
    rng = random.Random(seed)
    while True:
        await run.gate.wait()
        if run.stop:
            return
        run.in_flight += 1
        sent = time.monotonic()
        try:
            p, c = await _stream(run, http, rng)
            run.done.append((sent, time.monotonic(), p, c))
        except Exception as e:
            run.tally.fail("a stream failed under load", f"{type(e).__name__}: {str(e)[:200]} ({run.since_open()})")
            await asyncio.sleep(1)
        finally:
            run.in_flight -= 1


async def _every(run: Run, seconds: float, call) -> None:
    while not run.stop:
        await call()
        await asyncio.sleep(seconds)


async def _api(run: Run, route: str, coro, ok=(200,)) -> object:
    try:
        out = await coro
        run.answer(route, 200)
        return out
    except ActpruneHTTPError as e:
        run.answer(route, e.status_code, str(e))
        if e.status_code not in ok:
            run.tally.fail(f"unexpected HTTP {e.status_code} under load", f"{route}: {str(e)[:200]}")
    except Exception as e:
        run.tally.fail("an actprune route failed under load",
                       f"{route}: {type(e).__name__}: {str(e)[:200]} ({run.since_open()})")
    return None


def _background(run: Run, api: AsyncClient, http: httpx.AsyncClient, rng: random.Random, pid: int) -> list:
    import psutil

    async def bad() -> None:
        method, path, kw = rng.choice(BAD)
        r = await http.request(method, path, **kw)
        run.answer(f"bad {path}", r.status_code, r.text)
        if not 400 <= r.status_code < 500:
            run.tally.fail("a malformed request is not a 4xx under load", f"{method} {path}: {r.status_code} {r.text[:160]}")

    async def rss() -> None:
        procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
        run.rss.append((time.monotonic(), sum(p.memory_info().rss for p in procs) / 2**20))

    strategies = ["wifv", "importance", "magnitude", "wanda_sp"]
    return [_every(run, 0.5, lambda: _api(run, "status", api.status())),
            _every(run, 1.0, lambda: _api(run, "stats json", api.summary(k=10))),
            _every(run, 5.0, lambda: _api(run, "stats file", api.stats())),
            _every(run, 2.0, lambda: _api(run, "plan", api.plan(mlp_ratio=0.25, strategy=rng.choice(strategies)),
                                          ok=(200, 409, 429))),
            _every(run, 7.0, bad), _every(run, 5.0, rss)]


async def _quiet(run: Run) -> None:
    run.gate.clear()
    deadline = time.monotonic() + 600
    while run.in_flight and time.monotonic() < deadline:
        await asyncio.sleep(0.05)


async def _control(run: Run, api: AsyncClient, action: str) -> tuple[float, float]:
    sent = time.monotonic()
    await _api(run, action, getattr(api, action)())
    return sent, time.monotonic()


async def _checked(run: Run, call):
    """A check's own request: a dropped connection is a finding, then it is asked again."""
    for attempt in range(3):
        try:
            return await call()
        except (httpx.TransportError, OSError) as e:
            run.tally.fail("a request dropped without an answer", f"{call.__name__}: {type(e).__name__}: {e}")
            if attempt == 2:
                raise
        except Exception as e:
            if "could not connect" not in str(e) or attempt == 2:
                raise
            run.tally.fail("a request dropped without an answer", f"{call.__name__}: {str(e)[:200]}")


def _computed(reqs) -> int:
    return sum(p + c - 1 for _, _, p, c in reqs)


async def _epoch(run: Run, api: AsyncClient, kind: str, base: int, rng: random.Random) -> tuple[int, str | None]:
    """One epoch; returns (the count now, why it is wrong or None)."""
    if kind == "quiet-reset":
        await _control(run, api, "reset")
        base = 0
    if kind == "quiet-pause":
        await _control(run, api, "pause")
    first = len(run.done)
    run.opened = time.monotonic()
    run.gate.set()
    if kind == "live-reset":
        await asyncio.sleep(rng.uniform(3, EPOCH_S - 3))
        r_sent, r_ans = await _control(run, api, "reset")
    elif kind == "live-pause":
        await asyncio.sleep(rng.uniform(2, EPOCH_S / 2 - 2))
        p_sent, p_ans = await _control(run, api, "pause")
        await asyncio.sleep(rng.uniform(3, EPOCH_S / 2))
        q_sent, q_ans = await _control(run, api, "resume")
    await asyncio.sleep(EPOCH_S if kind not in ("live-reset", "live-pause") else 3)
    await _quiet(run)
    reqs = run.done[first:]
    st = await _checked(run, api.status)
    now = st.tokens_prefill + st.tokens_decode
    if kind == "quiet-pause":
        lo = hi = base
        await _control(run, api, "resume")
    elif kind == "live-reset":
        lo = _computed(r for r in reqs if r[0] >= r_ans)
        hi = _computed(r for r in reqs if r[1] > r_sent)
    elif kind == "live-pause":
        lo = base + _computed(r for r in reqs if r[1] <= p_sent or r[0] >= q_ans)
        hi = base + _computed(reqs) - _computed(r for r in reqs if r[0] >= p_ans and r[1] <= q_sent)
    else:
        lo = hi = base + _computed(reqs)
    why = None if lo <= now <= hi else f"{kind}: server counts {now}, clients say {lo if lo == hi else f'{lo}..{hi}'}"
    stats = await _checked(run, api.stats)
    bad = [i for i in stats.layers if {float(stats.group(i, "mlp")["count"]), float(stats.tensors[f"layers.{i}.block.count"])} != {float(now)}]
    if bad or stats.tokens != now:
        why = (why or "") + f" stats file: tokens {stats.tokens}, layers {bad} disagree with the count {now}"
    return now, why


async def _drive(run: Run, base_url: str, pid: int, minutes: float, streams: int, rng: random.Random) -> list[str]:
    limits = httpx.Limits(max_connections=streams + 16, max_keepalive_connections=streams + 16)
    async with httpx.AsyncClient(base_url=base_url, timeout=600, limits=limits) as http, \
            AsyncClient(base_url, timeout=600, retries=0) as api:
        tasks = [asyncio.create_task(_worker(run, http, 1000 + i)) for i in range(streams)]
        tasks += [asyncio.create_task(c) for c in _background(run, api, http, rng, pid)]
        deadline, base, log = time.monotonic() + minutes * 60, 0, []
        kinds = ["plain", "live-reset", "quiet-pause", "live-pause", "quiet-reset", "plain"]
        while time.monotonic() < deadline:
            kind = kinds[len(log) % len(kinds)]
            base, why = await _epoch(run, api, kind, base, rng)
            run.tally.trial([("token accounting wrong", why)] if why else [], 0, f"epoch {len(log)}")
            log.append(f"{kind} {base}")
        run.stop = True
        run.gate.set()
        await asyncio.gather(*tasks[:streams])
        for t in tasks[streams:]:
            t.cancel()
        st = await _checked(run, api.status)
        return [*log, f"final {st.tokens_prefill + st.tokens_decode}"]


def load(fx: Fixtures, tally: Tally, work: Path, minutes: float = 5.0, streams: int = 64,
         rng: random.Random | None = None) -> None:
    import shutil

    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    rng = rng or random.Random(0)
    srv = serve(fx.model("tiny"), work / "snapshots", work / "server.log", interval=2.0)
    try:
        run = Run(tally, httpx.get(f"{srv.base_url}/v1/models", timeout=60).json()["data"][0]["id"])
        log = asyncio.run(_drive(run, srv.base_url, srv.proc.pid, minutes, streams, rng))
        last = int(log[-1].split()[-1])
    finally:
        srv.stop()
    on_disk = snapshot_file(work / "snapshots")
    from actprune.core.wire.stats import Stats

    if on_disk is None or Stats.load(on_disk).tokens != last:
        tally.fail("the final snapshot misses counts", f"status {last}, file {on_disk and Stats.load(on_disk).tokens}")
    _rss(tally, run.rss)
    answers = ", ".join(f"{k} ×{v}" for k, v in sorted(run.answers.items()))
    tokens = _computed(run.done)
    tally.notes.append(f"{streams} streams for {minutes:g} min: {len(run.done)} completions, {tokens:,} tokens computed, "
                       f"{tally.trials} epochs ({', '.join(log[:6])}, ...); answers: {answers}")


def _rss(tally: Tally, samples: list[tuple[float, float]]) -> None:
    """Flat: the median of the last minute within max(32 MiB, 3 %) of the median of the first
    minute after a minute of warm-up."""
    if len(samples) < 8:
        tally.notes.append(f"RSS: too few samples ({len(samples)})")
        return
    t0 = samples[0][0]
    later = [(t - t0, mb) for t, mb in samples if t - t0 >= 60] or samples[len(samples) // 4:]
    first = statistics.median(mb for t, mb in later if t < later[0][0] + 60)
    last = statistics.median(mb for t, mb in later if t > later[-1][0] - 60)
    tally.notes.append(f"RSS of the server's processes: {first:.0f} MiB after warm-up, {last:.0f} MiB at the end "
                       f"(min {min(m for _, m in samples):.0f}, max {max(m for _, m in samples):.0f}, {len(samples)} samples)")
    if last - first > max(32.0, 0.03 * first):
        tally.fail("RSS grows under load", f"{first:.0f} -> {last:.0f} MiB")
