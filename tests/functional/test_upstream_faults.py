"""Upstream faults, injected on real sockets between Sprox and its upstream.

    client -> Sprox (subprocess) -> FaultProxy (tests/faultproxy.py) -> CountingUpstream

For every fault, what a user must see:
  - a fault before any byte reached the client is retried (GET and HEAD have no body
    to replay) and the answer is exact, or, once the retries are spent, an S3 XML
    error with a RequestId;
  - a fault after the headers left is a response cut short (the connection closes
    before Content-Length is reached), so client libraries raise; never a silent
    short body, never bytes of two versions;
  - --upstream-timeout bounds a stall: an error or a cut, about the timeout later;
  - nothing partial or wrong is ever published to the cache: once the fault is gone
    every byte read is exact, and every block the index names holds exactly the
    object's bytes (checked against the self-checking data, and by `sprox cache verify`).
"""

from __future__ import annotations

import asyncio
import http.client
import sqlite3
import time
import xml.etree.ElementTree as ET
import zlib
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

import aiohttp
import pytest

from sprox.cache import admin
from sprox.cache.records import ObjectRecord
from sprox.upstream.s3 import MAX_ATTEMPTS
from tests.counting_upstream import CountingUpstream
from tests.data import check_bytes, object_bytes
from tests.faultproxy import Fault, FaultProxy
from tests.servers import s3_client

BLOCK = 64 * 1024
SIZE = 5 * BLOCK + 12_345  # six blocks, the last one short
BUCKET = "bkt"
TIMEOUT = 10.0  # --upstream-timeout where no stall is injected
STALL_TIMEOUT = 1.0  # --upstream-timeout where one is
SLACK = 2.0  # seconds a loaded 2-core machine may add to any deadline here
MODES = ["cache", "no-cache"]


@pytest.fixture
def upstream():
    with CountingUpstream() as server:
        yield server


@pytest.fixture
def proxy(upstream):
    with FaultProxy(upstream.endpoint) as faults:
        yield faults


@dataclass
class Origin:
    upstream: CountingUpstream
    proxy: FaultProxy

    def put(self, key: str, size: int = SIZE, *, data_name: str | None = None) -> str:
        return self.upstream.put(BUCKET, key, object_bytes(data_name or key, size))


@pytest.fixture
def origin(upstream, proxy) -> Origin:
    return Origin(upstream, proxy)


class Sprox:
    """A Sprox subprocess in front of the fault proxy, in one mode."""

    def __init__(self, start_sprox, tmp_path: Path, origin: Origin, mode: str, timeout: float = TIMEOUT):
        self.mode = mode
        self.cache_dir = tmp_path / "cache"
        args = ["--upstream", origin.proxy.endpoint, "--upstream-timeout", str(timeout), "--block-size", "64KiB"]
        args += ["--cache-dir", str(self.cache_dir), "--ttl", "3600"] if mode == "cache" else ["--no-cache"]
        self.proc = start_sprox(tmp_path, *args)

    @property
    def endpoint(self) -> str:
        return self.proc.endpoint

    def get(self, key: str, range_header: str | None = None, method: str = "GET", **headers) -> Got:
        if range_header:
            headers["Range"] = range_header
        return fetch(self.endpoint, method, f"/{BUCKET}/{key}", headers)

    def stop_and_check_cache(self, objects: dict[str, tuple[str, int]]) -> int:
        """Stop Sprox; assert every block the index names is exactly its object's
        bytes and `sprox cache verify`'s check finds nothing damaged. `objects`: key ->
        (name its data was made from, size). Returns how many blocks are cached."""
        self.proc.stop()
        if self.mode != "cache":
            return 0
        checked = assert_published_blocks_exact(self.cache_dir, objects)
        verified = admin.verify(self.cache_dir)  # what `sprox cache verify` runs
        assert (verified["checked"], verified["damaged"]) == (checked, 0), verified
        return checked


@dataclass
class Got:
    """What a client saw: status, headers, the body bytes it received, and the error
    reading the body ended with (None: the whole Content-Length arrived)."""

    status: int
    headers: dict[str, str]
    body: bytes
    error: BaseException | None

    @property
    def cut_short(self) -> bool:
        return self.error is not None

    def xml(self, name: str) -> str | None:
        return ET.fromstring(self.body).findtext(name)


def fetch(endpoint: str, method: str, target: str, headers: dict[str, str], timeout: float = 30.0) -> Got:
    """One request with http.client, reading the body in pieces so that what arrived
    before a cut is kept. http.client's read(n) returns b"" at an early EOF without
    complaint, so completeness is judged here against Content-Length."""
    host, port = endpoint.removeprefix("http://").rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        conn.request(method, target, headers=headers)
        response = conn.getresponse()
        got = Got(response.status, {k.lower(): v for k, v in response.getheaders()}, b"", None)
        if method == "HEAD":
            return got
        expected = int(got.headers["content-length"])
        pieces = []
        received = 0
        try:
            while received < expected:
                piece = response.read(min(1 << 16, expected - received))
                if not piece:
                    raise http.client.IncompleteRead(b"", expected - received)
                pieces.append(piece)
                received += len(piece)
        except (OSError, http.client.HTTPException) as exc:
            got.error = exc
        got.body = b"".join(pieces)
        return got
    finally:
        conn.close()


def assert_exact(got: Got, key: str, first: int, last: int, *, data_name: str | None = None) -> None:
    assert got.error is None, f"{key}: body cut short after {len(got.body)} bytes: {got.error!r}"
    assert len(got.body) == last - first + 1, f"{key}: {len(got.body)} bytes, expected {last - first + 1}"
    bad = check_bytes(data_name or key, first, got.body)
    assert bad is None, f"{key}: wrong byte at offset {bad}"


def assert_cut_short_with_right_prefix(got: Got, key: str, first: int) -> None:
    """The connection closed before Content-Length; what did arrive is right."""
    assert got.cut_short, f"{key}: a short body that looked complete ({len(got.body)} bytes)"
    assert len(got.body) < int(got.headers["content-length"])
    bad = check_bytes(key, first, got.body)
    assert bad is None, f"{key}: wrong byte at offset {bad} before the cut"


def assert_s3_error(got: Got, status: int, code: str) -> None:
    assert got.status == status, (got.status, got.body[:300])
    assert got.headers.get("x-amz-request-id"), got.headers
    if got.body:  # HEAD answers carry no body
        assert got.headers["content-type"].startswith("application/xml")
        assert got.xml("Code") == code, got.body
        assert got.xml("RequestId"), got.body


def assert_published_blocks_exact(cache_dir: Path, objects: dict[str, tuple[str, int]]) -> int:
    """Read the stopped cache's index and check each block it names byte for byte
    against the self-checking data (a CRC only proves the disk kept what was written;
    this proves what was written was right). Returns the number of blocks."""
    db = sqlite3.connect(f"file:{cache_dir / 'index.sqlite'}?mode=ro", uri=True)
    try:
        rows = db.execute("SELECT o.id, o.bucket, o.key, o.etag, o.size, o.block_size, b.idx, b.crc "
                          "FROM blocks b JOIN objects o ON o.id = b.object_id ORDER BY o.id, b.idx").fetchall()
    finally:
        db.close()
    for object_id, bucket, key, etag, size, block_size, idx, crc in rows:
        data_name, true_size = objects[key]
        assert size == true_size, f"{key}: the record says {size} bytes, the object has {true_size}"
        record = ObjectRecord(object_id, bucket, key, etag, size, "", (), 0.0, block_size)
        start, end = record.block_range(idx)
        with open(cache_dir / "blocks" / record.file_name, "rb") as f:
            f.seek(start)
            data = f.read(end - start)
        assert len(data) == end - start, f"{key}: block {idx} is short on disk"
        assert zlib.crc32(data) == crc, f"{key}: block {idx} does not match its CRC"
        bad = check_bytes(data_name, start, data)
        assert bad is None, f"{key}: block {idx} published with a wrong byte at offset {bad}"
    return len(rows)


def gaps(proxy: FaultProxy, method: str, key: str) -> list[float]:
    times = [s.at for s in proxy.requests(method, key)]
    return [b - a for a, b in pairwise(times)]


# -- faults before any byte: retried, then exact ---------------------------------------------

RETRIED_FAULTS = [Fault.RESET, Fault.ERROR_500, Fault.ERROR_503]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("fault", RETRIED_FAULTS)
@pytest.mark.parametrize("method, range_header, first, last", [
    ("GET", None, 0, SIZE - 1),
    ("GET", f"bytes=1000-{2 * BLOCK + 5}", 1000, 2 * BLOCK + 5),
    ("HEAD", None, 0, -1),
])
def test_a_fault_before_any_byte_is_retried_and_the_answer_is_exact(
        start_sprox, tmp_path, origin, mode, fault, method, range_header, first, last):
    sprox = Sprox(start_sprox, tmp_path, origin, mode)
    key = "retried"
    etag = origin.put(key)
    origin.proxy.inject(fault, method=method, key=key, times=MAX_ATTEMPTS - 1)

    got = sprox.get(key, range_header, method)

    assert got.status == (206 if range_header else 200), got.body[:300]
    assert got.headers["etag"] == etag
    if method == "GET":
        assert_exact(got, key, first, last)
    else:
        assert got.headers["content-length"] == str(SIZE)
    # Every attempt reached the proxy, the last one the upstream; the back-off between
    # them is jittered and short (full jitter, 0.1 s * 2**attempt at most).
    assert origin.proxy.count(method, key) == MAX_ATTEMPTS
    assert origin.proxy.count(method, key, faulted=True) == MAX_ATTEMPTS - 1
    assert origin.upstream.count(method, key) == 1
    assert all(0 <= g < 0.1 * 2 ** (i + 1) + SLACK for i, g in enumerate(gaps(origin.proxy, method, key)))
    if mode == "cache" and method == "GET":
        again = sprox.get(key, range_header)
        assert_exact(again, key, first, last)
        assert again.headers["x-cache"] == "HIT" and origin.proxy.count("GET", key) == MAX_ATTEMPTS
    assert sprox.stop_and_check_cache({key: (key, SIZE)}) >= (1 if mode == "cache" and method == "GET" else 0)


def test_retries_back_off_with_full_jitter(start_sprox, tmp_path, origin):
    sprox = Sprox(start_sprox, tmp_path, origin, "no-cache")
    key = "backoff"
    origin.put(key, 100)
    origin.proxy.inject(Fault.ERROR_503, key=key, times=None)
    clients = 8
    for _ in range(clients):
        assert_s3_error(sprox.get(key), 503, "SlowDown")
    times = [s.at for s in origin.proxy.requests("GET", key)]
    assert len(times) == clients * MAX_ATTEMPTS
    for retry in range(1, MAX_ATTEMPTS):
        waits = [times[c * MAX_ATTEMPTS + retry] - times[c * MAX_ATTEMPTS + retry - 1] for c in range(clients)]
        # Before retry n Sprox sleeps uniform(0, 0.1 * 2**n): a mean of 0.05 * 2**n.
        # Not a resend at once, not a fixed delay, and never much longer.
        assert sum(waits) / clients > 0.1 * 2 ** retry / 8, waits
        assert max(waits) - min(waits) > 0.01, waits
        assert max(waits) < 0.1 * 2 ** retry + SLACK, waits
    sprox.stop_and_check_cache({})


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("fault, status, code", [
    (Fault.ERROR_500, 500, "InternalError"),
    (Fault.ERROR_503, 503, "SlowDown"),
    (Fault.RESET, 502, "BadGateway"),
])
@pytest.mark.parametrize("method", ["GET", "HEAD"])
def test_a_fault_that_outlasts_the_retries_is_an_s3_error_then_nothing_is_cached(
        start_sprox, tmp_path, origin, mode, fault, status, code, method):
    sprox = Sprox(start_sprox, tmp_path, origin, mode)
    key = "down"
    origin.put(key)
    origin.proxy.inject(fault, method=None, key=key, times=None)

    got = sprox.get(key, method=method)

    assert_s3_error(got, status, code)
    # Retried, and no more than that: an upstream asking to slow down is not sent
    # extra requests (one client request = MAX_ATTEMPTS upstream attempts at most).
    assert origin.proxy.count(key=key) == MAX_ATTEMPTS
    assert origin.upstream.count(key=key) == 0
    origin.proxy.clear()
    after = sprox.get(key, method=method)
    assert after.status == 200
    if method == "GET":
        assert_exact(after, key, 0, SIZE - 1)
    if mode == "cache":
        assert after.headers["x-cache"] == "MISS"  # the error left nothing behind
    sprox.stop_and_check_cache({key: (key, SIZE)})


def test_a_fill_that_meets_slowdown_answers_slowdown_and_keeps_what_is_cached(start_sprox, tmp_path, origin):
    sprox = Sprox(start_sprox, tmp_path, origin, "cache")
    key = "fill-503"
    origin.put(key)
    assert_exact(sprox.get(key, f"bytes=0-{BLOCK - 1}"), key, 0, BLOCK - 1)  # block 0 cached
    origin.proxy.inject(Fault.ERROR_503, key=key, if_match=True, times=None)  # every fill

    got = sprox.get(key)

    # The fill's answer decides the status before any header is sent: the client is
    # told to slow down, as the upstream told Sprox, after Sprox's own retries.
    assert_s3_error(got, 503, "SlowDown")
    assert origin.proxy.count("GET", key, fault=Fault.ERROR_503) == MAX_ATTEMPTS
    hit = sprox.get(key, "bytes=10-99")
    assert_exact(hit, key, 10, 99)
    assert hit.headers["x-cache"] == "HIT"
    origin.proxy.clear()
    after = sprox.get(key)
    assert_exact(after, key, 0, SIZE - 1)
    assert after.headers["x-cache"] == "PARTIAL"
    assert sprox.stop_and_check_cache({key: (key, SIZE)}) == 6


# -- faults after the headers: cut short, or resumed by the cache --------------------------------

MID_BODY_FAULTS = [
    pytest.param(Fault.RESET_MID_BODY, {"after": 100_000}, id="reset"),
    pytest.param(Fault.TRUNCATE, {"after": 100_000}, id="truncate"),
    pytest.param(Fault.LONG_LENGTH, {"extra": 1000}, id="long-content-length"),
]


@pytest.mark.parametrize("fault, params", MID_BODY_FAULTS)
def test_no_cache_a_fault_mid_body_cuts_the_response_short(start_sprox, tmp_path, origin, fault, params):
    sprox = Sprox(start_sprox, tmp_path, origin, "no-cache")
    key = "mid"
    origin.put(key)
    origin.proxy.inject(fault, key=key, **params)

    got = sprox.get(key)

    assert got.status == 200
    assert_cut_short_with_right_prefix(got, key, 0)
    assert origin.proxy.count("GET", key) == 1  # headers were sent: nothing left to retry
    assert_exact(sprox.get(key), key, 0, SIZE - 1)  # the fault is spent
    sprox.stop_and_check_cache({})


@pytest.mark.parametrize("fault, params", MID_BODY_FAULTS[:2])  # a Content-Length lie: see below
@pytest.mark.parametrize("range_header, first, last", [
    (None, 0, SIZE - 1),
    (f"bytes=70000-{SIZE - 2}", 70000, SIZE - 2),
])
def test_cache_a_fill_cut_once_is_resumed_from_the_origin_and_the_client_gets_every_byte(
        start_sprox, tmp_path, origin, fault, params, range_header, first, last):
    sprox = Sprox(start_sprox, tmp_path, origin, "cache")
    key = "resumed"
    origin.put(key)
    # Faults the cold GET (a plain GET, or a block-aligned ranged one for a Range).
    origin.proxy.inject(fault, key=key, if_match=False, **params)

    got = sprox.get(key, range_header)

    assert_exact(got, key, first, last)
    assert origin.proxy.count("GET", key, faulted=True) == 1
    # Again, with the fault gone: exact, and the cache fills what it lacks.
    assert_exact(sprox.get(key, range_header), key, first, last)
    assert_exact(sprox.get(key), key, 0, SIZE - 1)
    before = origin.proxy.count("GET", key)
    hit = sprox.get(key)
    assert_exact(hit, key, 0, SIZE - 1)
    assert hit.headers["x-cache"] == "HIT" and origin.proxy.count("GET", key) == before
    assert sprox.stop_and_check_cache({key: (key, SIZE)}) == 6


# Cut every time after 5,000 bytes: too few for the fill's retries (each resumes where
# the last one stopped) and the reader's own resume ever to complete a block.
CUT_EVERY_TIME_FAULTS = [
    pytest.param(Fault.RESET_MID_BODY, {"after": 5_000}, id="reset"),
    pytest.param(Fault.TRUNCATE, {"after": 5_000}, id="truncate"),
    pytest.param(Fault.LONG_LENGTH, {"extra": 1000}, id="long-content-length"),
]


@pytest.mark.parametrize("fault, params", CUT_EVERY_TIME_FAULTS)
def test_cache_a_fill_cut_every_time_cuts_the_client_short_and_publishes_nothing_wrong(
        start_sprox, tmp_path, origin, fault, params):
    sprox = Sprox(start_sprox, tmp_path, origin, "cache")
    key = "broken"
    origin.put(key)
    origin.proxy.inject(fault, key=key, times=None, **params)

    got = sprox.get(key)

    assert got.status == 200 and got.headers["x-cache"] == "MISS"
    assert_cut_short_with_right_prefix(got, key, 0)
    # What the cut left in the cache: only blocks that arrived whole, each exact. (A
    # Content-Length lie on the cold GET's 200 sized the record: its blocks before the
    # real end are still the object's bytes; the size is corrected below.)
    record_size = SIZE + params.get("extra", 0)
    published = sprox.stop_and_check_cache({key: (key, record_size)})
    assert published <= params.get("after", record_size) // BLOCK
    origin.proxy.clear()
    sprox = Sprox(start_sprox, tmp_path, origin, "cache")  # the same cache directory
    for _ in range(2):  # refill what is missing, then all from the cache
        assert_exact(sprox.get(key), key, 0, SIZE - 1)
    assert sprox.get(key).headers["x-cache"] == "HIT"
    assert sprox.stop_and_check_cache({key: (key, SIZE)}) == 6


def test_boto3_sees_a_reset_mid_body_as_an_error(start_sprox, tmp_path, origin):
    from botocore.exceptions import BotoCoreError

    sprox = Sprox(start_sprox, tmp_path, origin, "no-cache")
    key = "boto"
    origin.put(key)
    origin.proxy.inject(Fault.RESET_MID_BODY, key=key, after=3 * BLOCK)
    s3 = s3_client(sprox.endpoint)
    body = s3.get_object(Bucket=BUCKET, Key=key)["Body"]
    with pytest.raises(BotoCoreError):  # IncompleteReadError or ResponseStreamingError
        body.read()
    assert s3.get_object(Bucket=BUCKET, Key=key)["Body"].read() == object_bytes(key, SIZE)
    sprox.stop_and_check_cache({})


def test_aiohttp_sees_a_truncated_fill_as_an_error(start_sprox, tmp_path, origin):
    sprox = Sprox(start_sprox, tmp_path, origin, "cache")
    key = "aio"
    origin.put(key)
    # Every GET cut after 7 bytes: the fill's retries and the reader's resume never finish.
    origin.proxy.inject(Fault.TRUNCATE, key=key, times=None, after=7)

    async def read() -> bytes:
        async with aiohttp.ClientSession() as session, session.get(f"{sprox.endpoint}/{BUCKET}/{key}") as response:
            assert response.status == 200
            return await response.read()

    with pytest.raises(aiohttp.ClientPayloadError):
        asyncio.run(read())
    origin.proxy.clear()
    assert asyncio.run(read()) == object_bytes(key, SIZE)
    sprox.stop_and_check_cache({key: (key, SIZE)})


@pytest.mark.parametrize("fault", [Fault.RESET_MID_BODY, Fault.TRUNCATE])
def test_a_fill_cut_once_is_fetched_again_alone_from_where_it_stopped(start_sprox, tmp_path, origin, fault):
    """The fill's GET breaks after 100,000 bytes: the fill asks again for the rest only
    (If-Match, Range from the first byte it lacks), the client gets every byte without
    a cut, and the whole object is cached."""
    sprox = Sprox(start_sprox, tmp_path, origin, "cache")
    key = "once"
    etag = origin.put(key)
    origin.proxy.inject(fault, key=key, times=1, after=100_000)

    assert_exact(sprox.get(key), key, 0, SIZE - 1)
    gets = origin.proxy.requests("GET", key)
    assert len(gets) == 2 and gets[0].fault == fault and gets[1].fault is None
    # From the first byte the fill lacks: what arrived before the cut (all of it, or
    # none, as the HTTP client delivers it) is kept.
    resumed_at = int(gets[1].range.removeprefix("bytes=").split("-")[0])
    assert 0 <= resumed_at <= 100_000 and gets[1].range == f"bytes={resumed_at}-{SIZE - 1}"
    assert gets[1].if_match == etag
    assert sprox.get(key).headers["x-cache"] == "HIT"
    assert sprox.stop_and_check_cache({key: (key, SIZE)}) == 6


# -- Content-Length that disagrees with the body ---------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("fault, params", [
    pytest.param(Fault.LONG_LENGTH, {"extra": 5000}, id="declares-more"),
    pytest.param(Fault.SHORT_LENGTH, {"short": 5000}, id="declares-less"),
])
def test_a_ranged_answer_whose_length_disagrees_with_its_content_range_is_retried(
        start_sprox, tmp_path, origin, mode, fault, params):
    sprox = Sprox(start_sprox, tmp_path, origin, mode)
    key = "mislength"
    origin.put(key)
    origin.proxy.inject(fault, key=key, ranged=True, **params)

    got = sprox.get(key, f"bytes={BLOCK}-{3 * BLOCK - 1}")

    assert got.status == 206
    assert_exact(got, key, BLOCK, 3 * BLOCK - 1)
    # Content-Length and Content-Range of a 206 must agree: when they do not, the
    # answer is refused before any byte of it is used, and asked again.
    assert origin.proxy.count("GET", key) == 2
    assert sprox.stop_and_check_cache({key: (key, SIZE)}) == (2 if mode == "cache" else 0)


@pytest.mark.parametrize("mode", MODES)
def test_excess_body_bytes_never_end_up_in_another_answer(start_sprox, tmp_path, origin, mode):
    # A 200 whose Content-Length is shorter than its body cannot be told from a shorter
    # object by the response alone; what must not happen is the excess bytes, left on
    # the upstream connection, being read as (part of) the next answer on it.
    sprox = Sprox(start_sprox, tmp_path, origin, mode)
    origin.put("liar", 20_000)
    origin.put("next", 20_000)
    origin.proxy.inject(Fault.SHORT_LENGTH, key="liar", short=10_000)
    first = sprox.get("liar")
    assert first.status == 200 and check_bytes("liar", 0, first.body) is None
    for _ in range(3):
        assert_exact(sprox.get("next"), "next", 0, 19_999)
    # With the cache, the lie sized the record; revalidating it (here forced by the
    # client; otherwise after --ttl) compares the size too, so the record is dropped.
    assert_exact(sprox.get("liar", **{"Cache-Control": "no-cache"}), "liar", 0, 19_999)
    assert_exact(sprox.get("liar"), "liar", 0, 19_999)
    sprox.stop_and_check_cache({"liar": ("liar", 20_000), "next": ("next", 20_000)})


def test_a_record_sized_by_a_lying_content_length_is_dropped_once_a_fill_shows_it(start_sprox, tmp_path, origin):
    sprox = Sprox(start_sprox, tmp_path, origin, "cache")
    key = "inflated"
    origin.put(key)
    # The cold GET's 200 says SIZE + 1000 bytes and sends SIZE: the record is too big.
    origin.proxy.inject(Fault.LONG_LENGTH, key=key, extra=1000)
    got = sprox.get(key)
    assert got.status == 200 and got.headers["content-length"] == str(SIZE + 1000)
    assert_cut_short_with_right_prefix(got, key, 0)
    # Fault gone: a fill's Content-Range gives the real size away; the record is
    # dropped and learned again, so the answer is exact.
    assert_exact(sprox.get(key), key, 0, SIZE - 1)
    assert_exact(sprox.get(key), key, 0, SIZE - 1)
    assert sprox.stop_and_check_cache({key: (key, SIZE)}) == 6


# -- stalls and --upstream-timeout ------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("method", ["GET", "HEAD"])
def test_a_stall_before_the_headers_is_a_gateway_timeout_after_the_upstream_timeout(
        start_sprox, tmp_path, origin, mode, method):
    sprox = Sprox(start_sprox, tmp_path, origin, mode, timeout=STALL_TIMEOUT)
    key = "stalled"
    origin.put(key)
    origin.proxy.inject(Fault.STALL, method=method, key=key, times=None, seconds=60)

    started = time.monotonic()
    got = sprox.get(key, method=method)
    elapsed = time.monotonic() - started

    assert_s3_error(got, 504, "GatewayTimeout")
    # The timeout bounds the client's wait, retries included: a retry after a stall
    # would only make the answer come later than the client is likely to wait.
    assert STALL_TIMEOUT * 0.9 <= elapsed <= STALL_TIMEOUT + SLACK, elapsed
    origin.proxy.clear()
    after = sprox.get(key, method=method)
    assert after.status == 200
    if method == "GET":
        assert_exact(after, key, 0, SIZE - 1)
    sprox.stop_and_check_cache({key: (key, SIZE)})


@pytest.mark.parametrize("mode, times", [("no-cache", 1), ("cache", 1), ("cache", None)])
def test_a_stall_mid_body_is_bounded_by_the_upstream_timeout(start_sprox, tmp_path, origin, mode, times):
    sprox = Sprox(start_sprox, tmp_path, origin, mode, timeout=STALL_TIMEOUT)
    key = "slow-body"
    origin.put(key)
    origin.proxy.inject(Fault.STALL_MID_BODY, key=key, times=times, after=100_000, seconds=60)

    started = time.monotonic()
    got = sprox.get(key)
    elapsed = time.monotonic() - started

    assert got.status == 200
    if mode == "cache" and times == 1:
        # The fill gave up after the timeout; its readers took the rest from the origin.
        assert_exact(got, key, 0, SIZE - 1)
        assert STALL_TIMEOUT * 0.9 <= elapsed <= STALL_TIMEOUT + SLACK, elapsed
    else:
        assert_cut_short_with_right_prefix(got, key, 0)
        # One stalled read each for the fill and the attempt to resume it (cache mode).
        stalls = origin.proxy.count("GET", key, faulted=True)
        assert STALL_TIMEOUT * 0.9 * stalls <= elapsed <= STALL_TIMEOUT * stalls + SLACK, (elapsed, stalls)
    origin.proxy.clear()
    assert_exact(sprox.get(key), key, 0, SIZE - 1)
    sprox.stop_and_check_cache({key: (key, SIZE)})


# -- the ETag changes between two block fetches of one object -----------------------------------------


@pytest.mark.parametrize("fault, params", [
    pytest.param(Fault.ETAG, {"etag": '"0123456789abcdef0123456789abcdef"'}, id="etag-only"),
    pytest.param(Fault.OTHER_VERSION, {"serve_key": "other"}, id="other-version-bytes"),
])
@pytest.mark.parametrize("times", [1, None])
def test_a_fill_answered_with_another_etag_is_never_stitched(start_sprox, tmp_path, origin, fault, params, times):
    sprox = Sprox(start_sprox, tmp_path, origin, "cache")
    key = "versioned"
    etag = origin.put(key)
    origin.put("other")
    assert_exact(sprox.get(key, f"bytes=0-{BLOCK - 1}"), key, 0, BLOCK - 1)  # block 0, this ETag
    origin.proxy.inject(fault, key=key, if_match=True, times=times, **params)  # every later fill

    got = sprox.get(key)

    # The fill's ETag differs: the record is dropped and the object read afresh with
    # a plain GET (no block of the old record can mix with the new answer).
    assert_exact(got, key, 0, SIZE - 1)
    assert got.headers["etag"] == etag
    assert origin.proxy.count("GET", key, faulted=True) == 1
    origin.proxy.clear()
    assert_exact(sprox.get(key), key, 0, SIZE - 1)
    assert sprox.stop_and_check_cache({key: (key, SIZE), "other": ("other", SIZE)}) == 6


def test_another_version_while_resuming_a_cut_fill_cuts_the_client_short(start_sprox, tmp_path, origin):
    sprox = Sprox(start_sprox, tmp_path, origin, "cache")
    key = "resume-changed"
    origin.put(key)
    origin.put("other")
    origin.proxy.inject(Fault.RESET_MID_BODY, key=key, if_match=False, after=100_000)  # the cold GET
    origin.proxy.inject(Fault.OTHER_VERSION, key=key, if_match=True, times=None, serve_key="other")  # resuming

    got = sprox.get(key)

    # Headers (with this version's ETag) were sent; the resumed bytes would be of
    # another version: the client gets a cut, and only this version's bytes before it.
    assert got.status == 200
    assert_cut_short_with_right_prefix(got, key, 0)
    origin.proxy.clear()
    assert_exact(sprox.get(key), key, 0, SIZE - 1)
    sprox.stop_and_check_cache({key: (key, SIZE), "other": ("other", SIZE)})


def test_an_object_deleted_behind_sprox_during_a_fill_is_a_404_not_a_502(start_sprox, tmp_path, origin):
    sprox = Sprox(start_sprox, tmp_path, origin, "cache")
    key = "gone"
    origin.put(key)
    assert_exact(sprox.get(key, f"bytes=0-{BLOCK - 1}"), key, 0, BLOCK - 1)  # block 0 cached
    del origin.upstream.objects[f"{BUCKET}/{key}"]

    got = sprox.get(key)  # blocks 1-5 are filled with If-Match: the upstream says 404

    assert got.status == 404 and got.xml("Code") == "NoSuchKey", got.body
    assert sprox.stop_and_check_cache({}) == 0  # the record of the deleted object is gone


# -- a real S3 implementation behind the faults --------------------------------------------------------


def test_retries_in_front_of_moto_with_boto3(start_sprox, tmp_path, moto_server):
    seed = s3_client(moto_server.endpoint)
    seed.create_bucket(Bucket="faulty")
    seed.put_object(Bucket="faulty", Key="obj", Body=object_bytes("obj", SIZE))
    with FaultProxy(moto_server.endpoint) as proxy:
        sprox = start_sprox(tmp_path, "--upstream", proxy.endpoint, "--upstream-timeout", str(TIMEOUT),
                            "--cache-dir", str(tmp_path / "cache"), "--block-size", "64KiB")
        s3 = s3_client(sprox.endpoint)
        proxy.inject(Fault.RESET, method="HEAD", key="obj", times=MAX_ATTEMPTS - 1)
        proxy.inject(Fault.ERROR_503, key="obj", times=MAX_ATTEMPTS - 1)
        assert s3.head_object(Bucket="faulty", Key="obj")["ContentLength"] == SIZE  # learns the record
        assert s3.get_object(Bucket="faulty", Key="obj", Range="bytes=5-70000")["Body"].read() == \
            object_bytes("obj", SIZE)[5:70001]  # fills blocks 0-1
        assert proxy.count("HEAD", "obj") == MAX_ATTEMPTS and proxy.count("GET", "obj") == MAX_ATTEMPTS
        sprox.stop()


@pytest.mark.parametrize("fault, status, code", [(Fault.ERROR_503, 503, "SlowDown"),
                                                 (Fault.ERROR_500, 500, "InternalError")])
def test_a_failing_revalidation_is_the_origins_error_and_keeps_the_record(start_sprox, tmp_path, origin,
                                                                          fault, status, code):
    """A stale record whose revalidation HEAD keeps failing: the client gets the
    origin's error (never possibly stale bytes), and the record and its blocks stay,
    so once the origin is back the object is a hit again without refetching."""
    sprox = Sprox(start_sprox, tmp_path, origin, "cache")
    key = "revalidate"
    origin.put(key)
    first = sprox.get(key)
    assert first.status == 200 and check_bytes(key, 0, first.body) is None
    fetched = origin.proxy.count("GET", key)
    origin.proxy.inject(fault, method="HEAD", key=key, times=None)
    # Cache-Control: no-cache makes Sprox revalidate now, as an expired --ttl would.
    assert_s3_error(sprox.get(key, **{"Cache-Control": "no-cache"}), status, code)
    assert origin.proxy.count("HEAD", key) == MAX_ATTEMPTS
    origin.proxy.clear()
    again = sprox.get(key, **{"Cache-Control": "no-cache"})
    assert again.status == 200 and check_bytes(key, 0, again.body) is None and again.headers["x-cache"] == "HIT"
    assert origin.proxy.count("GET", key) == fetched  # its blocks were kept
    sprox.stop_and_check_cache({key: (key, SIZE)})


@pytest.mark.parametrize("then", [Fault.RESET, Fault.ERROR_500])
def test_a_write_that_landed_but_failed_leaves_no_old_version_cached(start_sprox, tmp_path, origin, then):
    """The object store took a PUT, but the connection was reset before its answer, or
    the answer was a 500: the old version a read fetched and cached while the PUT was
    under way must not stay cached (the write may have been done, as it was here)."""
    import threading

    origin.put("k")
    old, new = object_bytes("k", SIZE), object_bytes("k-new", SIZE)
    sprox = Sprox(start_sprox, tmp_path, origin, "cache")
    release = threading.Event()  # the PUT waits at the proxy until the read is done
    origin.proxy.inject(Fault.LANDED, method="PUT", key="k", times=None, release=release, then=then)
    put_status = []

    def put() -> None:
        host, port = sprox.endpoint.removeprefix("http://").rsplit(":", 1)
        conn = http.client.HTTPConnection(host, int(port), timeout=60)
        try:
            conn.request("PUT", f"/{BUCKET}/k", body=new)
            put_status.append(conn.getresponse().status)
        finally:
            conn.close()

    writer = threading.Thread(target=put)
    writer.start()
    deadline = time.monotonic() + 30
    while origin.proxy.count("PUT", "k") == 0:  # the PUT is at the store, not done yet
        assert time.monotonic() < deadline, "the PUT never reached the upstream"
        time.sleep(0.01)
    got = sprox.get("k")
    assert got.status == 200 and got.body == old  # read, and cached, before the write landed
    release.set()
    writer.join(60)
    assert put_status and put_status[0] >= 500, put_status
    assert origin.upstream.objects[f"{BUCKET}/k"].data == new  # the write was done all the same
    got = sprox.get("k")
    assert got.status == 200 and got.body == new
    sprox.proc.stop()
