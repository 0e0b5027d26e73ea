"""The block cache, observed from outside: Sprox as a subprocess in front of an
upstream that counts every request it receives.

Data is self-checking (byte i of an object is a function of its key and i), so a
wrong range, a shifted block or bytes of another version are caught."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import aiohttp
import pytest

from tests.counting_upstream import CountingUpstream
from tests.data import check_bytes, expected_bytes, object_bytes
from tests.functional.test_passthrough import raw

BLOCK = 64 * 1024
SIZE = 5 * BLOCK + 12_345  # six blocks, the last one short


@pytest.fixture
def upstream():
    with CountingUpstream() as server:
        yield server


# The whole suite runs on both I/O backends for cache fills and block reads.
IO_BACKEND = "threads"


@pytest.fixture(autouse=True, params=["uring", "threads"])
def io_backend(request):
    global IO_BACKEND
    IO_BACKEND = request.param
    return request.param


def start(start_sprox, tmp_path, upstream, *args, env=None):
    return start_sprox(tmp_path, "--upstream", upstream.endpoint, "--cache-dir", str(tmp_path / "cache"),
                       "--block-size", "64KiB", "--io-backend", IO_BACKEND, *args, env=env)


def get(proc, key, range_header=None, **headers):
    if range_header:
        headers["Range"] = range_header
    return raw(proc.endpoint, "GET", f"/bkt/{key}", headers)


RANGES = [
    # (Range header, first byte, last byte): every form, across block boundaries
    (None, 0, SIZE - 1),
    ("bytes=0-0", 0, 0),
    (f"bytes={BLOCK - 1}-{BLOCK}", BLOCK - 1, BLOCK),
    (f"bytes={BLOCK}-{3 * BLOCK - 1}", BLOCK, 3 * BLOCK - 1),
    ("bytes=100000-", 100000, SIZE - 1),
    ("bytes=-16384", SIZE - 16384, SIZE - 1),
    ("bytes=-1", SIZE - 1, SIZE - 1),
    (f"bytes=-{SIZE * 2}", 0, SIZE - 1),
    (f"bytes={SIZE - 10}-{SIZE + 1000}", SIZE - 10, SIZE - 1),
]


@pytest.mark.parametrize("sendfile", ["sendfile", "copy"])
def test_every_range_form_cold_then_warm_with_zero_upstream_gets(start_sprox, tmp_path, upstream, sendfile):
    env = {"SPROX_NO_SENDFILE": "1"} if sendfile == "copy" else None
    proc = start(start_sprox, tmp_path, upstream, env=env)
    for header, first, last in RANGES:
        key = f"obj-{header}"
        upstream.put("bkt", key, object_bytes(key, SIZE))
        for attempt in ("cold", "warm"):
            before = upstream.count("GET")
            status, headers, body = get(proc, key, header)
            assert status == (200 if header is None else 206), (header, attempt)
            assert len(body) == last - first + 1 and check_bytes(key, first, body) is None, (header, attempt)
            if header is not None:
                assert headers["content-range"] == f"bytes {first}-{last}/{SIZE}"
            if attempt == "warm":
                assert upstream.count("GET") == before, f"warm read of {header} went upstream"
                assert headers["x-cache"] == "HIT"
            else:
                assert headers["x-cache"] == "MISS"


def test_missing_blocks_are_fetched_in_one_merged_ranged_get_with_if_match(start_sprox, tmp_path, upstream):
    proc = start(start_sprox, tmp_path, upstream)
    etag = upstream.put("bkt", "merged", object_bytes("merged", SIZE))
    get(proc, "merged", f"bytes=0-{BLOCK - 1}")  # block 0 cached
    get(proc, "merged", f"bytes={4 * BLOCK}-{5 * BLOCK - 1}")  # block 4 cached
    upstream.reset_counts()
    status, headers, body = get(proc, "merged", "bytes=0-")
    assert status == 206 and headers["x-cache"] == "PARTIAL" and check_bytes("merged", 0, body) is None
    fills = [s for s in upstream.seen if s.method == "GET"]
    # Blocks 1-3 in one GET, block 5 in another; each pinned to the version seen.
    assert {s.range for s in fills} == {f"bytes={BLOCK}-{4 * BLOCK - 1}", f"bytes={5 * BLOCK}-{SIZE - 1}"}
    assert len(fills) == 2
    assert all(s.if_match == etag for s in fills)


def test_a_large_miss_is_fetched_in_parallel_parts_of_at_most_8_mib(start_sprox, tmp_path):
    """A read of many missing blocks is cut into ranged GETs of at most PART_BYTES, in
    flight at the same time (the upstream holds each GET until three are: without
    parallel parts it would wait out its gate), each pinned to the version; the client
    gets the bytes in order."""
    from sprox.cache.fill import PART_BYTES

    with CountingUpstream() as upstream:
        proc = start(start_sprox, tmp_path, upstream)
        size = 20 * 2**20 + 5
        etag = upstream.put("bkt", "large", object_bytes("large", size))
        assert get(proc, "large", "bytes=0-0")[0] == 206  # learns the object; block 0 cached
        upstream.reset_counts()
        upstream.gate = 3
        status, headers, body = get(proc, "large")
        assert status == 200 and headers["x-cache"] == "PARTIAL"
        assert len(body) == size and check_bytes("large", 0, body) is None
        per_part = PART_BYTES // BLOCK
        last_block = (size - 1) // BLOCK
        expected = [(first * BLOCK, min((first + per_part) * BLOCK, size) - 1)
                    for first in range(1, last_block + 1, per_part)]
        fills = [s for s in upstream.seen if s.method == "GET"]
        assert sorted(s.range for s in fills) == sorted(f"bytes={a}-{b}" for a, b in expected)
        assert len(expected) == 3 and all(s.if_match == etag for s in fills)
        assert upstream.max_in_flight == 3


def test_a_large_read_of_an_unknown_object_is_fetched_in_parallel_parts_after_the_first(start_sprox, tmp_path):
    """The first GET of an object Sprox has no record of asks for what the client asked
    (a whole object: with its checksums); once its headers give the size, that answer
    feeds the first part only and is closed, and the rest comes in ranged parts."""
    from sprox.cache.fill import PART_BYTES

    with CountingUpstream() as upstream:
        proc = start(start_sprox, tmp_path, upstream)
        size = 20 * 2**20 + 5
        etag = upstream.put("bkt", "large", object_bytes("large", size))
        status, headers, body = get(proc, "large")
        assert status == 200 and headers["x-cache"] == "MISS"
        assert len(body) == size and check_bytes("large", 0, body) is None
        fills = [s for s in upstream.seen if s.method == "GET"]
        assert fills[0].range is None  # the learning GET
        expected = [(first, min(first + PART_BYTES, size) - 1) for first in range(PART_BYTES, size, PART_BYTES)]
        assert sorted(s.range for s in fills[1:]) == sorted(f"bytes={a}-{b}" for a, b in expected)
        assert all(s.if_match == etag for s in fills[1:])
        upstream.reset_counts()
        status, _, body = get(proc, "large", "bytes=100-20000000")
        assert status == 206 and check_bytes("large", 100, body) is None and upstream.count("GET") == 0


def test_fifty_concurrent_clients_on_a_cold_block_make_one_upstream_get(start_sprox, tmp_path):
    with CountingUpstream(first_byte_delay=0.3) as slow:
        proc = start(start_sprox, tmp_path, slow)
        slow.put("bkt", "hot", object_bytes("hot", SIZE))

        async def one(session):
            async with session.get(f"{proc.endpoint}/bkt/hot", headers={"Range": "bytes=1000-50000"}) as r:
                return r.status, await r.read()

        async def all_at_once():
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=100)) as session:
                return await asyncio.gather(*(one(session) for _ in range(50)))

        results = asyncio.run(all_at_once())
        assert all(status == 206 and check_bytes("hot", 1000, body) is None and len(body) == 49001
                   for status, body in results)
        assert slow.count("GET") == 1


def test_head_is_answered_from_the_record_within_the_ttl(start_sprox, tmp_path, upstream):
    proc = start(start_sprox, tmp_path, upstream, "--ttl", "3600")
    upstream.put("bkt", "h", object_bytes("h", 1000), content_type="text/csv", metadata={"team": "data"})
    for _ in range(3):
        status, headers, body = raw(proc.endpoint, "HEAD", "/bkt/h")
        assert (status, body) == (200, b"")
        assert headers["content-length"] == "1000" and headers["content-type"] == "text/csv"
        assert headers["x-amz-meta-team"] == "data" and headers["etag"] == upstream.objects["bkt/h"].etag
    assert upstream.count("HEAD") == 1


def test_conditions_and_errors_are_evaluated_against_the_record(start_sprox, tmp_path, upstream):
    proc = start(start_sprox, tmp_path, upstream)
    etag = upstream.put("bkt", "c", object_bytes("c", 1000))
    get(proc, "c")
    upstream.reset_counts()
    assert get(proc, "c", **{"If-Match": etag})[0] == 200
    assert get(proc, "c", **{"If-Match": '"other"'})[0] == 412
    status, headers, body = get(proc, "c", **{"If-None-Match": etag})
    assert (status, body, headers["etag"]) == (304, b"", etag)
    assert get(proc, "c", "bytes=1000-")[0] == 416
    assert upstream.count() == 0


def test_errors_are_never_cached(start_sprox, tmp_path, upstream):
    proc = start(start_sprox, tmp_path, upstream)
    assert get(proc, "later")[0] == 404
    upstream.put("bkt", "later", object_bytes("later", 500))
    status, _, body = get(proc, "later")
    assert status == 200 and check_bytes("later", 0, body) is None


def test_overwrite_through_sprox_is_seen_at_once(start_sprox, tmp_path, upstream):
    proc = start(start_sprox, tmp_path, upstream, "--ttl", "3600")
    upstream.put("bkt", "w", object_bytes("v1", SIZE))
    assert check_bytes("v1", 0, get(proc, "w")[2]) is None
    assert raw(proc.endpoint, "PUT", "/bkt/w", {}, object_bytes("v2", SIZE))[0] == 200
    status, headers, body = get(proc, "w")
    assert status == 200 and headers["x-cache"] == "MISS" and check_bytes("v2", 0, body) is None
    assert raw(proc.endpoint, "DELETE", "/bkt/w")[0] == 204
    assert get(proc, "w")[0] == 404


def test_overwrite_behind_sprox_is_seen_after_the_ttl(start_sprox, tmp_path, upstream):
    ttl = 3.0
    proc = start(start_sprox, tmp_path, upstream, "--ttl", str(ttl))
    upstream.put("bkt", "b", object_bytes("old", SIZE))
    learned_from = time.monotonic()  # the record is validated at some moment after this
    assert check_bytes("old", 0, get(proc, "b")[2]) is None
    upstream.put("bkt", "b", object_bytes("new", SIZE))
    body = get(proc, "b")[2]
    if time.monotonic() < learned_from + ttl:  # surely inside the TTL (a loaded machine may not be)
        assert check_bytes("old", 0, body) is None, "the cached version is trusted for --ttl"
    deadline = learned_from + ttl + 10
    while True:
        body = get(proc, "b")[2]
        if check_bytes("new", 0, body) is None:
            break
        assert check_bytes("old", 0, body) is None, "a response mixed two versions"
        assert time.monotonic() < deadline, "the new version never appeared"
    assert time.monotonic() - learned_from >= ttl  # not before the record's TTL ran out


def test_client_no_cache_forces_revalidation(start_sprox, tmp_path, upstream):
    proc = start(start_sprox, tmp_path, upstream, "--ttl", "3600")
    upstream.put("bkt", "nc", object_bytes("nc-1", 1000))
    get(proc, "nc")
    upstream.put("bkt", "nc", object_bytes("nc-2", 1000))
    assert check_bytes("nc-1", 0, get(proc, "nc")[2]) is None
    assert check_bytes("nc-2", 0, get(proc, "nc", **{"Cache-Control": "no-cache"})[2]) is None


def test_a_version_change_between_blocks_is_never_stitched(start_sprox, tmp_path, upstream):
    proc = start(start_sprox, tmp_path, upstream, "--ttl", "3600")
    upstream.put("bkt", "s", object_bytes("first", SIZE))
    get(proc, "s", f"bytes=0-{BLOCK - 1}")  # block 0 of the first version cached
    upstream.put("bkt", "s", object_bytes("second", SIZE))  # behind Sprox's back
    status, _, body = get(proc, "s")  # block 0 cached (first), blocks 1.. must come from the upstream
    assert status == 200 and len(body) == SIZE
    assert check_bytes("second", 0, body) is None, "bytes of two versions in one response"


def test_warm_data_stays_warm_across_a_restart(start_sprox, tmp_path, upstream):
    proc = start(start_sprox, tmp_path, upstream, "--ttl", "3600")
    upstream.put("bkt", "r", object_bytes("r", SIZE))
    get(proc, "r")
    proc.stop()
    proc = start(start_sprox, tmp_path, upstream, "--ttl", "3600")
    upstream.reset_counts()
    status, headers, body = get(proc, "r")
    assert status == 200 and check_bytes("r", 0, body) is None and headers["x-cache"] == "HIT"
    assert upstream.count() == 0


def test_checksums_are_kept_by_the_record_and_answered_like_s3(start_sprox, tmp_path, upstream):
    """A read that asks (x-amz-checksum-mode: ENABLED) for the whole object gets the
    object's checksums from the cache, across a restart and in the fast lane; a range
    or a read that does not ask gets none. A record made from a range learns them once,
    with one HEAD."""
    import base64
    import json
    import urllib.request
    import zlib

    data = object_bytes("summed", SIZE)
    crc = base64.b64encode(zlib.crc32(data).to_bytes(4, "big")).decode()
    sums = {"x-amz-checksum-crc32": crc, "x-amz-checksum-type": "FULL_OBJECT"}
    upstream.put("bkt", "s", data, checksums=sums)
    proc = start(start_sprox, tmp_path, upstream, "--ttl", "3600")
    mode = {"x-amz-checksum-mode": "ENABLED"}

    def fast_lane_hits() -> int:
        with urllib.request.urlopen(proc.endpoint + "/_sprox/cache/stats", timeout=10) as response:
            return json.load(response)["fast_lane_hits"]

    status, headers, body = get(proc, "s", "bytes=0-99", **mode)  # the record comes from a range
    assert status == 206 and body == data[:100] and "x-amz-checksum-crc32" not in headers
    for attempt in range(2):
        status, headers, body = get(proc, "s", **mode)
        assert status == 200 and body == data, attempt
        assert (headers["x-amz-checksum-crc32"], headers["x-amz-checksum-type"]) == (crc, "FULL_OBJECT")
    assert upstream.count("HEAD") == 1  # learned once; the second read was the cache's alone
    status, headers, body = get(proc, "s")  # not asked: not sent
    assert status == 200 and not any(name.startswith("x-amz-checksum-") for name in headers)
    status, headers, _ = raw(proc.endpoint, "HEAD", "/bkt/s", mode)
    assert headers["x-amz-checksum-crc32"] == crc

    proc.stop()
    proc = start(start_sprox, tmp_path, upstream, "--ttl", "3600")
    upstream.reset_counts()
    get(proc, "s", **mode)  # checks the restarted blocks once
    before = fast_lane_hits()
    status, headers, body = get(proc, "s", **mode)
    assert status == 200 and body == data and headers["x-amz-checksum-crc32"] == crc
    assert headers["x-cache"] == "HIT" and fast_lane_hits() == before + 1
    status, headers, body = get(proc, "s", "bytes=10-19", **mode)
    assert body == data[10:20] and "x-amz-checksum-crc32" not in headers
    assert upstream.count() == 0  # the record kept them across the restart

    # A full first read (a GET of the whole object) learns them from its own answer.
    upstream.put("bkt", "t", data, checksums=sums)
    upstream.reset_counts()
    assert get(proc, "t", **mode)[1]["x-amz-checksum-crc32"] == crc
    assert get(proc, "t", **mode)[1]["x-amz-checksum-crc32"] == crc
    assert upstream.count("HEAD") == 0


def test_a_failing_origin_does_not_refuse_fresh_bytes_for_want_of_checksums(start_sprox, tmp_path, upstream):
    """A fresh record made from a range does not know the checksums; when the HEAD that
    would learn them fails, the cached bytes are still served (without checksums)."""
    data = object_bytes("nosums", SIZE)
    upstream.put("bkt", "n", data, checksums={"x-amz-checksum-crc32": "AAAAAA=="})
    proc = start(start_sprox, tmp_path, upstream, "--ttl", "3600")
    for first in range(0, SIZE, BLOCK):  # every block, by ranges: the record has no checksums
        assert get(proc, "n", f"bytes={first}-{min(first + BLOCK, SIZE) - 1}")[0] == 206
    upstream.failing["HEAD"] = 503
    status, headers, body = get(proc, "n", **{"x-amz-checksum-mode": "ENABLED"})
    assert status == 200 and body == data and "x-amz-checksum-crc32" not in headers
    del upstream.failing["HEAD"]
    status, headers, body = get(proc, "n", **{"x-amz-checksum-mode": "ENABLED"})
    assert status == 200 and headers["x-amz-checksum-crc32"] == "AAAAAA=="


def test_a_damaged_block_file_is_a_miss_never_wrong_bytes(start_sprox, tmp_path, upstream):
    proc = start(start_sprox, tmp_path, upstream, "--ttl", "3600")
    upstream.put("bkt", "d", object_bytes("d", SIZE))
    get(proc, "d")
    proc.stop()
    (block_file,) = (tmp_path / "cache" / "blocks").rglob("*.blk")
    with open(block_file, "r+b") as f:
        f.seek(BLOCK + 10)
        f.write(b"\x00garbage\x00")
    proc = start(start_sprox, tmp_path, upstream, "--ttl", "3600")
    upstream.reset_counts()
    status, _, body = get(proc, "d")
    assert status == 200 and check_bytes("d", 0, body) is None
    assert [s.range for s in upstream.seen if s.method == "GET"] == [f"bytes={BLOCK}-{2 * BLOCK - 1}"]


def test_cached_bytes_stay_within_the_cache_size(start_sprox, tmp_path, upstream):
    proc = start(start_sprox, tmp_path, upstream, "--cache-size", "256KiB")
    for i in range(4):
        upstream.put("bkt", f"cap{i}", object_bytes(f"cap{i}", SIZE))
        status, _, body = get(proc, f"cap{i}")
        assert status == 200 and check_bytes(f"cap{i}", 0, body) is None
    proc.stop()
    used = sum(os.stat(p).st_blocks * 512 for p in (tmp_path / "cache" / "blocks").rglob("*.blk"))
    assert used <= 256 * 1024 + 64 * 1024  # file-system allocation rounding


CRASH_CYCLES = 20
CRASH_SIZE = 2 * 1024 * 1024 + 4321  # 33 blocks, the last one short


def _range_forms(size):
    """RANGES for an object of `size` bytes: (Range header, first, last)."""
    return [(None, 0, size - 1), ("bytes=0-0", 0, 0), (f"bytes={BLOCK - 1}-{BLOCK}", BLOCK - 1, BLOCK),
            (f"bytes={BLOCK}-{3 * BLOCK - 1}", BLOCK, 3 * BLOCK - 1), ("bytes=100000-", 100000, size - 1),
            ("bytes=-16384", size - 16384, size - 1), ("bytes=-1", size - 1, size - 1),
            (f"bytes=-{size * 2}", 0, size - 1), (f"bytes={size - 10}-{size + 1000}", size - 10, size - 1)]


async def _read_then_kill(proc, reads, kill_at_byte):
    """Start every read of `reads` ((key, first, last) each) at once; SIGKILL Sprox as
    soon as the clients together have received `kill_at_byte` bytes (a moment chosen by
    progress, not by the clock, so it falls among the fills on a fast or a slow
    machine). Every byte a read received, complete or cut short, must be right.
    Returns (reads complete, reads cut short)."""
    received_total = 0
    reached = asyncio.Event()

    async def one(session, key, first, last):
        nonlocal received_total
        received = bytearray()
        try:
            async with session.get(f"{proc.endpoint}/bkt/{key}", headers={"Range": f"bytes={first}-{last}"}) as r:
                assert r.status == 206, r.status
                async for chunk in r.content.iter_chunked(1 << 16):
                    received += chunk
                    received_total += len(chunk)
                    if received_total >= kill_at_byte:
                        reached.set()
            complete = True
        except (aiohttp.ClientError, TimeoutError):
            complete = False
        assert check_bytes(key, first, bytes(received)) is None, f"{key}: wrong bytes from {first}"
        assert not complete or len(received) == last - first + 1, f"{key}: a short body that looked complete"
        return complete

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=len(reads))) as session:
        tasks = [asyncio.ensure_future(one(session, *read)) for read in reads]
        everything = asyncio.ensure_future(asyncio.gather(*tasks))
        waiter = asyncio.ensure_future(reached.wait())
        await asyncio.wait([everything, waiter], timeout=30, return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        os.killpg(proc.pid, signal.SIGKILL)
        outcomes = await asyncio.wait_for(everything, 30)
    return sum(outcomes), len(outcomes) - sum(outcomes)


@pytest.mark.slow
def test_sigkill_during_fills_loses_nothing_and_serves_only_right_bytes(start_sprox, tmp_path):
    """SIGKILL at random moments while concurrent fills are in flight, over one cache
    directory, CRASH_CYCLES times. After each kill the stopped cache's index agrees with
    its block files: every block it names passes its CRC (`sprox cache verify` drops
    none) and holds exactly the object's bytes. After each restart every byte served,
    in every range form, is right. Replay a failure with SIGKILL_SEED=<printed seed>."""
    import random

    from sprox.cache import admin
    from tests.functional.test_upstream_faults import assert_published_blocks_exact

    seed = int(os.environ.get("SIGKILL_SEED") or random.SystemRandom().randrange(1 << 32))
    print(f"SIGKILL_SEED={seed}")
    rng = random.Random(seed)
    cache = tmp_path / "cache"
    objects: dict[str, tuple[str, int]] = {}  # every key so far -> (data name, size)
    previous: list[str] = []
    cut_cycles = published_cycles = 0
    with CountingUpstream(first_byte_delay=0.02) as upstream:
        for cycle in range(CRASH_CYCLES + 1):
            where = f"cycle {cycle}, SIGKILL_SEED={seed}"
            proc = start(start_sprox, tmp_path, upstream, "--ttl", "3600")
            # After the restart: the keys filled when Sprox was killed, in every range
            # form (their blocks are checked against their CRCs on first use).
            for key in previous:
                for header, first, last in _range_forms(CRASH_SIZE):
                    status, _, body = get(proc, key, header)
                    assert status in (200, 206), where
                    assert len(body) == last - first + 1 and check_bytes(key, first, body) is None, (where, header)
            if cycle == CRASH_CYCLES:
                proc.stop()
                break
            # New keys each cycle, so every kill lands among fills of cold objects.
            keys = [f"c{cycle}-{i}" for i in range(4)]
            for key in keys:
                upstream.put("bkt", key, object_bytes(key, CRASH_SIZE))
                objects[key] = (key, CRASH_SIZE)
            reads = []
            for key in keys:
                for _ in range(3):
                    first = rng.randrange(CRASH_SIZE)
                    reads.append((key, first, rng.randrange(first, CRASH_SIZE)))
            kill_at_byte = rng.randrange(sum(last - first + 1 for _, first, last in reads))
            complete, cut = asyncio.run(_read_then_kill(proc, reads, kill_at_byte))
            proc.stop()  # reaps the killed process
            # The stopped cache: the index agrees with the block files.
            result = admin.verify(cache)
            assert result["damaged"] == 0, (where, result)
            checked = assert_published_blocks_exact(cache, objects)
            assert checked == result["checked"], where
            published = _blocks_of(cache, keys)
            cut_cycles += cut > 0
            published_cycles += published > 0
            print(f"cycle {cycle}: killed at byte {kill_at_byte}: {complete} reads complete, {cut} cut short, "
                  f"{published} blocks of this cycle's keys published")
            previous = keys
    verified = sprox_cli("cache", "verify", "--cache-dir", str(cache))
    assert verified.returncode == 0 and "dropped 0 damaged" in verified.stdout, (verified.stdout, verified.stderr)
    # The kills landed among the fills: reads were cut short, and blocks had been
    # published, in enough cycles that the checks above were not checking nothing.
    assert cut_cycles >= CRASH_CYCLES // 4, f"only {cut_cycles} kills cut a read short (SIGKILL_SEED={seed})"
    assert published_cycles >= CRASH_CYCLES // 4, f"only {published_cycles} kills after a block was published"


def _blocks_of(cache, keys) -> int:
    """How many blocks of `keys` the (stopped) cache's index names."""
    import sqlite3

    db = sqlite3.connect(f"file:{cache / 'index.sqlite'}?mode=ro", uri=True)
    try:
        marks = ",".join("?" * len(keys))
        return db.execute(f"SELECT count(*) FROM blocks b JOIN objects o ON o.id = b.object_id "
                          f"WHERE o.key IN ({marks})", keys).fetchone()[0]
    finally:
        db.close()


def test_no_cache_is_pure_pass_through(start_sprox, tmp_path, upstream):
    proc = start_sprox(tmp_path, "--upstream", upstream.endpoint, "--no-cache")
    upstream.put("bkt", "p", object_bytes("p", 1000))
    for _ in range(2):
        status, headers, body = get(proc, "p", "bytes=10-20")
        assert status == 206 and body == expected_bytes("p", 10, 11) and headers["x-cache"] == "BYPASS"
    assert upstream.count("GET") == 2


def sprox_cli(*args):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "sprox", *args], capture_output=True, text=True, timeout=120)


def test_cache_stats_purge_and_verify_commands(start_sprox, tmp_path, upstream):
    cache = str(tmp_path / "cache")
    proc = start(start_sprox, tmp_path, upstream, "--ttl", "3600")
    for key in ("a/1", "a/2", "b/1"):
        upstream.put("bkt", key, object_bytes(key, SIZE))
        get(proc, key)
        get(proc, key)
    # Purge while running goes through the running process.
    running = sprox_cli("cache", "stats", "--cache-dir", cache)
    assert "running:   50.0% hits of 6 object reads since start" in running.stdout, running.stdout
    result = sprox_cli("cache", "purge", "s3://bkt/b/", "--cache-dir", cache)
    assert result.returncode == 0 and "purged 1 object\n" in result.stdout, result.stderr
    assert get(proc, "b/1")[1]["x-cache"] == "MISS"
    busy = sprox_cli("cache", "verify", "--cache-dir", cache)
    assert busy.returncode == 1 and "stop it first" in busy.stderr
    proc.stop()

    stats = sprox_cli("cache", "stats", "--cache-dir", cache)
    assert stats.returncode == 0, stats.stderr
    assert "objects:   3" in stats.stdout and "blocks:    18" in stats.stdout
    assert f"bytes:     {3 * SIZE} " in stats.stdout
    assert "hit ratio: 42.9% of 7 object reads" in stats.stdout  # 3 hits of 7 reads

    (block_file, *_) = sorted((tmp_path / "cache" / "blocks").rglob("*.blk"))
    with open(block_file, "r+b") as f:
        f.seek(10)
        f.write(b"\xff" * 8)
    verified = sprox_cli("cache", "verify", "--cache-dir", cache)
    assert verified.returncode == 0 and "checked 18 blocks, dropped 1 damaged" in verified.stdout

    offline = sprox_cli("cache", "purge", "--cache-dir", cache)
    assert offline.returncode == 0 and "purged 3 objects" in offline.stdout
    assert "objects:   0" in sprox_cli("cache", "stats", "--cache-dir", cache).stdout
    bad = sprox_cli("cache", "purge", "bucket-without-scheme", "--cache-dir", cache)
    assert bad.returncode == 2 and "s3://" in bad.stderr


def test_access_log_records_every_request(start_sprox, tmp_path, upstream):
    from sprox.analytics.accesslog import read_access_log

    proc = start(start_sprox, tmp_path, upstream)
    upstream.put("bkt", "logged", object_bytes("logged", SIZE))
    get(proc, "logged", "bytes=0-99")
    get(proc, "logged", "bytes=0-99")
    get(proc, "missing")
    proc.stop()
    rows = read_access_log(tmp_path / "cache" / "logs").to_pylist()
    assert [(r["operation"], r["status"], r["cache"], r["bytes_sent"]) for r in rows] == [
        ("GetObject", 206, "MISS", 100), ("GetObject", 206, "HIT", 100), ("GetObject", 404, "MISS", rows[2]["bytes_sent"]),
    ]
    assert [r["upstream_requests"] for r in rows] == [1, 0, 1]
    assert rows[0]["range"] == "bytes=0-99" and rows[0]["key"] == "logged" and rows[0]["latency_ms"] > 0
    assert rows[0]["upstream_bytes"] >= 100


@pytest.fixture
def tiny_disk(tmp_path):
    """A 320 KiB file system for the cache, so fills run out of disk space."""
    import subprocess

    mount = tmp_path / "tiny"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=320k", "tmpfs", str(mount)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        if os.environ.get("CI"):
            pytest.fail(f"cannot mount a tmpfs in CI: {result.stderr}")
        pytest.skip(f"mounting a tmpfs needs root: {result.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_degrades_to_pass_through_and_requests_succeed(tiny_disk, start_sprox, tmp_path, upstream):
    proc = start_sprox(tmp_path, "--upstream", upstream.endpoint, "--cache-dir", str(tiny_disk),
                       "--block-size", "64KiB", "--cache-size", "1GiB", "--io-backend", IO_BACKEND)
    size = 2 * 1024 * 1024
    for i in range(3):
        key = f"big{i}"
        upstream.put("bkt", key, object_bytes(key, size))
        for header, first, last in [(None, 0, size - 1), ("bytes=100000-1500000", 100000, 1500000)]:
            status, _, body = get(proc, key, header)
            assert status in (200, 206) and len(body) == last - first + 1
            assert check_bytes(key, first, body) is None


def test_listings_are_cached_for_list_ttl_and_dropped_by_writes(start_sprox, tmp_path):
    origin = tmp_path / "origin"
    (origin / "lbkt").mkdir(parents=True)
    proc = start_sprox(tmp_path, "--origin-dir", str(origin), "--cache-dir", str(tmp_path / "cache"),
                       "--list-ttl", "3600")
    raw(proc.endpoint, "PUT", "/lbkt/a", {}, b"1")
    listing = raw(proc.endpoint, "GET", "/lbkt?list-type=2")[2]
    assert b"<Key>a</Key>" in listing
    (origin / "lbkt" / "behind-the-back").write_bytes(b"2")  # not through Sprox: not seen yet
    assert raw(proc.endpoint, "GET", "/lbkt?list-type=2")[2] == listing
    raw(proc.endpoint, "PUT", "/lbkt/b", {}, b"3")  # a write through Sprox drops the bucket's listings
    fresh = raw(proc.endpoint, "GET", "/lbkt?list-type=2")[2]
    assert b"<Key>b</Key>" in fresh and b"<Key>behind-the-back</Key>" in fresh


@pytest.mark.parametrize("sendfile", ["sendfile", "copy"])
def test_warm_read_larger_than_socket_buffers(start_sprox, tmp_path, upstream, sendfile):
    import http.client

    env = {"SPROX_NO_SENDFILE": "1"} if sendfile == "copy" else None
    proc = start_sprox(tmp_path, "--upstream", upstream.endpoint, "--cache-dir", str(tmp_path / "cache"), env=env)
    size = 24 * 1024 * 1024 + 17
    upstream.put("bkt", "large", object_bytes("large", size))
    get(proc, "large")
    upstream.reset_counts()
    host, port = proc.endpoint.removeprefix("http://").rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    conn.request("GET", "/bkt/large", headers={"Range": "bytes=1000-"})
    response = conn.getresponse()
    assert response.status == 206 and response.getheader("X-Cache") == "HIT"
    pos = 1000
    while chunk := response.read(65536):  # a slow reader: the socket fills, sendfile must wait
        assert check_bytes("large", pos, chunk) is None
        pos += len(chunk)
    conn.close()
    assert pos == size and upstream.count("GET") == 0


def test_cached_answers_carry_each_header_once(start_sprox, tmp_path, upstream):
    proc = start(start_sprox, tmp_path, upstream)
    upstream.put("bkt", "typed.csv", b"a,b\n1,2\n" * 100, content_type="text/csv", metadata={"m": "1"})
    for header in ("bytes=0-9", None):
        for _ in ("cold", "warm"):
            host, port = proc.endpoint.removeprefix("http://").rsplit(":", 1)
            import http.client

            conn = http.client.HTTPConnection(host, int(port), timeout=30)
            conn.request("GET", "/bkt/typed.csv", headers={"Range": header} if header else {})
            response = conn.getresponse()
            response.read()
            names = [name.lower() for name, _ in response.getheaders()]
            conn.close()
            assert response.getheader("Content-Type") == "text/csv"
            assert len(names) == len(set(names)), names


def test_direct_io_fills_and_restart_checks_serve_exact_bytes(start_sprox, tmp_path, upstream):
    """--direct-io: fills are written with O_DIRECT (the short last block padded to a
    whole sector) and checked with O_DIRECT reads after a restart; every byte served
    is right. A file system that refuses O_DIRECT stops start-up naming the flag."""
    import subprocess
    import sys

    if not _direct_io_works(tmp_path):
        refused = subprocess.run([sys.executable, "-m", "sprox", "serve", "--port", "0", "--upstream",
                                  upstream.endpoint, "--cache-dir", str(tmp_path / "cache"), "--direct-io"],
                                 capture_output=True, text=True, timeout=60, check=False)
        assert refused.returncode == 2 and "--direct-io" in refused.stderr, refused.stderr
        return
    upstream.put("bkt", "direct", object_bytes("direct", SIZE))
    proc = start(start_sprox, tmp_path, upstream, "--direct-io", "--ttl", "3600")
    seen = []
    deadline = time.monotonic() + 30
    # The client may have every byte before the fill's last O_DIRECT write lands: read
    # until a HIT (each answer right), within a deadline.
    while not seen or seen[-1] != "HIT":
        assert time.monotonic() < deadline, seen
        status, headers, body = get(proc, "direct")
        assert status == 200 and check_bytes("direct", 0, body) is None and len(body) == SIZE
        seen.append(headers["x-cache"])
    assert seen[0] == "MISS"
    proc.stop()
    proc = start(start_sprox, tmp_path, upstream, "--direct-io", "--ttl", "3600")
    upstream.reset_counts()
    status, headers, body = get(proc, "direct", f"bytes={SIZE - 20_000}-")
    assert status == 206 and check_bytes("direct", SIZE - 20_000, body) is None and headers["x-cache"] == "HIT"
    assert upstream.count() == 0  # every block passed its O_DIRECT checksum read


def _direct_io_works(directory) -> bool:
    try:
        fd = os.open(directory / "o_direct_probe", os.O_RDWR | os.O_CREAT | os.O_DIRECT, 0o600)
    except OSError:
        return False
    os.close(fd)
    return True
