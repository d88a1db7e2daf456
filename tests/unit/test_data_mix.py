"""Replay interleave: the old share is exact within one row on every prefix, and deterministic."""

import itertools

import pytest

from jobs.data.mix import interleave, old_repeats


@pytest.mark.parametrize("fraction", [0.2, 0.05, 1 / 3, 0.5, 0.9])
def test_every_prefix_has_the_exact_old_count(fraction):
    stream = list(itertools.islice(
        interleave((("new", i) for i in itertools.count()), (("old", i) for i in itertools.count()), fraction),
        10_000,
    ))  # fmt: skip
    assert len(stream) == 10_000
    old = 0
    for n, (src, _) in enumerate(stream, 1):
        old += src == "old"
        assert abs(old - n * fraction) <= 1, (n, old)
    assert abs(old / 10_000 - fraction) <= 0.02
    # each source's rows arrive in order and none is skipped
    for src in ("new", "old"):
        idx = [i for s, i in stream if s == src]
        assert idx == list(range(len(idx)))


def test_deterministic_and_spread_out():
    a = list(itertools.islice(interleave(itertools.repeat("n"), itertools.repeat("o"), 0.2), 100))
    b = list(itertools.islice(interleave(itertools.repeat("n"), itertools.repeat("o"), 0.2), 100))
    assert a == b
    assert a[:10] == ["n", "n", "n", "n", "o"] * 2  # one old row in every five, not in bursts


def test_stops_when_a_source_runs_out_and_cycle_replays():
    out = list(interleave(range(8), ["a", "b"], 0.25))
    assert out == [0, 1, 2, "a", 3, 4, 5, "b", 6, 7]  # the 12th item would need a third old row
    out = list(interleave(range(100), ["a"], 0.25))
    assert out == [0, 1, 2, "a", 3, 4, 5]  # old ran out at the 8th item: stop, keep the ratio
    out = list(interleave(range(8), itertools.cycle(["a"]), 0.5))
    assert out.count("a") == 8 and [x for x in out if x != "a"] == list(range(8))


def test_fraction_edges_and_repeats():
    assert list(interleave(range(3), itertools.repeat("o"), 0.0)) == [0, 1, 2]
    assert list(itertools.islice(interleave([], itertools.repeat("o"), 1.0), 3)) == ["o"] * 3
    with pytest.raises(ValueError):
        list(interleave([], [], 1.5))
    assert old_repeats(8000, 500, 0.2) == 4  # 8000 new need 2000 old at 20%
    assert old_repeats(8000, 5000, 0.2) == 1
