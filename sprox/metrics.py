"""`/_sprox/metrics`: live counters in the Prometheus text format (version 0.0.4).

Request counters are fed by the same call that writes each request's access-log record
(`FrontEnd._record_access`, both lanes), so the live view and the log cannot disagree.
Cache figures (bytes, objects, evictions, fills) are read from the cache when scraped.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Sequence

# Seconds: a fill takes from a few milliseconds (a small block nearby) to minutes.
FILL_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_STATUS_CLASS = {1: "1xx", 2: "2xx", 3: "3xx", 4: "4xx", 5: "5xx"}
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)


class Histogram:
    """A cumulative histogram with fixed buckets (seconds)."""

    __slots__ = ("buckets", "counts", "total", "count")

    def __init__(self, buckets: Sequence[float]) -> None:
        self.buckets = tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)  # the last: above every bucket
        self.total = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.total += value
        self.count += 1

    def lines(self, name: str, labels: str = "") -> Iterable[str]:
        cumulative = 0
        sep = "," if labels else ""
        for bound, n in zip(self.buckets, self.counts):
            cumulative += n
            yield f'{name}_bucket{{{labels}{sep}le="{bound:g}"}} {cumulative}'
        yield f'{name}_bucket{{{labels}{sep}le="+Inf"}} {self.count}'
        brace = f"{{{labels}}}" if labels else ""
        yield f"{name}_sum{brace} {self.total:.6f}"
        yield f"{name}_count{brace} {self.count}"


class RequestMetrics:
    """Counters of the requests Sprox answered, fed once per request."""

    def __init__(self) -> None:
        self.requests: dict[tuple[str, str], int] = {}  # (operation, status class)
        self.object_reads: dict[str, int] = {}  # cache outcome
        self.bytes_sent: dict[str, int] = {}  # cache outcome ("none": not an object read)
        self.upstream_requests = 0
        self.upstream_bytes = 0
        self.latency: dict[str, Histogram] = {}  # cache outcome of GetObject

    def observe(self, operation: str, status: int, cache: str | None, bytes_sent: int,
                upstream_requests: int, upstream_bytes: int, seconds: float) -> None:
        # On every request's path (a cache hit's too): plain dict arithmetic only.
        key = (operation, _STATUS_CLASS.get(status // 100, "other"))
        requests = self.requests
        requests[key] = requests.get(key, 0) + 1
        outcome = cache or "none"
        sent = self.bytes_sent
        sent[outcome] = sent.get(outcome, 0) + bytes_sent
        self.upstream_requests += upstream_requests
        self.upstream_bytes += upstream_bytes
        if cache is not None:
            reads = self.object_reads
            reads[cache] = reads.get(cache, 0) + 1
            if operation == "GetObject":
                histogram = self.latency.get(cache)
                if histogram is None:
                    histogram = self.latency[cache] = Histogram(LATENCY_BUCKETS)
                histogram.observe(seconds)


    def add_kernel_hits(self, gets: int, heads: int, bytes_sent: int, latency_counts: Sequence[int],
                        latency_sum: float) -> None:
        """Hits the hit kernel answered, counted there (`latency_counts`: its GETs per
        bucket of LATENCY_BUCKETS, and one above them all): what `observe` would have
        made of them one by one."""
        requests = self.requests
        for operation, n in (("GetObject", gets), ("HeadObject", heads)):
            if n:
                requests[(operation, "2xx")] = requests.get((operation, "2xx"), 0) + n
        self.object_reads["HIT"] = self.object_reads.get("HIT", 0) + gets + heads
        self.bytes_sent["HIT"] = self.bytes_sent.get("HIT", 0) + bytes_sent
        if gets:
            histogram = self.latency.get("HIT")
            if histogram is None:
                histogram = self.latency["HIT"] = Histogram(LATENCY_BUCKETS)
            for i, n in enumerate(latency_counts):
                histogram.counts[i] += n
            histogram.total += latency_sum
            histogram.count += gets


def render(requests: RequestMetrics, cache=None, fast_lane_hits: int = 0, connections: int = 0,
           refused_connections: int = 0, kernel_hits: int = 0, kernel_ring_full: int = 0,
           kernel_partials: int = 0, peers=None, invalidations_received: int = 0) -> str:
    """The exposition text. `cache` is the ObjectCache, or None with --no-cache;
    `peers` the tier's other nodes (sprox/peers.py), or None without --peers."""
    out: list[str] = []

    def metric(name: str, kind: str, help_text: str, samples: Iterable[str]) -> None:
        out.append(f"# HELP {name} {help_text}")
        out.append(f"# TYPE {name} {kind}")
        out.extend(samples)

    metric("sprox_requests_total", "counter", "Requests answered, by S3 operation and status class.",
           (f'sprox_requests_total{{operation="{op}",status="{status}"}} {n}'
            for (op, status), n in sorted(requests.requests.items())))
    metric("sprox_object_reads_total", "counter",
           "GetObject and HeadObject requests by cache outcome (HIT, MISS, PARTIAL, BYPASS).",
           (f'sprox_object_reads_total{{outcome="{o}"}} {n}' for o, n in sorted(requests.object_reads.items())))
    metric("sprox_sent_bytes_total", "counter", "Body bytes sent to clients, by cache outcome (none: not an "
           "object read).", (f'sprox_sent_bytes_total{{outcome="{o}"}} {n}'
                             for o, n in sorted(requests.bytes_sent.items())))
    metric("sprox_upstream_requests_total", "counter", "Requests Sprox made to the upstream.",
           [f"sprox_upstream_requests_total {requests.upstream_requests}"])
    metric("sprox_upstream_received_bytes_total", "counter", "Body bytes received from the upstream.",
           [f"sprox_upstream_received_bytes_total {requests.upstream_bytes}"])
    metric("sprox_fast_lane_hits_total", "counter", "Cache hits answered by the fast lane.",
           [f"sprox_fast_lane_hits_total {fast_lane_hits}"])
    metric("sprox_kernel_hits_total", "counter", "Of those, the hits the C hit kernel answered (no Python on the way).",
           [f"sprox_kernel_hits_total {kernel_hits}"])
    metric("sprox_kernel_partial_total", "counter", "Kernel hits the socket could not take at once: the rest was "
           "sent by the Python lane.", [f"sprox_kernel_partial_total {kernel_partials}"])
    metric("sprox_kernel_ring_full_total", "counter", "Hits the kernel left to the Python lane because its "
           "access-log ring was full (the log writer fell behind).",
           [f"sprox_kernel_ring_full_total {kernel_ring_full}"])
    metric("sprox_connections", "gauge", "Client connections being served.",
           [f"sprox_connections {connections}"])
    metric("sprox_connections_refused_total", "counter", "Connections answered 503 SlowDown and closed because "
           "--max-connections were being served.", [f"sprox_connections_refused_total {refused_connections}"])
    metric("sprox_get_latency_seconds", "histogram", "GetObject latency, request start to last byte, by cache "
           "outcome.", (line for outcome, h in sorted(requests.latency.items())
                        for line in h.lines("sprox_get_latency_seconds", f'outcome="{outcome}"')))
    metric("sprox_peer_invalidations_received_total", "counter", "Invalidations other nodes of a tier sent here "
           "(a write through them changed keys this node may cache).",
           [f"sprox_peer_invalidations_received_total {invalidations_received}"])
    if peers is not None:
        metric("sprox_peer_invalidations_total", "counter", "Calls telling a peer about a write: ok (answered), "
               "failed (each attempt that was not; retried in the background), given_up (never answered "
               "after every retry).",
               [f'sprox_peer_invalidations_total{{result="ok"}} {peers.stats.ok}',
                f'sprox_peer_invalidations_total{{result="failed"}} {peers.stats.failed}',
                f'sprox_peer_invalidations_total{{result="given_up"}} {peers.stats.given_up}'])
        metric("sprox_peer_invalidations_retrying", "gauge", "Invalidations waiting to be sent to a peer again.",
               [f"sprox_peer_invalidations_retrying {peers.stats.retrying}"])
    if cache is not None:
        metric("sprox_cache_bytes", "gauge", "Bytes of cached blocks.", [f"sprox_cache_bytes {cache.used_bytes}"])
        metric("sprox_cache_capacity_bytes", "gauge", "The cache's disk budget (--cache-size).",
               [f"sprox_cache_capacity_bytes {cache.policy.capacity}"])
        metric("sprox_cache_objects", "gauge", "Objects with a cached record.",
               [f"sprox_cache_objects {len(cache.index.by_id)}"])
        metric("sprox_cache_blocks", "gauge", "Cached blocks.", [f"sprox_cache_blocks {len(cache.policy)}"])
        metric("sprox_cache_evicted_blocks_total", "counter", "Blocks evicted to make room.",
               [f"sprox_cache_evicted_blocks_total {cache.stats.evicted_blocks}"])
        metric("sprox_cache_fills_total", "counter", "Fills started (one upstream ranged GET each).",
               [f"sprox_cache_fills_total {cache.stats.fills}"])
        metric("sprox_cache_fill_seconds", "histogram", "How long fills took, first request to last block "
               "stored.", cache.fill_seconds.lines("sprox_cache_fill_seconds"))
        if cache.prefetch is not None:
            p = cache.prefetch.stats
            metric("sprox_prefetch_requests_total", "counter", "Upstream GETs Sprox sent ahead of clients "
                   "(Parquet footers and the column chunks a scan reads next).",
                   [f"sprox_prefetch_requests_total {p.requests}"])
            metric("sprox_prefetch_bytes_total", "counter", "Prefetched bytes: fetched from the upstream; "
                   "used (later read by a client); wasted (evicted or dropped unread).",
                   [f'sprox_prefetch_bytes_total{{outcome="fetched"}} {p.fetched_bytes}',
                    f'sprox_prefetch_bytes_total{{outcome="used"}} {p.used_bytes}',
                    f'sprox_prefetch_bytes_total{{outcome="wasted"}} {p.wasted_bytes}'])
            metric("sprox_prefetch_in_flight_bytes", "gauge", "Bytes of prefetch fills not finished yet.",
                   [f"sprox_prefetch_in_flight_bytes {cache.prefetch.in_flight_bytes}"])
            metric("sprox_prefetch_failures_total", "counter", "Prefetch fills that failed (logged, never a "
                   "client's error).", [f"sprox_prefetch_failures_total {p.failures}"])
            metric("sprox_prefetch_layouts_total", "counter", "Parquet footers read: parsed into a layout, "
                   "or refused (not Parquet, or lying about offsets: no prefetch).",
                   [f'sprox_prefetch_layouts_total{{result="parsed"}} {p.layouts}',
                    f'sprox_prefetch_layouts_total{{result="refused"}} {p.not_parquet}'])
    return "\n".join(out) + "\n"
