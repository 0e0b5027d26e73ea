"""What-if cache sizes: the hit ratio a trace of object reads would have had with other
cache sizes (a miss-ratio curve), simulated block by block as Sprox caches.

The trace is the access log's object reads, each turned into the blocks it touched
(`blocks_of`). Two policies:

- LRU, for every size at once: one pass computes each access's stack distance (how
  many distinct blocks were touched since the same block was last touched; Mattson et
  al., 1970); an LRU cache of C blocks hits exactly the accesses whose distance is < C.
  Distances come from a Fenwick tree over access times, O(log n) each.
- S3-FIFO, Sprox's own policy (`sprox.cache.policy.S3FIFO`, the same class the cache
  uses), replayed once per size.

Sizes are counted in blocks, each charged a whole block (Sprox charges an object's
shorter last block its own size, so with many small objects the real cache holds a
little more than simulated); ratios are by accesses and by bytes.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

from ..cache.policy import S3FIFO

Block = tuple[int, int]  # (object id, block index)


@dataclass(frozen=True, slots=True)
class Access:
    block: Block
    size: int  # bytes of the block this access read


@dataclass(frozen=True, slots=True)
class CurvePoint:
    blocks: int  # cache size in blocks
    bytes: int  # the same, in bytes (blocks * block size)
    lru_hit_ratio: float
    lru_byte_hit_ratio: float
    s3fifo_hit_ratio: float | None  # None: not simulated at this size
    s3fifo_byte_hit_ratio: float | None


def blocks_of(first_byte: int, length: int, block_size: int) -> range:
    """Indexes of the blocks bytes [first_byte, first_byte + length) fall in."""
    if length <= 0:
        return range(0)
    return range(first_byte // block_size, (first_byte + length - 1) // block_size + 1)


def trace_of(reads: Iterable[tuple[str, int, int]], block_size: int) -> list[Access]:
    """Block accesses of `reads`: (object name, first byte, length) in time order. Each
    access reads the part of its block the read covered (its byte weight)."""
    ids: dict[str, int] = {}
    out: list[Access] = []
    for name, first, length in reads:
        object_id = ids.setdefault(name, len(ids))
        end = first + length
        for index in blocks_of(first, length, block_size):
            start = max(first, index * block_size)
            stop = min(end, (index + 1) * block_size)
            out.append(Access((object_id, index), stop - start))
    return out


class _Fenwick:
    __slots__ = ("tree",)

    def __init__(self, size: int) -> None:
        self.tree = [0] * (size + 1)

    def add(self, i: int, delta: int) -> None:
        i += 1
        tree = self.tree
        while i < len(tree):
            tree[i] += delta
            i += i & -i

    def prefix(self, i: int) -> int:
        """Sum of positions [0, i)."""
        total = 0
        tree = self.tree
        while i > 0:
            total += tree[i]
            i -= i & -i
        return total


def stack_distances(trace: Sequence[Access]) -> Iterator[int | None]:
    """Per access: distinct blocks touched since this block's previous access (None
    for a first access, a miss at any size)."""
    last_seen: dict[Block, int] = {}
    marks = _Fenwick(len(trace))  # 1 at the latest access time of every block
    for now, access in enumerate(trace):
        previous = last_seen.get(access.block)
        if previous is None:
            yield None
        else:
            yield marks.prefix(now) - marks.prefix(previous + 1)
            marks.add(previous, -1)
        marks.add(now, 1)
        last_seen[access.block] = now


def lru_curve(trace: Sequence[Access], sizes: Sequence[int]) -> list[tuple[float, float]]:
    """(hit ratio, byte hit ratio) of an LRU cache of each of `sizes` blocks."""
    sizes = sorted(sizes)
    hits = [0] * len(sizes)
    hit_bytes = [0] * len(sizes)
    total_bytes = 0
    for access, distance in zip(trace, stack_distances(trace)):
        total_bytes += access.size
        if distance is None:
            continue
        for i in range(len(sizes) - 1, -1, -1):  # a hit at every size above the distance
            if distance >= sizes[i]:
                break
            hits[i] += 1
            hit_bytes[i] += access.size
    n = len(trace)
    return [(hits[i] / n if n else 0.0, hit_bytes[i] / total_bytes if total_bytes else 0.0)
            for i in range(len(sizes))]


def s3fifo_ratio(trace: Sequence[Access], blocks: int, block_size: int) -> tuple[float, float]:
    """(hit ratio, byte hit ratio) of Sprox's S3-FIFO with room for `blocks` blocks."""
    policy = S3FIFO(blocks * block_size, expected_blocks=max(blocks, 1024))
    never_pinned = _never_pinned
    hits = hit_bytes = total_bytes = 0
    for access in trace:
        total_bytes += access.size
        if access.block in policy:
            policy.hit(access.block)
            hits += 1
            hit_bytes += access.size
        else:
            # Every block is charged a whole block (see the module's note).
            policy.evict(never_pinned, need=block_size)
            policy.insert(access.block, block_size)
    n = len(trace)
    return (hits / n if n else 0.0, hit_bytes / total_bytes if total_bytes else 0.0)


def _never_pinned(block: Block) -> bool:
    return False


def default_sizes(distinct_blocks: int, points: int = 12) -> list[int]:
    """Cache sizes to try, in blocks: roughly log-spaced up to every distinct block of
    the trace (beyond that, nothing more can hit)."""
    if distinct_blocks <= 0:
        return []
    sizes = {distinct_blocks}
    for i in range(points):
        sizes.add(max(1, round(distinct_blocks ** (i / (points - 1)))))
    return sorted(sizes)


def miss_ratio_curve(trace: Sequence[Access], block_size: int, sizes: Sequence[int] | None = None,
                     *, s3fifo: bool = True) -> list[CurvePoint]:
    distinct = len({a.block for a in trace})
    sizes = sorted(set(sizes)) if sizes is not None else default_sizes(distinct)
    lru = lru_curve(trace, sizes)
    points = []
    for blocks, (ratio, byte_ratio) in zip(sizes, lru):
        fifo = s3fifo_ratio(trace, blocks, block_size) if s3fifo else (None, None)
        points.append(CurvePoint(blocks, blocks * block_size, ratio, byte_ratio, fifo[0], fifo[1]))
    return points


def knee(points: Sequence[CurvePoint], share: float = 0.9) -> CurvePoint | None:
    """The smallest size whose hit ratio (Sprox's policy where simulated, else LRU)
    reaches `share` of the best ratio on the curve: most of the benefit."""
    def ratio(p: CurvePoint) -> float:
        return p.s3fifo_hit_ratio if p.s3fifo_hit_ratio is not None else p.lru_hit_ratio
    if not points:
        return None
    best = max(ratio(p) for p in points)
    if best <= 0:
        return None
    return next(p for p in sorted(points, key=lambda p: p.blocks) if ratio(p) >= share * best)
