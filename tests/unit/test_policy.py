"""S3-FIFO eviction: capacity, scan resistance, pins, sizes, and memory per block."""

from __future__ import annotations

import random
import tracemalloc
from array import array

from sprox.cache.policy import S3FIFO
from sprox.cache.records import ObjectRecord


def key(i: int, record: int = 1) -> tuple[int, int]:
    return (record, i)


def fill(policy, keys, size=1):
    for k in keys:
        policy.insert(k, size)
        for victim in policy.evict(lambda _: False):
            assert victim not in policy


def test_stays_within_capacity():
    policy = S3FIFO(capacity=10)
    for i in range(100):
        policy.insert(key(i), 1)
        for victim in policy.evict(lambda _: False):
            assert victim not in policy
        assert policy.used <= 10
    assert len(policy) == 10


def test_a_one_off_scan_does_not_flush_the_hot_set():
    policy = S3FIFO(capacity=100)
    hot = [key(i, record=1) for i in range(20)]
    fill(policy, hot)
    for k in hot:  # read again: promoted to the main queue on eviction from the small one
        policy.hit(k)
    fill(policy, [key(i, record=2) for i in range(1000)])  # a large scan, each block read once
    assert all(k in policy for k in hot)


def test_lru_would_have_lost_the_hot_set_here():
    # The same trace against plain LRU keeps only the last 100 scan blocks.
    from collections import OrderedDict

    lru: OrderedDict = OrderedDict()
    for k in [key(i, 1) for i in range(20)] * 2 + [key(i, 2) for i in range(1000)]:
        lru.pop(k, None)
        lru[k] = None
        while len(lru) > 100:
            lru.popitem(last=False)
    assert not any(key(i, 1) in lru for i in range(20))


def test_pinned_entries_are_passed_over():
    policy = S3FIFO(capacity=3)
    a, b, c, d = (key(i) for i in range(4))
    fill(policy, [a, b, c])
    policy.insert(d, 1)
    victims = policy.evict(lambda k: k in (a, b))
    assert victims == [c] and a in policy and b in policy


def test_everything_pinned_evicts_nothing_and_terminates():
    policy = S3FIFO(capacity=2)
    for i in range(3):
        policy.insert(key(i), 1)
    assert policy.evict(lambda _: True) == []
    assert len(policy) == 3


def test_ghost_hit_goes_to_main_queue():
    policy = S3FIFO(capacity=10)
    fill(policy, [key(i) for i in range(30)])  # 0..19 evicted through the small queue into the ghost
    policy.insert(key(5), 1)
    assert policy.queue_of(key(5)) == "main"
    policy.insert(key(1000, record=9), 1)  # never seen: the small queue
    assert policy.queue_of(key(1000, record=9)) == "small"


def test_sizes_are_tracked_exactly_with_a_short_last_block():
    policy = S3FIFO(capacity=10_000)
    policy.insert((7, 3), 100)  # the short last block arrives first
    for i in range(3):
        policy.insert((7, i), 1000)
    assert policy.used == 3100
    policy.remove((7, 3))
    assert policy.used == 3000
    policy.remove((7, 0))
    assert policy.used == 2000
    victims = policy.evict(lambda _: False, need=10_000)
    assert sorted(victims) == [(7, 1), (7, 2)] and policy.used == 0 and len(policy) == 0


def test_removed_and_reinserted_blocks_are_counted_once():
    policy = S3FIFO(capacity=50)
    rng = random.Random(5)
    live: set = set()
    for _ in range(20_000):
        k = key(rng.randrange(200), record=rng.randrange(3))
        action = rng.random()
        if action < 0.5:
            policy.insert(k, 1)
            live.add(k)
        elif action < 0.7:
            policy.remove(k)
            live.discard(k)
        else:
            policy.hit(k)
        for victim in policy.evict(lambda _: False):
            live.discard(victim)
        assert policy.used == len(policy) == len(live) <= 50
    assert all(k in policy for k in live)


def test_index_memory_per_cached_block_is_at_most_64_bytes():
    """Issue target: 1M cached blocks in <= 64 MB of index memory. Measured here on
    200,000 blocks (200 records of 1,000): records (present bits, CRCs) and policy."""
    blocks_per_record, records = 1000, 200
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        policy = S3FIFO(capacity=1 << 50, expected_blocks=blocks_per_record * records)
        kept = []
        for r in range(records):
            record = ObjectRecord(r + 1, "bucket", f"key-{r}", '"etag"', blocks_per_record * 65536, "",
                                  (("Content-Type", "binary/octet-stream"),), 0.0, 65536)
            for i in range(blocks_per_record):
                record.set_present(i, i)
                policy.insert((record.id, i), 65536)
            kept.append(record)
        used = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    per_block = used / (blocks_per_record * records)
    print(f"index memory: {per_block:.1f} bytes per cached block")
    assert per_block <= 64, per_block
    assert len(policy) == blocks_per_record * records and isinstance(kept[0].crcs, array)


def test_a_promoted_block_survives_a_scan_it_was_never_read_again_in():
    # A Parquet footer: read once so far, but every later query reads it again.
    policy = S3FIFO(capacity=100)
    footer = key(0, record=1)
    fill(policy, [footer])
    policy.promote(footer)
    assert policy.queue_of(footer) == "main"
    fill(policy, [key(i, record=2) for i in range(1000)])
    assert footer in policy
    assert policy.used <= 100
    policy.remove(footer)  # its stale id in the small queue is skipped, never counted twice
    fill(policy, [key(i, record=3) for i in range(1000)])
    assert footer not in policy and policy.used <= 100 and len(policy) <= 100
