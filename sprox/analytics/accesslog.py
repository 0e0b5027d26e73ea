"""The access log: one record per S3 request, written to Parquet files.

Use:

    log = AccessLog(Path("/var/lib/sprox/access"))
    await log.start()
    log.record(AccessRecord(...))   # per request: O(1), no I/O, never raises
    await log.close()               # at shutdown
    table = read_access_log(Path("/var/lib/sprox/access"))

Schema (`SCHEMA`, version "1" in the schema metadata key `sprox.accesslog.version`)
-----------------------------------------------------------------------------------

| column              | type                  | null | meaning                                     |
|---------------------|-----------------------|------|---------------------------------------------|
| `time`              | timestamp[us, tz=UTC] | no   | when the request started                    |
| `request_id`        | string                | no   | the `x-amz-request-id` Sprox answered with  |
| `operation`         | string                | no   | S3 operation, e.g. `GetObject`              |
| `bucket`            | string                | yes  | bucket; None for ListBuckets                |
| `key`               | string                | yes  | object key, exactly as the client sent it   |
| `range`             | string                | yes  | the client's Range header as sent           |
| `status`            | int16                 | no   | HTTP status sent to the client              |
| `bytes_sent`        | int64                 | no   | body bytes sent to the client               |
| `cache`             | string                | yes  | HIT, MISS, PARTIAL, BYPASS; None: no object |
| `upstream_requests` | int32                 | no   | requests made to the origin for this one    |
| `upstream_bytes`    | int64                 | no   | body bytes received from the origin         |
| `latency_ms`        | float64               | no   | request start to the last byte sent         |
| `user_agent`        | string                | yes  | the client's User-Agent                     |
| `access_key`        | string                | yes  | the access key the request was signed with  |
| `first_byte`        | int64                 | yes  | object offset of the first body byte sent (v2) |
| `object_size`       | int64                 | yes  | the object's size, when the answer told it (v2) |

The schema only grows: a new column is added at the end with a new version number;
columns are never renamed, retyped or reordered, so reports over old and new files keep
working (`read_access_log` fills columns an older file lacks with nulls).
`AccessRecord.time` is float seconds since the epoch, stored rounded to the microsecond;
`cache` is None for operations that read no object (listings, writes, deletes).
`first_byte` and `object_size` come from the answer to an object read (Content-Range,
else Content-Length): with them a report knows which bytes, so which cache blocks, each
read touched. Version 1 files lack them (read as nulls).

Files
-----
In `directory`, one file per period, named at open time (UTC) as
`access-YYYYMMDDTHHMMSSZ-<pid>-<seq>.parquet` (seq: six digits, counting up within the
process), so names sort by time and two processes never write the same file.

While its period lasts, a file is a journal, `<name>.journal`: an Arrow IPC stream (LZ4)
to which each flush appends one batch, fdatasynced at most once a second. Its batches are
readable while it is written (a batch torn by a crash, or still being written, ends it).
The period ends when the journal reaches `rotate_bytes` after a flush, or at the first
flush tick after it is `rotate_seconds` old, or at `close()`: the journal is then closed
and published as `<name>.parquet` (written as `<name>.parquet.inprogress`, fsynced,
renamed, and only then the journal deleted) by a publisher thread that runs only when
the CPU is otherwise idle (SCHED_IDLE): writing Parquet beside the journal on every flush
cost cache hits about 0.2 ms of p99 on a core shared with the loop (measured). So:

- a record is readable within `flush_seconds` (5 s) of being recorded: `read_access_log`
  reads the Parquet files and the journals that have no Parquet file yet (`sprox report`,
  `sprox cache stats`); readers never see a half-written Parquet file;
- a process killed with SIGKILL loses only what it had not flushed yet (at most
  `flush_seconds` of records): the next `start()` in the directory publishes each journal
  whose writer is gone (the writer, then the publisher, hold an exclusive `flock` on it
  until it is published, however the process ends; a journal is created as
  `<name>.journal.new` and gets its name only once locked). A journal whose Parquet file was
  published already (a crash between the rename and the unlink) is just deleted; a
  publication that fails (disk full) leaves the journal, read as it is, for the next start.

An `.inprogress` file without its journal (left by an older version, or by another
process) cannot be read. Sprox never reads, renames or deletes one: `start()` names those
it finds in a warning, and removing them is the operator's call.

Threads, failures, memory
-------------------------
All methods are called on the event loop thread; `record()` is not thread-safe. Every
journal operation runs on one dedicated writer thread, at a lower priority than the loop
(`WRITER_NICE`), so writes happen in order and never block the loop; publication on the
publisher thread. pyarrow writes
through its own file object, without the GIL. Errors (disk full, directory gone) are
logged at most once a minute and counted, never raised into request handling: the
failed batch is dropped, the open file is abandoned and the next flush starts a new
one. A record that does not fit the schema (a bug in the caller) is dropped alone, not
with its batch.

The buffer holds at most `10 * flush_rows` records: when writing falls that far behind,
the oldest are dropped. Counters: `written` (rows written to a file), `dropped` (records
that will never be written, for any reason), `write_errors` (failed file operations).
After `close()`, every record given to `record()` is counted in `written` or `dropped`
(rows of a file abandoned after they were written stay counted as written).
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import fcntl

import pyarrow as pa
import pyarrow.ipc
import pyarrow.parquet as pq

log = logging.getLogger("sprox.accesslog")

SCHEMA_VERSION = "2"

SCHEMA = pa.schema(
    [
        pa.field("time", pa.timestamp("us", tz="UTC"), nullable=False),
        pa.field("request_id", pa.string(), nullable=False),
        pa.field("operation", pa.string(), nullable=False),
        pa.field("bucket", pa.string()),
        pa.field("key", pa.string()),
        pa.field("range", pa.string()),
        pa.field("status", pa.int16(), nullable=False),
        pa.field("bytes_sent", pa.int64(), nullable=False),
        pa.field("cache", pa.string()),
        pa.field("upstream_requests", pa.int32(), nullable=False),
        pa.field("upstream_bytes", pa.int64(), nullable=False),
        pa.field("latency_ms", pa.float64(), nullable=False),
        pa.field("user_agent", pa.string()),
        pa.field("access_key", pa.string()),
        pa.field("first_byte", pa.int64()),
        pa.field("object_size", pa.int64()),
    ],
    metadata={"sprox.accesslog.version": SCHEMA_VERSION},
)

INPROGRESS = ".inprogress"
JOURNAL = ".journal"
NEW = ".new"  # a journal being created, before it is locked and named (see _create_journal)
JOURNAL_OPTIONS = pa.ipc.IpcWriteOptions(compression="lz4")
JOURNAL_SYNC_SECONDS = 1.0
# Rows per row group of a published file: a report's --since/--until skips row groups
# by their `time` statistics.
ROW_GROUP_ROWS = 65_536
# Columns with few distinct values, dictionary-encoded; the others (request ids, times,
# ranges, offsets) are nearly all distinct, and trying a dictionary on them cost a third
# of the writer's CPU for a bigger file (10,000 hit records: 0.38 against 0.59 us per
# row, 224 against 301 KiB).
DICTIONARY_COLUMNS = ["operation", "bucket", "key", "status", "cache", "user_agent", "access_key"]
# Min/max statistics only for `time` (what a report's --since/--until prunes row groups
# by): on every column they took a third of the writer's CPU. LZ4 rather than zstd:
# the same size here (the random request ids dominate), less CPU. With both, 10,000 hit
# records cost 2.1 ms to write instead of 4.6 ms; the writer shares a core with the
# loop on a small machine, where its time shows in the hits' p99.
STATISTICS_COLUMNS = ["time"]
COMPRESSION = "lz4"

# How far writing may fall behind, in flushes, before the oldest records are dropped.
BUFFER_FLUSHES = 10

# Repeated warnings (drops, write errors) are logged at most this often.
WARN_INTERVAL = 60.0


class AccessRecord(NamedTuple):
    """One S3 request; fields are the columns of `SCHEMA`, in order (pass them by name)."""

    time: float
    request_id: str
    operation: str
    bucket: str | None
    key: str | None
    range: str | None
    status: int
    bytes_sent: int
    cache: str | None
    upstream_requests: int
    upstream_bytes: int
    latency_ms: float
    user_agent: str | None
    access_key: str | None
    first_byte: int | None = None
    object_size: int | None = None


class AccessLog:
    """Buffers `AccessRecord`s and writes them to rotating Parquet files in `directory`."""

    def __init__(self, directory: Path, *, flush_rows: int = 10_000, flush_seconds: float = 5.0,
                 rotate_bytes: int = 64 * 2**20, rotate_seconds: float = 3600.0) -> None:
        for name, value in [("flush_rows", flush_rows), ("flush_seconds", flush_seconds),
                            ("rotate_bytes", rotate_bytes), ("rotate_seconds", rotate_seconds)]:
            if not value > 0:
                raise ValueError(f"access log: {name} must be positive, not {value!r}")
        self.directory = Path(directory)
        self.flush_rows = flush_rows
        self.flush_seconds = flush_seconds
        self.written = 0
        self.dropped = 0
        self.write_errors = 0
        self.publish_errors = 0
        self._files = _LogFiles(self.directory, rotate_bytes, rotate_seconds, self._publish_later)
        # Publishing a journal as Parquet runs on its own thread, at idle priority: the
        # cost of a file is paid when the CPU has nothing else to do, never in the hits'
        # way (writing both formats per flush on the writer thread cost hits ~0.2 ms of p99).
        self._publisher: ThreadPoolExecutor | None = None
        self._publisher_thread: int | None = None  # its native id, once started
        self._capacity = BUFFER_FLUSHES * flush_rows
        self._buffer: deque[AccessRecord] = deque(maxlen=self._capacity)
        self._batches: deque[pa.RecordBatch] = deque()  # the hit kernel's (record_batch)
        self._batch_rows = 0
        self._wake = asyncio.Event()
        self._executor: ThreadPoolExecutor | None = None
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._warned_at: dict[str, float] = {}
        self._dropped_warned = 0

    async def start(self) -> None:
        """Create `directory` if needed, warn about stale `.inprogress` files, and start
        the writer thread and the periodic flush. Raises OSError if `directory` cannot
        be created: a bad setting should stop startup, not every later write."""
        if self._executor is not None or self._closed:
            raise RuntimeError("AccessLog.start() may be called once, before close()")
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sprox-accesslog",
                                            initializer=_lower_priority)
        self._publisher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sprox-accesslog-publish",
                                             initializer=self._publisher_started)
        try:
            stale, recovered = await asyncio.get_running_loop().run_in_executor(self._executor, self._files.prepare)
        except Exception:
            self._executor.shutdown()  # its only job has finished: the join is instant
            self._executor = None
            self._publisher.shutdown()
            self._publisher = None
            raise
        if recovered:
            log.warning("access log: recovered %d record(s) from %d journal(s) of a process that stopped "
                        "without closing its log (killed?) into %s", sum(recovered.values()), len(recovered),
                        ", ".join(sorted(path.name for path in recovered)))
        if stale:
            names = ", ".join(path.name for path in stale[:10]) + (" ..." if len(stale) > 10 else "")
            log.warning("access log: %d unfinished file(s) in %s, left by a crashed (or another "
                        "running) process; they are never read, delete them when sure: %s",
                        len(stale), self.directory, names)
        self._task = asyncio.create_task(self._flush_periodically(), name="sprox-accesslog-flush")

    def record(self, rec: AccessRecord) -> None:
        """Buffer one record. O(1), no I/O, never raises; wakes the flush task when
        `flush_rows` records are waiting."""
        if self._closed:
            self.dropped += 1
            return
        buffer = self._buffer
        if len(buffer) == self._capacity:
            self.dropped += 1  # the append pushes the oldest record out
        buffer.append(rec)
        if len(buffer) + self._batch_rows >= self.flush_rows:
            self._wake.set()

    def record_batch(self, batch: pa.RecordBatch) -> None:
        """Buffer the hit kernel's drained records (`kernel_batch`), as they are: no
        Python object per record. Batches are bounded like records (`flush_rows` times
        BUFFER_FLUSHES rows; the oldest are pushed out)."""
        if self._closed:
            self.dropped += batch.num_rows
            return
        self._batches.append(batch)
        self._batch_rows += batch.num_rows
        while self._batch_rows > self._capacity:
            over = self._batch_rows - self._capacity
            oldest = self._batches[0]
            if oldest.num_rows <= over:
                self._batches.popleft()
                self._batch_rows -= oldest.num_rows
                self.dropped += oldest.num_rows
            else:
                self._batches[0] = oldest.slice(over)
                self._batch_rows -= over
                self.dropped += over
        if len(self._buffer) + self._batch_rows >= self.flush_rows:
            self._wake.set()

    async def flush(self) -> None:
        """Write what is buffered as one row group (and close the current file if it is
        due for rotation); return once that is done. Failures are counted, not raised."""
        if self._executor is None:
            return
        rows, self._buffer = self._buffer, deque(maxlen=self._capacity)
        batches, self._batches = list(self._batches), deque()
        nrows = len(rows) + self._batch_rows
        self._batch_rows = 0
        self._wake.clear()
        await self._run_on_writer(nrows, self._files.write, rows, batches)
        if self.dropped > self._dropped_warned and self._may_warn("dropped"):
            log.warning("access log: %d record(s) dropped (%d in total): writing falls behind "
                        "or fails", self.dropped - self._dropped_warned, self.dropped)
            self._dropped_warned = self.dropped

    async def close(self) -> None:
        """Write what is buffered, close the current file (so it is renamed to `.parquet`),
        stop the flush task and the writer thread. Later records count as dropped."""
        if self._closed:
            return
        self._closed = True
        if self._executor is None:  # never started: nothing can be written
            self.dropped += len(self._buffer) + self._batch_rows
            self._buffer.clear()
            self._batches.clear()
            self._batch_rows = 0
            return
        try:
            if self._task is not None:
                self._task.cancel()
                await asyncio.wait([self._task])  # wait(), unlike await, does not re-raise its cancellation
            await self.flush()
            await self._run_on_writer(0, self._files.close)
        except BaseException:
            # Cancelled: don't block the loop. The threads finish their queues, then exit.
            self._executor.shutdown(wait=False)
            self._executor = None
            self._publisher_done(wait=False)
            raise
        # Joins a thread with nothing left to do (its last job was awaited above): instant.
        self._executor.shutdown()
        self._executor = None
        # The last journals are published before close() returns (a clean stop leaves
        # only Parquet files), at the normal priority: at idle priority, a stop on a busy
        # machine could wait minutes for them.
        publisher = self._publisher
        if publisher is not None:
            if self._publisher_thread is not None:
                with suppress(AttributeError, OSError):
                    os.sched_setscheduler(self._publisher_thread, os.SCHED_OTHER, os.sched_param(0))
            await asyncio.get_running_loop().run_in_executor(None, publisher.shutdown)
            self._publisher = None

    def _publisher_started(self) -> None:
        self._publisher_thread = threading.get_native_id()
        _idle_priority()

    def _publisher_done(self, *, wait: bool) -> None:
        if self._publisher is not None:
            self._publisher.shutdown(wait=wait)
            self._publisher = None

    def _publish_later(self, journal: Path, fd: int) -> None:
        """(writer thread) Queue a closed journal for publication."""
        publisher = self._publisher
        if publisher is None:  # (cancelled close): the next start publishes it
            os.close(fd)
            return
        publisher.submit(self._publish, journal, fd)

    def _publish(self, journal: Path, fd: int) -> None:
        """(publisher thread) A failure is logged; the journal stays, read as it is, and
        the next start publishes it."""
        try:
            publish_journal(journal, fd)
        except Exception as exc:
            self.publish_errors += 1
            if self._may_warn("publish_error"):
                log.error("access log: publishing %s as Parquet failed (%d failure(s) so far); it stays, "
                          "readable, and is published at the next start: %s", journal.name,
                          self.publish_errors, exc, exc_info=None if isinstance(exc, OSError) else exc)

    async def _flush_periodically(self) -> None:
        while True:
            with suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.flush_seconds)
            await self.flush()

    async def _run_on_writer(self, nrows: int, job: Callable[..., int], *args: object) -> None:
        """Run `job(*args)` (which writes `nrows` records) on the writer thread."""
        assert self._executor is not None
        future = asyncio.get_running_loop().run_in_executor(self._executor, job, *args)
        # Counting in a callback, and waiting with wait() rather than await, means a
        # cancelled caller neither cancels a queued write (its rows would vanish
        # uncounted) nor skips the counting; errors are counted there, never raised.
        future.add_done_callback(partial(self._count, nrows))
        await asyncio.wait([future])

    def _count(self, nrows: int, future: asyncio.Future[int]) -> None:
        if future.cancelled():
            self.dropped += nrows
            return
        error = future.exception()
        if error is not None:
            self.write_errors += 1
            self.dropped += nrows
            if self._may_warn("write_error"):
                # An OSError (disk full, permissions) says all in its message; a traceback is
                # for anything else, which would be a bug.
                log.error("access log: writing to %s failed (%d failure(s) so far), %d record(s) "
                          "lost: %s", self.directory, self.write_errors, nrows, error,
                          exc_info=None if isinstance(error, OSError) else error)
            return
        written = future.result()
        self.written += written
        if written < nrows:
            self.dropped += nrows - written
            if self._may_warn("invalid"):
                log.error("access log: %d record(s) dropped: a field does not fit the schema",
                          nrows - written)

    def _may_warn(self, kind: str) -> bool:
        now = time.monotonic()
        if now - self._warned_at.get(kind, -WARN_INTERVAL) < WARN_INTERVAL:
            return False
        self._warned_at[kind] = now
        return True


def kernel_batch(log: tuple) -> pa.RecordBatch:
    """The hit kernel's drained records (HitKernel.drain()'s columns: Arrow buffers it
    filled in C) as a RecordBatch with `SCHEMA`: no Python object per record."""
    (n, time_us, request_id, operation, bucket, key, range_, status, bytes_sent, cache, upstream_requests,
     upstream_bytes, latency_ms, user_agent, access_key, first_byte, object_size) = log
    buf = pa.py_buffer

    def strings(buffers: tuple) -> pa.Array:
        if len(buffers) == 2:
            return pa.Array.from_buffers(pa.string(), n, [None, buf(buffers[0]), buf(buffers[1])])
        valid, offsets, data = buffers
        return pa.Array.from_buffers(pa.string(), n, [buf(valid), buf(offsets), buf(data)], null_count=-1)

    def fixed(kind: pa.DataType, values: bytes, valid: bytes | None = None) -> pa.Array:
        return pa.Array.from_buffers(kind, n, [None if valid is None else buf(valid), buf(values)],
                                     null_count=0 if valid is None else -1)

    columns = [
        fixed(SCHEMA.field("time").type, time_us),
        strings(request_id), strings(operation), strings(bucket), strings(key), strings(range_),
        fixed(pa.int16(), status), fixed(pa.int64(), bytes_sent), strings(cache),
        fixed(pa.int32(), upstream_requests), fixed(pa.int64(), upstream_bytes), fixed(pa.float64(), latency_ms),
        strings(user_agent), strings(access_key),
        fixed(pa.int64(), first_byte[1], first_byte[0]), fixed(pa.int64(), object_size),
    ]
    return pa.RecordBatch.from_arrays(columns, schema=SCHEMA)


def read_access_log(directory: str | os.PathLike[str]) -> pa.Table:
    """Every record in `directory`'s access log, oldest file first, as one table with
    `SCHEMA`: the Parquet files, and the journals of files not closed yet (their complete
    batches). `.inprogress` files are skipped. Blocking: not for the event loop thread."""
    directory = Path(directory)
    # Journals first: one published after this listing is in the next (its Parquet file
    # is renamed into place before the journal is deleted).
    journals = list(directory.glob("access-*" + JOURNAL))
    parquet = {path.name: path for path in directory.glob("access-*.parquet")}
    sources = [(path.name, path) for path in parquet.values()]
    sources += [(_published_name(j), j) for j in journals if _published_name(j) not in parquet]
    tables = []
    for _, path in sorted(sources):
        if path.suffix == JOURNAL:
            try:
                table = read_journal(path, missing_ok=False)
            except FileNotFoundError:  # published since it was listed
                published = path.with_name(_published_name(path))
                if not published.exists():
                    continue  # (it had no complete batch)
                table = pq.read_table(published, schema=SCHEMA)
            if table.num_rows:
                tables.append(table)
        else:
            tables.append(pq.read_table(path, schema=SCHEMA))
    return pa.concat_tables(tables) if tables else SCHEMA.empty_table()


def read_journal(path: Path, *, missing_ok: bool = True) -> pa.Table:
    """The complete batches of a journal, as a table with `SCHEMA` (a batch cut short by
    a crash, or still being written, ends it). Empty if the file is unreadable, or gone
    (FileNotFoundError then, unless `missing_ok`)."""
    batches = []
    try:
        with pa.OSFile(str(path), "r") as source:
            reader = pa.ipc.open_stream(source)
            while True:
                try:
                    batches.append(reader.read_next_batch())
                except StopIteration:
                    break
                except (pa.ArrowInvalid, OSError):
                    break  # torn or being written: what came before is whole
            schema = reader.schema
    except FileNotFoundError:
        if not missing_ok:
            raise
        return SCHEMA.empty_table()
    except (pa.ArrowInvalid, OSError):  # not even a schema yet
        return SCHEMA.empty_table()
    return _conform(pa.Table.from_batches(batches, schema=schema))


def _conform(table: pa.Table) -> pa.Table:
    """`table` with SCHEMA's columns, in order; a column it lacks is all nulls."""
    if table.schema.equals(SCHEMA, check_metadata=False):
        return table.replace_schema_metadata(SCHEMA.metadata)
    columns = [table.column(f.name).cast(f.type) if f.name in table.column_names
               else pa.nulls(table.num_rows, f.type) for f in SCHEMA]
    return pa.Table.from_arrays(columns, schema=SCHEMA)


def _published_name(journal: Path) -> str:
    """The `.parquet` name of the file a journal stands beside."""
    return journal.name[:-len(JOURNAL)] + ".parquet"


# The writer thread's nice value: the loop answers requests, the writer can wait. On a
# busy shared core (one pinned core, a one-CPU VM) nice 10 still leaves it about a
# tenth of the core, and writing takes ~0.2 us per record (1.5% of a core at 70k
# hits/s); a writer that falls behind drops the oldest records, counted in `dropped`.
WRITER_NICE = 10


def _lower_priority() -> None:
    """Lower the calling thread's scheduling priority (Linux: priorities are per
    thread). Best effort: where it is refused, the writer keeps the loop's priority."""
    with suppress(AttributeError, OSError):
        thread = threading.get_native_id()
        if os.getpriority(os.PRIO_PROCESS, thread) < WRITER_NICE:
            os.setpriority(os.PRIO_PROCESS, thread, WRITER_NICE)


def _idle_priority() -> None:
    """Run the calling thread only when the CPU is otherwise idle (Linux SCHED_IDLE;
    else the lowest nice value). Best effort."""
    with suppress(AttributeError, OSError):
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))  # (0: this thread)
        return
    with suppress(AttributeError, OSError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)


def _utc_stamp() -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())


class _LogFiles:
    """The log's journals and their publication as Parquet. `prepare`, `write` and
    `close` run on the log's writer thread; `publish` (given) hands a closed journal to
    the publisher thread."""

    def __init__(self, directory: Path, rotate_bytes: int, rotate_seconds: float,
                 publish: Callable[[Path, int], None]) -> None:
        self.directory = directory
        self.rotate_bytes = rotate_bytes
        self.rotate_seconds = rotate_seconds
        self.publish = publish
        self._seq = 0
        self._path: Path | None = None  # the open journal
        self._fd = -1  # its descriptor: flock'd while the journal is ours, until published
        self._file: pa.NativeFile | None = None
        self._writer: pa.ipc.RecordBatchStreamWriter | None = None
        self._opened_at = 0.0
        self._synced_at = -JOURNAL_SYNC_SECONDS

    def prepare(self) -> tuple[list[Path], dict[Path, int]]:
        """Create the directory; publish the journals of writers that are gone (a
        Parquet file each). Returns the `.inprogress` files that stay (unreadable) and
        the Parquet files recovered, with their row counts."""
        self.directory.mkdir(parents=True, exist_ok=True)
        for new in self.directory.glob("access-*" + JOURNAL + NEW):  # creations cut short: no records
            with suppress(OSError):
                fd = os.open(new, os.O_RDONLY | os.O_CLOEXEC)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # (else: being created right now)
                    new.unlink()
                finally:
                    os.close(fd)
        recovered = {}
        for journal in sorted(self.directory.glob("access-*" + JOURNAL)):
            try:
                fd = os.open(journal, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue  # its writer (or publisher) lives: another process's
            rows = publish_journal(journal, fd)
            if rows:
                recovered[self.directory / _published_name(journal)] = rows
        return sorted(self.directory.glob("access-*" + INPROGRESS)), recovered

    def write(self, rows: Sequence[AccessRecord], batches: Sequence[pa.RecordBatch] = ()) -> int:
        """Append `rows` and `batches` (the hit kernel's) to the journal as one batch,
        opening one if none is open, then hand it over for publication if it is due for
        rotation. Returns how many rows were written."""
        tables = [_valid_rows_table(rows)] if rows else []
        if batches:
            tables.append(pa.Table.from_batches(batches, schema=SCHEMA))
        table = pa.concat_tables(tables).combine_chunks() if tables else None
        try:
            if table is not None and table.num_rows:
                if self._writer is None:
                    self._open()
                assert self._writer is not None
                self._writer.write_table(table)
                # A killed process loses nothing written (the page cache keeps it); the
                # fdatasync is for a machine that goes down, at most once a second.
                if time.monotonic() - self._synced_at >= JOURNAL_SYNC_SECONDS:
                    os.fdatasync(self._fd)
                    self._synced_at = time.monotonic()
            if self._writer is not None and self._rotation_due():
                self._hand_over()
        except BaseException:
            self._abandon()
            raise
        return 0 if table is None else table.num_rows

    def close(self) -> int:
        """Hand the open journal, if any, over for publication."""
        try:
            if self._writer is not None:
                self._hand_over()
        except BaseException:
            self._abandon()
            raise
        return 0

    def _rotation_due(self) -> bool:
        assert self._file is not None
        return (self._file.tell() >= self.rotate_bytes
                or time.monotonic() - self._opened_at >= self.rotate_seconds)

    def _open(self) -> None:
        stamp = _utc_stamp()
        while True:
            name = f"access-{stamp}-{os.getpid()}-{self._seq:06d}"
            self._seq += 1
            path = self.directory / (name + JOURNAL)
            if (self.directory / (name + ".parquet")).exists() or \
                    (self.directory / (name + ".parquet" + INPROGRESS)).exists():
                continue  # same pid, same second: a process before a restart
            try:
                fd, sink, writer = _create_journal(path)
            except FileExistsError:
                continue  # (never another writer's file)
            break
        self._path, self._fd, self._file, self._writer, self._opened_at = path, fd, sink, writer, time.monotonic()

    def _hand_over(self) -> None:
        """Close the journal (its end-of-stream mark) and give it, lock held, to the
        publisher."""
        assert self._writer is not None and self._file is not None and self._path is not None
        path, fd = self._path, self._fd
        self._writer.close()
        self._file.close()
        self._writer = self._file = self._path = None
        self._fd = -1
        self.publish(path, fd)

    def _abandon(self) -> None:
        """After a failure, stop writing this journal: what it holds whole is published,
        and the next write opens a new one."""
        if self._writer is None:
            return
        log.warning("access log: closed %s early after a write error", self._path)
        with suppress(OSError, pa.ArrowException):
            self._writer.close()
        with suppress(OSError):
            assert self._file is not None
            self._file.close()
        path, fd = self._path, self._fd
        self._writer = self._file = self._path = None
        self._fd = -1
        assert path is not None
        self.publish(path, fd)


def publish_journal(journal: Path, fd: int) -> int:
    """Write a journal whose writer is done as its Parquet file, then delete it; `fd` is
    the journal's descriptor holding its lock, closed at the end (also on failure: the
    journal then stays, readable, for the next start). Returns the rows published."""
    try:
        published = journal.with_name(_published_name(journal))
        rows = 0
        if not published.exists():  # (else: published before a crash, not deleted yet)
            table = read_journal(journal)
            if table.num_rows:
                _write_parquet(table, published)
                rows = table.num_rows
        with suppress(FileNotFoundError):
            journal.unlink()
        inprogress = published.with_name(published.name + INPROGRESS)
        with suppress(FileNotFoundError):
            inprogress.unlink()  # (a publication cut short before)
        return rows
    finally:
        os.close(fd)


def _create_journal(path: Path) -> tuple[int, pa.NativeFile, Any]:
    """A new journal at `path` (FileExistsError if there is one: never another writer's):
    its descriptor, holding the journal's lock (and kept for the fsync), a pyarrow file on
    it and the stream writer. It is made as `<path>.new`, which no one else reads or
    recovers, and renamed to `path` only once locked: a journal is never seen unlocked
    while its writer lives (another process's start() would publish and delete it).
    Nothing is left behind when a step fails."""
    if path.exists():
        raise FileExistsError(path)
    new = path.with_name(path.name + NEW)
    fd = os.open(new, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    ours = True  # `new` names the file `fd` is
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held until published
        except BlockingIOError:  # another start() took it for a leftover, in that instant
            raise FileExistsError(new) from None
        # Or it took it, removed it and let go between the open and the lock: the lock is
        # then on a file no one can find, and `new` may name another one by now.
        try:
            ours = os.path.samestat(os.fstat(fd), os.stat(new))
        except FileNotFoundError:
            ours = False
        if not ours:
            raise FileExistsError(new)
        # pyarrow writes to its own file object without the GIL; through a Python file
        # object every page write took the GIL back, and the event loop, on a shared
        # core, waited for it (up to 1.5 ms, measured).
        sink = pa.OSFile(str(new), "w")
        try:
            writer = pa.ipc.new_stream(sink, SCHEMA, options=JOURNAL_OPTIONS)
            os.link(new, path)  # (not rename: link fails, rather than replaces, if `path` appeared)
            with suppress(OSError):
                new.unlink()
            return fd, sink, writer
        except BaseException:
            sink.close()
            raise
    except BaseException:
        os.close(fd)
        if ours:
            with suppress(OSError):
                new.unlink()
        raise


def _write_parquet(table: pa.Table, path: Path) -> None:
    """Write `table` as one Parquet file at `path`, published as the log's files are
    (written as `.inprogress`, fsynced, renamed)."""
    partial_path = path.with_name(path.name + INPROGRESS)
    with pa.OSFile(str(partial_path), "w") as sink:
        with pq.ParquetWriter(sink, SCHEMA, compression=COMPRESSION, use_dictionary=DICTIONARY_COLUMNS,
                              write_statistics=STATISTICS_COLUMNS) as writer:
            writer.write_table(table, row_group_size=ROW_GROUP_ROWS)
    fd = os.open(partial_path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(partial_path, path)


def _table(rows: Sequence[AccessRecord]) -> pa.Table:
    columns: list[Sequence[object]] = list(zip(*rows))
    columns[0] = [round(t * 1_000_000) for t in columns[0]]  # float seconds -> microseconds
    arrays = [pa.array(column, type=field.type) for column, field in zip(columns, SCHEMA)]
    for field, array in zip(SCHEMA, arrays):
        # pyarrow does not enforce nullable=False; a null would break the file's contract.
        if not field.nullable and array.null_count:
            raise ValueError(f"access log: {field.name} is None")
    return pa.Table.from_arrays(arrays, schema=SCHEMA)


def _valid_rows_table(rows: Sequence[AccessRecord]) -> pa.Table:
    """The rows as a table; rows that do not fit the schema are left out."""
    try:
        return _table(rows)
    except (pa.ArrowException, TypeError, ValueError, OverflowError):
        pass
    # Rare (a caller bug): find the bad rows one by one rather than lose the batch.
    good = [row for row in rows if _fits(row)]
    return _table(good) if good else SCHEMA.empty_table()


def _fits(row: AccessRecord) -> bool:
    try:
        _table([row])
    except (pa.ArrowException, TypeError, ValueError, OverflowError):
        return False
    return True
