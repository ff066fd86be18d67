"""A stand-in for a vLLM server in the client tests, on real loopback HTTP (uvicorn, 127.0.0.1,
a free port), so the client's sockets, retries and headers meet a real server.

- The actprune routes are the REAL ones (routes, service, shard assembly, worker RPC methods,
  capture), mounted as vLLM mounts them over :class:`fake_engine.FakeEngineClient`, which runs
  the capture over known raw samples (:mod:`raw_samples`): what a server holds is what numpy
  computes on those samples.
- The OpenAI API (``/v1/models``, ``/v1/completions``, ``/v1/chat/completions``) is vLLM's, not
  actprune's, so it stays a FAKE: usage counts are words (tests know the exact totals), it can
  answer 503 a few times and 400 to a prompt containing "FAIL", and it checks the API key on
  ``/v1`` like vLLM's middleware.
"""

from __future__ import annotations

import hmac
import socket
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import uvicorn
from actprune.core.wire.stats import Stats, config_hash
from fake_engine import FakeEngineClient, actprune_app, config_for
from fastapi import APIRouter, Depends, FastAPI, Header, HTTPException, Request
from fastapi.responses import JSONResponse
from raw_samples import RawLayer, stats_from_raw

__all__ = ["FakeVllm", "bound_socket", "fake_vllm", "serve"]


@dataclass
class FakeVllm:
    """One fake server: its engine (``engine.calls`` records the actprune RPCs) and the state of
    its fake OpenAI API."""

    engine: FakeEngineClient
    api_key: str | None = None
    models: list[str] = field(default_factory=lambda: ["tiny/qwen3", "other"])
    fail_first: int = 0  # answer 503 to this many OpenAI requests first
    hits: Counter[str] = field(default_factory=Counter)  # OpenAI requests per path
    openai_bodies: list[dict[str, Any]] = field(default_factory=list)

    def reference(self, raw: list[RawLayer]) -> Stats:
        """What this server must hold after serving ``raw``, computed by numpy."""
        return stats_from_raw(raw, model=self.engine.served_model_name, config_hash=config_hash(self.engine.config))


def fake_vllm(raw: list[RawLayer], *, model: str = "tiny/qwen3", api_key: str | None = None,
              config: dict[str, Any] | None = None, **kw: Any) -> FakeVllm:
    """A server of a tiny Qwen3 shaped like the raw samples (``config`` overrides its config)
    that has served them."""
    engine = FakeEngineClient(config_for(raw, **(config or {})), served_model_name=model)
    engine.feed(raw)
    return FakeVllm(engine=engine, api_key=api_key, **kw)


# ---- the app ---------------------------------------------------------------------------------
def build_app(server: FakeVllm, snapshot_dir: Path) -> FastAPI:
    keys = [server.api_key] if server.api_key else []
    app = actprune_app(server.engine, snapshot_dir=snapshot_dir, api_keys=keys)
    app.include_router(_openai_router(server))
    return app


def _openai_router(server: FakeVllm) -> APIRouter:
    def auth(request: Request, authorization: Annotated[str | None, Header()] = None) -> None:
        server.hits[request.url.path] += 1
        sent = (authorization or "").removeprefix("Bearer ")
        if server.api_key is not None and not hmac.compare_digest(sent.encode(), server.api_key.encode()):
            raise HTTPException(401, "Unauthorized")

    router = APIRouter(prefix="/v1", dependencies=[Depends(auth)])

    @router.get("/models")
    def models() -> Any:
        return {"object": "list",
                "data": [{"id": m, "object": "model", "created": 0, "owned_by": "fake"} for m in server.models]}

    @router.post("/completions")
    async def completions(request: Request) -> Any:
        body = await request.json()
        return _openai_answer(server, body, body["prompt"], chat=False)

    @router.post("/chat/completions")
    async def chat(request: Request) -> Any:
        body = await request.json()
        return _openai_answer(server, body, " ".join(m["content"] for m in body["messages"]), chat=True)

    return router


def _openai_answer(server: FakeVllm, body: dict[str, Any], text: str, *, chat: bool) -> Any:
    if server.fail_first > 0:
        server.fail_first -= 1
        return JSONResponse({"error": {"message": "overloaded", "type": "ServiceUnavailable", "code": 503}},
                            status_code=503, headers={"retry-after-ms": "1"})
    if "FAIL" in text:
        return JSONResponse({"error": {"message": "prompt rejected by the fake", "type": "BadRequestError",
                                       "code": 400}}, status_code=400)
    server.openai_bodies.append(body)
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
def serve(server: FakeVllm, *, sock: socket.socket | None = None, delay: float = 0.0) -> Iterator[str]:
    """Run the server on a loopback port; yield its base URL. With ``delay``, start serving only
    after that many seconds (connections are refused until then) and yield at once."""
    sock = sock or bound_socket()
    port = sock.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        app = build_app(server, Path(tmp))
        uv = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))

        def target() -> None:
            time.sleep(delay)
            uv.run(sockets=[sock])

        thread = threading.Thread(target=target, daemon=True)
        thread.start()
        if delay == 0:
            deadline = time.monotonic() + 10
            while not uv.started:
                if time.monotonic() > deadline or not thread.is_alive():
                    raise RuntimeError("fake server did not start")
                time.sleep(0.01)
        try:
            yield f"http://127.0.0.1:{port}"
        finally:
            uv.should_exit = True
            thread.join(timeout=10)
            sock.close()
