"""Sprox under sustained load: 200 concurrent client connections for a bounded time
(60 s; `SPROX_LOAD_SECONDS` shortens it) against the block cache in front of a
counting upstream, mixing hits, misses, revalidations, every Range form, HEAD,
keep-alive connections and pipelined requests.

The clients are raw asyncio sockets with a small, strict HTTP/1.1 response reader,
so pipelining is real (requests written back to back before any response is read)
and every byte on the wire is accounted for by Content-Length. Every response is
checked: status, Content-Range, Content-Length, ETag, and the exact bytes.

Objects overwritten on the upstream behind Sprox's back get a new name for their
bytes (and a new size) per version, so a response is accepted only if it is one
whole version that the upstream held when the response arrived, or that was
replaced less than --ttl (plus a little slack) before the request was sent.
A response stitched from two versions matches neither and fails.

Sprox's resources are watched from outside: resident memory (sampled, and the
kernel's VmHWM peak) must stay under warm-up RSS + 200 MiB, and its file descriptors
after the run are compared, by kind, with those after warm-up. The upstream's
request log shows the cache working under load: no GET of a hot object, at most one
revalidation per object per TTL, no block of an unchanging object fetched twice.
Finally Sprox must exit cleanly on SIGTERM, with no error in its log.

A summary (requests/s, CPU, RSS, descriptors) is printed: run with -s to see it.
"""

from __future__ import annotations

import asyncio
import collections
import http.client
import json
import os
import random
import re
import resource
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

import pytest

from sprox.cache.blockfiles import MAX_IDLE_FDS
from sprox.cache.mirror import MAX_ENTRIES as MIRROR_ENTRIES
from tests.counting_upstream import CountingUpstream
from tests.data import check_bytes, object_bytes

# Read at import: the session's autouse fixture hides SPROX_* variables from tests.
LOAD_SECONDS = float(os.environ.get("SPROX_LOAD_SECONDS", "60"))
CONNECTIONS = 200
TTL = 2.0
BLOCK = 64 * 1024
BUCKET = "bkt"
FIRST_BYTE_DELAY = 0.005
# Sprox trusts a record for --ttl from the moment its HEAD or GET *answer* was
# processed (time.time() then), which can be a little after the upstream looked up
# the object; under load that gap is well below this.
STALE_SLACK = 1.0
RESPONSE_TIMEOUT = 15.0  # one pipelined batch; a hang fails instead of eating the budget
MiB = 2**20
RSS_HEADROOM = 200 * MiB  # peak VmRSS / VmHWM must stay below warm-up RSS + this
# Descriptors are compared by kind: Sprox keeps bounded pools whose size after a run
# says nothing about leaks (idle block-file descriptors, up to MAX_IDLE_FDS, and those
# the hit kernel's mirror holds for the objects it knows, up to its MAX_ENTRIES; idle
# upstream keep-alive connections, up to the connector limit, closed after 15 s).
# Everything else must be back to its warm-up count, within this margin; and after a
# purge (which closes every idle block file) no block file may be open at all.
FD_MARGIN = 8
UPSTREAM_POOL_LIMIT = 256  # sprox.upstream.s3: TCPConnector(limit=max_connections=256)
IDLE_BLOCK_FDS_LIMIT = MAX_IDLE_FDS + MIRROR_ENTRIES
PIPELINE_SHARE = 0.3  # share of batches that pipeline 2-8 requests
OVERWRITE_EVERY = 1.0  # one mutable object overwritten on the upstream per second...
PUBLISH_EVERY = 0.25  # ...and one new (cold) object published this often

HOT_SIZES = [3 * 1024, 5_000, 40_000, BLOCK, BLOCK + 1, 100_000, 2 * BLOCK, 200_003, 300_000,
             8 * BLOCK + 1, 1_000_000, 1_500_017, 2 * 2**20 + 12_345, 3 * 2**20 - 1]
COLD_SIZES = [4096, 12_345, BLOCK - 1, 150_000, 4 * BLOCK, 333_333, 700_001, 2**20, 1_600_000, 2_500_003]
MUTABLE_SIZES = [20_000, 70_000, 200_000, 450_005, 1_000_001, 1_800_000]
INITIAL_COLD = 16


# -- what the upstream holds -----------------------------------------------------------------


@dataclass(slots=True)
class Version:
    name: str  # the data key: byte i is a function of (name, i)
    data: bytes
    etag: str
    put_at: float  # monotonic, taken before the upstream put
    replaced_at: float | None = None  # monotonic, taken after the next version's put


class Catalogue:
    """Every object's versions, and which objects are hot, mutable or cold."""

    def __init__(self, upstream: CountingUpstream) -> None:
        self.upstream = upstream
        self.versions: dict[str, list[Version]] = {}
        self.hot = [f"hot/{i:02d}-{size}" for i, size in enumerate(HOT_SIZES)]
        self.mutable = [f"mut/{i:02d}" for i in range(len(MUTABLE_SIZES))]
        self.cold_unread: collections.deque[str] = collections.deque()
        self.cold_recent: collections.deque[str] = collections.deque(maxlen=16)
        self.published = 0
        self.overwrites = 0
        for key in self.hot:
            self._put(key, key, int(key.rsplit("-", 1)[1]))
        for key, size in zip(self.mutable, MUTABLE_SIZES, strict=True):
            self._put(key, f"{key}#v0", size)
        for _ in range(INITIAL_COLD):
            self.publish_cold()

    def _put(self, key: str, name: str, size: int) -> None:
        data = object_bytes(name, size)
        put_at = time.monotonic()
        etag = self.upstream.put(BUCKET, key, data)
        history = self.versions.setdefault(key, [])
        if history:
            history[-1].replaced_at = time.monotonic()
        history.append(Version(name, data, etag, put_at))

    def publish_cold(self) -> None:
        key = f"cold/{self.published:04d}-{COLD_SIZES[self.published % len(COLD_SIZES)]}"
        self.published += 1
        self._put(key, key, int(key.rsplit("-", 1)[1]))
        self.cold_unread.append(key)

    def overwrite(self) -> None:
        """The next mutable object (round robin) gets a new version of a new size."""
        key = self.mutable[self.overwrites % len(self.mutable)]
        self.overwrites += 1
        n = len(self.versions[key])
        self._put(key, f"{key}#v{n}", MUTABLE_SIZES[self.mutable.index(key)] + 1013 * n)

    def identify(self, data: bytes) -> str:
        """Where the first 64 bytes of `data` come from, for failure messages."""
        probe = data[:64]
        if probe.startswith(b"HTTP/1.1 "):
            return f"a response head {data[:200]!r}"
        found = [f"{v.name} at offset {v.data.find(probe)}" for history in self.versions.values()
                 for v in history if probe in v.data]
        return " or ".join(found) if found else f"unknown bytes {probe[:32]!r}"

    def current(self, key: str) -> Version:
        return self.versions[key][-1]

    def acceptable(self, key: str, sent_at: float, received_at: float) -> list[Version]:
        """Versions a response may carry, newest first: on the upstream before the
        response arrived, and not replaced more than TTL + slack before the request."""
        return [v for v in reversed(self.versions[key])
                if v.put_at <= received_at
                and (v.replaced_at is None or sent_at <= v.replaced_at + TTL + STALE_SLACK)]


# -- ranges ----------------------------------------------------------------------------------


def pick_range(rng: random.Random, size: int, allow_unsatisfiable: bool) -> str | None:
    """A Range header (or None) of every form: a-b, a-, -n, across block boundaries,
    past the end, single bytes, and (for objects that never change) unsatisfiable."""
    r = rng.random()
    if r < 0.12:
        return None
    if r < 0.32:
        first = rng.randrange(size)
        return f"bytes={first}-{min(size - 1, first + rng.randrange(min(size, 256 * 1024)))}"
    if r < 0.50 and size > BLOCK + 1:
        boundary = rng.randrange(1, (size - 1) // BLOCK + 1) * BLOCK
        first = max(0, boundary - rng.randint(1, 5000))
        last = min(size - 1, boundary + rng.choice([0, 1, rng.randrange(1, 3 * BLOCK)]))
        return f"bytes={first}-{last}"
    if r < 0.62:
        return f"bytes={rng.randrange(size)}-"
    if r < 0.76:
        return f"bytes=-{rng.choice([1, rng.randint(1, min(size, 300_000)), size, size + 777])}"
    if r < 0.84:
        first = rng.randrange(size)
        return f"bytes={first}-{size + rng.randrange(100_000)}"  # last byte past the end
    if r < 0.92:
        return rng.choice(["bytes=0-0", f"bytes={size - 1}-{size - 1}", f"bytes={size - 1}-"])
    if allow_unsatisfiable and r < 0.95:
        return f"bytes={size + rng.randrange(0, 1000)}-"
    return f"bytes=0-{rng.randrange(size)}"


def expected_span(range_header: str | None, size: int) -> tuple[int, int, int]:
    """(status, first, last) of an answer for an object of `size` (> 0) bytes."""
    if range_header is None:
        return 200, 0, size - 1
    a, b = range_header.removeprefix("bytes=").split("-")
    if a == "":
        return 206, max(0, size - int(b)), size - 1
    first, last = int(a), size - 1 if b == "" else min(int(b), size - 1)
    if first >= size:
        return 416, -1, -1
    return 206, first, last


# -- a minimal, strict HTTP/1.1 client --------------------------------------------------------

_STATUS_LINE = re.compile(rb"HTTP/1\.1 ([1-5][0-9][0-9]) [\x20-\x7e]*")
_HEADER_LINE = re.compile(rb"([!#$%&'*+\-.^_`|~0-9A-Za-z]+):[ \t]*([\x20-\x7e\t]*?)[ \t]*")
_SINGLE = frozenset({"content-length", "content-range", "etag", "transfer-encoding", "connection"})
MAX_HEAD = 64 * 1024


class ProtocolError(Exception):
    pass


class Connection(asyncio.BufferedProtocol):
    """One client connection. A body is received straight into its own buffer
    (recv_into), so the client copies each byte once: cheap enough that 200 of them
    leave Sprox most of the machine."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.pending = bytearray()  # received, not consumed yet (heads, and whatever follows)
        self._scratch = memoryview(bytearray(256 * 1024))
        self._body: memoryview | None = None  # the body being received, when it is
        self._filled = 0
        self._waiter: asyncio.Future | None = None
        self.closed = False
        self.error: BaseException | None = None

    # asyncio's side
    def connection_made(self, transport) -> None:
        self.transport = transport

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._body[self._filled:] if self._body is not None else self._scratch

    def buffer_updated(self, nbytes: int) -> None:
        if self._body is not None:
            self._filled += nbytes
            if self._filled == len(self._body):
                self._wake()
        else:
            self.pending += self._scratch[:nbytes]
            self._wake()

    def eof_received(self) -> bool:
        self.closed = True
        self._wake()
        return False

    def connection_lost(self, exc: BaseException | None) -> None:
        self.closed, self.error = True, exc
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def _wait(self) -> None:
        if self.closed:
            raise EOFError(f"connection closed by Sprox ({self.error!r})")
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    # the client's side
    def write(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    async def read_head(self) -> bytes:
        while True:
            end = self.pending.find(b"\r\n\r\n")
            if end >= 0:
                head = bytes(self.pending[:end])
                del self.pending[:end + 4]
                return head
            if len(self.pending) > MAX_HEAD:
                raise ProtocolError(f"no end of a response head in {len(self.pending)} bytes")
            await self._wait()

    async def read_body(self, length: int) -> bytearray:
        body = bytearray(length)
        taken = min(length, len(self.pending))
        body[:taken] = self.pending[:taken]
        del self.pending[:taken]
        if taken < length:
            self._body, self._filled = memoryview(body), taken
            try:
                while self._filled < length:
                    await self._wait()
            finally:
                self._body = None
        return body

    async def wait_closed(self) -> bytes:
        """b"" once Sprox closed the connection; else the bytes it sent instead."""
        while not self.closed and not self.pending:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return bytes(self.pending[:80])


@dataclass(slots=True)
class Response:
    status: int
    headers: dict[str, str]
    body: bytes | bytearray


async def read_response(connection: Connection, head: bool) -> Response:
    """One response: status line, headers, then exactly Content-Length body bytes
    (none for HEAD). Anything else (chunked, folded or duplicate framing headers,
    a bare LF, a missing length) is a ProtocolError: the stream could not be framed."""
    lines = (await connection.read_head()).split(b"\r\n")
    match = _STATUS_LINE.fullmatch(lines[0])
    if match is None:
        raise ProtocolError(f"bad status line {lines[0][:120]!r}")
    status = int(match.group(1))
    headers: dict[str, str] = {}
    for line in lines[1:]:
        header = _HEADER_LINE.fullmatch(line)
        if header is None:
            raise ProtocolError(f"bad header line {line[:120]!r}")
        name, value = header.group(1).decode().lower(), header.group(2).decode()
        if name in headers:
            if name in _SINGLE:
                raise ProtocolError(f"duplicate {name} header")
            headers[name] += ", " + value
        else:
            headers[name] = value
    if status < 200:
        raise ProtocolError(f"unexpected interim response {status}")
    if "transfer-encoding" in headers:
        raise ProtocolError(f"Transfer-Encoding {headers['transfer-encoding']!r}: every answer here has a known length")
    if head or status in (204, 304):
        return Response(status, headers, b"")
    length = headers.get("content-length")
    if length is None or not length.isdigit():
        raise ProtocolError(f"status {status} without a valid Content-Length ({length!r})")
    return Response(status, headers, await connection.read_body(int(length)))


@dataclass(slots=True)
class Request:
    method: str
    key: str
    range: str | None
    close: bool = False

    def encode(self, host: str) -> bytes:
        lines = [f"{self.method} /{BUCKET}/{self.key} HTTP/1.1", f"Host: {host}"]
        if self.range is not None:
            lines.append(f"Range: {self.range}")
        if self.close:
            lines.append("Connection: close")
        return ("\r\n".join(lines) + "\r\n\r\n").encode()


def describe(batch: list[tuple[str, Request]]) -> str:
    if len(batch) == 1:
        return ""
    return ": " + ", ".join(f"{r.method} {r.key} {r.range or '(whole)'}" for _, r in batch)


# -- the load ----------------------------------------------------------------------------------


@dataclass
class Failures:
    """Failed requests, and the first few failures described."""

    failures: list[str] = field(default_factory=list)
    failed: int = 0  # requests that failed (one failure entry may cover several)

    def fail(self, count: int, message: str) -> None:
        self.failed += count
        if len(self.failures) < 30:
            self.failures.append(message)


@dataclass
class Tally(Failures):
    requests: int = 0
    pipelined: int = 0
    connections: int = 0
    body_bytes: int = 0
    stale: int = 0  # answers carrying a replaced version (inside TTL + slack): allowed
    by_kind: collections.Counter = field(default_factory=collections.Counter)
    by_status: collections.Counter = field(default_factory=collections.Counter)
    x_cache: collections.Counter = field(default_factory=collections.Counter)
    latencies: list[float] = field(default_factory=list)  # non-pipelined, seconds


class Load:
    """The clients, the upstream's changes while they run, and what they saw."""

    def __init__(self, catalogue: Catalogue, endpoint: str) -> None:
        self.catalogue = catalogue
        self.host_header = endpoint.removeprefix("http://")
        host, port = self.host_header.rsplit(":", 1)
        self.host, self.port = host, int(port)
        self.tally = Tally()
        self.started = time.monotonic()
        self.deadline = 0.0
        self.hot_only = False

    # Request mix: HEAD 10%, mutable objects 15%, first reads of cold objects 7%,
    # recently published objects 8% (concurrent first reads), hot objects the rest.
    def choose(self, rng: random.Random) -> tuple[str, Request]:
        cat = self.catalogue
        r = 1.0 if self.hot_only else rng.random()
        if r < 0.10:
            key = rng.choice(cat.hot + cat.mutable)
            size = len(cat.current(key).data)
            range_header = pick_range(rng, size, key.startswith("hot/")) if rng.random() < 0.3 else None
            return "head", Request("HEAD", key, range_header)
        if r < 0.25:
            key = rng.choice(cat.mutable)
            return "mutable", Request("GET", key, pick_range(rng, len(cat.current(key).data), False))
        if r < 0.32 and cat.cold_unread:
            key = cat.cold_unread.popleft()
            cat.cold_recent.append(key)
            return "cold-first", Request("GET", key, pick_range(rng, len(cat.current(key).data), True))
        if r < 0.40 and cat.cold_recent:
            key = rng.choice(cat.cold_recent)
            return "cold-recent", Request("GET", key, pick_range(rng, len(cat.current(key).data), True))
        key = rng.choice(cat.hot)
        return "hot", Request("GET", key, pick_range(rng, len(cat.current(key).data), True))

    def verify(self, request: Request, response: Response, sent_at: float, received_at: float) -> str | None:
        """None when the response is right for one whole acceptable version."""
        candidates = self.catalogue.acceptable(request.key, sent_at, received_at)
        problems = []
        for n, version in enumerate(candidates):
            problem = self._match(request, response, version)
            if problem is None:
                if n:
                    self.tally.stale += 1
                return None
            problems.append(f"as {version.name}: {problem}")
        if not candidates:
            problems.append("no acceptable version (test bug)")
        return "; ".join(problems)

    def _match(self, request: Request, response: Response, version: Version) -> str | None:
        size = len(version.data)
        status, first, last = expected_span(request.range, size)
        headers = response.headers
        if response.status != status:
            return f"status {response.status}, expected {status} (body {response.body[:200]!r})"
        if status == 416:
            if headers.get("content-range") != f"bytes */{size}":
                return f"416 with Content-Range {headers.get('content-range')!r}"
            # (The body is the upstream's when Sprox passes its 416 through: the test
            # upstream sends none.)
            if request.method == "GET" and response.body and b"<Code>InvalidRange</Code>" not in response.body:
                return f"416 body {response.body[:200]!r}"
            return None
        length = last - first + 1
        if headers.get("content-length") != str(length):
            return f"Content-Length {headers.get('content-length')!r}, expected {length}"
        content_range = headers.get("content-range")
        if status == 206 and content_range != f"bytes {first}-{last}/{size}":
            return f"Content-Range {content_range!r}, expected 'bytes {first}-{last}/{size}'"
        if status == 200 and content_range is not None:
            return f"200 with Content-Range {content_range!r}"
        if headers.get("etag") != version.etag:
            return f"ETag {headers.get('etag')!r}, expected {version.etag!r}"
        if request.method == "GET" and response.body != version.data[first:last + 1]:
            bad = check_bytes(version.name, first, response.body)
            assert bad is not None
            return (f"wrong byte at offset {bad} (answer {first}-{last}, {len(response.body)} bytes); "
                    f"from there on it is {self.catalogue.identify(response.body[bad - first:])}")
        return None

    async def client(self, index: int) -> None:
        rng = random.Random(index)
        while time.monotonic() < self.deadline:
            await self.connection(rng)

    async def connection(self, rng: random.Random) -> None:
        tally = self.tally
        try:
            _, connection = await asyncio.get_running_loop().create_connection(Connection, self.host, self.port)
        except OSError as exc:
            tally.fail(1, f"connect: {exc!r}")
            await asyncio.sleep(0.1)
            return
        tally.connections += 1
        budget = rng.choice([1, 3, 10, 50, 200])
        done = 0
        try:
            while done < budget and time.monotonic() < self.deadline:
                size = min(rng.randint(2, 8) if rng.random() < PIPELINE_SHARE else 1, budget - done)
                batch = [self.choose(rng) for _ in range(size)]
                closing = done + size >= budget and rng.random() < 0.5
                if closing:
                    batch[-1][1].close = True
                answered = await self.exchange(connection, batch)
                done += size
                if answered < size:
                    return  # the connection is unusable; the failure is recorded
                if closing:
                    try:
                        async with asyncio.timeout(5):
                            extra = await connection.wait_closed()
                    except TimeoutError as exc:
                        extra = repr(exc).encode()
                    if extra:
                        tally.fail(1, f"connection still open after 'Connection: close' ({extra[:80]!r})")
                    return
        finally:
            connection.close()

    async def exchange(self, connection: Connection, batch: list[tuple[str, Request]]) -> int:
        """Write the batch in one go, then read and check its responses in order.
        Returns how many were answered."""
        tally = self.tally
        answered = 0
        sent_at = time.monotonic()
        pipelined = len(batch) > 1
        try:
            connection.write(b"".join(request.encode(self.host_header) for _, request in batch))
            async with asyncio.timeout(RESPONSE_TIMEOUT):
                for kind, request in batch:
                    response = await read_response(connection, request.method == "HEAD")
                    received_at = time.monotonic()
                    answered += 1
                    tally.requests += 1
                    tally.by_kind[kind] += 1
                    tally.by_status[response.status] += 1
                    tally.x_cache[response.headers.get("x-cache", "-")] += 1
                    tally.body_bytes += len(response.body)
                    if pipelined:
                        tally.pipelined += 1
                    else:
                        tally.latencies.append(received_at - sent_at)
                    problem = self.verify(request, response, sent_at, received_at)
                    if problem is not None:
                        tally.fail(1, f"t={received_at - self.started:.2f}s {kind} {request.method} "
                                      f"{request.key} Range={request.range} (request {answered} of "
                                      f"{len(batch)} pipelined{describe(batch)}): {problem}")
                    if request.close and response.headers.get("connection", "").lower() != "close":
                        tally.fail(1, f"no 'Connection: close' in the answer to a closing request: {response.headers}")
        except (OSError, EOFError, TimeoutError, ProtocolError) as exc:
            kind, request = batch[min(answered, len(batch) - 1)]
            pending = bytes(connection.pending)  # what arrived but could not be framed, if anything
            seen = f"; {len(pending)} unread bytes: {self.catalogue.identify(pending)}" if pending else ""
            tally.fail(len(batch) - answered,
                       f"t={time.monotonic() - self.started:.2f}s {kind} {request.method} {request.key} "
                       f"Range={request.range} (request {answered + 1} of {len(batch)} pipelined"
                       f"{describe(batch)}): {exc!r}{seen}")
        return answered

    async def publisher(self) -> None:
        next_publish = next_overwrite = time.monotonic()
        while time.monotonic() < self.deadline:
            now = time.monotonic()
            if now >= next_publish:
                self.catalogue.publish_cold()
                next_publish += PUBLISH_EVERY
            if now >= next_overwrite:
                self.catalogue.overwrite()
                next_overwrite += OVERWRITE_EVERY
            await asyncio.sleep(min(next_publish, next_overwrite) - time.monotonic())

    async def run(self, seconds: float, connections: int, *, hot_only: bool = False) -> None:
        self.hot_only = hot_only
        self.deadline = time.monotonic() + seconds
        tasks = [asyncio.ensure_future(self.client(i)) for i in range(connections)]
        if not hot_only:
            tasks.append(asyncio.ensure_future(self.publisher()))
        # Clients finish the batch in flight after the deadline: bounded by RESPONSE_TIMEOUT.
        done, pending = await asyncio.wait(tasks, timeout=seconds + RESPONSE_TIMEOUT + 10)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        for task in done:
            if task.exception() is not None:
                self.tally.fail(1, f"client task crashed: {task.exception()!r}")
        if pending:
            self.tally.fail(len(pending), f"{len(pending)} client tasks did not stop")

    async def warm_up(self) -> None:
        """Every hot and mutable object read whole once, then a short burst of
        hot reads on all connections, so the baseline includes a loaded Sprox."""
        for key in self.catalogue.hot + self.catalogue.mutable:
            _, connection = await asyncio.get_running_loop().create_connection(Connection, self.host, self.port)
            try:
                await self.exchange(connection, [("warm-up", Request("GET", key, None))])
            finally:
                connection.close()
        await self.run(2.0, CONNECTIONS, hot_only=True)


# -- Sprox, seen from /proc --------------------------------------------------------------------


def rss_bytes(pid: int, field_name: str = "VmRSS") -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field_name} for {pid}")


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _tcp_sockets(pid: int) -> dict[int, tuple[int, int, str]]:
    """inode -> (local port, remote port, state) from the process's network namespace."""
    table = {}
    for name in ("tcp", "tcp6"):
        try:
            with open(f"/proc/{pid}/net/{name}") as f:
                next(f)
                for line in f:
                    parts = line.split()
                    local, remote, state, inode = parts[1], parts[2], parts[3], int(parts[9])
                    table[inode] = (int(local.rsplit(":", 1)[1], 16), int(remote.rsplit(":", 1)[1], 16), state)
        except FileNotFoundError:
            pass
    return table


def fd_census(pid: int, sprox_port: int, upstream_port: int, blocks_dir: Path) -> collections.Counter:
    """Sprox's descriptors by kind: pooled (idle block files, upstream keep-alive
    connections, both bounded by Sprox) and everything else."""
    sockets = _tcp_sockets(pid)
    kinds: collections.Counter = collections.Counter()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except FileNotFoundError:
            continue
        kinds["total"] += 1
        if target.startswith("socket:["):
            local, remote, state = sockets.get(int(target[8:-1]), (0, 0, ""))
            if state == "0A":
                kinds["listening"] += 1
            elif remote == upstream_port:
                kinds["upstream socket"] += 1
            elif local == sprox_port:
                kinds["client socket"] += 1
            else:
                kinds["other socket"] += 1
        elif target.startswith(str(blocks_dir)):
            kinds["deleted block file" if target.endswith(" (deleted)") else "block file"] += 1
        else:
            kinds["other"] += 1
    return kinds


def unpooled(census: collections.Counter) -> int:
    return census["total"] - census["upstream socket"] - census["block file"]


class Sampler:
    """Samples Sprox's VmRSS (every 0.2 s) and descriptor count (every 1 s) on a thread."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.rss: list[int] = []
        self.fds: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sprox-sampler", daemon=True)

    def _run(self) -> None:
        tick = 0
        while not self._stop.wait(0.2):
            self.rss.append(rss_bytes(self.pid))
            if tick % 5 == 0:
                self.fds.append(len(os.listdir(f"/proc/{self.pid}/fd")))
            tick += 1

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


def settled_census(pid: int, sprox_port: int, upstream_port: int, blocks_dir: Path,
                   baseline: collections.Counter | None, wait: float = 5.0) -> collections.Counter:
    """The census once closed client connections are gone from Sprox (it closes its
    side when it reads the EOF), waiting up to `wait` seconds."""
    deadline = time.monotonic() + wait
    while True:
        census = fd_census(pid, sprox_port, upstream_port, blocks_dir)
        quiet = census["client socket"] == 0 and (baseline is None or unpooled(census) <= unpooled(baseline))
        if quiet or time.monotonic() > deadline:
            return census
        time.sleep(0.1)


def blocks_in(range_header: str | None, size: int) -> int:
    """How many blocks of an object of `size` bytes a GET with this Range can return."""
    status, first, last = expected_span(range_header, size)
    return 0 if status == 416 else last // BLOCK - first // BLOCK + 1


def purge_cache(endpoint: str) -> int:
    """Purge the running Sprox's whole cache (what `sprox cache purge` does); returns
    how many objects it dropped."""
    host, port = endpoint.removeprefix("http://").rsplit(":", 1)
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        connection.request("POST", "/_sprox/cache/purge")
        response = connection.getresponse()
        body = response.read()
        assert response.status == 200, (response.status, body)
        return json.loads(body)["purged"]
    finally:
        connection.close()


def _percentile(values: list[float], share: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


@pytest.mark.slow
def test_two_hundred_connections_of_mixed_reads_stay_correct_and_bounded(start_sprox, tmp_path):
    began = time.monotonic()
    with CountingUpstream(first_byte_delay=FIRST_BYTE_DELAY) as upstream:
        catalogue = Catalogue(upstream)
        cache_dir = tmp_path / "cache"
        proc = start_sprox(tmp_path, "--upstream", upstream.endpoint, "--cache-dir", str(cache_dir),
                           "--block-size", "64KiB", "--ttl", str(int(TTL)))
        pid = proc.pid
        blocks_dir = (cache_dir / "blocks").resolve()
        load = Load(catalogue, proc.endpoint)

        asyncio.run(load.warm_up())
        warm_failures = list(load.tally.failures)
        census_after_warm_up = settled_census(pid, proc.port, upstream.port, blocks_dir, None)
        rss_after_warm_up = rss_bytes(pid)
        threads_after_warm_up = len(os.listdir(f"/proc/{pid}/task"))
        upstream.reset_counts()

        load = Load(catalogue, proc.endpoint)
        cpu_before, own_before = cpu_seconds(pid), resource.getrusage(resource.RUSAGE_SELF)
        load_began = time.monotonic()
        with Sampler(pid) as sampler:
            asyncio.run(load.run(LOAD_SECONDS, CONNECTIONS))
        load_seconds = time.monotonic() - load_began
        own_after = resource.getrusage(resource.RUSAGE_SELF)
        sprox_cpu = cpu_seconds(pid) - cpu_before
        own_cpu = (own_after.ru_utime + own_after.ru_stime) - (own_before.ru_utime + own_before.ru_stime)

        census_at_end = settled_census(pid, proc.port, upstream.port, blocks_dir, census_after_warm_up)
        # Purging the cache drops every record, which closes every idle block-file
        # descriptor: one still open now was acquired and never released.
        purged = purge_cache(proc.endpoint)
        census_after_purge = fd_census(pid, proc.port, upstream.port, blocks_dir)
        peak_rss = max([rss_after_warm_up, *sampler.rss])
        high_water = rss_bytes(pid, "VmHWM")
        threads = (threads_after_warm_up, len(os.listdir(f"/proc/{pid}/task")))

        upstream_gets: collections.Counter = collections.Counter()
        upstream_heads: collections.Counter = collections.Counter()
        blocks_fetched: collections.Counter = collections.Counter()
        for seen in list(upstream.seen):
            key = seen.path.removeprefix(f"/{BUCKET}/")
            (upstream_gets if seen.method == "GET" else upstream_heads)[key] += 1
            if seen.method == "GET" and key in catalogue.versions:
                blocks_fetched[key] += blocks_in(seen.range, len(catalogue.current(key).data))

        os.kill(pid, signal.SIGTERM)
        term_sent = time.monotonic()
        try:
            exit_status = proc._proc.wait(15)
        except subprocess.TimeoutExpired:
            exit_status = None
        exit_seconds = time.monotonic() - term_sent
        proc.stop()
    stderr = proc.stderr_path.read_text(errors="replace")

    tally = load.tally
    hot_gets = sum(upstream_gets[key] for key in catalogue.hot)
    revalidation_bound = int(load_seconds / TTL) + 2
    busiest_revalidation = max(upstream_heads[key] for key in catalogue.hot)
    refetched = [key for key in catalogue.versions if key.startswith("cold/")
                 and blocks_fetched[key] > -(-len(catalogue.current(key).data) // BLOCK)]
    # Log records start with a timestamp; a traceback's lines belong to the record above.
    records = re.split(r"\n(?=\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)", stderr)
    suspicious = [record for record in records
                  if re.search(r"Traceback| ERROR |CRITICAL|Unclosed|never retrieved|was destroyed", record)]
    warnings = [record for record in records if " WARNING " in record]

    summary = "\n".join([
        (f"load: {tally.requests} requests in {load_seconds:.1f} s = {tally.requests / load_seconds:.0f} req/s "
         f"over {tally.connections} connections ({CONNECTIONS} concurrent), {tally.pipelined} pipelined, "
         f"{tally.body_bytes / MiB:.0f} MiB of bodies ({tally.body_bytes / MiB / load_seconds:.0f} MiB/s)"),
        f"  kinds {dict(tally.by_kind)}; status {dict(tally.by_status)}; X-Cache {dict(tally.x_cache)}",
        (f"  latency (non-pipelined) p50 {_percentile(tally.latencies, .5) * 1000:.1f} ms, "
         f"p99 {_percentile(tally.latencies, .99) * 1000:.1f} ms; stale-but-allowed answers {tally.stale}"),
        (f"  objects: {catalogue.published} cold published, {catalogue.overwrites} overwrites; "
         f"upstream GETs {sum(upstream_gets.values())} (hot objects: {hot_gets}), "
         f"HEADs {sum(upstream_heads.values())} (busiest hot object: {busiest_revalidation}, "
         f"bound {revalidation_bound})"),
        f"  failed requests: {tally.failed} (+{len(warm_failures)} in warm-up)",
        (f"  cpu: sprox {sprox_cpu:.1f} s ({sprox_cpu / load_seconds:.0%} of a core), "
         f"test process (clients + upstream) {own_cpu:.1f} s ({own_cpu / load_seconds:.0%})"),
        (f"  rss: after warm-up {rss_after_warm_up / MiB:.0f} MiB, sampled peak {peak_rss / MiB:.0f} MiB, "
         f"VmHWM {high_water / MiB:.0f} MiB, bound {(rss_after_warm_up + RSS_HEADROOM) / MiB:.0f} MiB"),
        f"  fds after warm-up {dict(census_after_warm_up)}",
        f"  fds at end        {dict(census_at_end)} (sampled max total {max(sampler.fds, default=0)})",
        f"  fds after purging {purged} objects {dict(census_after_purge)}; threads {threads[0]} -> {threads[1]}",
        (f"  SIGTERM: exit status {exit_status} after {exit_seconds:.2f} s; "
         f"test runtime {time.monotonic() - began:.1f} s"),
        f"  sprox log: {len(suspicious)} errors, {len(warnings)} warnings {warnings[:3]}",
    ])
    print("\n" + summary)
    failures = "\n".join(warm_failures + tally.failures)
    assert not warm_failures and tally.failed == 0, f"{summary}\nfirst failures:\n{failures}"
    assert tally.requests > 0 and tally.by_kind["cold-first"] > 0 and tally.by_kind["mutable"] > 0, summary
    # What the upstream saw: hot objects were cached whole in warm-up, so only
    # revalidations (one HEAD per TTL, however many clients) reach it...
    assert hot_gets == 0, summary
    assert busiest_revalidation <= revalidation_bound, summary
    # ...and no block of an object that never changed was fetched twice.
    upstream_log = {key: [(seen.method, seen.range, seen.if_match) for seen in upstream.seen
                          if seen.path == f"/{BUCKET}/{key}"] for key in refetched}
    assert not refetched, f"blocks of unchanging objects fetched twice: {upstream_log}\n{summary}"
    # No descriptor leak: what is not in one of Sprox's bounded pools is back to its
    # warm-up count; the pools are within their bounds; no replaced version's file
    # is held open.
    assert census_at_end["client socket"] == 0, summary
    assert census_at_end["deleted block file"] == 0, summary
    assert unpooled(census_at_end) <= unpooled(census_after_warm_up) + FD_MARGIN, summary
    assert census_at_end["upstream socket"] <= UPSTREAM_POOL_LIMIT, summary
    assert census_at_end["block file"] <= IDLE_BLOCK_FDS_LIMIT, summary
    assert purged > 0 and census_after_purge["block file"] + census_after_purge["deleted block file"] == 0, summary
    assert unpooled(census_after_purge) <= unpooled(census_after_warm_up) + FD_MARGIN, summary
    assert max(peak_rss, high_water) < rss_after_warm_up + RSS_HEADROOM, summary
    assert exit_status == 0 and exit_seconds < 10, summary
    assert not suspicious, f"{summary}\n{len(suspicious)} sprox log records like:\n" + "\n".join(suspicious[:3])
