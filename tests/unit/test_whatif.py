"""What-if cache sizes: stack distances and the LRU curve against traces worked out by
hand and against a plain LRU replay; S3-FIFO through Sprox's own policy class."""

from __future__ import annotations

from collections import OrderedDict

from hypothesis import example, given, settings
from hypothesis import strategies as st

from sprox.analytics.whatif import (
    Access,
    blocks_of,
    default_sizes,
    knee,
    lru_curve,
    miss_ratio_curve,
    s3fifo_ratio,
    stack_distances,
    trace_of,
)


def trace(letters: str, size: int = 1) -> list[Access]:
    return [Access((ord(c), 0), size) for c in letters]


def test_stack_distances_by_hand():
    # A B C A B D A: A is preceded by {B, C}, B by {C, A}, the last A by {B, D}.
    assert list(stack_distances(trace("ABCABDA"))) == [None, None, None, 2, 2, None, 2]


def test_lru_curve_by_hand():
    # With 3 blocks: A B C (misses), A B (hits), D (miss, evicts C), A (hit): 3 of 7.
    assert lru_curve(trace("ABCABDA"), [1, 2, 3, 4]) == [(0.0, 0.0), (0.0, 0.0), (3 / 7, 3 / 7), (3 / 7, 3 / 7)]


def test_s3fifo_by_hand():
    # 3 blocks: A B C enter the small queue; A and B are hit; D needs room: A and B
    # (read again) move to the main queue, C (never re-read) is evicted; A hits.
    assert s3fifo_ratio(trace("ABCABDA"), 3, 1) == (3 / 7, 3 / 7)
    # A scan of blocks read once does not push out a block read twice before it.
    scan = "AA" + "".join(chr(ord("a") + i) for i in range(20)) + "A"
    assert s3fifo_ratio(trace(scan), 4, 1)[0] == 2 / len(scan)
    assert lru_curve(trace(scan), [4])[0][0] == 1 / len(scan)  # LRU lost it to the scan


def test_byte_ratio_weights_each_access_by_the_bytes_it_read():
    accesses = [Access((1, 0), 100), Access((2, 0), 10), Access((1, 0), 100), Access((2, 0), 10)]
    assert lru_curve(accesses, [2]) == [(0.5, 110 / 220)]


def test_reads_become_block_accesses():
    assert list(blocks_of(0, 1, 4)) == [0] and list(blocks_of(3, 2, 4)) == [0, 1]
    assert list(blocks_of(8, 0, 4)) == []
    got = trace_of([("a", 3, 6), ("b", 0, 4), ("a", 4, 1)], 4)
    # "a" bytes 3..8 touch blocks 0 (1 byte), 1 (4 bytes) and 2 (1 byte).
    assert got == [Access((0, 0), 1), Access((0, 1), 4), Access((0, 2), 1), Access((1, 0), 4), Access((0, 1), 1)]


def plain_lru_hits(accesses: list[Access], capacity: int) -> int:
    cache: OrderedDict = OrderedDict()
    hits = 0
    for a in accesses:
        if a.block in cache:
            hits += 1
            cache.move_to_end(a.block)
        else:
            cache[a.block] = True
            if len(cache) > capacity:
                cache.popitem(last=False)
    return hits


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 12), max_size=120), st.lists(st.integers(1, 15), min_size=1, max_size=5))
# Found by hypothesis once: 13/23 * 23 is not 13.0 in floating point, so the ratio is
# compared with the replay's own hits / accesses (the same division), never multiplied back.
@example([0] * 14 + [1, 2, 0, 1, 0, 1, 0, 1, 0], [1])
def test_lru_curve_matches_a_plain_lru_replay(blocks, sizes):
    accesses = [Access((b, 0), 1) for b in blocks]
    curve = lru_curve(accesses, sizes)
    for size, (ratio, _) in zip(sorted(sizes), curve):
        expected = plain_lru_hits(accesses, size) / len(accesses) if accesses else 0.0
        assert ratio == expected


def test_curve_sizes_and_knee():
    assert default_sizes(0) == [] and default_sizes(1) == [1]
    sizes = default_sizes(1000)
    assert sizes[0] == 1 and sizes[-1] == 1000 and sizes == sorted(set(sizes))
    # A hot set of 3 blocks read over and over, then 10 blocks read once each.
    accesses = trace("ABC" * 20 + "defghijklm")
    points = miss_ratio_curve(accesses, 1, [1, 2, 3, 8, 13])
    best = knee(points)
    assert best is not None and best.blocks == 3  # 3 blocks hold all the benefit
    assert points[-1].lru_hit_ratio == 57 / 70
