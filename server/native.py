"""The capture's C++ op (csrc/stash.cpp): built once per machine, loaded in every worker.

``actprune::stash_layer`` runs once per decoder layer per step. Its C++ body copies the layer's
taps and residual stream into the step buffers with plain loops; the Python body (ops.py, the
reference, registered as ``stash_layer_slow``) costs more per call than the copies it makes
(BENCHMARKS.md, issue 16). The C++ op hands the rare cases (a step too long for the buffers, a
phase it has no buffers for) to the Python op through the dispatcher.

Building needs what torch.compile already needs on a CPU and Triton on a GPU: a C++ compiler
(and ninja, a vLLM dependency). The first worker on a machine builds it (~15 s on 2 cores);
later ones load the cached library. When it cannot be built, the capture says why, once, and
runs the Python op: the statistics are the same, a step costs more. ``ACTPRUNE_NATIVE_OPS=0``
skips it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from pathlib import Path

import torch
from actprune.server.settings import cache_dir, native_ops

__all__ = ["SOURCE", "load"]

log = logging.getLogger("vllm.actprune")  # under "vllm": its handlers apply

SOURCE = Path(__file__).parent / "csrc" / "stash.cpp"
_STALE_LOCK_S = 600  # a build lock this old was left by a build that was killed


def build_dir() -> Path:
    """One directory per source and torch version: an upgrade or an edit builds anew."""
    tag = hashlib.sha1(SOURCE.read_bytes() + torch.__version__.encode()).hexdigest()[:12]
    return cache_dir() / "native" / tag


def load(env: dict[str, str] | None = None) -> str | None:
    """Build (the first time on a machine) and load the C++ ``stash_layer``: None when it is
    loaded, else why not. The op schemas must be defined first (ops.py)."""
    if not native_ops(os.environ if env is None else env):
        return "ACTPRUNE_NATIVE_OPS=0"
    try:
        from torch.utils.cpp_extension import load as build

        where = build_dir()
        where.mkdir(parents=True, exist_ok=True)
        lock = where / "lock"
        if lock.exists() and time.time() - lock.stat().st_mtime > _STALE_LOCK_S:
            lock.unlink(missing_ok=True)  # torch's build waits for ever on a lock nobody will free
        build(name="actprune_stash", sources=[str(SOURCE)], build_directory=str(where), is_python_module=False,
              extra_cflags=["-O3"], verbose=False)
    except Exception as e:  # no compiler, no headers, a read-only home: the Python op serves
        why = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
        log.warning("actprune: the capture's C++ op could not be built or loaded (%s); capturing with "
                    "its Python body, which costs more a step (set ACTPRUNE_NATIVE_OPS=0 to skip "
                    "the attempt)", why)
        return why
    log.info("actprune: the capture's per-layer op runs its C++ body (%s)", where)
    return None
