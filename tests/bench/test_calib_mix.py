"""bench/calib_mix.py: the mixed moments are the per-token mixture they claim (at the token
share, exactly the moments of the two texts pooled, so the refit equals a refit on the pooled
activations), the other-domain texts split into disjoint calibration and validation halves,
and the table marks the λ of the best validation mean, never looking at evaluation sets."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from actprune.pruning.compensate import maths as compensate

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))

import calib_mix  # noqa: E402
import texts  # noqa: E402


def _gram(x: torch.Tensor) -> torch.Tensor:
    g = torch.zeros(x.shape[1] + 1, x.shape[1] + 1, dtype=torch.float64)
    compensate.update_gram(g, x)
    return g


def test_mix_at_the_token_share_is_the_pooled_moments_and_refits_the_same():
    gen = torch.Generator().manual_seed(0)
    xa = torch.randn(40, 6, generator=gen, dtype=torch.float64)
    xb = 3.0 + torch.randn(10, 6, generator=gen, dtype=torch.float64)  # another "domain"
    ga, gb = _gram(xa), _gram(xb)
    pooled = _gram(torch.cat([xa, xb]))
    mixed = calib_mix.mix_gram(ga, gb, 10 / 50)
    torch.testing.assert_close(mixed, pooled / 50)
    assert torch.equal(calib_mix.mix_gram(ga, gb, 0.0), ga / 40)
    w = torch.randn(4, 6, generator=gen, dtype=torch.float64)
    keep = [0, 2, 3, 5]
    fit_mixed = compensate.refit(*compensate.moments_from_gram(mixed, w, keep), w[:, keep], 1e-2)
    fit_pooled = compensate.refit(*compensate.moments_from_gram(pooled, w, keep), w[:, keep], 1e-2)
    for a, b in zip(fit_mixed, fit_pooled, strict=True):  # the ridge scales with A: same solution
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="λ"):
        calib_mix.mix_gram(ga, gb, 1.5)


def test_halves_are_disjoint_and_cover_the_text():
    text = "\n\n".join(f"paragraph {i} " + "word " * i for i in range(20))
    first, second = calib_mix.halves(text)
    assert first + second == text and first and second
    assert second.startswith("\n\n")  # cut at a paragraph break
    assert abs(len(first) - len(text) / 2) < len(text) / 4


def test_the_other_domain_texts_are_prose_without_markup():
    readmes = texts.package_readmes()
    assert len(readmes) > 10_000 and "http" not in readmes and "![" not in readmes
    assert "Iris" in texts.dataset_descriptions()


def test_table_marks_the_best_validation_mean_not_the_best_evaluation():
    dense = {s: 10.0 for s in (*calib_mix.VAL_SETS, *calib_mix.EVAL_SETS)}
    # λ = 0.5 has the best evaluation figures but the worse validation mean: λ = 0 is chosen
    r0 = {"lam": 0.0, **{s: 11.0 for s in calib_mix.VAL_SETS}, **{s: 15.0 for s in calib_mix.EVAL_SETS}}
    r5 = {"lam": 0.5, **{s: 12.0 for s in calib_mix.VAL_SETS}, **{s: 12.0 for s in calib_mix.EVAL_SETS}}
    out = calib_mix.table({"dense": dense, "p|0": r0, "p|0.5": r5, "other|0": r5}, "p|")
    rows = [ln for ln in out.splitlines() if ln.startswith("| 0")]
    assert rows[0].startswith("| 0 ◀ | 1.100 |") and "◀" not in rows[1]
    assert rows[1].split(" | ")[5] == "1.200"  # the first evaluation set of λ = 0.5
    assert len(rows) == 2  # another prefix's rows are not this table's
