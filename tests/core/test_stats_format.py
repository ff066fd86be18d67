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


def test_tokens_served_from_a_prefix_cache_are_checked_and_add_up_in_a_merge(stats):
    from actprune.core.wire.stats_merge import merge

    with pytest.raises(StatsFormatError, match="tokens_cached"):
        Stats(tensors=stats.tensors, meta={**stats.meta, "tokens_cached": -1}).validate()
    a = Stats(tensors=stats.tensors, meta={**stats.meta, "tokens_cached": 300, "prefix_caching": True})
    b = Stats(tensors=stats.tensors, meta=dict(stats.meta))  # prefix caching off: nothing cached
    both = merge([a, b])
    assert both.meta["tokens_cached"] == 300 and both.meta["prefix_caching"] is True
    back = Stats.from_bytes(both.to_bytes())
    assert back.meta["tokens_cached"] == 300 and back.meta["prefix_caching"] is True
    unknown = Stats(tensors=stats.tensors, meta={**stats.meta, "tokens_cached": None, "prefix_caching": True})
    unknown.validate()  # a server that keeps no count says so
    assert merge([a, unknown]).meta["tokens_cached"] is None  # a sum with an unknown part is unknown


def test_tokens_a_sampling_capture_skipped_are_checked_add_up_and_are_shown(stats):
    from actprune.client.stats_cli import format_table
    from actprune.core.summary import summarize
    from actprune.core.wire.stats_merge import merge

    with pytest.raises(StatsFormatError, match="tokens_unsampled"):
        Stats(tensors=stats.tensors, meta={**stats.meta, "tokens_unsampled": 2.5}).validate()
    a = Stats(tensors=stats.tensors, meta={**stats.meta, "tokens_unsampled": 120})
    b = Stats(tensors=stats.tensors, meta=dict(stats.meta))  # an exact capture: none skipped
    assert "tokens_unsampled" not in merge([b, b]).meta
    both = Stats.from_bytes(merge([b, a, a]).to_bytes())
    assert both.meta["tokens_unsampled"] == 240
    assert "; 240 more in steps the capture's sampling skipped, not seen" in format_table(summarize(both))
    assert "sampling" not in format_table(summarize(b))


def test_stats_show_says_what_a_prefix_cache_kept_from_the_capture(stats):
    from actprune.client.stats_cli import format_table
    from actprune.core.summary import summarize

    head = format_table(summarize(stats)).splitlines()[1]
    assert "cache" not in head
    cached = Stats(tensors=stats.tensors, meta={**stats.meta, "tokens_cached": 300, "prefix_caching": True})
    assert "prefix caching on: 300 more served from the cache, not seen" in format_table(summarize(cached))
