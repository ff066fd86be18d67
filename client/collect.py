"""`actprune collect`: replay production-style prompts through a server's OpenAI API.

The server captures activation statistics while it answers; this command only produces the
traffic. Prompts come from a JSONL file, one request per line::

    {"prompt": "Text to complete"}                                   # /v1/completions
    {"messages": [{"role": "user", "content": "A question"}]}        # /v1/chat/completions
    {"messages": [...], "max_tokens": 64}                             # per-line override

Exactly one of ``prompt`` and ``messages`` per line; other keys (an ``id``, a source tag) are
ignored. An example ships with actprune: ``client/data/prompts_example.jsonl``.

Requests go through the OpenAI Python SDK (``pip install 'actprune[client]'``), which retries
connection errors, 408/409/429 and 5xx with backoff; a request that still fails is counted and
reported, and the run goes on. Exit code 1 when any request failed.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from actprune.client.http import ClientSettings
from actprune.core.errors import UsageError
from actprune.core.files import JsonlError, read_jsonl

__all__ = ["EXAMPLE_PROMPTS", "CollectReport", "PromptItem", "configure", "load_prompts", "run"]

EXAMPLE_PROMPTS = Path(__file__).parent / "data" / "prompts_example.jsonl"
_ROLES = ("system", "user", "assistant", "tool", "developer")


@dataclass(frozen=True)
class PromptItem:
    """One request to replay: ``prompt`` (completions) or ``messages`` (chat), never both."""

    line: int
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    max_tokens: int | None = None


@dataclass
class CollectReport:
    requests: int = 0
    ok: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    errors: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def lines(self) -> list[str]:
        tokens = self.prompt_tokens + self.completion_tokens
        rate = tokens / self.seconds if self.seconds > 0 else 0.0
        out = [
            f"requests:          {self.ok} ok / {self.requests} sent",
            f"errors:            {len(self.errors)}",
            f"prompt tokens:     {self.prompt_tokens}",
            f"completion tokens: {self.completion_tokens}",
            f"elapsed:           {self.seconds:.2f} s",
            f"tokens/s:          {rate:.1f} (prompt + completion)",
        ]
        out += [f"  error: {e}" for e in self.errors[:5]]
        if len(self.errors) > 5:
            out.append(f"  … and {len(self.errors) - 5} more errors")
        return out


def load_prompts(path: str | Path) -> list[PromptItem]:
    """Parse a prompts JSONL file; raise UsageError naming the file and line of the first problem."""
    path = Path(path)
    try:
        items = [_parse_obj(obj, n, path) for n, obj in read_jsonl(path)]
    except JsonlError as e:
        raise UsageError(f"--prompts: {e}") from e
    if not items:
        raise UsageError(f"{path}: no prompts (the file is empty); expected one JSON object per line")
    return items


def _parse_obj(obj: dict[str, Any], n: int, path: Path) -> PromptItem:
    where = f"{path}:{n}"
    has_p, has_m = "prompt" in obj, "messages" in obj
    if has_p == has_m:
        raise UsageError(f"{where}: needs exactly one of 'prompt' (completions) or 'messages' (chat)")
    max_tokens = obj.get("max_tokens")
    if max_tokens is not None and (type(max_tokens) is not int or max_tokens < 1):
        raise UsageError(f"{where}: 'max_tokens' must be a positive integer, got {max_tokens!r}")
    if has_p:
        if not isinstance(obj["prompt"], str) or not obj["prompt"]:
            raise UsageError(f"{where}: 'prompt' must be a non-empty string")
        return PromptItem(line=n, prompt=obj["prompt"], max_tokens=max_tokens)
    msgs = obj["messages"]
    if not isinstance(msgs, list) or not msgs:
        raise UsageError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
    for j, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or m.get("role") not in _ROLES:
            raise UsageError(
                f"{where}: messages[{j}] must be an object with 'role' (one of {', '.join(_ROLES)}) "
                f"and a string 'content'"
            )
    return PromptItem(line=n, messages=msgs, max_tokens=max_tokens)


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base-url", required=True, help="server URL, e.g. http://localhost:8000 (with or without /v1)")
    p.add_argument("--prompts", required=True, type=Path,
                   help=f"JSONL file, one 'prompt' or 'messages' object per line (example: {EXAMPLE_PROMPTS})")
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight at once (default 8)")
    p.add_argument("--max-tokens", type=int, default=128, help="tokens to generate per request (default 128)")
    p.add_argument("--model", help="model name (default: the server's first /v1/models entry)")
    p.add_argument("--api-key", help="API key (default: $ACTPRUNE_API_KEY, then $VLLM_API_KEY)")
    p.add_argument("--retries", type=int, default=3, help="retries per request (default 3)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per request (default 600)")


def run(args: argparse.Namespace) -> int:
    for name in ("concurrency", "max_tokens"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.retries < 0:
        raise UsageError(f"--retries must be >= 0, got {args.retries}")
    if not args.base_url.startswith(("http://", "https://")):
        raise UsageError(f"--base-url must start with http:// or https://, got {args.base_url!r}")
    items = load_prompts(args.prompts)
    try:
        import openai
    except ImportError as e:
        raise UsageError("collect needs the OpenAI SDK: pip install 'actprune[client]'") from e
    settings = ClientSettings.from_env(api_key=args.api_key)
    base = args.base_url.rstrip("/")
    client = openai.AsyncOpenAI(
        base_url=base if base.endswith("/v1") else base + "/v1",
        api_key=settings.api_key or "EMPTY",  # the SDK insists on a key; vLLM without one ignores it
        max_retries=args.retries,
        timeout=args.timeout,
    )
    report = asyncio.run(_collect(client, items, args))
    print("\n".join(report.lines()))
    return 0 if not report.errors else 1


async def _collect(client: Any, items: list[PromptItem], args: argparse.Namespace) -> CollectReport:
    import openai
    from tqdm import tqdm

    async with client:
        model = args.model or await _default_model(client, args.base_url)
        report = CollectReport(requests=len(items))
        queue: asyncio.Queue[PromptItem] = asyncio.Queue()
        for item in items:
            queue.put_nowait(item)
        bar = tqdm(total=len(items), desc=f"collect {model}", unit="req")

        async def worker() -> None:
            while not queue.empty():
                item = queue.get_nowait()
                try:
                    usage = await _send(client, model, item, args.max_tokens)
                except openai.OpenAIError as e:
                    report.errors.append(f"line {item.line}: {_describe(e)}")
                else:
                    report.ok += 1
                    if usage is not None:
                        report.prompt_tokens += usage.prompt_tokens
                        report.completion_tokens += usage.completion_tokens or 0
                bar.update(1)
                bar.set_postfix(tokens=report.prompt_tokens + report.completion_tokens,
                                errors=len(report.errors), refresh=False)

        start = time.perf_counter()
        try:
            await asyncio.gather(*(worker() for _ in range(min(args.concurrency, len(items)))))
        finally:
            bar.close()
        report.seconds = time.perf_counter() - start
    return report


async def _default_model(client: Any, base_url: str) -> str:
    import openai

    try:
        models = await client.models.list()
    except openai.APIConnectionError as e:
        raise UsageError(f"cannot reach {base_url}: {e}; is the server up?") from e
    except openai.APIStatusError as e:
        raise UsageError(f"GET /v1/models answered {e.status_code}: {_describe(e)}") from e
    if not models.data:
        raise UsageError(f"{base_url} serves no model (/v1/models is empty); pass --model")
    return models.data[0].id


async def _send(client: Any, model: str, item: PromptItem, max_tokens: int) -> Any:
    n = item.max_tokens or max_tokens
    if item.prompt is not None:
        r = await client.completions.create(model=model, prompt=item.prompt, max_tokens=n)
    else:
        r = await client.chat.completions.create(model=model, messages=item.messages, max_tokens=n)
    return r.usage


def _describe(e: Exception) -> str:
    """One line: the status code and the server's message when there is one."""
    status = getattr(e, "status_code", None)
    body = getattr(e, "body", None)
    msg = (body.get("message") or body.get("detail")) if isinstance(body, dict) else None
    text = str(msg or e).replace("\n", " ")
    return f"{status} {text}" if status else f"{type(e).__name__}: {text}"
