"""S3-FIFO eviction: capacity, scan resistance, pins."""

from sprox.cache.policy import S3FIFO


def fill(policy, keys, size=1):
    for key in keys:
        policy.insert(key, size)
        for victim in policy.evict(lambda k: False):
            assert victim not in policy


def test_stays_within_capacity():
    policy = S3FIFO(capacity=10)
    for i in range(100):
        policy.insert(i, 1)
        for victim in policy.evict(lambda k: False):
            assert victim not in policy
        assert policy.used <= 10


def test_a_one_off_scan_does_not_flush_the_hot_set():
    policy = S3FIFO(capacity=100)
    hot = [f"hot{i}" for i in range(20)]
    fill(policy, hot)
    for key in hot:  # read again: promoted to the main queue on eviction from the small one
        policy.hit(key)
    fill(policy, [f"scan{i}" for i in range(1000)])  # a large scan, each block read once
    assert all(key in policy for key in hot)


def test_lru_would_have_lost_the_hot_set_here():
    # The same trace against plain LRU keeps only the last 100 scan blocks.
    from collections import OrderedDict

    lru: OrderedDict = OrderedDict()
    for key in [f"hot{i}" for i in range(20)] * 2 + [f"scan{i}" for i in range(1000)]:
        lru.pop(key, None)
        lru[key] = None
        while len(lru) > 100:
            lru.popitem(last=False)
    assert not any(f"hot{i}" in lru for i in range(20))


def test_pinned_entries_are_passed_over():
    policy = S3FIFO(capacity=3)
    fill(policy, ["a", "b", "c"])
    policy.insert("d", 1)
    victims = policy.evict(lambda k: k in ("a", "b"))
    assert victims == ["c"] and "a" in policy and "b" in policy


def test_everything_pinned_evicts_nothing_and_terminates():
    policy = S3FIFO(capacity=2)
    for key in "abc":
        policy.insert(key, 1)
    assert policy.evict(lambda k: True) == []
    assert len(policy) == 3


def test_ghost_hit_goes_to_main_queue():
    policy = S3FIFO(capacity=10)
    fill(policy, range(30))  # 0..19 evicted through the small queue into the ghost
    policy.insert(5, 1)
    assert 5 in policy.main
