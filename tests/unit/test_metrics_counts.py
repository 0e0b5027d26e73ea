"""The hit kernel's counters, merged into the request metrics, equal what observing
its hits one by one would have made (sprox/metrics.py RequestMetrics.add_kernel_hits)."""

from __future__ import annotations

import bisect

from sprox.metrics import LATENCY_BUCKETS, RequestMetrics, render


def test_merged_kernel_counters_equal_hits_observed_one_by_one() -> None:
    hits = [("GetObject", 206, 4096, 0.0004), ("GetObject", 200, 10, 0.003), ("HeadObject", 200, 0, 0.0001),
            ("GetObject", 206, 65536, 0.2), ("GetObject", 206, 1, 30.0)]
    one_by_one = RequestMetrics()
    for operation, status, sent, seconds in hits:
        one_by_one.observe(operation, status, "HIT", sent, 0, 0, seconds)
    merged = RequestMetrics()
    counts = [0] * (len(LATENCY_BUCKETS) + 1)
    for operation, _, _, seconds in hits:
        if operation == "GetObject":
            counts[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
    gets = sum(1 for h in hits if h[0] == "GetObject")
    merged.add_kernel_hits(gets, len(hits) - gets, sum(h[2] for h in hits), counts,
                           sum(h[3] for h in hits if h[0] == "GetObject"))
    assert render(merged) == render(one_by_one)
