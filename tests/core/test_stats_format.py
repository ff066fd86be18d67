"""The stats file's metadata: names and hashes stay strings, numbers are checked."""

from __future__ import annotations

import numpy as np
import pytest
from actprune.core.wire.stats import Stats, StatsFormatError
from actprune.pruning.fixtures.synthetic import tiny_config
from pruning_helpers import stats_from_samples

CFG = tiny_config("qwen3")


@pytest.fixture(scope="module")
def stats() -> Stats:
    return stats_from_samples(CFG, lambda i, k, w: np.random.default_rng(i).standard_normal((8, w)))


@pytest.mark.parametrize("value", ["1234567890123456", "12e4567890123456", "null", "007"])
def test_hashes_and_names_that_look_like_json_stay_strings(stats, value):
    s = Stats(tensors=stats.tensors, meta={**stats.meta, "config_hash": value, "model": value})
    back = Stats.from_bytes(s.to_bytes())
    assert back.meta["config_hash"] == value and back.meta["model"] == value


def test_numbers_of_the_metadata_are_checked(stats):
    for field, value in (("tokens_prefill", 1.5), ("tokens_decode", True), ("near_zero_threshold", float("nan"))):
        with pytest.raises(StatsFormatError, match=field):
            Stats(tensors=stats.tensors, meta={**stats.meta, field: value}).validate()
