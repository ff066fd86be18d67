"""A stand-in for the vLLM server in client tests (no vLLM here): a small FastAPI app on real
loopback HTTP (uvicorn, 127.0.0.1, a free port) serving

- the actprune routes, with the shared response models of ``wire/api.py``, over a ``Stats``
  built with numpy from random raw samples (kept, so tests can compare against numpy on them);
- a fake OpenAI API (``/v1/models``, ``/v1/completions``, ``/v1/chat/completions``) whose
  usage counts are words, so tests know the exact totals to expect.

The real server's routes are tested against vLLM by the server's own tests.
"""

from __future__ import annotations

import hmac
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import numpy as np
import uvicorn
from actprune.core.summary import summarize
from actprune.core.wire.api import (
    SAFETENSORS_MEDIA_TYPE,
    PauseResponse,
    ResetResponse,
    StatsSummary,
    StatusResponse,
)
from actprune.core.wire.stats import Stats
from fastapi import Depends, FastAPI, Header, HTTPException, Query, Request
from fastapi.responses import JSONResponse, Response

THRESHOLD = 1e-3


# ---- stats from raw samples ------------------------------------------------------------------
def accumulate(x: np.ndarray, threshold: float = THRESHOLD) -> dict[str, np.ndarray]:
    """The accumulator group of raw samples x: (T, C), computed directly with numpy."""
    mean = x.mean(axis=0) if len(x) else np.zeros(x.shape[1])
    return {
        "count": np.asarray(float(len(x))),
        "mean": mean,
        "m2": ((x - mean) ** 2).sum(axis=0),
        "sum": x.sum(axis=0),
        "sum_sq": (x * x).sum(axis=0),
        "sum_abs": np.abs(x).sum(axis=0),
        "max_abs": np.abs(x).max(axis=0).astype(np.float32) if len(x) else np.zeros(x.shape[1], np.float32),
        "near_zero": (np.abs(x) <= threshold).sum(axis=0).astype(np.float64),
    }


@dataclass
class RawLayer:
    mlp: np.ndarray  # (T, I) inputs of down_proj
    attn: np.ndarray  # (T, H*D) inputs of o_proj
    cos: np.ndarray  # (T,) cosine of residual in/out


def random_raw(
    rng: np.random.Generator, tokens: int, layers: int = 3, mlp: int = 48, heads: int = 4, head_dim: int = 8
) -> list[RawLayer]:
    """Activations with the features that matter: dead neurons (exact zeros), a large offset on
    some channels (where naive variance would cancel), heavy tails."""
    out = []
    for _ in range(layers):
        m = rng.standard_t(df=3, size=(tokens, mlp))
        m[:, :5] *= rng.random((tokens, 5)) < 0.05  # mostly-dead neurons
        m[:, 5:8] += 1e4
        a = rng.standard_normal((tokens, heads * head_dim)) * rng.uniform(0.1, 2.0, heads * head_dim)
        out.append(RawLayer(mlp=m, attn=a, cos=rng.uniform(0.5, 1.0, tokens)))
    return out


def stats_from_raw(raw: list[RawLayer], *, model: str = "tiny/qwen3", config_hash: str = "abc123",
                   head_dim: int | None = 8, decode_share: float = 0.25) -> Stats:
    tensors: dict[str, np.ndarray] = {}
    for i, layer in enumerate(raw):
        for kind, x in (("mlp", layer.mlp), ("attn", layer.attn)):
            tensors.update({f"layers.{i}.{kind}.{f}": v for f, v in accumulate(x).items()})
        tensors[f"layers.{i}.block.cos_sum"] = np.asarray(layer.cos.sum())
        tensors[f"layers.{i}.block.count"] = np.asarray(float(len(layer.cos)))
    tokens = len(raw[0].cos)
    decode = int(tokens * decode_share)
    meta: dict[str, Any] = {
        "format": "actprune.stats", "format_version": 1, "model": model, "architecture": "Qwen3ForCausalLM",
        "config_hash": config_hash, "tensor_parallel_size": 1, "near_zero_threshold": THRESHOLD,
        "tokens_prefill": tokens - decode, "tokens_decode": decode,
    }
    if head_dim is not None:
        meta["head_dim"] = head_dim
    return Stats(tensors=tensors, meta=meta)


# ---- the app ---------------------------------------------------------------------------------
@dataclass
class FakeState:
    stats: Stats
    api_key: str | None = None
    models: list[str] = field(default_factory=lambda: ["tiny/qwen3", "other"])
    fail_first: int = 0  # answer 503 to this many OpenAI requests first
    status_500: bool = False
    corrupt_stats: bool = False
    paused: bool = False
    resets: int = 0
    hits: Counter[str] = field(default_factory=Counter)
    openai_bodies: list[dict[str, Any]] = field(default_factory=list)
    last_plan_body: dict[str, Any] | None = None


def build_app(state: FakeState) -> FastAPI:
    def auth(request: Request, authorization: Annotated[str | None, Header()] = None) -> None:
        state.hits[request.url.path] += 1
        if state.api_key is None:
            return
        sent = (authorization or "").removeprefix("Bearer ")
        if not hmac.compare_digest(sent.encode(), state.api_key.encode()):
            raise HTTPException(401, detail="missing or wrong API key: send 'Authorization: Bearer <key>'")

    app = FastAPI(title="fake vLLM + actprune", dependencies=[Depends(auth)])

    def status() -> StatusResponse:
        m = state.stats.meta
        return StatusResponse(
            capturing=not state.paused, paused=state.paused, tokens_prefill=m["tokens_prefill"],
            tokens_decode=m["tokens_decode"], window_start=1.7e9, last_snapshot_time=None,
            model=m["model"], architecture=m["architecture"], config_hash=m["config_hash"],
            tensor_parallel_size=1, pipeline_parallel_size=1, num_layers=len(state.stats.layers),
            near_zero_threshold=m["near_zero_threshold"],
        )

    @app.get("/activations/stats", response_model=StatsSummary)
    def get_stats(format: Literal["json", "safetensors"] = "json",
                  k: Annotated[int, Query(ge=0, le=1000)] = 10) -> Any:
        if format == "safetensors":
            body = b"{not a stats file" if state.corrupt_stats else state.stats.to_bytes()
            return Response(content=body, media_type=SAFETENSORS_MEDIA_TYPE)
        return summarize(state.stats, k=k)

    @app.get("/activations/status", response_model=StatusResponse)
    def get_status() -> Any:
        if state.status_500:
            raise HTTPException(500, detail="snapshot lock timed out")
        return status()

    @app.post("/activations/reset", response_model=ResetResponse)
    def reset() -> Any:
        state.resets += 1
        return ResetResponse(status=status())

    @app.post("/activations/{action}", response_model=PauseResponse)
    def pause_resume(action: Literal["pause", "resume"]) -> Any:
        state.paused = action == "pause"
        return PauseResponse(status=status())

    @app.post("/prune/plan")
    async def plan(request: Request) -> Any:
        state.last_plan_body = await request.json()
        return {"received": state.last_plan_body}

    @app.get("/v1/models")
    def models() -> Any:
        return {"object": "list",
                "data": [{"id": m, "object": "model", "created": 0, "owned_by": "fake"} for m in state.models]}

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        body = await request.json()
        return _openai_answer(state, body, body["prompt"], chat=False)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Any:
        body = await request.json()
        return _openai_answer(state, body, " ".join(m["content"] for m in body["messages"]), chat=True)

    return app


def _openai_answer(state: FakeState, body: dict[str, Any], text: str, *, chat: bool) -> Any:
    if state.fail_first > 0:
        state.fail_first -= 1
        return JSONResponse({"error": {"message": "overloaded", "type": "ServiceUnavailable", "code": 503}},
                            status_code=503, headers={"retry-after-ms": "1"})
    if "FAIL" in text:
        return JSONResponse({"error": {"message": "prompt rejected by the fake", "type": "BadRequestError",
                                       "code": 400}}, status_code=400)
    state.openai_bodies.append(body)
    n_prompt, n_out = len(text.split()), body["max_tokens"]
    usage = {"prompt_tokens": n_prompt, "completion_tokens": n_out, "total_tokens": n_prompt + n_out}
    if chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "length"}
        return {"id": "c", "object": "chat.completion", "created": 0, "model": body["model"],
                "choices": [choice], "usage": usage}
    choice = {"index": 0, "text": "ok", "finish_reason": "length", "logprobs": None}
    return {"id": "c", "object": "text_completion", "created": 0, "model": body["model"],
            "choices": [choice], "usage": usage}


# ---- running it ------------------------------------------------------------------------------
def bound_socket() -> socket.socket:
    """A socket bound to a free loopback port, not listening yet (connections are refused)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


@contextmanager
def serve(state: FakeState, *, sock: socket.socket | None = None, delay: float = 0.0) -> Iterator[str]:
    """Run the app on a loopback port; yield its base URL. With ``delay``, start serving only
    after that many seconds (connections are refused until then) and yield at once."""
    sock = sock or bound_socket()
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(build_app(state), log_level="warning", lifespan="off"))

    def target() -> None:
        time.sleep(delay)
        server.run(sockets=[sock])

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    if delay == 0:
        deadline = time.monotonic() + 10
        while not server.started:
            if time.monotonic() > deadline or not thread.is_alive():
                raise RuntimeError("fake server did not start")
            time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
