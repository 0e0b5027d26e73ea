"""AccessLog: records buffered on the loop, written to rotating Parquet files off it.

Each test drives a real AccessLog in `tmp_path` under `asyncio.run` (no plugin). An
autouse guard fails any file-system call made on the event loop thread, so the test's
own looks at the directory go through `asyncio.to_thread`; another fails the test if a
writer thread outlives it. Waits poll a condition against a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import re
import threading
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sprox.analytics import accesslog
from sprox.analytics.accesslog import SCHEMA, AccessLog, AccessRecord, read_access_log, read_journal

FILE_NAME = re.compile(r"access-\d{8}T\d{6}Z-(\d+)-(\d{6})\.parquet")
# What the writer thread writes to (the journal); tests make its disk slow or full.
JOURNAL_WRITER = pa.ipc.RecordBatchStreamWriter

from tests.guards import no_blocking_on_loop  # noqa: E402,F401  (autouse: applies to this module)
from tests.waiting import until  # noqa: E402


@pytest.fixture(autouse=True)
def no_leaked_writer_thread():
    yield
    leaked = [t.name for t in threading.enumerate() if t.name.startswith("sprox-accesslog")]
    assert not leaked, leaked


def open_files() -> set[str]:
    """What this process's file descriptors point at (Linux), or nothing elsewhere."""
    if not os.path.isdir("/proc/self/fd"):
        return set()
    links = set()
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(FileNotFoundError):  # the listing's own fd, now closed
            links.add(os.readlink(f"/proc/self/fd/{fd}"))
    return links


def rec(i: int, **changes) -> AccessRecord:
    """A record whose every field is a function of i."""
    fields = dict(
        time=1_700_000_000 + i / 1000, request_id=f"req-{i:04d}", operation="GetObject",
        bucket="bucket", key=f"dir/obj-{i}", range=f"bytes={i}-{i + 99}", status=206,
        bytes_sent=100 + i, cache="HIT", upstream_requests=i % 3, upstream_bytes=2**40 + i,
        latency_ms=i + 0.25, user_agent="aws-cli/2.15", access_key="AKIDTEST",
    )
    return AccessRecord(**{**fields, **changes})


def as_row(record: AccessRecord) -> dict:
    """What reading a record back must give: its fields, time as a UTC datetime."""
    micros = round(record.time * 1_000_000)
    epoch = datetime(1970, 1, 1, tzinfo=timezone.utc)
    return {**record._asdict(), "time": epoch + timedelta(microseconds=micros)}


def names(directory: Path) -> list[str]:
    return sorted(path.name for path in directory.iterdir())


async def complete_files(directory: Path) -> list[str]:
    return [n for n in await asyncio.to_thread(names, directory) if n.endswith(".parquet")]


async def has_complete_files(directory: Path, count: int) -> bool:
    return len(await complete_files(directory)) == count


def read_back(directory: Path) -> list[dict]:
    table = read_access_log(directory)
    assert table.schema.equals(SCHEMA, check_metadata=True)
    return table.to_pylist()


# --- schema --------------------------------------------------------------------------


def test_record_fields_are_the_schema_columns_in_order():
    assert AccessRecord._fields == tuple(SCHEMA.names)
    assert SCHEMA.field("time").type == pa.timestamp("us", tz="UTC")
    assert SCHEMA.metadata == {b"sprox.accesslog.version": b"2"}
    required = {f.name for f in SCHEMA if not f.nullable}
    assert required == {"time", "request_id", "operation", "status", "bytes_sent",
                        "upstream_requests", "upstream_bytes", "latency_ms"}


def test_read_access_log_of_an_empty_directory_is_an_empty_table(tmp_path):
    assert read_access_log(tmp_path).schema.equals(SCHEMA, check_metadata=True)
    assert read_access_log(tmp_path).num_rows == 0


# --- round trip ----------------------------------------------------------------------


def test_records_round_trip_exactly(tmp_path):
    records = [
        rec(0),
        rec(1, key="ключ/日本語/emoji-🎉/a/../b/ space+plus%20", bucket="bücket"),
        rec(2, bucket=None, key=None, range=None, cache=None, user_agent=None,
            access_key=None, operation="ListBuckets", status=200, upstream_requests=0),
        rec(3, status=503, bytes_sent=0, upstream_bytes=0, latency_ms=0.0, cache="BYPASS"),
        rec(4, time=1_712_345_678.123456, bytes_sent=2**62, upstream_bytes=2**63 - 1,
            upstream_requests=2**31 - 1, latency_ms=1e9 + 0.5, key="", range="bytes=-0"),
        rec(5, user_agent="line\nbreak\x00nul", cache="PARTIAL", status=32767),
    ]

    async def scenario():
        log = AccessLog(tmp_path)
        await log.start()
        for record in records:
            log.record(record)
        await log.close()
        assert (log.written, log.dropped, log.write_errors) == (len(records), 0, 0)

    asyncio.run(scenario())
    assert read_back(tmp_path) == [as_row(r) for r in records]
    [name] = names(tmp_path)
    assert FILE_NAME.fullmatch(name) and FILE_NAME.fullmatch(name).group(1) == str(os.getpid())
    # Types as stored in the Parquet file itself, for readers other than pyarrow.
    parquet_schema = pq.read_metadata(tmp_path / name).schema
    time_type = json.loads(parquet_schema.column(0).logical_type.to_json())
    assert (time_type["Type"], time_type["isAdjustedToUTC"], time_type["timeUnit"]) == \
        ("Timestamp", True, "microseconds")
    status_type = json.loads(parquet_schema.column(6).logical_type.to_json())
    assert (status_type["Type"], status_type["bitWidth"]) == ("Int", 16)


def batch_of(records: list[AccessRecord]) -> pa.RecordBatch:
    return pa.RecordBatch.from_pylist([as_row(r) for r in records], schema=SCHEMA)


def test_the_kernels_batches_are_written_beside_single_records(tmp_path):
    """record_batch (the hit kernel's drained ring, as Arrow columns) lands in the same
    row groups as record()'s records, wakes the flush at flush_rows, and is counted as
    dropped after close."""
    records = [rec(i) for i in range(30)]

    async def scenario():
        log = AccessLog(tmp_path, flush_rows=10, flush_seconds=3600)
        log.record_batch(batch_of(records[:5]))  # before start: buffered
        await log.start()
        log.record(records[5])
        log.record_batch(batch_of(records[6:]))
        await until(lambda: log.written == 30, what="the batches written")
        await log.close()
        log.record_batch(batch_of(records[:3]))  # after close: dropped, counted
        assert (log.written, log.dropped) == (30, 3)

    asyncio.run(scenario())
    assert sorted(read_back(tmp_path), key=lambda row: row["request_id"]) == [as_row(r) for r in records]


def test_batches_over_the_buffer_push_the_oldest_rows_out(tmp_path):
    """Batches are bounded as records are (flush_rows x BUFFER_FLUSHES rows): the
    oldest rows go first, counted as dropped; what stays is written."""
    records = [rec(i) for i in range(35)]

    async def scenario():
        assert accesslog.BUFFER_FLUSHES == 10
        log = AccessLog(tmp_path, flush_rows=2, flush_seconds=3600)  # holds 20 rows
        for first in range(0, 35, 7):  # not yet started: nothing is flushed
            log.record_batch(batch_of(records[first:first + 7]))
        assert log.dropped == 15
        await log.start()
        await until(lambda: log.written == 20, what="what stayed, written")
        await log.close()

    asyncio.run(scenario())
    assert read_back(tmp_path) == [as_row(r) for r in records[15:]]


# --- flushing ------------------------------------------------------------------------


def test_flush_on_row_count(tmp_path):
    async def scenario():
        log = AccessLog(tmp_path, flush_rows=5, flush_seconds=3600)
        await log.start()
        for i in range(4):
            log.record(rec(i))
        await asyncio.sleep(0)
        assert log.written == 0
        log.record(rec(4))
        await until(lambda: log.written == 5, what="a flush after 5 rows")
        # Readable at once, from the journal of the file not published yet.
        assert await asyncio.to_thread(read_back, tmp_path) == [as_row(rec(i)) for i in range(5)]
        for i in range(5, 7):
            log.record(rec(i))
        await log.close()
        assert log.written == 7

    asyncio.run(scenario())
    [name] = names(tmp_path)
    assert FILE_NAME.fullmatch(name)
    assert read_back(tmp_path) == [as_row(rec(i)) for i in range(7)]


def test_flush_on_time(tmp_path):
    async def scenario():
        log = AccessLog(tmp_path, flush_rows=1000, flush_seconds=0.02)
        await log.start()
        for i in range(3):
            log.record(rec(i))
        await until(lambda: log.written == 3, what="a timed flush")
        await log.close()

    asyncio.run(scenario())
    assert read_back(tmp_path) == [as_row(rec(i)) for i in range(3)]


def test_each_flush_is_one_batch_of_one_journal_published_as_one_file(tmp_path):
    async def scenario():
        log = AccessLog(tmp_path, flush_seconds=3600)
        await log.start()
        for batch in range(3):
            for i in range(batch * 10, batch * 10 + 10):
                log.record(rec(i))
            await log.flush()
        await log.flush()  # nothing buffered: no empty batch
        [journal] = await asyncio.to_thread(names, tmp_path)
        assert journal.endswith(".journal")
        table = await asyncio.to_thread(read_journal, tmp_path / journal)
        assert table.column(0).num_chunks == 3
        await log.close()

    asyncio.run(scenario())
    [name] = names(tmp_path)
    assert FILE_NAME.fullmatch(name)
    assert read_back(tmp_path) == [as_row(rec(i)) for i in range(30)]


# --- rotation ------------------------------------------------------------------------


def test_rotation_by_size(tmp_path):
    async def scenario():
        log = AccessLog(tmp_path, flush_seconds=3600, rotate_bytes=1)
        await log.start()
        for batch in range(3):
            for i in range(batch * 4, batch * 4 + 4):
                log.record(rec(i))
            await log.flush()
            # Over rotate_bytes after the write: closed, then published (idle priority).
            await until(lambda: has_complete_files(tmp_path, batch + 1), what="a size rotation")
        await log.close()

    asyncio.run(scenario())
    files = names(tmp_path)
    assert len(files) == 3 and all(FILE_NAME.fullmatch(n) for n in files)
    assert [FILE_NAME.fullmatch(n).group(2) for n in files] == ["000000", "000001", "000002"]
    for batch, name in enumerate(files):
        rows = pq.read_table(tmp_path / name).to_pylist()
        assert rows == [as_row(rec(i)) for i in range(batch * 4, batch * 4 + 4)]
    assert read_back(tmp_path) == [as_row(rec(i)) for i in range(12)]


def test_rotation_by_time(tmp_path):
    async def scenario():
        log = AccessLog(tmp_path, flush_seconds=0.01, rotate_seconds=0.05)
        await log.start()
        for batch in range(3):
            for i in range(batch * 4, batch * 4 + 4):
                log.record(rec(i))
            # The periodic flush writes the batch, then closes the file once it is old.
            await until(lambda: has_complete_files(tmp_path, batch + 1), what="a time rotation")
        await log.close()

    asyncio.run(scenario())
    files = names(tmp_path)
    assert len(files) == 3 and all(FILE_NAME.fullmatch(n) for n in files)
    for batch, name in enumerate(files):
        rows = pq.read_table(tmp_path / name).to_pylist()
        assert rows == [as_row(rec(i)) for i in range(batch * 4, batch * 4 + 4)]
    assert read_back(tmp_path) == [as_row(rec(i)) for i in range(12)]


def test_file_names_never_collide(tmp_path, monkeypatch):
    monkeypatch.setattr(accesslog, "_utc_stamp", lambda: "20240101T000000Z")
    taken = [f"access-20240101T000000Z-{os.getpid()}-000000.parquet",
             f"access-20240101T000000Z-{os.getpid()}-000001.parquet.inprogress"]
    for name in taken:
        (tmp_path / name).write_bytes(b"not ours")

    async def scenario():
        log = AccessLog(tmp_path)
        await log.start()
        log.record(rec(0))
        await log.close()

    asyncio.run(scenario())
    assert names(tmp_path) == sorted([*taken, f"access-20240101T000000Z-{os.getpid()}-000002.parquet"])
    for name in taken:
        assert (tmp_path / name).read_bytes() == b"not ours"


# --- lifecycle -----------------------------------------------------------------------


def test_close_leaves_no_inprogress_file_task_or_thread(tmp_path):
    async def scenario():
        log = AccessLog(tmp_path, flush_seconds=0.01)
        await log.start()
        log.record(rec(0))
        await until(lambda: log.written == 1, what="a timed flush")
        assert any(n.endswith(".journal") for n in await asyncio.to_thread(names, tmp_path))
        assert any(t.name.startswith("sprox-accesslog") for t in threading.enumerate())
        await log.close()
        await log.close()  # idempotent
        assert asyncio.all_tasks() == {asyncio.current_task()}
        assert not [t for t in threading.enumerate() if t.name.startswith("sprox-accesslog")]
        log.record(rec(1))
        await log.flush()  # after close: nothing to do, no error
        assert (log.written, log.dropped) == (1, 1)

    asyncio.run(scenario())
    assert not {f for f in open_files() if f.startswith(str(tmp_path))}
    [name] = names(tmp_path)
    assert FILE_NAME.fullmatch(name)


def test_close_without_start_counts_buffered_records_as_dropped(tmp_path):
    async def scenario():
        log = AccessLog(tmp_path / "never")
        log.record(rec(0))
        await log.close()
        assert (log.written, log.dropped) == (0, 1)

    asyncio.run(scenario())
    assert names(tmp_path) == []


def test_start_creates_the_directory_and_names_stale_inprogress_files(tmp_path, caplog):
    directory = tmp_path / "a" / "b"
    directory.mkdir(parents=True)
    stale = directory / "access-20200101T000000Z-1-000000.parquet.inprogress"
    stale.write_bytes(b"PAR1 torn")

    async def scenario():
        log = AccessLog(directory)
        await log.start()
        log.record(rec(0))
        await log.close()

    with caplog.at_level(logging.WARNING, logger="sprox.accesslog"):
        asyncio.run(scenario())
    assert stale.name in caplog.text
    assert stale.read_bytes() == b"PAR1 torn"  # never deleted, never read
    assert read_back(directory) == [as_row(rec(0))]


def test_start_fails_when_the_directory_cannot_be_created(tmp_path):
    (tmp_path / "file").write_bytes(b"")

    async def scenario():
        log = AccessLog(tmp_path / "file" / "logs")
        with pytest.raises(OSError):
            await log.start()

    asyncio.run(scenario())


@pytest.mark.parametrize("setting", ["flush_rows", "flush_seconds", "rotate_bytes", "rotate_seconds"])
def test_settings_must_be_positive(tmp_path, setting):
    with pytest.raises(ValueError, match=setting):
        AccessLog(tmp_path, **{setting: 0})


# --- never on the loop ---------------------------------------------------------------


def test_record_does_no_io_and_all_writing_runs_on_one_writer_thread(tmp_path, monkeypatch):
    calls: list[tuple[str, threading.Thread]] = []

    def spy(owner, name):
        function = getattr(owner, name)

        def spied(*args, **kwargs):
            calls.append((name, threading.current_thread()))
            return function(*args, **kwargs)
        monkeypatch.setattr(owner, name, spied)

    for name in ["__init__", "write_table", "close"]:
        spy(pq.ParquetWriter, name)
    for name in ["rename", "fsync", "fdatasync"]:
        spy(os, name)
    journal_write = JOURNAL_WRITER.write_table

    def journal_spy(self, table, max_chunksize=None):
        calls.append(("journal", threading.current_thread()))
        return journal_write(self, table, max_chunksize)
    monkeypatch.setattr(JOURNAL_WRITER, "write_table", journal_spy)

    async def scenario():
        log = AccessLog(tmp_path, flush_rows=2, flush_seconds=3600, rotate_bytes=1)
        await log.start()
        for i in range(5):
            log.record(rec(i))  # passes flush_rows: schedules a flush, does not run it
        assert calls == []
        await until(lambda: log.written >= 2, what="the count-triggered flush")
        await log.close()
        return threading.current_thread()

    loop_thread = asyncio.run(scenario())
    assert {name for name, _ in calls} == {"journal", "fdatasync", "__init__", "write_table", "close", "rename",
                                           "fsync"}
    # Journals on the writer thread; their publication as Parquet on the publisher's.
    (writer,) = {thread for name, thread in calls if name in ("journal", "fdatasync")}
    (publisher,) = {thread for name, thread in calls if name not in ("journal", "fdatasync")}
    assert writer.name.startswith("sprox-accesslog_") and publisher.name.startswith("sprox-accesslog-publish")
    assert loop_thread not in (writer, publisher)
    assert read_back(tmp_path) == [as_row(rec(i)) for i in range(5)]


def test_the_writer_stays_out_of_the_loops_way(tmp_path, monkeypatch):
    """The journal's writer thread runs at a lower priority than the loop, and pyarrow
    writes to its own file object (a Python one would take the GIL back for every page);
    publishing as Parquet runs only when the CPU is otherwise idle. On a core shared with
    the event loop, each showed as stalls in the hits' p99. Files keep min/max statistics
    for `time` only, and are still read whole."""
    seen: dict[str, object] = {}
    init = pq.ParquetWriter.__init__
    create = accesslog._create_journal

    def spied_init(self, where, *args, **kwargs):
        seen.setdefault("policy", os.sched_getscheduler(0))
        init(self, where, *args, **kwargs)

    def spied_create(path):
        fd, sink, writer = create(path)
        seen["sink"] = sink
        seen["nice"] = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        return fd, sink, writer
    monkeypatch.setattr(pq.ParquetWriter, "__init__", spied_init)
    monkeypatch.setattr(accesslog, "_create_journal", spied_create)

    async def scenario():
        log = AccessLog(tmp_path, flush_seconds=3600, rotate_bytes=1)
        await log.start()
        for i in range(20):
            log.record(rec(i))
        await log.flush()  # one journal, due for rotation: published while the log runs
        await until(lambda: has_complete_files(tmp_path, 1), what="the publication")
        await log.close()
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    loop_nice = asyncio.run(scenario())
    assert seen["nice"] == max(loop_nice, accesslog.WRITER_NICE)
    assert isinstance(seen["sink"], pa.NativeFile)
    assert seen["policy"] == os.SCHED_IDLE  # (close() publishes what is left at the normal priority)
    [name] = names(tmp_path)
    row_group = pq.read_metadata(tmp_path / name).row_group(0)
    with_statistics = {row_group.column(i).path_in_schema for i in range(row_group.num_columns)
                       if row_group.column(i).is_stats_set}
    assert with_statistics == {"time"}
    assert read_back(tmp_path) == [as_row(rec(i)) for i in range(20)]


# --- failures ------------------------------------------------------------------------


def test_a_failing_write_is_counted_not_raised(tmp_path, monkeypatch, caplog):
    write_table = JOURNAL_WRITER.write_table

    def disk_full(self, table, max_chunksize=None):
        raise OSError(errno.ENOSPC, "No space left on device")

    async def scenario():
        log = AccessLog(tmp_path, flush_seconds=3600)
        await log.start()
        log.record(rec(0))
        await log.flush()  # a good batch in the first journal, which the failure closes early
        monkeypatch.setattr(JOURNAL_WRITER, "write_table", disk_full)
        for i in range(1, 4):
            log.record(rec(i))
        await log.flush()
        assert (log.written, log.dropped, log.write_errors) == (1, 3, 1)
        assert not log._task.done()  # the periodic flush lives on
        monkeypatch.setattr(JOURNAL_WRITER, "write_table", write_table)
        for i in range(4, 6):
            log.record(rec(i))
        await log.close()
        assert (log.written, log.dropped, log.write_errors) == (3, 3, 1)

    with caplog.at_level(logging.WARNING, logger="sprox.accesslog"):
        asyncio.run(scenario())
    assert not {f for f in open_files() if f.startswith(str(tmp_path))}  # the closed journal too
    assert "No space left on device" in caplog.text and "early after a write error" in caplog.text
    # What the first journal held before the failure was published all the same.
    files = names(tmp_path)
    assert len(files) == 2 and all(FILE_NAME.fullmatch(n) for n in files)
    assert read_back(tmp_path) == [as_row(rec(i)) for i in (0, 4, 5)]


def test_an_unwritable_directory_is_counted_not_raised(tmp_path):
    # Replacing the directory by a file fails every open, even for root (chmod would not).
    directory = tmp_path / "logs"

    async def scenario():
        log = AccessLog(directory, flush_seconds=3600)
        await log.start()
        await asyncio.to_thread(directory.rmdir)
        await asyncio.to_thread((tmp_path / "logs").write_bytes, b"")
        log.record(rec(0))
        await log.flush()
        assert (log.written, log.dropped, log.write_errors) == (0, 1, 1)
        await asyncio.to_thread((tmp_path / "logs").unlink)
        await asyncio.to_thread(directory.mkdir)
        log.record(rec(1))
        await log.close()
        assert (log.written, log.dropped, log.write_errors) == (1, 1, 1)

    asyncio.run(scenario())
    assert read_back(directory) == [as_row(rec(1))]


def test_a_record_that_does_not_fit_the_schema_is_dropped_alone(tmp_path, caplog):
    bad = [rec(1, status=None), rec(2, status=70_000), rec(3, time=None),
           rec(4, bytes_sent="many"), rec(5, request_id=None)]

    async def scenario():
        log = AccessLog(tmp_path)
        await log.start()
        log.record(rec(0))
        for record in bad:
            log.record(record)
        log.record(rec(6))
        await log.close()
        assert (log.written, log.dropped, log.write_errors) == (2, len(bad), 0)

    asyncio.run(scenario())
    assert "does not fit the schema" in caplog.text
    assert read_back(tmp_path) == [as_row(rec(0)), as_row(rec(6))]


def test_the_buffer_is_bounded_and_drops_the_oldest(tmp_path, monkeypatch, caplog):
    write_table = JOURNAL_WRITER.write_table
    entered, release = threading.Event(), threading.Event()

    def slow_disk(self, table, max_chunksize=None):
        entered.set()
        assert release.wait(10)
        return write_table(self, table, max_chunksize)

    monkeypatch.setattr(JOURNAL_WRITER, "write_table", slow_disk)

    async def scenario():
        log = AccessLog(tmp_path, flush_rows=2, flush_seconds=3600)
        await log.start()
        log.record(rec(0))
        log.record(rec(1))
        await until(entered.is_set, what="the first write to start")
        for i in range(100, 125):  # while the writer is stuck: capacity is 10 * 2
            log.record(rec(i))
        assert log.dropped == 5
        release.set()
        await until(lambda: log.written == 22, what="the backlog to be written")
        await log.close()
        assert (log.written, log.dropped, log.write_errors) == (22, 5, 0)

    with caplog.at_level(logging.WARNING, logger="sprox.accesslog"):
        asyncio.run(scenario())
    assert "5 record(s) dropped" in caplog.text
    expected = [rec(0), rec(1), *(rec(i) for i in range(105, 125))]
    assert read_back(tmp_path) == [as_row(r) for r in expected]


def test_drop_warnings_are_rate_limited(tmp_path, caplog):
    async def scenario():
        log = AccessLog(tmp_path, flush_rows=1, flush_seconds=3600)
        await log.start()
        for _ in range(3):
            for i in range(12):  # no await in between: nothing drains the buffer of 10
                log.record(rec(i))
            await log.flush()
        await log.close()
        assert (log.written, log.dropped) == (30, 6)

    with caplog.at_level(logging.WARNING, logger="sprox.accesslog"):
        asyncio.run(scenario())
    assert caplog.text.count("dropped") == 1


def test_cancelling_a_flush_neither_loses_nor_miscounts_its_rows(tmp_path, monkeypatch):
    write_table = JOURNAL_WRITER.write_table
    entered, release = threading.Event(), threading.Event()

    def slow_disk(self, table, max_chunksize=None):
        entered.set()
        assert release.wait(10)
        return write_table(self, table, max_chunksize)

    monkeypatch.setattr(JOURNAL_WRITER, "write_table", slow_disk)

    async def scenario():
        log = AccessLog(tmp_path, flush_seconds=3600)
        await log.start()
        for i in range(3):
            log.record(rec(i))
        flush = asyncio.create_task(log.flush())
        await until(entered.is_set, what="the write to start")
        flush.cancel()
        with pytest.raises(asyncio.CancelledError):
            await flush
        release.set()
        await log.close()
        assert (log.written, log.dropped) == (3, 0)

    asyncio.run(scenario())
    assert read_back(tmp_path) == [as_row(rec(i)) for i in range(3)]


def test_many_records_keep_their_order(tmp_path):
    count = 25_000

    async def scenario():
        log = AccessLog(tmp_path, flush_rows=1000, flush_seconds=0.01, rotate_bytes=64 * 1024)
        await log.start()
        for i in range(count):
            log.record(rec(i))
            if i % 1000 == 0:
                await log.flush()  # keep pace, so the bounded buffer never drops here
        await log.close()
        assert (log.written, log.dropped, log.write_errors) == (count, 0, 0)

    asyncio.run(scenario())
    assert len(names(tmp_path)) > 1
    table = read_access_log(tmp_path)
    assert table.column("request_id").to_pylist() == [f"req-{i:04d}" for i in range(count)]


def test_version_1_files_read_with_the_new_columns_null(tmp_path: Path):
    v1 = pa.schema([f for f in SCHEMA if f.name not in ("first_byte", "object_size")],
                   metadata={"sprox.accesslog.version": "1"})
    row = dict(time=datetime(2026, 1, 1, tzinfo=timezone.utc), request_id="r",
               operation="GetObject", bucket="b", key="k", range=None, status=200, bytes_sent=5, cache="HIT",
               upstream_requests=0, upstream_bytes=0, latency_ms=1.0, user_agent=None, access_key=None)
    pq.write_table(pa.Table.from_pylist([row], schema=v1), tmp_path / "access-20260101T000000Z-1-000001.parquet")
    (got,) = read_back(tmp_path)
    assert got["bytes_sent"] == 5 and got["first_byte"] is None and got["object_size"] is None


def test_a_failed_publication_keeps_the_journal_readable_until_the_next_start(tmp_path, monkeypatch, caplog):
    write_parquet = accesslog._write_parquet

    def disk_full(table, path):
        raise OSError(errno.ENOSPC, "No space left on device")

    async def run(records):
        log = AccessLog(tmp_path, flush_seconds=3600)
        await log.start()
        for r in records:
            log.record(r)
        await log.close()
        return log

    monkeypatch.setattr(accesslog, "_write_parquet", disk_full)
    with caplog.at_level(logging.ERROR, logger="sprox.accesslog"):
        log = asyncio.run(run([rec(i) for i in range(3)]))
    assert log.publish_errors == 1 and "published at the next start" in caplog.text
    assert [n for n in names(tmp_path) if n.endswith(".journal")]
    assert read_back(tmp_path) == [as_row(rec(i)) for i in range(3)]  # read from the journal
    monkeypatch.setattr(accesslog, "_write_parquet", write_parquet)
    asyncio.run(run([rec(3)]))
    files = names(tmp_path)
    assert len(files) == 2 and all(FILE_NAME.fullmatch(n) for n in files)
    assert read_back(tmp_path) == [as_row(rec(i)) for i in range(4)]


def test_a_journal_is_locked_before_it_has_its_name(tmp_path, monkeypatch):
    """Another process's start() publishes and deletes every unlocked journal: the
    writer's journal must never be one, not even in the instant after its creation."""
    seen = []
    real_link = os.link

    def link(src, dst, *args, **kwargs):  # the instant the journal gets its name (writer thread)
        fd = os.open(src, os.O_RDONLY)
        try:
            with pytest.raises(BlockingIOError):
                accesslog.fcntl.flock(fd, accesslog.fcntl.LOCK_EX | accesslog.fcntl.LOCK_NB)
            seen.append(Path(dst).name)
        finally:
            os.close(fd)
        return real_link(src, dst, *args, **kwargs)

    def journals() -> list[str]:
        return [n for n in names(tmp_path) if n.endswith(".journal")]

    async def scenario():
        log = AccessLog(tmp_path, flush_seconds=3600)
        await log.start()
        log.record(rec(0))
        await log.flush()
        # A second process starting in the same directory leaves the live journal alone.
        other = AccessLog(tmp_path, flush_seconds=3600)
        await other.start()
        await other.close()
        assert await asyncio.to_thread(journals) == seen
        log.record(rec(1))
        await log.close()

    monkeypatch.setattr(accesslog.os, "link", link)
    asyncio.run(scenario())
    assert len(seen) == 1 and seen[0].endswith(".journal")
    assert read_back(tmp_path) == [as_row(rec(0)), as_row(rec(1))]
    assert not [n for n in names(tmp_path) if not n.endswith(".parquet")]


def test_a_journal_removed_before_its_writer_locked_it_is_made_again(tmp_path, monkeypatch):
    """Another process's start() removes the writer's `.journal.new` between its
    creation and its lock (an unlocked leftover, to that process): the writer must not
    lock the removed file and take a new one of the same name, unlocked, as its journal
    (a third start() would publish and delete it, and the records after it be lost)."""
    real_flock = accesslog.fcntl.flock
    raced = []

    def flock(fd, operation):
        name = os.readlink(f"/proc/self/fd/{fd}")
        if not raced and name.endswith(".journal.new"):
            raced.append(name)
            os.unlink(name)  # the other process, in that instant
        return real_flock(fd, operation)

    def live_journal_is_locked() -> bool:
        [journal] = [n for n in names(tmp_path) if n.endswith(".journal")]
        fd = os.open(tmp_path / journal, os.O_RDONLY)
        try:
            real_flock(fd, accesslog.fcntl.LOCK_EX | accesslog.fcntl.LOCK_NB)
            return False
        except BlockingIOError:
            return True
        finally:
            os.close(fd)

    async def scenario():
        log = AccessLog(tmp_path, flush_seconds=3600)
        await log.start()
        log.record(rec(0))
        await log.flush()
        assert raced and await asyncio.to_thread(live_journal_is_locked)
        other = AccessLog(tmp_path, flush_seconds=3600)  # a third start leaves it alone
        await other.start()
        await other.close()
        log.record(rec(1))
        await log.close()

    monkeypatch.setattr(accesslog.fcntl, "flock", flock)
    asyncio.run(scenario())
    assert read_back(tmp_path) == [as_row(rec(0)), as_row(rec(1))]
    assert not [n for n in names(tmp_path) if not n.endswith(".parquet")]


def test_a_journal_creation_cut_short_is_removed_at_the_next_start_unless_in_progress(tmp_path):
    dead = tmp_path / "access-20260101T000000Z-1-000000.journal.new"
    live = tmp_path / "access-20260101T000000Z-2-000000.journal.new"
    dead.write_bytes(b"")
    live.write_bytes(b"")
    fd = os.open(live, os.O_RDONLY)
    try:
        accesslog.fcntl.flock(fd, accesslog.fcntl.LOCK_EX)  # its creator is at work

        async def scenario():
            log = AccessLog(tmp_path)
            await log.start()
            await log.close()

        asyncio.run(scenario())
        assert names(tmp_path) == [live.name]
        assert read_access_log(tmp_path).num_rows == 0  # never read as a journal
    finally:
        os.close(fd)


def test_a_journal_published_while_the_log_is_read_is_read_from_its_parquet_file(tmp_path, monkeypatch):
    journal = tmp_path / "access-20260101T000000Z-1-000000.journal"
    fd, sink, writer = accesslog._create_journal(journal)
    writer.write_table(accesslog._table([rec(i) for i in range(3)]))
    writer.close()
    sink.close()
    real_glob = Path.glob

    def glob(self, pattern):  # the publisher runs right after the reader listed the journals
        found = list(real_glob(self, pattern))
        if pattern.endswith(".journal") and journal.exists():
            accesslog.publish_journal(journal, fd)
        return iter(found)

    monkeypatch.setattr(Path, "glob", glob)
    assert read_back(tmp_path) == [as_row(rec(i)) for i in range(3)]
    monkeypatch.setattr(Path, "glob", real_glob)
    assert names(tmp_path) == ["access-20260101T000000Z-1-000000.parquet"]
