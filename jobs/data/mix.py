"""Replay mixing: interleave new rows with a share of old rows, deterministically.

`interleave` is the exact schedule (any iterables of rows or of equal-sized batches);
`mix_datasets` does the same for Ray Data with the built-in `Dataset.mix` of Ray 2.60;
`weighted_schedule` is the exact schedule of K sources by weight (a joint multitask run's tasks).
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")


def _share(fraction: float) -> Fraction:
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"replay fraction {fraction} must be in [0, 1]")
    return Fraction(fraction).limit_denominator(1_000_000)


def interleave(new: Iterable[T], old: Iterable[T], fraction: float) -> Iterator[T]:
    """Yield from `new` and `old` so that after n items exactly floor(n * fraction) came from
    `old` (fraction as a ratio with denominator <= 10^6): a Bresenham schedule, no randomness,
    so every prefix is within one item of the target. Stops when the source the schedule
    needs next is exhausted; pass `itertools.cycle(old)` to replay a small old set."""
    f = _share(fraction)
    new_it, old_it = iter(new), iter(old)
    n = taken_old = 0
    while True:
        n += 1
        source = old_it if math.floor(n * f) > taken_old else new_it
        try:
            item = next(source)
        except StopIteration:
            return
        if source is old_it:
            taken_old += 1
        yield item


def weighted_schedule(weights: list[float], skip: int = 0) -> Iterator[int]:
    """Endless source indices so that after n items source i was chosen within one of
    n * w_i / sum(w) times: each item goes to the source furthest behind its share (ties: the
    lowest index), in exact fractions, no randomness (`interleave` is the floor schedule of two
    sources; this one rounds, and takes any number). `skip`: the first `skip` items are dropped (a resumed run goes on
    where it stopped, the mix exact over the whole run)."""
    if not weights or any(w <= 0 for w in weights):
        raise ValueError(f"weights {weights} must be positive")
    shares = [Fraction(w).limit_denominator(1_000_000) for w in weights]
    total = sum(shares)
    shares = [s / total for s in shares]
    taken, n = [0] * len(shares), 0
    while True:
        n += 1
        behind = [n * s - t for s, t in zip(shares, taken)]
        i = behind.index(max(behind))
        taken[i] += 1
        if n > skip:
            yield i


def old_repeats(new_rows: int, old_rows: int, fraction: float) -> int:
    """How many passes over the old set a full pass over the new set needs at `fraction`."""
    f = _share(fraction)
    if f == 0 or old_rows <= 0:
        return 1
    if f == 1:
        return 1
    needed = new_rows * f / (1 - f)
    return max(1, math.ceil(needed / old_rows))


def mix_datasets(new_ds, old_ds, fraction: float, seed: int, *, new_rows=None, old_rows=None):
    """A Ray Dataset whose rows come from `old_ds` with share `fraction`, from `new_ds` otherwise.

    Ray 2.60's `Dataset.mix` always pulls the next block from the input furthest behind its
    target share, so the ratio holds to within one block at every point of the stream (blocks
    are whole: mixing is per block, so shuffle locally when iterating, e.g.
    `iter_torch_batches(local_shuffle_buffer_size=...)`). STOP_ON_SHORTEST keeps the ratio to
    the end; to make a pass over `new_ds` complete, the old set is repeated `old_repeats` times
    when both row counts are given (take them from `launcher.datacheck.check_dataset`).
    `seed` fixes which blocks come first: the block order of each input is permuted by it.
    Same seed, same row order: this dataset's execution preserves order (the mixer itself is
    deterministic; without preserve_order, parallel reads deliver blocks as they finish)."""
    from ray.data import MixStoppingCondition

    f = float(_share(fraction))
    if f == 0:
        return new_ds
    if f == 1:
        return old_ds
    if new_rows is not None and old_rows is not None:
        reps = old_repeats(new_rows, old_rows, f)
        if reps > 1:
            old_ds = old_ds.union(*[old_ds] * (reps - 1))
    new_ds = new_ds.randomize_block_order(seed=seed)
    old_ds = old_ds.randomize_block_order(seed=seed + 1)
    mixed = new_ds.mix(
        old_ds, weights=[1 - f, f], stopping_condition=MixStoppingCondition.STOP_ON_SHORTEST
    )
    mixed.context.execution_options.preserve_order = True  # this dataset's own copy
    return mixed
