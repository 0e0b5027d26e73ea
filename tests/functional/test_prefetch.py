"""Parquet-aware prefetch, observed from outside: Sprox (a subprocess) in front of an
upstream that counts every request, and a client reading a Parquet object the way an
engine does (the tail, the footer, then column chunks row group by row group)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
import urllib.request

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.counting_upstream import CountingUpstream
from tests.data import object_bytes
from tests.functional.test_passthrough import raw

BLOCK = 64 * 1024
ROW_GROUPS = 6
ROWS = 20_000  # per row group: 160 KB per int64 column chunk (plain, uncompressed)
WAIT_SECONDS = 30.0


def parquet_bytes() -> bytes:
    table = pa.table({f"c{k}": pa.array([(i * 7919 + k * 104729) % (1 << 61) for i in range(ROW_GROUPS * ROWS)],
                                        pa.int64()) for k in range(4)})
    sink = io.BytesIO()
    pq.write_table(table, sink, row_group_size=ROWS, compression="none", use_dictionary=False)
    return sink.getvalue()


DATA = parquet_bytes()
META = pq.read_metadata(pa.BufferReader(DATA))


def chunk(row_group: int, column: int) -> tuple[int, int]:
    """(first, last) bytes of a column chunk."""
    c = META.row_group(row_group).column(column)
    return c.data_page_offset, c.data_page_offset + c.total_compressed_size - 1


@pytest.fixture
def upstream():
    with CountingUpstream() as server:
        server.put("bkt", "t.parquet", DATA)
        yield server


def start(start_sprox, tmp_path, upstream, *args):
    return start_sprox(tmp_path, "--upstream", upstream.endpoint, "--cache-dir", str(tmp_path / "cache"),
                       "--block-size", "64KiB", "--ttl", "3600", *args)


def metrics(proc) -> dict[str, float]:
    with urllib.request.urlopen(f"{proc.endpoint}/_sprox/metrics", timeout=20) as response:
        text = response.read().decode()
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values


def wait_for(proc, condition, what: str) -> dict[str, float]:
    """Polls Sprox's metrics until `condition(metrics)` holds (bounded)."""
    deadline = time.monotonic() + WAIT_SECONDS
    while True:
        m = metrics(proc)
        if condition(m):
            return m
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}: {m}")
        time.sleep(0.02)


def read(proc, key: str, first: int, last: int) -> tuple[bytes, str]:
    status, headers, body = raw(proc.endpoint, "GET", f"/bkt/{key}", {"Range": f"bytes={first}-{last}"})
    assert status == 206, body[:200]
    return body, headers["x-cache"]


def open_like_an_engine(proc) -> None:
    """The tail, then the footer, as engines read a Parquet file; then wait until Sprox
    has parsed the footer."""
    body, _ = read(proc, "t.parquet", len(DATA) - 8, len(DATA) - 1)
    length = int.from_bytes(body[:4], "little")
    read(proc, "t.parquet", len(DATA) - 8 - length, len(DATA) - 1)
    wait_for(proc, lambda m: m['sprox_prefetch_layouts_total{result="parsed"}'] == 1, "the footer's layout")


def idle(m: dict[str, float]) -> bool:
    return m["sprox_prefetch_in_flight_bytes"] == 0


def test_reading_a_column_chunk_prefetches_that_column_in_the_next_row_groups(start_sprox, tmp_path, upstream):
    proc = start(start_sprox, tmp_path, upstream)
    open_like_an_engine(proc)
    first, last = chunk(0, 1)
    body, _ = read(proc, "t.parquet", first, last)
    assert body == DATA[first:last + 1]
    # A first read is maybe a lookup: a few row groups ahead only.
    from sprox.cache.prefetch import FIRST_ROW_GROUPS_AHEAD

    m = wait_for(proc, lambda m: m["sprox_prefetch_requests_total"] >= 1 and idle(m), "the prefetch")
    fetched = m['sprox_prefetch_bytes_total{outcome="fetched"}']
    ahead = sum(chunk(rg, 1)[1] - chunk(rg, 1)[0] + 1 for rg in range(1, 1 + FIRST_ROW_GROUPS_AHEAD))
    assert ahead <= fetched <= ahead + 2 * FIRST_ROW_GROUPS_AHEAD * BLOCK
    upstream.reset_counts()
    first, last = chunk(1, 1)
    body, outcome = read(proc, "t.parquet", first, last)
    assert body == DATA[first:last + 1] and outcome == "HIT"
    # A prefetched chunk was read: a scan, followed to the last row group.
    wait_for(proc, lambda m: m['sprox_prefetch_bytes_total{outcome="fetched"}'] > fetched and idle(m),
             "the scan's prefetch")
    for rg in range(2, ROW_GROUPS):  # the scan goes on: every read is a hit
        first, last = chunk(rg, 1)
        body, outcome = read(proc, "t.parquet", first, last)
        assert body == DATA[first:last + 1]
        assert outcome == "HIT"
    # The prefetches the read of row group 1 set off: one GET per row group not yet fetched.
    assert upstream.count("GET") == ROW_GROUPS - 1 - FIRST_ROW_GROUPS_AHEAD
    # Another column was never read: nothing of it was prefetched.
    first, last = chunk(1, 3)
    assert read(proc, "t.parquet", first, last)[1] in ("MISS", "PARTIAL")
    m = wait_for(proc, lambda m: m['sprox_prefetch_bytes_total{outcome="used"}'] > 0, "used prefetched bytes")
    assert m['sprox_prefetch_bytes_total{outcome="wasted"}'] == 0
    assert m["sprox_prefetch_failures_total"] == 0


def test_a_client_asking_for_bytes_being_prefetched_joins_that_fetch(start_sprox, tmp_path, upstream):
    proc = start(start_sprox, tmp_path, upstream)
    open_like_an_engine(proc)
    upstream.slow_from, upstream.slow_seconds = chunk(0, 1)[1] + 1, 1.0  # the prefetches are slow
    upstream.reset_counts()
    first, last = chunk(0, 1)
    read(proc, "t.parquet", first, last)
    wait_for(proc, lambda m: m["sprox_prefetch_requests_total"] == 0 and m["sprox_prefetch_in_flight_bytes"] > 0,
             "prefetches in flight")
    for rg in (1, 2):  # asked for while being prefetched
        first, last = chunk(rg, 1)
        body, _ = read(proc, "t.parquet", first, last)
        assert body == DATA[first:last + 1]
    wait_for(proc, idle, "the prefetch")
    spans = sorted((int(a), int(b)) for a, b in (seen.range.removeprefix("bytes=").split("-")
                                                 for seen in upstream.seen if seen.method == "GET"))
    for (_, end), (begin, _) in zip(spans, spans[1:]):
        assert end < begin, f"bytes fetched twice: {spans}"


def test_prefetch_off_fetches_only_what_clients_read(start_sprox, tmp_path, upstream):
    proc = start(start_sprox, tmp_path, upstream, "--prefetch", "off")
    body, _ = read(proc, "t.parquet", len(DATA) - 8, len(DATA) - 1)
    first, last = chunk(0, 1)
    read(proc, "t.parquet", first, last)
    upstream.reset_counts()
    first, last = chunk(1, 1)
    body, outcome = read(proc, "t.parquet", first, last)
    assert body == DATA[first:last + 1] and outcome == "MISS"
    assert upstream.count("GET") == 1
    assert "sprox_prefetch_requests_total" not in metrics(proc)


@pytest.mark.parametrize("name,payload", [
    ("not Parquet", object_bytes("junk", 300_000)),
    ("a footer that lies about its offsets", b"PAR1" + DATA[-(int.from_bytes(DATA[-8:-4], "little") + 8):]),
    ("a length past the object", b"PAR1" + bytes(100) + (10**6).to_bytes(4, "little") + b"PAR1"),
])
def test_an_object_named_parquet_that_is_not_gets_no_prefetch_and_is_served_exactly(
        start_sprox, tmp_path, upstream, name, payload):
    upstream.put("bkt", "bad.parquet", payload)
    proc = start(start_sprox, tmp_path, upstream)
    status, _, body = raw(proc.endpoint, "GET", "/bkt/bad.parquet", {"Range": "bytes=-8"})
    assert status == 206 and body == payload[-8:]
    wait_for(proc, lambda m: m['sprox_prefetch_layouts_total{result="refused"}'] == 1
             or (m['sprox_prefetch_layouts_total{result="refused"}'] == 0 and len(payload) < 16),
             "the footer refused")
    upstream.reset_counts()
    status, _, body = raw(proc.endpoint, "GET", "/bkt/bad.parquet")
    assert status == 200 and body == payload
    status, _, body = raw(proc.endpoint, "GET", "/bkt/bad.parquet", {"Range": "bytes=5-70000"})
    assert status == 206 and body == payload[5:70001]
    m = metrics(proc)
    assert m["sprox_prefetch_requests_total"] == 0 or upstream.count("GET") <= 2
    assert m['sprox_prefetch_layouts_total{result="parsed"}'] == 0


def test_a_failed_prefetch_is_counted_and_never_a_clients_error(start_sprox, tmp_path, upstream):
    proc = start(start_sprox, tmp_path, upstream)
    open_like_an_engine(proc)
    upstream.fail_from = chunk(0, 1)[1] + 1  # every GET past the first chunk the client reads
    first, last = chunk(0, 1)
    body, _ = read(proc, "t.parquet", first, last)
    assert body == DATA[first:last + 1]
    wait_for(proc, lambda m: m["sprox_prefetch_failures_total"] >= 1 and idle(m), "the failed prefetch")
    upstream.fail_from = None
    for rg in (1, 2):
        first, last = chunk(rg, 1)
        body, _ = read(proc, "t.parquet", first, last)
        assert body == DATA[first:last + 1]


def test_the_report_shows_prefetched_bytes_used_and_wasted(start_sprox, tmp_path, upstream):
    proc = start(start_sprox, tmp_path, upstream)
    open_like_an_engine(proc)
    first, last = chunk(0, 2)
    read(proc, "t.parquet", first, last)
    wait_for(proc, lambda m: m["sprox_prefetch_requests_total"] >= 1 and idle(m), "the prefetch")
    first, last = chunk(1, 2)
    read(proc, "t.parquet", first, last)
    m = wait_for(proc, lambda m: m['sprox_prefetch_bytes_total{outcome="used"}'] > 0 and idle(m),
                 "used prefetched bytes")
    proc.stop()  # a clean stop writes what is buffered
    result = subprocess.run([sys.executable, "-m", "sprox", "report", "--cache-dir", str(tmp_path / "cache"),
                             "--format", "json"], capture_output=True, text=True, timeout=120,
                            env={**os.environ})
    assert result.returncode == 0, result.stderr
    prefetch = json.loads(result.stdout)["prefetch"]
    assert prefetch["requests"] == m["sprox_prefetch_requests_total"]
    assert prefetch["fetched_bytes"] == m['sprox_prefetch_bytes_total{outcome="fetched"}']
    assert prefetch["used_bytes"] >= m['sprox_prefetch_bytes_total{outcome="used"}'] > 0
    assert prefetch["failures"] == 0


def test_a_sequential_reader_of_other_objects_gets_read_ahead_and_a_random_one_does_not(
        start_sprox, tmp_path, upstream):
    from sprox.cache.prefetch import READ_AHEAD_BYTES

    size = 3 * READ_AHEAD_BYTES
    data = object_bytes("seq.bin", size)
    upstream.put("bkt", "seq.bin", data)
    upstream.put("bkt", "random.bin", object_bytes("random.bin", size))
    proc = start(start_sprox, tmp_path, upstream)
    step = 4 * BLOCK
    for offset in (0, step):  # the second read follows the first: a sequential reader
        body, outcome = read(proc, "seq.bin", offset, offset + step - 1)
        assert body == data[offset:offset + step] and outcome == "MISS"
    wait_for(proc, lambda m: m["sprox_prefetch_requests_total"] >= 1 and idle(m), "the read-ahead")
    upstream.reset_counts()
    for offset in range(2 * step, 2 * READ_AHEAD_BYTES, step):  # the window moves on with the reader
        body, _ = read(proc, "seq.bin", offset, offset + step - 1)
        assert body == data[offset:offset + step]
        wait_for(proc, idle, "the read-ahead")
    client_misses = [s for s in upstream.seen if s.method == "GET" and s.range.startswith("bytes=")]
    assert len(client_misses) <= 3, "reads ahead come in windows, not per read"
    m = metrics(proc)
    assert m['sprox_prefetch_bytes_total{outcome="used"}'] > 0
    # Reads that do not follow each other get nothing more than they asked for.
    upstream.reset_counts()
    before = m["sprox_prefetch_requests_total"]
    for offset in (5 * step, 1 * step, 9 * step, 3 * step):
        read(proc, "random.bin", offset, offset + 1000)
    assert upstream.count("GET") == 4
    assert metrics(proc)["sprox_prefetch_requests_total"] == before
