"""The connection lanes (sprox/_native/_lane_py.py), over raw sockets against a real
Sprox process: cache hits answered by the fast lane, everything else by aiohttp on the
same connection, answers in request order, and one parser deciding where each request
ends, so that smuggling forms are refused rather than read two ways.

Every test runs against the compiled lane and against its pure-Python twin
(SPROX_NO_EXTENSIONS=1 in the Sprox process).
"""

from __future__ import annotations

import json
import os
import re
import socket
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from tests.data import object_bytes
from tests.servers import TEST_ACCESS_KEY, TEST_REGION, TEST_SECRET_KEY

BUCKET = "lane"
SMALL = object_bytes("lane/small", 300 * 1024)  # 4 KiB ranges of it are small answers
LARGE = object_bytes("lane/large", 3 * 1024 * 1024)  # whole: a sendfile answer
TIMEOUT = 20


@dataclass
class LaneSprox:
    proc: object
    origin: Path

    @property
    def port(self) -> int:
        return self.proc.port

    def stats(self) -> dict:
        # With keys configured, the data port's admin routes answer signed requests only.
        url = f"{self.proc.endpoint}/_sprox/cache/stats"
        signed = AWSRequest(method="GET", url=url)
        S3SigV4Auth(Credentials(TEST_ACCESS_KEY, TEST_SECRET_KEY), "s3", TEST_REGION).add_auth(signed)
        request = urllib.request.Request(url, headers=dict(signed.headers.items()))
        with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
            return json.load(response)


@pytest.fixture(scope="module", params=["compiled", "twin", "compiled-uvloop", "twin-uvloop"])
def lane(request, _module_sprox, tmp_path_factory) -> LaneSprox:
    """Sprox over a local directory, with a cache and SigV4, warm with both objects; the
    compiled lane and its twin, each on the standard loop and on uvloop (the default where installed)."""
    base = tmp_path_factory.mktemp(f"lane-{request.param}")
    origin = base / "origin"
    (origin / BUCKET / "lane").mkdir(parents=True)
    (origin / BUCKET / "lane" / "small").write_bytes(SMALL)
    (origin / BUCKET / "lane" / "large").write_bytes(LARGE)
    env = {"SPROX_NO_EXTENSIONS": "1"} if request.param.startswith("twin") else None
    loop = "uvloop" if request.param.endswith("-uvloop") else "asyncio"
    proc = _module_sprox(base, "--origin-dir", str(origin), "--cache-dir", str(base / "cache"),
                         "--block-size", "1MiB", "--access-key", TEST_ACCESS_KEY, "--secret-key", TEST_SECRET_KEY,
                         "--event-loop", loop, env=env)
    proc.wait_for_line(lambda line: line.strip() == f"event loop: {loop}")
    sprox = LaneSprox(proc, origin)
    for key, data in (("lane/small", SMALL), ("lane/large", LARGE)):
        with Client(sprox.port) as client:
            client.send(get(sprox.port, key))
            response = client.response()
            assert response.status == 200 and response.body == data
    # Fills finish after the answer: wait until both objects are plain hits.
    for key in ("lane/small", "lane/large"):
        wait_for_hit(sprox, key)
    return sprox


def wait_for_hit(sprox: LaneSprox, key: str, seconds: float = 15.0) -> None:
    """Until a GET of `key` is answered by the fast lane (its fills are on disk)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        before = sprox.stats()["fast_lane_hits"]
        with Client(sprox.port) as client:
            client.send(get(sprox.port, key))
            client.response()
        if sprox.stats()["fast_lane_hits"] > before:
            return
        time.sleep(0.02)  # a fill is being written: poll the state, bounded by the deadline
    raise AssertionError(f"{key} never became a fast-lane hit")


# -- requests ------------------------------------------------------------------------------

def sign(port: int, method: str, path: str, headers: dict[str, str] | None = None, body: bytes = b"",
         secret: str = TEST_SECRET_KEY) -> dict[str, str]:
    request = AWSRequest(method=method, url=f"http://127.0.0.1:{port}{path}", headers=dict(headers or {}),
                         data=body)
    S3SigV4Auth(Credentials(TEST_ACCESS_KEY, secret), "s3", TEST_REGION).add_auth(request)
    return {"Host": f"127.0.0.1:{port}", **dict(request.headers.items())}


def raw(method: str, path: str, headers: dict[str, str], body: bytes = b"", version: str = "1.1") -> bytes:
    lines = [f"{method} {path} HTTP/{version}", *(f"{k}: {v}" for k, v in headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def get(port: int, key: str, extra: dict[str, str] | None = None, *, head: bool = False, **kw) -> bytes:
    method = "HEAD" if head else "GET"
    path = f"/{BUCKET}/{key}"
    return raw(method, path, sign(port, method, path, extra, **kw))


def put(port: int, key: str, body: bytes) -> bytes:
    path = f"/{BUCKET}/{key}"
    headers = sign(port, "PUT", path, {"Content-Length": str(len(body))}, body)
    return raw("PUT", path, headers, body)


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes


class Client:
    """One keep-alive connection; responses are read one at a time from one buffer, so
    pipelined answers are never lost between reads."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
        self.file = self.sock.makefile("rb")

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.file.close()
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def response(self, head: bool = False) -> Response:
        status_line = self.file.readline()
        assert status_line, "connection closed before a response"
        status = int(status_line.split()[1])
        headers: dict[str, str] = {}
        while (line := self.file.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        if head or status in (204, 304):
            return Response(status, headers, b"")
        if headers.get("transfer-encoding") == "chunked":
            body = b""
            while (size := int(self.file.readline().split(b";")[0], 16)) > 0:
                body += self.file.read(size)
                self.file.readline()
            self.file.readline()
            return Response(status, headers, body)
        return Response(status, headers, self.file.read(int(headers.get("content-length", "0"))))

    def closed(self) -> bool:
        """True when the server closed the connection (and sent nothing more)."""
        return self.file.read(1) == b""


# -- the fast lane ---------------------------------------------------------------------------

def test_hits_take_the_fast_lane_with_the_same_answers(lane):
    before = lane.stats()["fast_lane_hits"]
    with Client(lane.port) as client:
        client.send(get(lane.port, "lane/small", {"Range": "bytes=4096-8191"}))
        ranged = client.response()
        client.send(get(lane.port, "lane/large"))
        whole = client.response()
        client.send(get(lane.port, "lane/small", {"Range": "bytes=-100"}, head=True))
        head = client.response(head=True)
    assert ranged.status == 206 and ranged.body == SMALL[4096:8192]
    assert ranged.headers["content-range"] == f"bytes 4096-8191/{len(SMALL)}"
    assert ranged.headers["x-cache"] == "HIT" and ranged.headers["etag"] and ranged.headers["x-amz-request-id"]
    assert whole.status == 200 and whole.body == LARGE and whole.headers["content-length"] == str(len(LARGE))
    assert head.status == 206 and head.headers["content-length"] == "100"
    assert lane.stats()["fast_lane_hits"] == before + 3


def test_a_bad_signature_is_refused_even_for_cached_bytes(lane):
    with Client(lane.port) as client:
        client.send(get(lane.port, "lane/small", secret="not-the-secret"))
        forged = client.response()
        client.send(raw("GET", f"/{BUCKET}/lane/small", {"Host": f"127.0.0.1:{lane.port}"}))
        anonymous = client.response()
    assert forged.status == 403 and b"<Code>SignatureDoesNotMatch</Code>" in forged.body
    assert anonymous.status == 403 and b"<Code>AccessDenied</Code>" in anonymous.body
    assert SMALL[:64] not in forged.body + anonymous.body


def test_conditions_and_bad_ranges_get_s3_answers(lane):
    with Client(lane.port) as client:
        client.send(get(lane.port, "lane/small", {"If-Match": '"nope"'}))
        failed = client.response()
        client.send(get(lane.port, "lane/small", {"Range": f"bytes={len(SMALL)}-"}))
        unsatisfiable = client.response()
    assert failed.status == 412 and b"PreconditionFailed" in failed.body
    assert unsatisfiable.status == 416 and b"InvalidRange" in unsatisfiable.body


def test_pipelined_hits_misses_and_writes_are_answered_in_order(lane):
    """One write holding hits, a write with a body, a miss, an error: every answer
    comes back in request order on the one connection."""
    new_body = b"written through the aiohttp lane" * 100
    batch = b"".join([
        get(lane.port, "lane/small", {"Range": "bytes=0-9"}),
        put(lane.port, "lane/new", new_body),
        get(lane.port, "lane/large", {"Range": "bytes=10-19"}),
        get(lane.port, "lane/new"),
        get(lane.port, "lane/missing"),
        get(lane.port, "lane/large"),  # a sendfile answer queued behind the others
        get(lane.port, "lane/small", {"Range": "bytes=20-29"}, head=True),
        get(lane.port, "lane/small", {"Range": "bytes=30-39"}),
    ])
    with Client(lane.port) as client:
        client.send(batch)
        answers = [client.response(head=(i == 6)) for i in range(8)]
    assert [a.status for a in answers] == [206, 200, 206, 200, 404, 200, 206, 206]
    assert answers[0].body == SMALL[0:10]
    assert answers[2].body == LARGE[10:20]
    assert answers[3].body == new_body
    assert b"<Code>NoSuchKey</Code>" in answers[4].body
    assert answers[5].body == LARGE
    assert answers[7].body == SMALL[30:40]


@pytest.mark.parametrize("size", [7_001, 65_536 + 13, 200_003])
def test_pipelined_answers_to_a_reader_that_lags_arrive_whole(lane, size):
    """Many answers queued on one connection whose client reads only after sending
    every request: the socket fills up between answers, when headers or a body are
    due, and every answer must still arrive whole and in order."""
    count = 256
    ranges = [(i * 997) % (len(LARGE) - size) for i in range(count)]
    with Client(lane.port) as client:
        client.send(b"".join(get(lane.port, "lane/large", {"Range": f"bytes={o}-{o + size - 1}"}) for o in ranges))
        for i, offset in enumerate(ranges):
            answer = client.response()
            assert answer.status == 206 and answer.body == LARGE[offset:offset + size], f"answer {i} differs"


def test_http_10_and_connection_close_end_the_connection(lane):
    path = f"/{BUCKET}/lane/small"
    with Client(lane.port) as client:
        client.send(raw("GET", path, sign(lane.port, "GET", path, {"Range": "bytes=0-3"}), version="1.0"))
        answer = client.response()
        assert answer.status == 206 and answer.body == SMALL[:4]
        assert client.closed()
    with Client(lane.port) as client:
        headers = sign(lane.port, "GET", path, {"Range": "bytes=0-3"})
        client.send(raw("GET", path, {**headers, "Connection": "close"}) + get(lane.port, "lane/small"))
        answer = client.response()
        assert answer.status == 206 and answer.headers.get("connection") == "close"
        assert client.closed()  # the request after `Connection: close` is not answered


def test_connection_close_after_a_large_answer_ends_the_connection(lane):
    """A whole 3 MiB object asked with Connection: close by a client with a small receive
    buffer: all of it, then the close. (An answer the socket cannot take at once, the
    kernel's PARTIAL, is forced in-process: tests/unit/test_lane_io.py.)"""
    path = f"/{BUCKET}/lane/large"
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)
        sock.settimeout(TIMEOUT)
        sock.connect(("127.0.0.1", lane.port))
        sock.sendall(raw("GET", path, {**sign(lane.port, "GET", path), "Connection": "close"}))
        received = bytearray()
        while chunk := sock.recv(65536):  # until the server closes (a timeout fails the test)
            received += chunk
    finally:
        sock.close()
    head, _, body = bytes(received).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ") and b"\r\nConnection: close" in head
    assert body == LARGE


# -- one parser: smuggling and malformed requests -------------------------------------------------

SMUGGLED = b"GET /lane/lane/small HTTP/1.1\r\nHost: x\r\n\r\n"


@pytest.mark.parametrize("attempt", [
    pytest.param(b"POST /lane/lane/x HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n"
                 b"0\r\n\r\n" + SMUGGLED, id="content-length and transfer-encoding"),
    pytest.param(b"POST /lane/lane/x HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nContent-Length: 41\r\n\r\n"
                 + SMUGGLED, id="two content-lengths"),
    pytest.param(b"GET /lane/lane/small HTTP/1.1\nHost: x\n\n" + SMUGGLED, id="bare LF"),
    pytest.param(b"GET /lane/lane/small HTTP/1.1\r\nHost: x\r\nX: a\r\n b\r\n\r\n" + SMUGGLED, id="obs-fold"),
    pytest.param(b"POST /lane/lane/x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n"
                 + SMUGGLED, id="transfer-encoding not ending in chunked"),
    pytest.param(b"POST /lane/lane/x HTTP/1.1\r\nHost: x\r\nContent-Length : 41\r\n\r\n" + SMUGGLED,
                 id="space before colon"),
    pytest.param(b"POST /lane/lane/x HTTP/1.1\r\nHost: x\r\nContent-Length: +41\r\n\r\n" + SMUGGLED,
                 id="signed content-length"),
    pytest.param(b"GET /lane/lane/small HTTP/1.1\r\nHost: x\r\nX: a\x00b\r\n\r\n" + SMUGGLED, id="NUL in a header"),
])
def test_smuggling_forms_are_refused_and_the_connection_closed(lane, attempt):
    with Client(lane.port) as client:
        client.send(attempt)
        answer = client.response()
        assert answer.status == 400
        assert b"<Code>" in answer.body and b"<RequestId>" in answer.body
        assert answer.headers["connection"] == "close"
        assert client.closed()  # the smuggled request never got an answer


def test_a_body_is_never_read_as_a_request(lane):
    """A GET whose body holds a whole request: the body is a body (answered once, by
    the aiohttp lane, since hits have no body), and the next real request is next."""
    path = f"/{BUCKET}/lane/small"
    body = raw("GET", path, sign(lane.port, "GET", path, {"Range": "bytes=0-0"}))
    headers = sign(lane.port, "GET", path, {"Range": "bytes=1-1", "Content-Length": str(len(body))})
    with Client(lane.port) as client:
        client.send(raw("GET", path, headers, body) + get(lane.port, "lane/small", {"Range": "bytes=2-2"}))
        first, second = client.response(), client.response()
    assert first.status in (206, 400, 403)  # whatever S3 makes of a GET with a body: one answer
    assert first.body != SMALL[0:1]
    assert second.status == 206 and second.body == SMALL[2:3]


def test_a_chunked_upload_with_a_trailer_goes_through_whole(lane):
    path = f"/{BUCKET}/lane/chunked"
    data = b"0123456789" * 1000
    headers = sign(lane.port, "PUT", path, {}, data)  # signed as sent: without a Content-Length
    chunks = b"".join(b"%x;ext=1\r\n%s\r\n" % (len(data[i:i + 3000]), data[i:i + 3000]) for i in range(0, len(data), 3000))
    with Client(lane.port) as client:
        client.send(raw("PUT", path, {**headers, "Transfer-Encoding": "chunked"}, chunks + b"0\r\nX-Trailer: 1\r\n\r\n"))
        stored = client.response()
        client.send(get(lane.port, "lane/chunked"))
        read_back = client.response()
    # Streamed on without a length: the origin (here the local one) takes it whole.
    assert stored.status == 200, stored
    assert read_back.status == 200 and read_back.body == data


@pytest.mark.parametrize(("request_bytes", "code"), [
    pytest.param(b"GET /lane/" + b"k" * 20000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", b"RequestHeaderSectionTooLarge",
                 id="request line too long"),
    pytest.param(b"GET /lane/k HTTP/1.1\r\nHost: x\r\nX-Big: " + b"v" * 70000 + b"\r\n\r\n",
                 b"RequestHeaderSectionTooLarge", id="header too large"),
    pytest.param(b"GET /lane/k HTTP/1.1\r\nHost: x\r\n" + b"X-Many: 1\r\n" * 200 + b"\r\n",
                 b"RequestHeaderSectionTooLarge", id="too many headers"),
    pytest.param("GET /lane/ké HTTP/1.1\r\nHost: x\r\n\r\n".encode(), b"InvalidURI", id="raw UTF-8 in the target"),
    pytest.param(b"CONNECT evil.example:443 HTTP/1.1\r\nHost: evil.example:443\r\n\r\n", b"InvalidRequest",
                 id="CONNECT"),
    pytest.param(b"GET /lane/k HTTP/1.1\r\nHost: x\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n",
                 b"InvalidRequest", id="upgrade"),
    pytest.param(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", b"BadRequest", id="TLS on the plain port"),
])
def test_malformed_requests_get_an_s3_error_and_the_server_stays_up(lane, request_bytes, code):
    with Client(lane.port) as client:
        client.send(request_bytes)
        answer = client.response()
        assert answer.status == 400 and f"<Code>{code.decode()}</Code>".encode() in answer.body
        assert client.closed()
    with Client(lane.port) as client:  # still serving
        client.send(get(lane.port, "lane/small", {"Range": "bytes=0-1"}))
        assert client.response().body == SMALL[:2]


def test_answers_before_a_malformed_request_are_still_sent(lane):
    with Client(lane.port) as client:
        client.send(get(lane.port, "lane/small", {"Range": "bytes=5-6"}) + b"GARBAGE\r\n\r\n")
        good = client.response()
        bad = client.response()
    assert good.status == 206 and good.body == SMALL[5:7]
    assert bad.status == 400


# -- a request body that goes quiet ----------------------------------------------------------------

@pytest.mark.parametrize("module", ["sprox._native._lane_py", "sprox._native.lane"], ids=["twin", "compiled"])
def test_an_upload_that_goes_quiet_is_answered_request_timeout_and_not_stored(tmp_path, monkeypatch, module):
    """A PUT that stops sending in the middle of its body: 400 RequestTimeout once the
    body has been quiet for BODY_SECONDS (shortened here, so Sprox runs in-process, on
    a thread, with the lane chosen by the test), and no object, whole or short, in the
    origin. (The lane-level cases are in tests/unit/test_lane_io.py.)"""
    import importlib

    import sprox.server
    from sprox import run_in_thread

    if module == "sprox._native.lane" and os.environ.get("SPROX_NO_EXTENSIONS") == "1":
        pytest.skip("extensions disabled")
    lane_module = importlib.import_module(module)
    monkeypatch.setattr(lane_module, "BODY_SECONDS", 0.5)
    monkeypatch.setattr(sprox.server, "LaneServer", lane_module.LaneServer)
    origin = tmp_path / "origin"
    (origin / "quiet").mkdir(parents=True)
    with run_in_thread(origin_dir=origin, cache_dir=tmp_path / "cache") as running:
        with socket.create_connection(("127.0.0.1", running.port), timeout=TIMEOUT) as sock:
            started = time.monotonic()  # (before the send: the server may read it all before sendall returns)
            sock.sendall(b"PUT /quiet/half HTTP/1.1\r\nHost: x\r\nContent-Length: 1048576\r\n\r\n" + b"h" * 300_000)
            answer = b""
            while piece := sock.recv(65536):
                answer += piece
            elapsed = time.monotonic() - started
        with Client(running.port) as client:
            client.send(b"GET /quiet/half HTTP/1.1\r\nHost: x\r\n\r\n")
            read_back = client.response()
    assert answer.startswith(b"HTTP/1.1 400 ") and b"<Code>RequestTimeout</Code>" in answer, answer[:300]
    assert elapsed >= 0.5  # not before the body's quiet time ran out (the socket timeout bounds a hang)
    assert read_back.status == 404 and b"<Code>NoSuchKey</Code>" in read_back.body
    assert not (origin / "quiet" / "half").exists()


# -- fuzzing: whatever arrives, each answer is whole and the server stays up -----------------------

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_PIECES = [
    b"GET /lane/lane/small HTTP/1.1\r\n", b"HEAD /lane/lane/small HTTP/1.1\r\n", b"PUT /lane/lane/f HTTP/1.1\r\n",
    b"POST /lane/lane/f?uploads HTTP/1.1\r\n", b"GET /lane/lane/small HTTP/1.0\r\n", b"Host: x\r\n",
    b"Content-Length: 5\r\n", b"Content-Length: 0\r\n", b"Transfer-Encoding: chunked\r\n", b"Range: bytes=0-9\r\n",
    b"Range: bytes=-5,7-\r\n", b"Connection: close\r\n", b"Expect: 100-continue\r\n", b"X-Amz-Date: 20240101T000000Z\r\n",
    b"\r\n", b"\n", b"hello", b"5\r\nhello\r\n0\r\n\r\n", b"0\r\n\r\n", b" ", b":", b"\x00", b"\xff", b"%00", b"GET",
]


@settings(max_examples=int(os.environ.get("SPROX_FUZZ_EXAMPLES", "60")), deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.sampled_from(_PIECES), min_size=1, max_size=24))
def test_any_byte_stream_gets_answers_then_a_close(lane, pieces):
    """Random streams of request fragments, then the client half-closes: Sprox answers
    what it can (never a 5xx), then closes; it never hangs, and keeps serving."""
    stream = b"".join(pieces)
    with Client(lane.port) as client:
        client.sock.settimeout(5)
        client.send(stream)
        client.sock.shutdown(socket.SHUT_WR)  # nothing more comes: every answer is owed now
        received = b""
        try:
            while chunk := client.sock.recv(1 << 20):
                received += chunk
        except TimeoutError:
            raise AssertionError(f"neither answered nor closed within 5 s: {stream!r} -> {received[:200]!r}") from None
    assert received == b"" or received.startswith((b"HTTP/1.1 ", b"HTTP/1.0 ")), (stream, received[:200])
    statuses = [int(s) for s in re.findall(rb"(?m)^HTTP/1\.[01] (\d{3}) ", received)]
    assert all(status < 500 for status in statuses), (stream, received[:500])
    with Client(lane.port) as client:  # still serving
        client.send(get(lane.port, "lane/small", {"Range": "bytes=0-1"}))
        assert client.response().body == SMALL[:2]
