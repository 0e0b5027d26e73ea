"""Sprox at and over its connection limit, then stopped with answers in flight.

A real Sprox (`--max-connections 800`) in front of a counting upstream takes 1,000
concurrent client connections for a bounded time (20 s; `SPROX_CONNECTIONS_SECONDS`
changes it) of mixed traffic: cache hits of every Range form, HEADs, first reads
(misses), re-reads, keep-alive connections with pipelined batches, and a few PUTs read
back. Every answer must be right for its object (self-checking bytes, tests/data.py),
or be the documented refusal: S3's `503 SlowDown` with a request id and
`Connection: close`, as the first and only answer on its connection, followed by the
close. Refused clients back off and retry, as S3 clients do. Nothing else may fail: a
connection Sprox served is never cut, reset, or answered wrongly.

Watched from outside (/proc): Sprox's resident memory stays under its warm-up value
plus RSS_HEADROOM (why that much: see the constant), and after the load its descriptors,
apart from its two bounded pools, are back to their warm-up count.

Then SIGTERM while answers are in flight (misses waiting on a slowed upstream, large
hits to slow readers, uploads): every one of them completes whole, idle connections
are closed at once, Sprox exits 0 within its shutdown grace, every answered request is
in the access log's Parquet files, and a restarted Sprox serves what the first one
cached (also what it cached while stopping) as hits without asking the upstream.

A summary (requests, refusals, RSS, descriptors, timings) is printed: run with -s.
"""

from __future__ import annotations

import asyncio
import collections
import os
import random
import re
import resource
import signal
import socket
import time
from dataclasses import dataclass, field

import pytest

from sprox.cache.blockfiles import MAX_IDLE_FDS
from sprox.cache.mirror import MAX_ENTRIES as MIRROR_ENTRIES
from sprox.server import SHUTDOWN_SECONDS
from tests.counting_upstream import CountingUpstream
from tests.data import object_bytes
from tests.functional.test_load import (
    Failures,
    Sampler,
    expected_span,
    pick_range,
    rss_bytes,
    settled_census,
    unpooled,
)

# Read at import: the session's autouse fixture hides SPROX_* variables from tests.
LOAD_SECONDS = float(os.environ.get("SPROX_CONNECTIONS_SECONDS", "20"))
MAX_CONNECTIONS = 800
CLIENTS = 1000
BUCKET = "conn"
BLOCK = 64 * 1024
MiB = 2**20
RAMP_SECONDS = 1.0  # clients start spread over this, not in one SYN flood
BACKOFF = (0.1, 0.4)  # seconds a refused client waits before it tries again
RESPONSE_TIMEOUT = 20.0  # one batch; a hang fails instead of eating the budget
CONNECT_TIMEOUT = 15.0  # covers SYN retransmits when the listen queue overflows
# Sprox's memory, per served connection: the lane's Connection, its llhttp parser and
# transport, aiohttp's handler and parser for those that use the aiohttp lane, a
# request head or few (these are small), and a response's write buffer: under 64 KiB
# each, 50 MiB for 800 (measured: about 55 MiB in all over the warm-up value). Another
# 50 MiB covers in-flight fills (block buffers), the access log's buffer (a few
# seconds of records) and the allocator. Memory kept per request (50,000 to 100,000
# of them) or per refused connection (thousands) would not fit.
RSS_HEADROOM = 100 * MiB
FD_MARGIN = 8  # descriptors outside the pools may differ by this after the load
UPSTREAM_POOL_LIMIT = 256  # sprox.upstream.s3: TCPConnector(limit=256)
# Idle block files, and those the hit kernel's mirror holds open for the objects it knows.
IDLE_BLOCK_FDS_LIMIT = MAX_IDLE_FDS + MIRROR_ENTRIES
SLOW_UPSTREAM = 1.0  # first-byte delay of the upstream while SIGTERM arrives

HOT_SIZES = [3_000, 40_000, BLOCK + 1, 200_003, 700_001, 1_500_017]
BIG_SIZE = 6 * MiB + 5  # read slowly while Sprox stops
COLD_SIZES = [2_000, 9_000, 33_333, 70_001]
COLD_OBJECTS = 600  # first reads during the load (published up front)
TERM_MISSES = 6  # fresh objects first read while Sprox stops
TERM_SIZE = MiB + 3
SLOW_READERS = 3
IDLE_AT_TERM = 5


# -- objects ---------------------------------------------------------------------------------------

class Objects:
    """Every object on the upstream, by key: its bytes and ETag. Immutable: a key is
    never overwritten, so every answer has exactly one right content."""

    def __init__(self, upstream: CountingUpstream) -> None:
        self.upstream = upstream
        self.data: dict[str, bytes] = {}
        self.etags: dict[str, str] = {}
        self.hot = [f"hot/{i}-{size}" for i, size in enumerate(HOT_SIZES)]
        self.big = f"big-{BIG_SIZE}"
        self.cold_unread = collections.deque(f"cold/{i:04d}-{COLD_SIZES[i % len(COLD_SIZES)]}"
                                             for i in range(COLD_OBJECTS))
        self.cold_read: list[str] = []
        self.term = [f"term/{i}-{TERM_SIZE}" for i in range(TERM_MISSES)]
        for key in [*self.hot, self.big, *self.cold_unread, *self.term]:
            self.put_upstream(key, object_bytes(key, int(key.rsplit("-", 1)[1])))

    def put_upstream(self, key: str, data: bytes) -> None:
        self.data[key] = data
        self.etags[key] = self.upstream.put(BUCKET, key, data)

    def expect(self, key: str, data: bytes) -> None:
        """An object a client is about to PUT through Sprox."""
        self.data[key] = data


# -- a small, strict HTTP/1.1 client ------------------------------------------------------------

_STATUS_LINE = re.compile(rb"HTTP/1\.1 ([1-5][0-9][0-9]) [\x20-\x7e]*")
_SINGLE = frozenset({"content-length", "content-range", "etag", "transfer-encoding", "connection"})


class ProtocolError(Exception):
    pass


@dataclass(slots=True)
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes


@dataclass(slots=True)
class Request:
    method: str
    key: str
    range: str | None = None
    body: bytes | None = None
    close: bool = False

    def encode(self, host: str) -> bytes:
        lines = [f"{self.method} /{BUCKET}/{self.key} HTTP/1.1", f"Host: {host}"]
        if self.range is not None:
            lines.append(f"Range: {self.range}")
        if self.body is not None:
            lines.append(f"Content-Length: {len(self.body)}")
        if self.close:
            lines.append("Connection: close")
        return ("\r\n".join(lines) + "\r\n\r\n").encode() + (self.body or b"")


async def read_answer(reader: asyncio.StreamReader, head_request: bool, first: bool) -> Answer:
    """One answer: status line, headers, exactly Content-Length body bytes (none for a
    HEAD, except on a refusal: that 503 was sent before any request was read)."""
    raw = await reader.readuntil(b"\r\n\r\n")
    lines = raw[:-4].split(b"\r\n")
    match = _STATUS_LINE.fullmatch(lines[0])
    if match is None:
        raise ProtocolError(f"bad status line {lines[0][:120]!r}")
    status = int(match.group(1))
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.decode("latin-1").partition(":")
        name = name.lower()
        if not sep or name != name.strip():
            raise ProtocolError(f"bad header line {line[:120]!r}")
        if name in headers and name in _SINGLE:
            raise ProtocolError(f"duplicate {name} header")
        headers[name] = value.strip()
    if "transfer-encoding" in headers:
        raise ProtocolError("Transfer-Encoding: every answer here has a known length")
    if (head_request and not (first and status == 503)) or status in (204, 304):
        return Answer(status, headers, b"")
    length = headers.get("content-length", "")
    if not length.isdigit():
        raise ProtocolError(f"status {status} without a valid Content-Length ({length!r})")
    return Answer(status, headers, await reader.readexactly(int(length)))


def refusal_problem(answer: Answer) -> str | None:
    """None when `answer` is the documented refusal: 503 SlowDown, closing."""
    body, headers = answer.body, answer.headers
    if b"<Code>SlowDown</Code>" not in body or b"<Message>Please reduce your request rate.</Message>" not in body:
        return f"503 that is not SlowDown: {body[:200]!r}"
    if headers.get("connection") != "close" or not headers.get("x-amz-request-id") \
            or b"<RequestId>" + headers["x-amz-request-id"].encode() + b"</RequestId>" not in body:
        return f"SlowDown without Connection: close or a request id: {headers}"
    return None


def check(objects: Objects, request: Request, answer: Answer) -> str | None:
    """None when `answer` is right for `request` on the object's one content."""
    if request.method == "PUT":
        if answer.status != 200:
            return f"PUT answered {answer.status}: {answer.body[:200]!r}"
        objects.etags[request.key] = answer.headers.get("etag", "")
        return None
    data = objects.data[request.key]
    size = len(data)
    status, first, last = expected_span(request.range, size)
    headers = answer.headers
    if answer.status != status:
        return f"status {answer.status}, expected {status} ({answer.body[:200]!r})"
    if status == 416:
        return None if headers.get("content-range") == f"bytes */{size}" else f"416 with {headers}"
    if headers.get("content-length") != str(last - first + 1):
        return f"Content-Length {headers.get('content-length')!r}, expected {last - first + 1}"
    if status == 206 and headers.get("content-range") != f"bytes {first}-{last}/{size}":
        return f"Content-Range {headers.get('content-range')!r}, expected bytes {first}-{last}/{size}"
    if status == 200 and "content-range" in headers:
        return f"200 with Content-Range {headers['content-range']!r}"
    if headers.get("etag") != objects.etags.get(request.key):
        return f"ETag {headers.get('etag')!r}, expected {objects.etags.get(request.key)!r}"
    if request.method == "GET" and answer.body != data[first:last + 1]:
        wrong = next((i for i, (a, b) in enumerate(zip(answer.body, data[first:last + 1])) if a != b), None)
        return f"wrong bytes (first wrong at offset {first + (wrong or 0)} of {first}-{last})"
    return None


# -- the load -----------------------------------------------------------------------------------------

@dataclass
class Tally(Failures):
    requests: int = 0  # answered and right
    refused: int = 0  # connections answered 503 SlowDown
    connections: int = 0  # connections served (first answer not a refusal)
    served_now: int = 0  # client connections with a served answer, open now
    served_max: int = 0
    body_bytes: int = 0
    by_kind: collections.Counter = field(default_factory=collections.Counter)
    by_status: collections.Counter = field(default_factory=collections.Counter)
    request_ids: list[str] = field(default_factory=list)  # every served answer's x-amz-request-id


class Load:
    def __init__(self, objects: Objects, endpoint: str) -> None:
        self.objects = objects
        self.host_header = endpoint.removeprefix("http://")
        host, port = self.host_header.rsplit(":", 1)
        self.host, self.port = host, int(port)
        self.tally = Tally()
        self.deadline = 0.0
        self.puts = 0

    # Mix: hot GETs 70%, HEADs 10%, re-reads of objects already read ~17%, first reads
    # (misses, while unread objects last) 1.5%, PUTs (each read back in the same batch) 0.5%.
    def choose(self, rng: random.Random, client: int) -> list[tuple[str, Request]]:
        objects = self.objects
        r = rng.random()
        if r < 0.005:
            self.puts += 1
            key = f"put/{client}-{self.puts}"
            data = object_bytes(key, rng.choice([1_000, 17_000, 90_001]))
            objects.expect(key, data)
            return [("put", Request("PUT", key, body=data)), ("put-read", Request("GET", key))]
        if r < 0.02 and objects.cold_unread:
            key = objects.cold_unread.popleft()
            objects.cold_read.append(key)
            return [("miss", Request("GET", key, pick_range(rng, len(objects.data[key]), True)))]
        if r < 0.20 and objects.cold_read:
            key = rng.choice(objects.cold_read)
            return [("re-read", Request("GET", key, pick_range(rng, len(objects.data[key]), True)))]
        key = rng.choice(objects.hot)
        size = len(objects.data[key])
        if r < 0.30:
            return [("head", Request("HEAD", key, pick_range(rng, size, True) if rng.random() < 0.3 else None))]
        return [("hot", Request("GET", key, pick_range(rng, size, True)))]

    async def client(self, index: int) -> None:
        rng = random.Random(index)
        await asyncio.sleep(RAMP_SECONDS * index / CLIENTS)  # the ramp, not a wait for a condition
        while time.monotonic() < self.deadline:
            await self.connection(rng, index)

    async def connection(self, rng: random.Random, index: int) -> None:
        tally = self.tally
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT):
                reader, writer = await asyncio.open_connection(self.host, self.port)
        except (OSError, TimeoutError) as exc:
            tally.fail(1, f"connect: {exc!r}")
            await asyncio.sleep(0.1)
            return
        served = False
        budget = rng.choice([1, 4, 20, 100])
        done = 0
        try:
            while done < budget and time.monotonic() < self.deadline:
                batch = [item for _ in range(rng.choice([1, 1, 1, 2, 4])) for item in self.choose(rng, index)]
                if done + len(batch) >= budget and rng.random() < 0.5:
                    batch[-1][1].close = True
                outcome = await self.exchange(reader, writer, batch, first=not served)
                if outcome == "refused":
                    return
                if outcome != "ok":
                    return  # failed: recorded
                if not served:
                    served = True
                    tally.connections += 1
                    tally.served_now += 1
                    tally.served_max = max(tally.served_max, tally.served_now)
                done += len(batch)
                if batch[-1][1].close:
                    try:
                        async with asyncio.timeout(5):
                            extra = await reader.read(1)
                    except (TimeoutError, OSError) as exc:
                        extra = repr(exc).encode()
                    if extra:
                        tally.fail(1, f"still open after Connection: close ({extra[:80]!r})")
                    return
        finally:
            if served:
                tally.served_now -= 1
            writer.close()

    async def exchange(self, reader, writer, batch: list[tuple[str, Request]], first: bool) -> str:
        """Send the batch in one write, read and check its answers in order: "ok",
        "refused" (after the backoff), or "failed"."""
        tally = self.tally
        answered = 0
        try:
            writer.write(b"".join(request.encode(self.host_header) for _, request in batch))
            async with asyncio.timeout(RESPONSE_TIMEOUT):
                for kind, request in batch:
                    answer = await read_answer(reader, request.method == "HEAD", first and answered == 0)
                    if answer.status == 503 and first and answered == 0:
                        problem = refusal_problem(answer)
                        if problem is None and await reader.read(1) != b"":
                            problem = "refusal not followed by the close"
                        if problem is not None:
                            tally.fail(len(batch), problem)
                            return "failed"
                        tally.refused += 1
                        writer.close()
                        await asyncio.sleep(random.uniform(*BACKOFF))  # what a client does with SlowDown
                        return "refused"
                    answered += 1
                    problem = check(self.objects, request, answer)
                    if problem is not None:
                        tally.fail(1, f"{kind} {request.method} {request.key} Range={request.range}: {problem}")
                        continue
                    tally.requests += 1
                    tally.by_kind[kind] += 1
                    tally.by_status[answer.status] += 1
                    tally.body_bytes += len(answer.body)
                    tally.request_ids.append(answer.headers.get("x-amz-request-id", "?"))
                    if request.close and answer.headers.get("connection", "").lower() != "close":
                        tally.fail(1, f"no Connection: close in answer to a closing request: {answer.headers}")
        except (OSError, EOFError, TimeoutError, ProtocolError, asyncio.IncompleteReadError,
                asyncio.LimitOverrunError) as exc:
            kind, request = batch[min(answered, len(batch) - 1)]
            tally.fail(len(batch) - answered, f"{kind} {request.method} {request.key} (answer {answered + 1} of "
                                              f"{len(batch)}, first on its connection: {first}): {exc!r}")
            return "failed"
        return "ok"

    async def run(self, seconds: float, clients: int) -> None:
        self.deadline = time.monotonic() + seconds
        tasks = [asyncio.ensure_future(self.client(i)) for i in range(clients)]
        done, pending = await asyncio.wait(tasks, timeout=seconds + RESPONSE_TIMEOUT + CONNECT_TIMEOUT)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        for task in done:
            if task.exception() is not None:
                self.tally.fail(1, f"client task crashed: {task.exception()!r}")
        if pending:
            self.tally.fail(len(pending), f"{len(pending)} client tasks did not stop")


async def get_whole(host: str, port: int, key: str, objects: Objects, *, rcvbuf: int = 0,
                    pace: float = 0.0, started: asyncio.Event | None = None) -> Answer:
    """GET `key` on a connection of its own and check it. With `pace`, the body is read
    64 KiB at a time, that many seconds apart, on a small receive buffer: a slow reader."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (host, port))
    reader, writer = await asyncio.open_connection(sock=sock, limit=64 * 1024)
    try:
        writer.write(Request("GET", key).encode(f"{host}:{port}"))
        raw = await reader.readuntil(b"\r\n\r\n")
        if started is not None:
            started.set()
        lines = raw[:-4].decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        length = int(headers["content-length"])
        body = bytearray()
        while len(body) < length:
            piece = await reader.read(min(64 * 1024, length - len(body)))
            if not piece:
                raise EOFError(f"{key}: closed after {len(body)} of {length} bytes")
            body += piece
            if pace:
                await asyncio.sleep(pace)  # the slow reader's pace, not a wait for a condition
        answer = Answer(int(lines[0].split()[1]), headers, bytes(body))
    finally:
        writer.close()
    problem = check(objects, Request("GET", key), answer)
    assert problem is None, f"{key}: {problem}"
    return answer


async def put_whole(host: str, port: int, key: str, objects: Objects) -> Answer:
    data = object_bytes(key, 300_001)
    objects.expect(key, data)
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(Request("PUT", key, body=data).encode(f"{host}:{port}"))
        answer = await read_answer(reader, False, False)
    finally:
        writer.close()
    assert check(objects, Request("PUT", key, body=data), answer) is None, answer
    return answer


# -- the test -------------------------------------------------------------------------------------------

@pytest.fixture
def open_file_room():
    """1,000 client sockets, the upstream's sockets and Sprox's files: raise this
    process's soft descriptor limit (Sprox inherits it, and raises its own as needed)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 8192 if hard == resource.RLIM_INFINITY else min(8192, hard)
    if wanted < 2 * CLIENTS + 1024:
        pytest.skip(f"the hard open-file limit ({hard}) is too low for {CLIENTS} client connections")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, wanted), hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def wait_for_hits(host: str, port: int, objects: Objects, keys: list[str], seconds: float = 15.0) -> None:
    """Until each key is answered from the cache (fills finish after the answers)."""
    async def poll() -> None:
        deadline = time.monotonic() + seconds
        for key in keys:
            while True:
                answer = await get_whole(host, port, key, objects)
                if answer.headers.get("x-cache") == "HIT":
                    break
                assert time.monotonic() < deadline, f"{key} never became a hit"
                await asyncio.sleep(0.05)  # a fill is being written: poll again, within the deadline

    asyncio.run(poll())


@pytest.mark.slow
@pytest.mark.parametrize("event_loop", ["auto", "asyncio"])  # auto: uvloop where installed
def test_a_thousand_connections_over_a_limit_of_800_then_sigterm_in_flight(start_sprox, tmp_path, open_file_room,
                                                                            event_loop):
    from sprox.analytics.accesslog import read_access_log

    began = time.monotonic()
    cache_dir = tmp_path / "cache"
    args = ("--cache-dir", str(cache_dir), "--block-size", "64KiB", "--ttl", "600",
            "--max-connections", str(MAX_CONNECTIONS), "--event-loop", event_loop)
    with CountingUpstream(first_byte_delay=0.002) as upstream:
        objects = Objects(upstream)
        proc = start_sprox(tmp_path, "--upstream", upstream.endpoint, *args)
        pid, host, port = proc.pid, "127.0.0.1", proc.port
        blocks_dir = (cache_dir / "blocks").resolve()
        wait_for_hits(host, port, objects, [*objects.hot, objects.big])
        census_before = settled_census(pid, port, upstream.port, blocks_dir, None)
        rss_before = rss_bytes(pid)

        # -- the load ------------------------------------------------------------------------------
        load = Load(objects, proc.endpoint)
        load_began = time.monotonic()
        with Sampler(pid) as sampler:
            asyncio.run(load.run(LOAD_SECONDS, CLIENTS))
        load_seconds = time.monotonic() - load_began
        tally = load.tally
        census_after = settled_census(pid, port, upstream.port, blocks_dir, census_before, wait=10.0)
        peak_rss = max([rss_before, *sampler.rss, rss_bytes(pid, "VmHWM")])  # VmHWM: the kernel's peak

        # -- SIGTERM with answers in flight --------------------------------------------------------
        upstream.reset_counts()
        upstream.first_byte_delay = SLOW_UPSTREAM

        async def stop_in_flight() -> tuple[list[Answer], list[bytes], float, int | None]:
            readers_started = [asyncio.Event() for _ in range(SLOW_READERS)]
            work = [asyncio.ensure_future(get_whole(host, port, key, objects)) for key in objects.term]
            work += [asyncio.ensure_future(get_whole(host, port, objects.big, objects, rcvbuf=32 * 1024, pace=0.02,
                                                     started=started)) for started in readers_started]
            work += [asyncio.ensure_future(put_whole(host, port, f"term-put/{i}", objects)) for i in range(2)]
            idle = []
            for _ in range(IDLE_AT_TERM):  # keep-alive connections between requests
                reader, writer = await asyncio.open_connection(host, port)
                writer.write(Request("HEAD", objects.hot[0]).encode(f"{host}:{port}"))
                await read_answer(reader, True, True)
                idle.append((reader, writer))
            deadline = time.monotonic() + 15
            while not (all(e.is_set() for e in readers_started)
                       and all(upstream.count("GET", key) for key in objects.term)
                       and upstream.count("PUT") == 2):
                assert time.monotonic() < deadline, "requests never got in flight"
                assert not any(t.done() for t in work), "an answer finished before SIGTERM: nothing in flight"
                await asyncio.sleep(0.01)  # polling the upstream's log and the readers, within the deadline
            assert not any(t.done() for t in work)
            os.kill(pid, signal.SIGTERM)
            term_sent = time.monotonic()
            idle_closed = []
            for reader, writer in idle:
                async with asyncio.timeout(5):
                    idle_closed.append(await reader.read(1))
                writer.close()
            async with asyncio.timeout(SHUTDOWN_SECONDS + 5):
                answers = await asyncio.gather(*work)
            exit_status = await asyncio.to_thread(proc._proc.wait, SHUTDOWN_SECONDS + 5)
            return answers, idle_closed, time.monotonic() - term_sent, exit_status

        in_flight, idle_closed, exit_seconds, exit_status = asyncio.run(stop_in_flight())
        in_flight_ids = [answer.headers["x-amz-request-id"] for answer in in_flight]
        proc.stop()
        stderr = proc.stderr_path.read_text(errors="replace")
        log_rows = read_access_log(cache_dir / "logs").to_pylist()

        # -- a restart serves what was cached as hits -----------------------------------------------
        upstream.first_byte_delay = 0.0
        upstream.reset_counts()
        again = start_sprox(tmp_path, "--upstream", upstream.endpoint, *args)

        async def read_back() -> list[str]:
            """X-Cache of every object cached before the stop (checked whole); the
            uploads made while stopping are read back whole from the upstream."""
            answers = [await get_whole(host, again.port, key, objects) for key in [*objects.term, *objects.hot]]
            for i in range(2):
                await get_whole(host, again.port, f"term-put/{i}", objects)
            return [a.headers.get("x-cache", "-") for a in answers]

        x_cache_after_restart = asyncio.run(read_back())
        upstream_gets_after_restart = sum(upstream.count("GET", key) for key in [*objects.term, *objects.hot])
        again.stop()

    logged_ids = {row["request_id"] for row in log_rows}
    missing_from_log = [rid for rid in tally.request_ids + in_flight_ids if rid not in logged_ids]
    records = re.split(r"\n(?=\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)", stderr)
    suspicious = [r for r in records
                  if re.search(r"Traceback| ERROR |CRITICAL|Unclosed|never retrieved|was destroyed", r)]
    summary = "\n".join([
        (f"load: {tally.requests} requests in {load_seconds:.1f} s ({tally.requests / load_seconds:.0f}/s) on "
         f"{tally.connections} served connections, {tally.refused} refused with 503 SlowDown; {CLIENTS} clients, "
         f"limit {MAX_CONNECTIONS}, most served at once seen by clients {tally.served_max}"),
        (f"  kinds {dict(tally.by_kind)}; status {dict(tally.by_status)}; "
         f"{tally.body_bytes / MiB:.0f} MiB of bodies"),
        f"  failed: {tally.failed}",
        (f"  rss: before {rss_before / MiB:.0f} MiB, peak (sampled, VmHWM) {peak_rss / MiB:.0f} MiB "
         f"(+{(peak_rss - rss_before) / MiB:.0f}), bound +{RSS_HEADROOM / MiB:.0f} MiB"),
        f"  fds before {dict(census_before)}",
        f"  fds after  {dict(census_after)} (sampled max total {max(sampler.fds, default=0)})",
        (f"  SIGTERM with {len(in_flight)} answers in flight: exit {exit_status} after {exit_seconds:.2f} s; "
         f"idle connections closed: {idle_closed}"),
        (f"  access log: {len(log_rows)} rows; {len(missing_from_log)} of "
         f"{len(tally.request_ids) + len(in_flight_ids)} answered requests missing"),
        (f"  after restart: X-Cache {collections.Counter(x_cache_after_restart)}, "
         f"upstream GETs {upstream_gets_after_restart}"),
        f"  sprox log: {len(suspicious)} errors; test runtime {time.monotonic() - began:.1f} s",
    ])
    print("\n" + summary)
    assert tally.failed == 0, summary + "\nfirst failures:\n" + "\n".join(tally.failures)
    # The limit was met and held: refusals happened, and clients never saw more served
    # connections at once than the limit (they see fewer than Sprox holds, never more).
    assert tally.refused > 0 and tally.served_max <= MAX_CONNECTIONS, summary
    assert tally.served_max >= 0.75 * MAX_CONNECTIONS, summary
    assert tally.by_kind["miss"] > 0 and tally.by_kind["put-read"] > 0 and tally.by_kind["head"] > 0, summary
    # Bounded memory, no leaked descriptors: outside the two pools, back to the count
    # before the load, and the pools within their bounds.
    assert peak_rss < rss_before + RSS_HEADROOM, summary
    assert census_after["client socket"] == 0 and census_after["deleted block file"] == 0, summary
    assert unpooled(census_after) <= unpooled(census_before) + FD_MARGIN, summary
    assert census_after["upstream socket"] <= UPSTREAM_POOL_LIMIT, summary
    assert census_after["block file"] <= IDLE_BLOCK_FDS_LIMIT, summary
    # SIGTERM: answers in flight completed whole (checked as they arrived), idle
    # connections were closed at once, a clean exit within the grace.
    assert idle_closed == [b""] * IDLE_AT_TERM, summary
    assert exit_status == 0 and exit_seconds < SHUTDOWN_SECONDS, summary
    assert not suspicious, summary + "\n" + "\n".join(suspicious[:3])
    # Flushed: the access log holds every answered request, and the index everything
    # cached, including the objects first read while Sprox was stopping.
    assert not missing_from_log, summary
    assert x_cache_after_restart == ["HIT"] * (len(objects.term) + len(objects.hot)), summary
    assert upstream_gets_after_restart == 0, summary
