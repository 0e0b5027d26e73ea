"""Eviction: S3-FIFO over blocks.

Why S3-FIFO, and why blocks: OLAP engines re-read a few hot spans (Parquet footers,
popular column chunks) of many files, and also scan large ranges exactly once. By
block, a hot footer stays cached while the cold middle of its file is evicted. S3-FIFO
puts new blocks in a small FIFO first and only promotes those read again, so a one-off
scan passes through the small queue without flushing the hot set, which LRU would
do. Each entry costs a few dict slots; no per-hit list surgery as in LRU.

Reference: Yang et al., "FIFO queues are all you need for cache eviction", SOSP 2023.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable

MAX_FREQ = 3
SMALL_SHARE = 0.10


class S3FIFO:
    """Tracks cached items (with sizes) and chooses victims to stay within `capacity`."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.small: OrderedDict[Hashable, list] = OrderedDict()  # key -> [size, freq]
        self.main: OrderedDict[Hashable, list] = OrderedDict()
        self.ghost: OrderedDict[Hashable, None] = OrderedDict()
        self.small_bytes = 0
        self.main_bytes = 0

    @property
    def used(self) -> int:
        return self.small_bytes + self.main_bytes

    def __contains__(self, key: Hashable) -> bool:
        return key in self.small or key in self.main

    def __len__(self) -> int:
        return len(self.small) + len(self.main)

    def insert(self, key: Hashable, size: int) -> None:
        if key in self:
            return
        if key in self.ghost:
            # Evicted recently and wanted again: it belongs to the main queue.
            del self.ghost[key]
            self.main[key] = [size, 0]
            self.main_bytes += size
        else:
            self.small[key] = [size, 0]
            self.small_bytes += size

    def hit(self, key: Hashable) -> None:
        entry = self.small.get(key) or self.main.get(key)
        if entry is not None and entry[1] < MAX_FREQ:
            entry[1] += 1

    def remove(self, key: Hashable) -> None:
        entry = self.small.pop(key, None)
        if entry is not None:
            self.small_bytes -= entry[0]
            return
        entry = self.main.pop(key, None)
        if entry is not None:
            self.main_bytes -= entry[0]

    def evict(self, pinned: Callable[[Hashable], bool], need: int = 0) -> list[Hashable]:
        """Victims to remove so that `need` more bytes fit. Pinned items (in use by a
        response) are passed over; returns fewer victims if everything left is pinned."""
        victims: list[Hashable] = []
        budget = len(self.small) + 2 * len(self.main) * (MAX_FREQ + 1) + 8
        while self.used + need > self.capacity and (self.small or self.main) and budget > 0:
            budget -= 1
            if self.small and (self.small_bytes > self.capacity * SMALL_SHARE or not self.main):
                key, entry = self.small.popitem(last=False)
                self.small_bytes -= entry[0]
                if pinned(key):
                    self.small[key] = entry
                    self.small_bytes += entry[0]
                elif entry[1] > 0:
                    entry[1] = 0
                    self.main[key] = entry
                    self.main_bytes += entry[0]
                else:
                    self._to_ghost(key)
                    victims.append(key)
            else:
                key, entry = self.main.popitem(last=False)
                if pinned(key) or entry[1] > 0:
                    entry[1] = max(0, entry[1] - 1)
                    self.main[key] = entry
                else:
                    self.main_bytes -= entry[0]
                    victims.append(key)
        return victims

    def _to_ghost(self, key: Hashable) -> None:
        self.ghost[key] = None
        # The ghost queue remembers about as many keys as the main queue holds.
        while len(self.ghost) > max(len(self.main), 64):
            self.ghost.popitem(last=False)
