"""What was invalidated since a moment: a read that began before a write must not
cache what it fetched (it may be the old version), however long its answer took.

A reader takes `now()` before it asks the origin and, before it stores the answer,
asks `changed_since(then, bucket, key)`. Moments are a counter, not a clock. Memory
is bounded: past MAX_ENTRIES remembered keys and buckets, all are forgotten at once and
every moment before counts as changed. That only makes the reads in flight at that
instant go uncached, never serves an old version.
"""

from __future__ import annotations

MAX_ENTRIES = 65_536


class Invalidations:
    def __init__(self, max_entries: int = MAX_ENTRIES) -> None:
        self.max_entries = max_entries
        self._now = 0
        self._floor = 0  # everything up to this moment counts as changed
        self._keys: dict[tuple[str, str], int] = {}
        self._buckets: dict[str, int] = {}  # any key of the bucket (and its listings)

    def now(self) -> int:
        return self._now

    def key(self, bucket: str, key: str) -> None:
        """`key` of `bucket` changed."""
        self._now += 1
        self._keys[(bucket, key)] = self._now
        self._bound()

    def bucket(self, bucket: str) -> None:
        """Any key of `bucket` may have changed."""
        self._now += 1
        self._buckets[bucket] = self._now
        self._bound()

    def changed_since(self, moment: int, bucket: str, key: str | None = None) -> bool:
        """Whether `key` of `bucket` (None: the bucket's listings) may have changed after
        `moment`."""
        last = max(self._floor, self._buckets.get(bucket, 0))
        if key is not None:
            last = max(last, self._keys.get((bucket, key), 0))
        return last > moment

    def _bound(self) -> None:
        if len(self._keys) + len(self._buckets) > self.max_entries:
            self._floor = self._now
            self._keys.clear()
            self._buckets.clear()
