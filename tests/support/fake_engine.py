"""A fake vLLM engine client for tests of actprune's real HTTP routes (vLLM's own pattern: the
real serving code over a mocked engine client, driven in-process or on loopback).

What is real, and runs as it does in a server:

- the routes, the service and shard assembly (:func:`actprune_app` mounts them as vLLM does);
- the worker side: :class:`CaptureWorkerExtension`'s RPC methods, called through vLLM's own
  ``run_method`` (so a worker without the extension raises vLLM's NotImplementedError);
- the capture: :class:`actprune.server.capture.Capture` with its hooks, custom ops and
  accumulators, one per tensor-parallel rank, attached to the model as the loader attaches it;
- vLLM's forward context, which tells the capture each step's prefill/decode split and which
  rows are CUDA-graph padding.

What is fake, and why: there is no engine core, no worker process and no transformer. The
model is plain ``nn.Module``s shaped like vLLM's (``model.layers[i].mlp.down_proj`` and
``.self_attn.o_proj`` with RowParallelLinear's partition attributes) whose forward hands
*given* activations to those projections, so the statistics they must give are known exactly
(:mod:`raw_samples`). :meth:`FakeEngineClient.feed` plays vLLM's model runner: it batches the
tokens into steps (prefill chunks and one-token decodes, padded with garbage rows marked as
padding) and runs every rank. ``collective_rpc`` runs each worker's method in-process, between
steps, like the engine core.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from actprune.core.archs import REGISTRY
from actprune.pruning.fixtures.synthetic import tiny_config
from actprune.server.api.endpoints import ActpruneEndpoints
from actprune.server.api.service import CaptureService
from actprune.server.capture import Capture, CaptureOptions, ShardInfo
from actprune.server.loader import attach_capture
from actprune.server.settings import Settings
from actprune.server.worker import CaptureWorkerExtension
from fastapi import FastAPI
from raw_samples import RawLayer, split_tokens
from torch import Tensor, nn
from transformers import AutoConfig, PretrainedConfig
from vllm.forward_context import ForwardContext, override_forward_context
from vllm.v1.serial_utils import run_method

__all__ = ["FakeEngineClient", "actprune_app", "config_for"]

# "on": `actprune serve`. "not_loaded": the worker extension without the actprune load format.
# "no_extension": vLLM without the worker extension (collective_rpc raises NotImplementedError).
CaptureMode = Literal["on", "not_loaded", "no_extension"]
PAD = 7e5  # garbage in padding rows: counted, it would show in every figure
PREFILL_CHUNK, DECODES_PER_STEP, ROW_MULTIPLE = 40, 12, 8
MAX_TOKENS = 64  # rows of one step at most (vLLM's max_num_batched_tokens)
HIDDEN = 32


def config_for(raw: Sequence[RawLayer], head_dim: int = 8, **overrides: Any) -> dict[str, Any]:
    """A tiny Qwen3 config whose widths are those of the raw samples."""
    heads = raw[0].attn.shape[1] // head_dim
    return tiny_config("qwen3", num_hidden_layers=len(raw), intermediate_size=raw[0].mlp.shape[1],
                       num_attention_heads=heads, num_key_value_heads=max(heads // 2, 1),
                       head_dim=head_dim, hidden_size=HIDDEN, **overrides)


# ---- the model: vLLM's module layout, activations given -------------------------------------
class _RowParallel(nn.Linear):
    """The slice of vLLM's RowParallelLinear that rank ``tp_rank`` holds; capture reads the split
    from these attributes."""

    def __init__(self, total: int, out: int, tp_rank: int, tp_size: int) -> None:
        super().__init__(total // tp_size, out, bias=False)
        self.input_size, self.input_size_per_partition, self.tp_rank = total, total // tp_size, tp_rank


@dataclass
class _LayerStep:
    """One decoder layer's tensors of one step; rows: (N,) tokens of the step, padding last."""

    mlp_in: Tensor  # (N, I/tp)
    attn_in: Tensor  # (N, H*D/tp)
    hidden: Tensor  # (N, hidden) entering; hidden + residual is the residual stream
    residual: Tensor | None  # (N, hidden); None for layer 0, as in vLLM
    out: tuple[Tensor, Tensor]  # (hidden, residual) leaving


class _DecoderLayer(nn.Module):
    def __init__(self, cfg: dict[str, Any], tp_rank: int, tp_size: int) -> None:
        super().__init__()
        self.mlp, self.self_attn = nn.Module(), nn.Module()
        self.mlp.down_proj = _RowParallel(cfg["intermediate_size"], HIDDEN, tp_rank, tp_size)
        self.self_attn.o_proj = _RowParallel(cfg["num_attention_heads"] * cfg["head_dim"], HIDDEN, tp_rank, tp_size)

    def forward(self, positions: Tensor, hidden: Tensor, residual: Tensor | None, *,
                step: _LayerStep) -> tuple[Tensor, Tensor]:
        self.self_attn.o_proj(step.attn_in)
        self.mlp.down_proj(step.mlp_in)
        return step.out


class _Model(nn.Module):
    def __init__(self, cfg: dict[str, Any], tp_rank: int, tp_size: int) -> None:
        super().__init__()
        self.model = nn.Module()
        self.model.layers = nn.ModuleList(
            _DecoderLayer(cfg, tp_rank, tp_size) for _ in range(cfg["num_hidden_layers"]))

    def forward(self, positions: Tensor, steps: list[_LayerStep]) -> None:
        for layer, s in zip(self.model.layers, steps, strict=True):
            layer(positions, s.hidden, s.residual, step=s)


@dataclass
class _AttnMetadata:
    query_start_loc_cpu: Tensor  # the one field of vLLM's attention metadata the capture reads


class _Runner:
    def __init__(self, model: nn.Module) -> None:
        self.model = model


class _Worker:
    """A vLLM worker as ``collective_rpc`` sees it: a model runner holding the model."""

    def __init__(self, model: nn.Module) -> None:
        self.model_runner = _Runner(model)

    def shutdown(self) -> None:
        """As vLLM's worker does when the engine stops: the model is released."""
        self.model_runner.model = None


class _CaptureWorker(CaptureWorkerExtension, _Worker):
    """The worker class `actprune serve` makes (``--worker-extension-cls``)."""


@dataclass
class _Rank:
    model: _Model
    worker: _Worker
    capture: Capture | None
    tp_rank: int


# ---- the engine client ------------------------------------------------------------------------
@dataclass(frozen=True)
class FakeModelConfig:
    """The fields of vLLM's ModelConfig that actprune reads."""

    hf_config: PretrainedConfig
    model: str
    served_model_name: str
    architectures: list[str]


@dataclass(frozen=True)
class FakeParallelConfig:
    tensor_parallel_size: int
    pipeline_parallel_size: int = 1


@dataclass(frozen=True)
class FakeCacheConfig:
    enable_prefix_caching: bool = False  # as `actprune serve` starts vLLM unless asked


@dataclass(frozen=True)
class FakeVllmConfig:
    parallel_config: FakeParallelConfig
    cache_config: FakeCacheConfig = FakeCacheConfig()


@dataclass
class FakeEngineClient:
    """Records every ``collective_rpc`` call in ``calls`` as (method, args); ``fail`` makes the
    next call raise that exception (an engine fault)."""

    config: dict[str, Any]
    served_model_name: str = "tiny/qwen3"
    model_path: str | None = None  # a checkpoint directory: weight-aware plans read it
    tp_size: int = 1
    capture: CaptureMode = "on"
    calls: list[tuple[str, tuple[Any, ...]]] = field(default_factory=list)
    fail: Exception | None = None
    stash_mib: int = 256  # 0: no step buffers, every step folded tap by tap (a "long" step)
    # vLLM's default on a GPU (cudagraph mode FULL_AND_PIECEWISE): a step of decodes alone is a
    # full CUDA graph's replay, which runs the ops recorded in it but calls no module's hooks
    # around the model; played here by calling the model's forward past its own hooks
    full_graph_decodes: bool = False

    def __post_init__(self) -> None:
        cfg = dict(self.config)
        hf = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
        self.model_config = FakeModelConfig(hf, self.model_path or self.served_model_name,
                                            self.served_model_name, list(hf.architectures or []))
        self.vllm_config = FakeVllmConfig(FakeParallelConfig(self.tp_size))
        self._lock = threading.Lock()  # RPCs run between steps, never inside one
        self.ranks = [self._load(r) for r in range(self.tp_size)]

    def _load(self, tp_rank: int) -> _Rank:
        model = _Model(self.config, tp_rank, self.tp_size)
        if self.capture == "no_extension":
            return _Rank(model, _Worker(model), None, tp_rank)
        capture = None
        if self.capture == "on":  # what server.loader.CaptureModelLoader.load_model does
            spec = REGISTRY[self.config["architectures"][0]]
            capture = Capture(model, spec.vllm, CaptureOptions(max_tokens=MAX_TOKENS, stash_mib=self.stash_mib),
                              ShardInfo(tp_rank=tp_rank, tp_size=self.tp_size), torch.device("cpu"), HIDDEN)
            attach_capture(model, capture)
        return _Rank(model, _CaptureWorker(model), capture, tp_rank)

    @property
    def methods(self) -> list[str]:
        return [m for m, _ in self.calls]

    async def collective_rpc(self, method: str, timeout: float | None = None, args: tuple[Any, ...] = (),
                             kwargs: dict[str, Any] | None = None) -> list[Any]:
        self.calls.append((method, tuple(args)))
        if self.fail is not None:
            e, self.fail = self.fail, None
            raise e
        with self._lock:
            return [run_method(r.worker, method, tuple(args), kwargs or {}) for r in self.ranks]

    # ---- the model runner -------------------------------------------------------------------
    def feed(self, raw: Sequence[RawLayer], decode: int | None = None) -> None:
        """Run forward steps over every token of ``raw`` on every rank; the last ``decode``
        tokens (default: :func:`raw_samples.split_tokens`) are one-token decode queries."""
        tokens = raw[0].tokens
        prefill, decode = (split_tokens(tokens) if decode is None else (tokens - decode, decode))
        self._check_widths(raw)
        with self._lock:
            for rows, query_lens in _steps(prefill, decode):
                padded = -(-len(rows) // ROW_MULTIPLE) * ROW_MULTIPLE  # as CUDA graphs pad
                qsl = torch.tensor(np.cumsum([0, *query_lens]), dtype=torch.int32)
                is_padding = torch.arange(padded) >= len(rows)
                ctx = ForwardContext(no_compile_layers={}, attn_metadata={"attn": _AttnMetadata(qsl)},
                                     slot_mapping={}, is_padding=is_padding)
                streams = _streams(raw, rows, padded)
                for rank in self.ranks:
                    steps = [_layer_step(layer, rows, padded, i, rank.tp_rank, self.tp_size, streams)
                             for i, layer in enumerate(raw)]
                    replay = self.full_graph_decodes and set(query_lens) == {1}
                    with override_forward_context(ctx):
                        (rank.model.forward if replay else rank.model)(torch.arange(padded), steps)

    def _check_widths(self, raw: Sequence[RawLayer]) -> None:
        c = self.config
        want = (c["num_hidden_layers"], c["intermediate_size"], c["num_attention_heads"] * c["head_dim"])
        got = (len(raw), raw[0].mlp.shape[1], raw[0].attn.shape[1])
        if got != want:
            raise ValueError(f"raw samples have (layers, mlp, attn) {got}, the model {want}")


def _steps(prefill: int, decode: int) -> Iterator[tuple[np.ndarray, list[int]]]:
    """(token rows, query lengths) per step: a prefill chunk of the first ``prefill`` rows
    (never one token long: capture counts one-token queries as decode) plus decode rows."""
    if prefill == 1:
        raise ValueError("a one-token prefill would be counted as decode")
    p, d = 0, prefill
    while p < prefill or d < prefill + decode:
        n = prefill - p if prefill - p <= PREFILL_CHUNK + 1 else PREFILL_CHUNK
        k = min(DECODES_PER_STEP, prefill + decode - d)
        rows = np.concatenate([np.arange(p, p + n), np.arange(d, d + k)])
        yield rows, ([n] if n else []) + [1] * k
        p, d = p + n, d + k


def _streams(raw: Sequence[RawLayer], rows: np.ndarray, padded: int) -> list[np.ndarray]:
    """The residual stream entering layer 0 and leaving each layer, (padded, HIDDEN) each,
    chained as vLLM chains it (what layer i leaves, layer i + 1 is given): s_0 = e0 and
    s_{i+1} = cos_i s_i + sin_i e_{i+1}, unit vectors (e_{i+1} is orthogonal to s_0..s_i), so
    cosine(s_i, s_{i+1}) is layer i's raw cosine. Padding rows: garbage (PAD e0)."""
    out = [np.zeros((padded, HIDDEN), dtype=np.float64)]
    out[0][:, 0] = 1.0
    for i, layer in enumerate(raw):
        c = layer.cos[rows]  # (T,)
        nxt = np.zeros((padded, HIDDEN), dtype=np.float64)
        nxt[: len(rows)] = c[:, None] * out[-1][: len(rows)]
        nxt[: len(rows), i + 1] = np.sqrt(np.clip(1 - c**2, 0, None))
        out.append(nxt)
    for s in out:
        s[len(rows):] = 0.0
        s[len(rows):, 0] = PAD
    return out


def _layer_step(layer: RawLayer, rows: np.ndarray, padded: int, i: int, tp_rank: int, tp_size: int,
                streams: list[np.ndarray]) -> _LayerStep:
    def take(x: np.ndarray) -> Tensor:  # (T, C) -> this rank's columns of the step's rows, padded
        c = x.shape[1] // tp_size
        out = np.full((padded, c), PAD, dtype=np.float32)
        out[: len(rows)] = x[rows, tp_rank * c : (tp_rank + 1) * c]
        return torch.from_numpy(out)

    # From layer 1 on, vLLM passes the stream as hidden + residual: the last coordinate (never
    # part of the stream) split between them, exactly.
    e = np.zeros((padded, HIDDEN), dtype=np.float32)
    e[:, -1] = 1.0
    t = torch.from_numpy
    stream_in, stream_out = (streams[k].astype(np.float32) for k in (i, i + 1))
    residual = None if i == 0 else t(e)
    hidden = t(stream_in) if i == 0 else t(stream_in - e)
    return _LayerStep(mlp_in=take(layer.mlp), attn_in=take(layer.attn), hidden=hidden, residual=residual,
                      out=(t(stream_out - e), t(e)))


# ---- the app ---------------------------------------------------------------------------------
def actprune_app(engine: FakeEngineClient, *, snapshot_dir: Path, api_keys: Sequence[str] = (),
                 settings: Settings | None = None) -> FastAPI:
    """A FastAPI app with actprune's real routes, as vLLM's API server builds it: the endpoint
    plugin attaches its routers, and the service it makes once the engine is up. Default
    settings: no persistence, an instance identity of its own (two fake servers are two)."""
    app = FastAPI()
    ActpruneEndpoints().attach_router(app)
    settings = settings or Settings(snapshot_dir=snapshot_dir, snapshot_interval=0, instance_id=f"fake-{id(engine):x}")
    app.state.actprune = CaptureService(engine, settings, list(api_keys))
    return app
