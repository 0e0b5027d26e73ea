"""Eviction: S3-FIFO over blocks, in a few bytes per block.

Why S3-FIFO, and why blocks: OLAP engines re-read a few hot spans (Parquet footers,
popular column chunks) of many files, and also scan large ranges exactly once. By
block, a hot footer stays cached while the cold middle of its file is evicted. S3-FIFO
puts new blocks in a small FIFO first and only promotes those read again, so a one-off
scan passes through the small queue without flushing the hot set, which LRU would
do. A hit only bumps a 2-bit counter: no list surgery as in LRU.

Reference: Yang et al., "FIFO queues are all you need for cache eviction", SOSP 2023.

Memory (the cache may hold millions of blocks; see `tests/unit/test_policy.py` for
the measured figure): no Python object per block.
- The two queues are arrays of 64-bit block ids (record id << 32 | block index),
  8 bytes a block. Removing a block only clears its state; its stale id is skipped
  when it reaches the head, and the arrays are compacted when stale ids outnumber
  live ones.
- Each record has one byte per block: its frequency (2 bits) and its queue.
- Sizes: every block of a record has the record's block size except, at most, its
  last; only those odd sizes are stored.
- The ghost queue (recently evicted ids) is a two-generation bit filter sized from the
  expected number of blocks, about 2 bytes a block. A false positive only sends a new
  block straight to the main queue.
"""

from __future__ import annotations

from array import array
from collections.abc import Callable

MAX_FREQ = 3
SMALL_SHARE = 0.10

_FREQ = 0b0011
_SMALL = 0b0100
_MAIN = 0b1000

Key = tuple[int, int]  # (record id, block index)


class _Record:
    """The policy's view of one record: a state byte per block, and block sizes."""

    __slots__ = ("states", "unit", "odd", "live")

    def __init__(self) -> None:
        self.states = bytearray()
        self.live = 0  # blocks in a queue
        self.unit = 0  # the size most of its blocks have
        self.odd: dict[int, int] | None = None  # index -> size, for the (last) block that differs

    def size(self, index: int) -> int:
        if self.odd is not None:
            return self.odd.get(index, self.unit)
        return self.unit

    def note_size(self, index: int, size: int) -> None:
        if self.unit == 0 or size == self.unit:
            self.unit = size
            return
        if size < self.unit:
            self.odd = self.odd or {}
            self.odd[index] = size
            return
        # The first block seen was the short last one: `size` is the real unit, and
        # every block stored so far at the old unit is the odd one.
        odd = self.odd or {}
        for i, state in enumerate(self.states):
            if state & (_SMALL | _MAIN) and i not in odd and i != index:
                odd[i] = self.unit
        self.odd = odd
        self.unit = size


class _Queue:
    """A FIFO of 64-bit ids in an array, consumed from `head`."""

    __slots__ = ("ids", "head")

    def __init__(self) -> None:
        self.ids = array("Q")
        self.head = 0

    def push(self, block_id: int) -> None:
        self.ids.append(block_id)

    def pop(self) -> int | None:
        if self.head >= len(self.ids):
            return None
        block_id = self.ids[self.head]
        self.head += 1
        if self.head > 4096 and self.head * 2 > len(self.ids):
            del self.ids[:self.head]  # drop the consumed prefix
            self.head = 0
        return block_id

    def __len__(self) -> int:
        return len(self.ids) - self.head

    def compact(self, live: Callable[[int], bool]) -> None:
        self.ids = array("Q", (i for i in self.ids[self.head:] if live(i)))
        self.head = 0


class _GhostFilter:
    """Recently evicted ids, approximately: two generations of a bit set."""

    __slots__ = ("bits", "shift", "current", "previous", "added", "generation")

    def __init__(self, expected: int) -> None:
        log2 = max(16, (8 * max(expected, 1) - 1).bit_length())
        self.bits = 1 << log2
        self.shift = 64 - log2
        self.current = bytearray(self.bits // 8)
        self.previous = bytearray(self.bits // 8)
        self.added = 0
        self.generation = 64

    def _bit(self, block_id: int) -> int:
        return ((block_id * 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF) >> self.shift

    def add(self, block_id: int, remember: int) -> None:
        bit = self._bit(block_id)
        self.current[bit >> 3] |= 1 << (bit & 7)
        self.added += 1
        # The ghost remembers about as many ids as the main queue holds.
        if self.added >= max(remember, self.generation):
            self.previous, self.current = self.current, self.previous
            self.current[:] = bytes(len(self.current))
            self.added = 0

    def __contains__(self, block_id: int) -> bool:
        bit = self._bit(block_id)
        mask = 1 << (bit & 7)
        return bool((self.current[bit >> 3] | self.previous[bit >> 3]) & mask)

    def discard(self, block_id: int) -> None:
        # A bit may be shared with other ids: clearing it only makes them look new.
        bit = self._bit(block_id)
        mask = ~(1 << (bit & 7)) & 0xFF
        self.current[bit >> 3] &= mask
        self.previous[bit >> 3] &= mask


def _pack(key: Key) -> int:
    return (key[0] << 32) | key[1]


def _unpack(block_id: int) -> Key:
    return block_id >> 32, block_id & 0xFFFFFFFF


class S3FIFO:
    """Tracks cached blocks (with sizes) and chooses victims to stay within `capacity`.

    Keys are (record id, block index) pairs, both under 2**32. `expected_blocks` sizes
    the ghost filter (about how many blocks fit in the capacity)."""

    def __init__(self, capacity: int, expected_blocks: int = 65536) -> None:
        self.capacity = capacity
        self.records: dict[int, _Record] = {}
        self.small = _Queue()
        self.main = _Queue()
        self.ghost = _GhostFilter(expected_blocks)
        self.small_bytes = 0
        self.main_bytes = 0
        self.small_count = 0
        self.main_count = 0

    @property
    def used(self) -> int:
        return self.small_bytes + self.main_bytes

    def __len__(self) -> int:
        return self.small_count + self.main_count

    def _state(self, key: Key) -> int:
        record = self.records.get(key[0])
        if record is None or key[1] >= len(record.states):
            return 0
        return record.states[key[1]]

    def __contains__(self, key: Key) -> bool:
        return bool(self._state(key) & (_SMALL | _MAIN))

    def queue_of(self, key: Key) -> str | None:
        state = self._state(key)
        return "small" if state & _SMALL else "main" if state & _MAIN else None

    def insert(self, key: Key, size: int) -> None:
        record_id, index = key
        record = self.records.get(record_id)
        if record is None:
            record = self.records[record_id] = _Record()
        states = record.states
        if index >= len(states):
            states.extend(bytes(index + 1 - len(states)))
        elif states[index] & (_SMALL | _MAIN):
            return
        record.note_size(index, size)
        record.live += 1
        block_id = _pack(key)
        if block_id in self.ghost:
            # Evicted recently and wanted again: it belongs to the main queue.
            self.ghost.discard(block_id)
            states[index] = _MAIN
            self.main.push(block_id)
            self.main_bytes += size
            self.main_count += 1
        else:
            states[index] = _SMALL
            self.small.push(block_id)
            self.small_bytes += size
            self.small_count += 1

    def promote(self, key: Key) -> None:
        """Move a block of the small queue to the main one now, as if it had been read
        again: for bytes known to be read by every later reader (a Parquet footer)."""
        record = self.records.get(key[0])
        if record is None or key[1] >= len(record.states):
            return
        state = record.states[key[1]]
        if not state & _SMALL:
            return
        size = record.size(key[1])
        # Its id stays in the small queue, stale (no _SMALL bit): skipped when popped.
        record.states[key[1]] = _MAIN | (state & _FREQ)
        self.small_bytes -= size
        self.small_count -= 1
        self.main_bytes += size
        self.main_count += 1
        self.main.push(_pack(key))
        self._maybe_compact()

    def hit(self, key: Key, times: int = 1) -> None:
        """`key` was read `times` times: its frequency rises by as much, up to MAX_FREQ."""
        record = self.records.get(key[0])
        if record is None or key[1] >= len(record.states):
            return
        state = record.states[key[1]]
        if state & (_SMALL | _MAIN) and state & _FREQ < MAX_FREQ:
            record.states[key[1]] = state + min(times, MAX_FREQ - (state & _FREQ))

    def remove(self, key: Key) -> None:
        record = self.records.get(key[0])
        if record is None or key[1] >= len(record.states):
            return
        state = record.states[key[1]]
        if not state & (_SMALL | _MAIN):
            return
        self._forget(record, key, state)
        self._maybe_compact()

    def _forget(self, record: _Record, key: Key, state: int) -> None:
        size = record.size(key[1])
        record.states[key[1]] = 0
        if record.odd is not None:
            record.odd.pop(key[1], None)
        if state & _SMALL:
            self.small_bytes -= size
            self.small_count -= 1
        else:
            self.main_bytes -= size
            self.main_count -= 1
        record.live -= 1
        if record.live == 0:
            del self.records[key[0]]

    def _live_in(self, flag: int) -> Callable[[int], bool]:
        def live(block_id: int) -> bool:
            return bool(self._state(_unpack(block_id)) & flag)
        return live

    def _maybe_compact(self) -> None:
        # Stale ids (of removed blocks) are skipped at the head; compacting when they
        # outnumber live ones keeps the arrays within twice the live blocks.
        if len(self.small) > 2 * self.small_count + 1024:
            self.small.compact(self._live_in(_SMALL))
        if len(self.main) > 2 * self.main_count + 1024:
            self.main.compact(self._live_in(_MAIN))

    def _pop_live(self, queue: _Queue, flag: int) -> tuple[Key, _Record, int] | None:
        while True:
            block_id = queue.pop()
            if block_id is None:
                return None
            key = _unpack(block_id)
            record = self.records.get(key[0])
            if record is not None and key[1] < len(record.states) and record.states[key[1]] & flag:
                return key, record, record.states[key[1]]
            # A stale id: the block was removed (and maybe re-inserted, queued again).

    def evict(self, pinned: Callable[[Key], bool], need: int = 0) -> list[Key]:
        """Victims to remove so that `need` more bytes fit. Pinned blocks (being sent)
        are passed over; returns fewer victims if everything left is pinned."""
        victims: list[Key] = []
        budget = self.small_count + 2 * self.main_count * (MAX_FREQ + 1) + 8
        while self.used + need > self.capacity and (self.small_count or self.main_count) and budget > 0:
            budget -= 1
            if self.small_count and (self.small_bytes > self.capacity * SMALL_SHARE or not self.main_count):
                popped = self._pop_live(self.small, _SMALL)
                if popped is None:
                    break
                key, record, state = popped
                block_id = _pack(key)
                if pinned(key):
                    self.small.push(block_id)
                elif state & _FREQ:
                    size = record.size(key[1])
                    record.states[key[1]] = _MAIN
                    self.small_bytes -= size
                    self.small_count -= 1
                    self.main_bytes += size
                    self.main_count += 1
                    self.main.push(block_id)
                else:
                    self._forget(record, key, state)
                    self.ghost.add(block_id, self.main_count)
                    victims.append(key)
            else:
                popped = self._pop_live(self.main, _MAIN)
                if popped is None:
                    break
                key, record, state = popped
                if pinned(key) or state & _FREQ:
                    record.states[key[1]] = _MAIN | max(0, (state & _FREQ) - 1)
                    self.main.push(_pack(key))
                else:
                    self._forget(record, key, state)
                    victims.append(key)
        return victims
