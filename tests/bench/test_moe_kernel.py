"""bench/moe_kernel.py: its torch reference computes the MoE layer (checked against every expert
computed densely and masked), and the script runs end to end on small shapes, where it checks
vLLM's CPU kernel against that reference before timing anything."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))

import moe_kernel  # noqa: E402


def test_routing_picks_k_distinct_experts_and_the_reference_is_the_masked_dense_layer():
    gen = torch.Generator().manual_seed(0)
    T, E, k, H, inter = 6, 5, 2, 16, 8
    ids, w = moe_kernel.draw_routing(3, T, E, k, gen)
    assert ids.shape == (3, T, k) and all(len(set(row.tolist())) == k for row in ids.reshape(-1, k))
    assert torch.allclose(w.sum(-1), torch.ones(3, T))
    x = torch.randn(T, H, generator=gen, dtype=torch.float64)
    w13 = torch.randn(E, 2 * inter, H, generator=gen, dtype=torch.float64)
    w2 = torch.randn(E, H, inter, generator=gen, dtype=torch.float64)
    # dense: every expert on every token, weighted by the token's routing weight (0 when not picked)
    gate, up = torch.einsum("th,eih->eti", x, w13).chunk(2, dim=-1)
    every = torch.einsum("eti,ehi->eth", F.silu(gate) * up, w2)  # (E, T, H)
    dense_w = torch.zeros(T, E, dtype=torch.float64).scatter_(1, ids[0].long(), w[0].double())
    want = torch.einsum("te,eth->th", dense_w, every)
    assert torch.allclose(moe_kernel.torch_moe(x, w13, w2, ids[0].long(), w[0].double()), want)


def test_the_script_checks_the_kernel_and_prints_its_table():
    out = subprocess.run([sys.executable, str(BENCH / "moe_kernel.py"), "--hidden", "64", "--moe-intermediate", "32",
                          "--layers", "2", "--experts", "8", "4", "--tokens", "4", "--steps", "2", "--rounds", "2"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [ln for ln in out.stdout.splitlines() if ln.startswith("| vllm |") or ln.startswith("| torch |")]
    assert len(rows) == 4 and rows[0].split("|")[7].strip() == "1.00×", out.stdout
