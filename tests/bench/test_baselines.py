"""bench/baselines.py's pure parts: FLAP's global cut by parameters, LLM-Pruner's structure sums,
the row compress keeps (our candidate with the lowest validation perplexity)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from baselines import compress_choice, global_cut, group_importance  # noqa: E402


def test_compress_row_is_our_candidate_with_the_lowest_validation_perplexity_once_all_are_measured():
    recs = [{"method": "ours|mlp", "val": 26.3, "wiki": 25.6}, {"method": "ours|all-hm", "val": 27.3, "wiki": 25.4},
            {"method": "flap", "val": 20.0, "wiki": 20.0}]
    assert compress_choice(recs) is None  # ours|all not measured yet
    row = compress_choice([*recs, {"method": "ours|all", "val": 29.7, "wiki": 28.8}])
    assert row == {"method": "compress", "chosen": "ours|mlp", "val": 26.3, "wiki": 25.6}
    # as compress chooses: heads-capped better by 0.5 % keeps mlp, by 5 % takes heads-capped
    for val, chosen in ((26.3 / 1.005, "ours|mlp"), (26.3 / 1.05, "ours|all-hm")):
        recs[1]["val"] = val
        assert compress_choice([*recs, {"method": "ours|all", "val": 29.7, "wiki": 28.8}])["chosen"] == chosen


def test_global_cut_takes_lowest_scores_first_skips_what_no_longer_fits_and_keeps_one_per_pool():
    pools = {(0, "mlp"): {0, 1, 2}, (0, "kv"): {0, 1}, (1, "mlp"): {0, 1}}
    units = [(-3.0, 0, "kv", 1, 100), (-2.0, 0, "mlp", 2, 10), (-1.5, 1, "mlp", 0, 10), (-1.0, 1, "mlp", 1, 10),
             (-0.5, 0, "kv", 0, 100), (0.0, 0, "mlp", 1, 10), (1.0, 0, "mlp", 0, 10)]
    left = global_cut(units, pools, 135)
    # kv 1 (100), mlp 0.2 (10), mlp 1.0 (10); mlp 1.1 fits but would empty its pool; kv 0 is
    # too big for the 15 left; mlp 0.1 (10); mlp 0.0 no longer fits (5 left).
    assert pools == {(0, "mlp"): {0}, (0, "kv"): {0}, (1, "mlp"): {1}}
    assert left == 5


def test_group_importance_sums_each_neuron_and_kv_group_over_its_own_weights():
    hidden, d, kv, g, inter = 2, 2, 2, 2, 3
    imp = {"g": torch.arange(inter * hidden, dtype=torch.float64).reshape(inter, hidden),
           "u": torch.ones(inter, hidden, dtype=torch.float64),
           "d": torch.full((hidden, inter), 0.5, dtype=torch.float64),
           "q": torch.zeros(kv * g * d, hidden, dtype=torch.float64),
           "o": torch.zeros(hidden, kv * g * d, dtype=torch.float64),
           "k": torch.zeros(kv * d, hidden, dtype=torch.float64),
           "v": torch.zeros(kv * d, hidden, dtype=torch.float64)}
    imp["q"][5, 0] = 7.0  # query channel 5 = head 2 = KV group 1
    imp["o"][1, 1] = 3.0  # o column 1 = head 0 = KV group 0
    imp["k"][1, 1] = 2.0  # k channel 1 = KV head 0
    imp["v"][3, 0] = 4.0  # KV head 1
    mlp, groups = group_importance(imp, kv, d)
    assert mlp.tolist() == [0 + 1 + 2 + 1.0, 2 + 3 + 2 + 1.0, 4 + 5 + 2 + 1.0]
    assert groups.tolist() == [3.0 + 2.0, 7.0 + 4.0]
