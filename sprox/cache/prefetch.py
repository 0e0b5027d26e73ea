"""Parquet-aware prefetch: a scan's next reads, fetched before the client asks.

An engine scanning a Parquet object reads its footer, then, row group after row group,
the chunks of the columns its query needs. Once Sprox has the footer's layout
(`parquet.py`), a read of column c in row group i says what comes next: column c in
row groups i+1, i+2, ... Those chunks are fetched in the background, so the client's
next reads are hits instead of round trips to the origin. Every column the object's
readers scan at about that row group is fetched together, so adjacent columns' chunks
come in one GET.

When:
- The layout is learned when a client reads a `.parquet` object through the general
  path (a miss, or a hit the kernel did not take): the footer is read through the cache
  (fetching what is missing) and parsed on a worker thread. A key whose tail is not a
  footer, or whose footer lies, is remembered as "no layout" for that version.
- A prefetch is triggered by a client's read of a chunk (general path), and by the
  first read of a block Sprox prefetched (the hit kernel reports block reads), so a scan
  served from prefetched blocks keeps prefetching ahead of itself.

Objects with no Parquet layout get read-ahead instead, the way a kernel reads ahead
of a file: a miss right after bytes that are cached or being fetched means a
sequential reader, and the next READ_AHEAD_BYTES are fetched in the background; the
first read of a read-ahead block moves the window on once less than half of it is
left ahead (so a steady reader never waits, and a reader that stops costs at most one
window).

Bounds (never ahead of the client, never without limit):
- FIRST_ROW_GROUPS_AHEAD row groups ahead of a column's first read, ROW_GROUPS_AHEAD once a prefetched
  chunk of it was read (a scan, not a lookup), and COLUMN_BYTES_AHEAD bytes at most;
- at most OBJECT_BYTES in flight per object and PROCESS_BYTES in all, and FETCHES GETs;
  past a bound a prefetch waits (MAX_PENDING at most, oldest dropped) outside the cache's
  in-flight table, so a client never waits behind it;
- prefetch fills take no slot a client's own fill waits for; a client asking for bytes
  a prefetch is fetching joins that fill (single flight), so it never waits longer than
  its own GET would.
- the footer and page indexes go to the eviction policy's main queue: every query of the
  object reads them again, while a scan's chunks may be read once.

Accounting: every prefetch GET is a row in the access log (operation `Prefetch`, cache
`PREFETCH`, with its upstream bytes); each prefetched block is then `USED` (first read
by a client) or `WASTED` (evicted or dropped unread), logged as `Prefetch` rows whose
`bytes_sent` is the blocks' bytes, and counted in `/_sprox/metrics`."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..analytics.accesslog import AccessRecord
from ..s3.request import RequestStats
from .fill import FAILED, PART_BYTES, FillRun, block_parts, block_runs
from .parquet import TAIL, ParquetLayout, footer_length, is_parquet_key, parse_footer
from .records import ObjectRecord

if TYPE_CHECKING:
    from .service import ObjectCache

log = logging.getLogger("sprox.cache")

# Row groups fetched ahead of a column's reader: two at first (a point lookup reads one
# or two row groups and must not pay for a scan), then, once a prefetched chunk was read
# (a scan), ROW_GROUPS_AHEAD.
FIRST_ROW_GROUPS_AHEAD = 2
ROW_GROUPS_AHEAD = 8
COLUMN_BYTES_AHEAD = 16 * 2**20
OBJECT_BYTES = 64 * 2**20
PROCESS_BYTES = 512 * 2**20
FETCHES = 32  # prefetch GETs in flight at once
MAX_PENDING = 4096  # prefetch runs waiting for a bound to allow them
# Prefetched blocks tracked until their first read or eviction; past this the oldest are
# no longer followed (neither used nor wasted: prefetches a client never came back for).
MAX_UNREAD = 1_000_000
READ_AHEAD_BYTES = 4 * 2**20  # the window kept fetched ahead of a sequential reader
READ_AHEAD = -1  # the "column" of a read-ahead block
# Layouts kept, by record id, least recently used dropped past either bound (a layout
# costs ~20 bytes a column chunk: 2M chunks are ~40 MB).
MAX_LAYOUTS = 16384
MAX_LAYOUT_CHUNKS = 2_000_000
# Outcome rows of the access log are written at most this often (blocks' fates
# accumulate in between: one row per object and outcome).
OUTCOME_FLUSH_SECONDS = 1.0

Key = tuple[int, int]  # (record id, block index)


@dataclass
class PrefetchStats:
    """Totals since start, for /_sprox/metrics."""

    requests: int = 0  # prefetch GETs sent
    fetched_bytes: int = 0
    used_bytes: int = 0
    wasted_bytes: int = 0
    failures: int = 0  # prefetch fills that failed (logged; never a client's error)
    layouts: int = 0  # footers parsed into a layout
    not_parquet: int = 0  # .parquet objects whose tail or footer was refused


class Prefetcher:
    def __init__(self, cache: ObjectCache) -> None:
        self.cache = cache
        self.stats = PrefetchStats()
        # Called with each access-log row (set by the server).
        self.record_access: Callable[[AccessRecord], None] | None = None
        self._layouts: OrderedDict[int, ParquetLayout | None] = OrderedDict()
        self._layout_chunks = 0  # column chunks in all layouts kept
        self._learning: set[int] = set()
        # Prefetched blocks no client has read yet: (size, the column prefetched for).
        self._unread: dict[Key, tuple[int, int]] = {}
        self._in_flight_bytes: dict[int, int] = {}  # record id -> bytes being prefetched
        self._in_flight = 0  # bytes, in all
        self._fetches = 0
        # Prefetches waiting for a bound to allow them, oldest first: (record id, first
        # block, last block, block -> column). Not in the cache's in-flight table, so a
        # client never waits behind one: it fetches the bytes itself.
        self._pending: deque[tuple[int, int, int, dict[int, int]]] = deque()
        # The columns each object's readers scan: column -> the row group last read.
        self._scans: dict[int, dict[int, int]] = {}
        # record id -> the last horizon _ahead looked over (row group, columns, row groups):
        # the same one again finds nothing new to fetch.
        self._horizons: dict[int, tuple[int, tuple[int, ...], int]] = {}
        self._tasks: set[asyncio.Task] = set()
        self._closed = False  # closing: nothing new starts
        self._outcomes: dict[tuple[int, str], int] = {}  # (record id, USED/WASTED) -> bytes
        self._outcomes_flushed = time.monotonic()
        self._flush_timer: asyncio.TimerHandle | None = None

    # -- what the cache tells us -------------------------------------------------------------

    def client_read(self, record: ObjectRecord, first: int, last: int) -> None:
        """A client GET of bytes first..last of `record`, on the general path."""
        if self._closed or not is_parquet_key(record.key) or record.size < TAIL + 4:
            return
        if record.id not in self._layouts:
            if record.id not in self._learning:
                self._learning.add(record.id)
                self._spawn(self._learn(record), f"footer of {record.key}")
            return
        self._layouts.move_to_end(record.id)
        layout = self._layouts[record.id]
        if layout is not None and last - first < PART_BYTES:
            # (A client reading more than a part at once reads whole row groups or files:
            # its own read is cut into parallel parts, and chunks fetched around it would
            # only cut its next read into more, smaller GETs.)
            chunks = layout.chunks_overlapping(first, last)
            if chunks:
                self._ahead(record, layout, chunks, FIRST_ROW_GROUPS_AHEAD)

    def client_missed(self, record: ObjectRecord, first_block: int, last_block: int) -> None:
        """A client GET missed blocks first_block..last_block of `record` (the general
        path): if the block before them is cached or coming, the reader is sequential."""
        if first_block == 0 or self._layouts.get(record.id) is not None or record.id in self._learning:
            return  # (a Parquet scan is followed by its layout, not by offsets)
        before = first_block - 1
        if record.has(before) or self.cache.in_flight(record, before):
            self._read_ahead(record, last_block)

    def blocks_read(self, record_id: int, block: int) -> None:
        """A client read a block (the kernel's drain, or the general path): if it was
        prefetched, it is used, and the scan it belongs to is prefetched further."""
        entry = self._unread.pop((record_id, block), None)
        if entry is None:
            return
        size, column = entry
        self.stats.used_bytes += size
        self._outcome(record_id, "USED", size)
        record = self.cache.index.by_id.get(record_id)
        if record is None:
            return
        if column == READ_AHEAD:
            self._read_ahead(record, block)
            return
        layout = self._layouts.get(record_id)
        if layout is None:
            return
        # The scan of that column goes on (a block may also hold a neighbour column's
        # bytes, which no one asked for: that column is not followed).
        start, end = record.block_range(block)
        chunks = [(rg, c) for rg, c in layout.chunks_overlapping(start, end - 1) if c == column]
        if chunks:
            self._ahead(record, layout, chunks, ROW_GROUPS_AHEAD)

    def block_dropped(self, key: Key) -> None:
        entry = self._unread.pop(key, None)
        if entry is not None:
            self.stats.wasted_bytes += entry[0]
            self._outcome(key[0], "WASTED", entry[0])

    def record_dropped(self, record_id: int) -> None:
        self._scans.pop(record_id, None)
        self._horizons.pop(record_id, None)
        layout = self._layouts.pop(record_id, None)
        if layout is not None:
            self._layout_chunks -= layout.chunks

    @property
    def in_flight_bytes(self) -> int:
        return self._in_flight

    @property
    def has_unread(self) -> bool:
        """Whether any prefetched block waits for its first read (the hit path checks
        this before looking blocks up)."""
        return bool(self._unread)

    async def close(self) -> None:
        self._closed = True
        self._pending.clear()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        self.flush_outcomes(force=True)

    # -- learning a layout -----------------------------------------------------------------

    async def _learn(self, record: ObjectRecord) -> None:
        layout = None
        length = None
        started = time.time()
        stats = RequestStats(cache="PREFETCH")
        try:
            last8 = await self.cache.read_bytes(record, record.size - TAIL, record.size - 1, stats)
            length = footer_length(last8, record.size)
            if length is not None:
                tail = await self.cache.read_bytes(record, record.size - TAIL - length, record.size - 1, stats)
                loop = asyncio.get_running_loop()
                layout = await loop.run_in_executor(self.cache.executor, parse_footer, tail, record.size)
        except Exception as exc:  # noqa: BLE001 - a footer that cannot be read is no layout
            log.info("%s/%s: footer not read for prefetching (%s)", record.bucket, record.key, exc)
            self._learning.discard(record.id)
            return  # (not remembered: the next read tries again)
        self._learning.discard(record.id)
        if stats.upstream_requests:
            # The footer was fetched by Sprox (the client will read it next): logged.
            self.stats.requests += stats.upstream_requests
            self.stats.fetched_bytes += stats.upstream_bytes
            self._log_fetch(record, record.size - TAIL - (length or 0), record.size - 1, stats, 200, started)
        if self.cache.index.by_id.get(record.id) is not record:
            return
        if layout is None:
            self.stats.not_parquet += 1
            log.info("%s/%s: not a Parquet footer, or one that lies: no prefetch", record.bucket, record.key)
        else:
            self.stats.layouts += 1
            self.cache.admit_metadata(record, layout.metadata_start)
        self.record_dropped(record.id)  # (a layout learned twice is counted once)
        self._layouts[record.id] = layout
        self._layout_chunks += layout.chunks if layout is not None else 0
        while len(self._layouts) > MAX_LAYOUTS or self._layout_chunks > MAX_LAYOUT_CHUNKS:
            _, dropped = self._layouts.popitem(last=False)
            self._layout_chunks -= dropped.chunks if dropped is not None else 0

    # -- prefetching -------------------------------------------------------------------------

    def _ahead(self, record: ObjectRecord, layout: ParquetLayout, chunks: list[tuple[int, int]],
               row_groups: int) -> None:
        """Chunks (row group, column) were just read: fetch the next `row_groups` row
        groups of every column this object's readers scan at about that row group,
        together (so the chunks of adjacent columns come in one GET), up to
        COLUMN_BYTES_AHEAD per column."""
        scan = self._scans.setdefault(record.id, {})
        for rg, column in chunks:
            scan[column] = rg
        row_group = max(rg for rg, _ in chunks)
        # Columns last read at about this row group: the scan's current columns (readers
        # of one row group ask for its chunks one by one, in any order, and an engine's
        # threads read neighbouring row groups at once).
        columns = [c for c, last in scan.items() if abs(last - row_group) <= 1]
        # A reader asks for a row group's chunks block by block, so most calls look over
        # the horizon the call before did, which then asked for every block in it not
        # cached or coming (a block evicted or failed since is asked for again once the
        # scan moves on): skipping that walk saves ~50 us per read of a cold block.
        horizon = (row_group, tuple(columns), row_groups)
        if self._horizons.get(record.id) == horizon:
            return
        self._horizons[record.id] = horizon
        wanted: dict[int, int] = {}  # block -> the column it is fetched for
        bs = record.block_size
        budget = dict.fromkeys(columns, COLUMN_BYTES_AHEAD)
        for rg in range(row_group + 1, min(layout.row_groups, row_group + 1 + row_groups)):
            for column in columns:
                if budget[column] <= 0:
                    continue
                start, end = layout.chunk(rg, column)
                budget[column] -= end - start
                for i in range(start // bs, (end - 1) // bs + 1):
                    if not record.has(i) and not self.cache.in_flight(record, i):
                        wanted[i] = column
        self._fetch(record, wanted)

    def _read_ahead(self, record: ObjectRecord, position: int) -> None:
        """Keep the READ_AHEAD_BYTES after block `position` cached or coming: when less
        than half of that window is, fetch the rest of it (one GET per missing run)."""
        window = max(2, READ_AHEAD_BYTES // record.block_size)
        last = min(record.block_count - 1, position + window)
        covered = position + 1
        while covered <= last and (record.has(covered) or self.cache.in_flight(record, covered)):
            covered += 1
        if covered > last or covered - position > window // 2:
            return
        wanted = {i: READ_AHEAD for i in range(covered, last + 1)
                  if not record.has(i) and not self.cache.in_flight(record, i)}
        self._fetch(record, wanted)

    def _fetch(self, record: ObjectRecord, wanted: dict[int, int]) -> None:
        """Start fills of the `wanted` blocks (block -> what it is fetched for), one per
        run of adjacent blocks; runs past a bound wait in the pending queue (bounded:
        the oldest are forgotten, a later read asks again)."""
        if self._closed:
            return
        bs = record.block_size
        for first, last in block_parts(block_runs(sorted(wanted)), max(1, PART_BYTES // bs)):
            if not self._try_start(record, first, last, wanted):
                self._pending.append((record.id, first, last, wanted))
                if len(self._pending) > MAX_PENDING:
                    self._pending.popleft()

    def _try_start(self, record: ObjectRecord, first: int, last: int, columns: dict[int, int]) -> bool:
        size = record.block_range(last)[1] - record.block_range(first)[0]
        if (self._fetches >= FETCHES or self._in_flight + size > PROCESS_BYTES
                or self._in_flight_bytes.get(record.id, 0) + size > OBJECT_BYTES):
            return False
        self._start(record, first, last, size, columns)
        return True

    def _start_pending(self) -> None:
        """Start what waits, oldest first, as far as the bounds allow; a pending run
        whose blocks were meanwhile cached or fetched is trimmed to what is left."""
        for _ in range(len(self._pending)):
            if self._fetches >= FETCHES:
                return
            record_id, first, last, columns = self._pending.popleft()
            record = self.cache.index.by_id.get(record_id)
            if record is None:
                continue
            missing = [i for i in range(first, last + 1)
                       if not record.has(i) and not self.cache.in_flight(record, i)]
            for run_first, run_last in block_runs(missing):
                if not self._try_start(record, run_first, run_last, columns):
                    self._pending.append((record_id, run_first, run_last, columns))

    def _start(self, record: ObjectRecord, first: int, last: int, size: int, columns: dict[int, int]) -> None:
        stats = RequestStats(cache="PREFETCH")
        run = self.cache.start_prefetch(record, first, last, stats)
        self._fetches += 1
        self._in_flight += size
        self._in_flight_bytes[record.id] = self._in_flight_bytes.get(record.id, 0) + size
        for block in run.blocks:
            self._unread[(record.id, block.index)] = (block.end - block.start, columns[block.index])
        while len(self._unread) > MAX_UNREAD:
            del self._unread[next(iter(self._unread))]
        started = time.time()
        run.finished.add_done_callback(lambda _f: self._finished(run, size, stats, started))

    def _finished(self, run: FillRun, size: int, stats: RequestStats, started: float) -> None:
        record = run.record
        self._fetches -= 1
        self._in_flight -= size
        left = self._in_flight_bytes[record.id] - size
        if left:
            self._in_flight_bytes[record.id] = left
        else:
            del self._in_flight_bytes[record.id]
        self._start_pending()
        failed = [b for b in run.blocks if b.state == FAILED]
        for block in failed:
            self._unread.pop((record.id, block.index), None)  # nothing kept: neither used nor wasted
        if failed:
            self.stats.failures += 1
            log.info("prefetch of %s/%s bytes %d-%d failed (%s)", record.bucket, record.key, run.start,
                     run.end - 1, failed[0].error)
        self.stats.requests += stats.upstream_requests
        self.stats.fetched_bytes += stats.upstream_bytes
        self._log_fetch(record, run.start, run.end - 1, stats, 502 if failed else 206, started)

    def _log_fetch(self, record: ObjectRecord, first: int, last: int, stats: RequestStats, status: int,
                   started: float) -> None:
        if self.record_access is None:
            return
        self.record_access(AccessRecord(
            time=started, request_id="prefetch", operation="Prefetch", bucket=record.bucket, key=record.key,
            range=f"bytes={first}-{last}", status=status, bytes_sent=0, cache="PREFETCH",
            upstream_requests=stats.upstream_requests, upstream_bytes=stats.upstream_bytes,
            latency_ms=(time.time() - started) * 1000.0, user_agent=None, access_key=None, first_byte=first,
            object_size=record.size))

    # -- accounting ----------------------------------------------------------------------------

    def _outcome(self, record_id: int, outcome: str, size: int) -> None:
        key = (record_id, outcome)
        self._outcomes[key] = self._outcomes.get(key, 0) + size
        self.flush_outcomes()
        if self._outcomes and self._flush_timer is None:
            self._flush_timer = asyncio.get_running_loop().call_later(
                OUTCOME_FLUSH_SECONDS, self.flush_outcomes, True)

    def flush_outcomes(self, force: bool = False) -> None:
        """Write the accumulated USED/WASTED rows (at most once per
        OUTCOME_FLUSH_SECONDS, unless forced)."""
        now = time.monotonic()
        if force and self._flush_timer is not None:
            self._flush_timer.cancel()
            self._flush_timer = None
        if not self._outcomes or (not force and now - self._outcomes_flushed < OUTCOME_FLUSH_SECONDS):
            return
        self._outcomes_flushed = now
        outcomes, self._outcomes = self._outcomes, {}
        if self._flush_timer is not None:
            self._flush_timer.cancel()
            self._flush_timer = None
        if self.record_access is None:
            return
        wall = time.time()
        for (record_id, outcome), size in outcomes.items():
            record = self.cache.index.by_id.get(record_id)
            self.record_access(AccessRecord(
                time=wall, request_id="prefetch", operation="Prefetch",
                bucket=record.bucket if record is not None else None,
                key=record.key if record is not None else None, range=None, status=200, bytes_sent=size,
                cache=outcome, upstream_requests=0, upstream_bytes=0, latency_ms=0.0, user_agent=None,
                access_key=None))

    # -- tasks -------------------------------------------------------------------------------------

    def _spawn(self, coro, name: str) -> None:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
