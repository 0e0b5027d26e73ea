"""The hit kernel (sprox/_native/kernel.pyx), piece by piece against the references it
must never go beyond: its strict scanner against llhttp (a head it reads, llhttp reads
the same way), its signature check against the full verifier (what it accepts, the
full verifier accepts with the same key), its Range reading against `parse_range`, and
whole answers over a socket pair against what the Python lane sends. End-to-end hits
through a real Sprox are in tests/functional (test_lane.py, test_kernel_hits.py)."""

from __future__ import annotations

import collections
import os
import socket
import threading
import time
from types import SimpleNamespace

import botocore.auth
import httptools
import pytest
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from hypothesis import given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict, CIMultiDictProxy

import sprox.kernel
from sprox.analytics.accesslog import kernel_batch
from sprox._native import _lane_py
from sprox.ranges import RangeNotSatisfiable, parse_range
from sprox.s3.errors import S3Error
from sprox.s3.request import parse_request
from sprox.s3.sigv4 import SignatureVerifier
# The fast check's keys, clock and full-verifier reference: the kernel answers to the same.
from tests.unit import test_fastsig
from tests.unit.test_fastsig import ACCESS_KEY, KEYS, NOW, SECRET_KEY, SIGNED_AT, UNPARSED

# Read at import: the session's autouse fixture hides SPROX_* variables from tests.
NO_EXTENSIONS = os.environ.get("SPROX_NO_EXTENSIONS") == "1"
FUZZ_EXAMPLES = int(os.environ.get("SPROX_FUZZ_EXAMPLES", "300"))



def test_the_normal_build_loads_the_kernel() -> None:
    if NO_EXTENSIONS:
        assert sprox.kernel.NATIVE is False
        assert sprox.kernel.make_kernel(None, None) is None
        return
    assert sprox.kernel.NATIVE is True
    assert sprox.kernel.HitKernel.__module__ == "sprox._native.kernel"


needs_kernel = pytest.mark.skipif(not sprox.kernel.NATIVE, reason="the kernel is not built (SPROX_NO_EXTENSIONS=1)")


@needs_kernel
def test_the_lane_reads_the_kernels_answers_by_the_same_numbers() -> None:
    from sprox._native import kernel

    assert (kernel.DECLINED, kernel.SENT, kernel.SENT_CLOSE, kernel.PARTIAL, kernel.FAILED, kernel.FAILED_FILE) == (
        sprox.kernel.DECLINED, sprox.kernel.SENT, sprox.kernel.SENT_CLOSE, sprox.kernel.PARTIAL, sprox.kernel.FAILED,
        sprox.kernel.FAILED_FILE) == (
        _lane_py.KERNEL_DECLINED, _lane_py.KERNEL_SENT, _lane_py.KERNEL_SENT_CLOSE, _lane_py.KERNEL_PARTIAL,
        _lane_py.KERNEL_FAILED, _lane_py.KERNEL_FAILED_FILE)


def new_kernel(keys=KEYS, domain=None):
    return sprox.kernel.HitKernel(keys, 900.0, domain, "0123ABCD", (0.001, 0.01, 1.0))


# -- the strict scanner against llhttp -----------------------------------------------------------


class _Llhttp:
    """What llhttp (httptools, as the lane uses it) makes of some bytes."""

    def __init__(self, data: bytes) -> None:
        self.messages: list[tuple[bytes, bytes, list[tuple[bytes, bytes]]]] = []
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.error = None
        parser = httptools.HttpRequestParser(self)
        self.parser = parser
        try:
            parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self.error = exc

    def on_message_begin(self):
        self.url, self.headers = b"", []

    def on_url(self, url):
        self.url += url

    def on_header(self, name, value):
        self.headers.append((name, value))

    def on_headers_complete(self):
        self.messages.append((self.parser.get_method(), self.url, self.headers))


_METHODS = st.sampled_from([b"GET", b"HEAD", b"PUT", b"get", b"GET\t", b"CONNECT"])
_TARGETS = st.sampled_from([b"/b/k", b"/b/a%20b", b"/b/%ZZ", b"/b/k?x=1", b"*", b"http://h/b/k", b"/b/k#f",
                            b"/b/\xe2\x82\xac", b"/b/a b", b"/", b"/b/(k)!;=@:"])
_VERSIONS = st.sampled_from([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0", b"http/1.1", b"HTTP/1.1 "])
_NAMES = st.sampled_from([b"Host", b"Range", b"Authorization", b"x-amz-date", b"Content-Length",
                          b"Transfer-Encoding", b"Connection", b"User-Agent", b"X y", b"", b"Na\xc3\xa9me",
                          b"If-Match", b"Expect", b"x-amz-checksum-mode", b"Accept-Encoding", b"A:"])
_VALUES = st.binary(max_size=6).map(lambda b: b.replace(b"\r\n", b"")) | st.sampled_from(
    [b"bytes=0-1", b" close ", b"keep-alive", b"chunked", b"5", b"x\ty", b" a  b ", b"\xc3\xa9", b"",
     b"a\rb", b"a\nb", b"\x7f"])
_EOLS = st.sampled_from([b"\r\n", b"\r\n", b"\r\n", b"\n", b"\r"])
_SEPARATORS = st.sampled_from([b": ", b":", b":  ", b" : ", b":\t"])


@st.composite
def heads(draw) -> bytes:
    line = draw(_METHODS) + b" " + draw(_TARGETS) + b" " + draw(_VERSIONS) + draw(_EOLS)
    fields = b"".join(draw(_NAMES) + draw(_SEPARATORS) + draw(_VALUES) + draw(_EOLS)
                      for _ in range(draw(st.integers(0, 5))))
    if draw(st.booleans()):
        fields += b" folded" + draw(_EOLS)
    tail = draw(st.sampled_from([b"\r\n", b"\r\n", b"\n", b"", b"\r\nGET / HTTP/1.1\r\n\r\n", b"\r\nxyz"]))
    return line + fields + tail


@needs_kernel
@settings(max_examples=FUZZ_EXAMPLES * 3, deadline=None)
@given(heads())
def test_the_scanner_never_frames_a_head_differently_from_llhttp(data: bytes) -> None:
    scanned = new_kernel().scan(data)
    if scanned is None:
        return  # handed to llhttp: nothing to compare
    parsed = _Llhttp(data)
    assert parsed.error is None, (data, parsed.error)
    assert len(parsed.messages) == 1, data  # one whole request, nothing after it
    method, url, headers = parsed.messages[0]
    assert (method, url) == scanned[:2]
    assert [(n, v.strip(b" ")) for n, v in headers] == scanned[2], data
    # Not just any request: the one form a hit can take.
    assert method in (b"GET", b"HEAD") and url.startswith(b"/")


@needs_kernel
@pytest.mark.parametrize("data", [
    b"GET /b/k HTTP/1.1\r\nHost: x\r\n\r\n",
    b"HEAD /b/k HTTP/1.1\r\nHost: x\r\nRange: bytes=0-1\r\n\r\n",
    b"GET /b/a%20b HTTP/1.1\r\n\r\n",
])
def test_the_scanner_reads_common_heads(data: bytes) -> None:
    assert new_kernel().scan(data) is not None


@needs_kernel
@pytest.mark.parametrize("data", [
    b"GET /b/k HTTP/1.1\nHost: x\n\n",  # bare LF
    b"GET /b/k HTTP/1.1\r\nHost: x\r\n folded\r\n\r\n",  # obs-fold
    b"GET /b/k HTTP/1.1\r\nHost: x\r\n\r\nGET /b/k HTTP/1.1\r\n\r\n",  # pipelined
    b"GET /b/k HTTP/1.1\r\nHost: x\r\n",  # not whole yet
    b"GET /b/k HTTP/1.0\r\n\r\n",
    b"POST /b/k HTTP/1.1\r\n\r\n",
    b"GET /b/k HTTP/1.1\r\nX: a\tb\r\n\r\n",  # a tab inside a value
    b"GET /b/k HTTP/1.1\r\nX: \xc3\xa9\r\n\r\n",  # obs-text
    b"GET /b/k HTTP/1.1\r\nX y: 1\r\n\r\n",
])
def test_the_scanner_hands_everything_else_to_llhttp(data: bytes) -> None:
    assert new_kernel().scan(data) is None


# -- the signature check against the full verifier -------------------------------------------------


@pytest.fixture(autouse=True)
def frozen_signer_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(botocore.auth, "get_current_datetime",
                        lambda remove_tzinfo=True: SIGNED_AT.replace(tzinfo=None))


def signed_head(method: str = "GET", path: str = "/bucket/data/part-0.parquet", headers: dict | None = None,
                access_key: str = ACCESS_KEY, secret: str = SECRET_KEY) -> list[tuple[str, str]]:
    request = AWSRequest(method=method, url=f"http://127.0.0.1:9000{path}", headers=headers or {})
    S3SigV4Auth(Credentials(access_key, secret), "s3", "us-east-1").add_auth(request)
    return [("Host", "127.0.0.1:9000"), *request.headers.items(), ("User-Agent", "test")]


def head_bytes(method: str, path: str, headers: list[tuple[str, str]]) -> bytes:
    lines = [f"{method} {path} HTTP/1.1"] + [f"{name}: {value}" for name, value in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def full_verdict(method: str, target: str, headers: list[tuple[str, str]]) -> str | None:
    """test_fastsig's full verdict on a target and a header list: UNPARSED when the
    request is refused before its signature (a key that is not UTF-8, say: no mirror
    entry can match such a path, so the kernel declines it after its signature check)."""
    path, _, query = target.partition("?")
    return test_fastsig.full_verdict(method, path, query, CIMultiDictProxy(CIMultiDict(headers)))


@needs_kernel
@pytest.mark.parametrize("how", [
    {},
    {"method": "HEAD"},
    {"headers": {"Range": "bytes=4096-8191"}},
    {"path": "/bucket/a%20b/%E2%82%AC.bin", "headers": {"Range": "bytes=0-0"}},
    {"headers": {"x-amz-checksum-mode": "ENABLED", "Range": "bytes=-100"}},
], ids=["get", "head", "range", "encoded-key", "checksum-mode"])
def test_what_botocore_signs_is_accepted(how) -> None:
    method, path = how.get("method", "GET"), how.get("path", "/bucket/data/part-0.parquet")
    headers = signed_head(method, path, how.get("headers"))
    assert full_verdict(method, path, headers) == ACCESS_KEY
    assert new_kernel().check_signature(head_bytes(method, path, headers), NOW) == ACCESS_KEY


@needs_kernel
def test_signatures_it_declines() -> None:
    kernel = new_kernel()
    method, path = "GET", "/bucket/key"
    good = signed_head(method, path)

    def changed(**edits) -> list[tuple[str, str]]:
        out = [(n, v) for n, v in good if n.lower() not in {k.replace("_", "-").lower() for k in edits}]
        out += [(k.replace("_", "-"), v) for k, v in edits.items() if v is not None]
        return out

    assert kernel.check_signature(head_bytes(method, path, good), NOW) == ACCESS_KEY
    cases = {
        "wrong secret": signed_head(method, path, secret="nope"),
        "unknown key": signed_head(method, path, access_key="AKIDNOBODY"),
        "late": good,
        "unsigned x-amz header": good + [("x-amz-meta-x", "1")],
        "no date": changed(x_amz_date=None),
        "no payload hash": changed(x_amz_content_sha256=None),
        "other path": good,
        "two dates": good + [("X-Amz-Date", dict(good)["X-Amz-Date"])],
    }
    for why, headers in cases.items():
        now = NOW + 3600 if why == "late" else NOW
        target = "/bucket/other" if why == "other path" else path
        assert kernel.check_signature(head_bytes(method, target, headers), now) is None, why
    assert new_kernel(keys={"AKIDOTHER": "x"}).check_signature(head_bytes(method, path, good), NOW) is None


_HEADER_NAMES = st.sampled_from(["Range", "If-Match", "x-amz-checksum-mode", "Content-Type", "x-amz-meta-a",
                                 "Accept", "Host", "x-amz-date", "Authorization"])
_HEADER_VALUES = st.text(alphabet=st.sampled_from("ab= -\"0"), max_size=8)


@needs_kernel
@settings(max_examples=FUZZ_EXAMPLES, deadline=None)
@given(st.dictionaries(st.sampled_from(["Range", "x-amz-checksum-mode", "Content-Type", "Accept"]),
                       _HEADER_VALUES, max_size=3),
       st.sampled_from(["GET", "HEAD"]),
       st.text(alphabet=st.sampled_from("ab/%2E~+"), min_size=1, max_size=12),
       st.lists(st.tuples(st.sampled_from(["drop", "add", "change"]), _HEADER_NAMES, _HEADER_VALUES), max_size=2))
def test_random_requests_it_accepts_the_full_verifier_accepts(headers, method, key, changes) -> None:
    path = "/bucket/" + key
    try:
        got = signed_head(method, path, headers)
    except (ValueError, UnicodeEncodeError):
        return
    for action, name, value in changes:
        if action == "drop":
            got = [(n, v) for n, v in got if n.lower() != name.lower()]
        elif action == "add":
            got.append((name, value))
        else:
            got = [(n, v) for n, v in got if n.lower() != name.lower()] + [(name, value)]
    accepted = new_kernel().check_signature(head_bytes(method, path, got), NOW)
    verdict = full_verdict(method, path, got)
    if accepted is not None and verdict is not UNPARSED:
        assert verdict == accepted


def presigned_head(method: str = "GET", path: str = "/bucket/key", expires: int = 3600,
                   headers: dict | None = None, access_key: str = ACCESS_KEY,
                   secret: str = SECRET_KEY) -> tuple[str, list[tuple[str, str]]]:
    """A URL presigned by botocore: (target, headers a client sends with it)."""
    from botocore.auth import S3SigV4QueryAuth

    request = AWSRequest(method=method, url=f"http://127.0.0.1:9000{path}", headers=headers or {})
    S3SigV4QueryAuth(Credentials(access_key, secret), "s3", "us-east-1", expires=expires).add_auth(request)
    target = request.url.removeprefix("http://127.0.0.1:9000")
    sent = [(n, v) for n, v in request.headers.items()]
    return target, [("Host", "127.0.0.1:9000"), *sent, ("User-Agent", "test")]


@needs_kernel
@pytest.mark.parametrize("how", [{}, {"method": "HEAD"}, {"headers": {"Range": "bytes=0-99"}},
                                 {"path": "/bucket/a%20b/%E2%82%AC.bin"}], ids=["get", "head", "range", "encoded"])
def test_what_botocore_presigns_is_accepted(how) -> None:
    method = how.get("method", "GET")
    target, headers = presigned_head(method, how.get("path", "/bucket/key"), headers=how.get("headers"))
    assert full_verdict(method, target, headers) == ACCESS_KEY
    kernel = new_kernel()
    assert kernel.check_signature(head_bytes(method, target, headers), NOW) == ACCESS_KEY
    # Valid until it expires, not before it was made (beyond the allowed skew).
    assert kernel.check_signature(head_bytes(method, target, headers), NOW + 3599) == ACCESS_KEY
    assert kernel.check_signature(head_bytes(method, target, headers), NOW + 3601) is None
    assert kernel.check_signature(head_bytes(method, target, headers), NOW - 1000) is None


@needs_kernel
def test_presigned_urls_it_declines() -> None:
    kernel = new_kernel()
    target, headers = presigned_head()
    path, _, query = target.partition("?")
    cases = {
        "another parameter": f"{path}?{query}&response-content-type=text%2Fplain",
        "versionId": f"{path}?versionId=3&{query}",
        "a parameter twice": f"{path}?{query}&X-Amz-Expires=10",
        "no signature": f"{path}?" + "&".join(p for p in query.split("&") if not p.startswith("X-Amz-Signature")),
        "lower-case escape": f"{path}?" + query.replace("%2F", "%2f"),
        "other path": f"/bucket/other?{query}",
    }
    for why, changed in cases.items():
        assert kernel.check_signature(head_bytes("GET", changed, headers), NOW) is None, why
    with_authorization = headers + [("Authorization", "AWS4-HMAC-SHA256 x")]
    assert kernel.check_signature(head_bytes("GET", target, with_authorization), NOW) is None
    too_long, long_headers = presigned_head(expires=8 * 24 * 3600)
    assert kernel.check_signature(head_bytes("GET", too_long, long_headers), NOW) is None


def changed_query(target: str, changes: list[tuple[str, str, str]]) -> str:
    """`target` with query parameters dropped, added or edited (a suffix to the value)."""
    path, _, query = target.partition("?")
    params = query.split("&")
    for action, name, value in changes:
        if action == "drop":
            params = [p for p in params if not p.startswith(name + "=")]
        elif action == "add":
            params.append(f"{name}={value}")
        else:
            params = [f"{name}={p.partition('=')[2]}{value}" if p.startswith(name + "=") else p for p in params]
    return path + "?" + "&".join(params)


@needs_kernel
@settings(max_examples=FUZZ_EXAMPLES, deadline=None)
@given(st.sampled_from(["GET", "HEAD"]),
       st.text(alphabet=st.sampled_from("ab/%2E~+"), min_size=1, max_size=12),
       st.integers(1, 700000),
       st.lists(st.tuples(st.sampled_from(["drop", "add", "edit"]),
                          st.sampled_from(["X-Amz-Algorithm", "X-Amz-Credential", "X-Amz-Date", "X-Amz-Expires",
                                           "X-Amz-SignedHeaders", "X-Amz-Signature", "x-id", "partNumber"]),
                          st.text(alphabet=st.sampled_from("aZ0%2F-+ ;"), max_size=6)), max_size=2),
       st.integers(-2000, 800000))
def test_random_presigned_urls_it_accepts_the_full_verifier_accepts(method, key, expires, changes, age) -> None:
    try:
        target, headers = presigned_head(method, "/bucket/" + key, expires=expires)
    except (ValueError, UnicodeEncodeError):
        return
    target = changed_query(target, changes)
    now = NOW + age
    accepted = new_kernel().check_signature(head_bytes(method, target, headers), now)
    if accepted is None:
        return
    proxy = CIMultiDictProxy(CIMultiDict(headers))
    try:
        request = parse_request(method, target, proxy)
    except S3Error:
        return  # the Python lane refuses it before any signature
    assert SignatureVerifier(KEYS, clock=lambda: now).verify(request) == accepted


def presigned_v2(method: str = "GET", path: str = "/bucket/key", expires_at: int = int(NOW) + 3600,
                 access_key: str = ACCESS_KEY, secret: str = SECRET_KEY) -> tuple[str, list[tuple[str, str]]]:
    """A URL presigned with SigV2 the way boto3's generate_presigned_url does by default."""
    from botocore.auth import HmacV1QueryAuth

    request = AWSRequest(method=method, url=f"http://127.0.0.1:9000{path}")
    auth = HmacV1QueryAuth(Credentials(access_key, secret), expires=expires_at - int(NOW))
    auth._get_date = lambda: str(expires_at)  # (botocore adds `expires` to its own clock)
    auth.add_auth(request)
    return request.url.removeprefix("http://127.0.0.1:9000"), [("Host", "127.0.0.1:9000"), ("User-Agent", "t")]


@needs_kernel
@pytest.mark.parametrize("method", ["GET", "HEAD"])
def test_what_botocore_presigns_with_sigv2_is_accepted(method) -> None:
    target, headers = presigned_v2(method, "/bucket/a%20b/%E2%82%AC.bin")
    assert full_verdict(method, target, headers) == ACCESS_KEY
    kernel = new_kernel()
    assert kernel.check_signature(head_bytes(method, target, headers), NOW) == ACCESS_KEY
    assert kernel.check_signature(head_bytes(method, target, headers), NOW + 3601) is None  # expired
    path, _, query = target.partition("?")
    for changed in (f"/bucket/other?{query}", f"{path}?{query}&response-content-type=x",
                    target.replace("Expires=", "Expires=1")):
        assert kernel.check_signature(head_bytes(method, changed, headers), NOW) is None, changed
    assert kernel.check_signature(head_bytes(method, target, headers + [("Content-Type", "x")]), NOW) is None
    assert kernel.check_signature(head_bytes(method, target, headers + [("x-amz-date", "x")]), NOW) is None


@needs_kernel
@settings(max_examples=FUZZ_EXAMPLES, deadline=None)
@given(st.sampled_from(["GET", "HEAD"]), st.text(alphabet=st.sampled_from("ab/%2E~+"), min_size=1, max_size=12),
       st.integers(-100, 100000),
       st.lists(st.tuples(st.sampled_from(["drop", "add", "edit"]),
                          st.sampled_from(["AWSAccessKeyId", "Signature", "Expires", "x-amz-acl", "acl"]),
                          st.text(alphabet=st.sampled_from("aZ0%2F+= "), max_size=6)), max_size=2))
def test_random_sigv2_urls_it_accepts_the_full_verifier_accepts(method, key, lifetime, changes) -> None:
    try:
        target, headers = presigned_v2(method, "/bucket/" + key, expires_at=int(NOW) + lifetime)
    except (ValueError, UnicodeEncodeError):
        return
    target = changed_query(target, changes)
    accepted = new_kernel().check_signature(head_bytes(method, target, headers), NOW)
    verdict = full_verdict(method, target, headers)
    if accepted is not None and verdict is not UNPARSED:
        assert verdict == accepted


# -- Range ---------------------------------------------------------------------------------------------


@needs_kernel
@settings(max_examples=FUZZ_EXAMPLES, deadline=None)
@given(st.one_of(st.from_regex(r"bytes=[0-9]{0,4}-[0-9]{0,4}", fullmatch=True),
                 st.text(alphabet=st.sampled_from("bytes=0129-, "), max_size=14)),
       st.integers(0, 5000))
def test_range_reading_agrees_with_parse_range(value: str, size: int) -> None:
    mine = sprox.kernel.HitKernel.resolve_range(value.encode(), size)
    if mine is None:
        return  # the Python lane decides
    assert parse_range(value, size) == mine


@needs_kernel
def test_ranges_it_leaves_to_the_python_lane() -> None:
    resolve = sprox.kernel.HitKernel.resolve_range
    assert resolve(b"bytes=0-99", 1000) == (0, 99)
    assert resolve(b"bytes=900-", 1000) == (900, 999)
    assert resolve(b"bytes=-100", 1000) == (900, 999)
    assert resolve(b"bytes=0-5000", 1000) == (0, 999)
    for value in (b"bytes=1000-", b"bytes=-0", b"bytes=5-1", b"bytes=0-1,3-4", b"bytes = 0-1", b"items=0-1",
                  b"bytes=0-1 "):
        assert resolve(value, 1000) is None, value
        try:
            parse_range(value.decode(), 1000)
        except RangeNotSatisfiable:
            pass


# -- whole answers over a socket pair ----------------------------------------------------------------------


BLOCK = 4096
DATA = bytes(range(256)) * 64  # 16 KiB: four blocks


@pytest.fixture
def block_file(tmp_path):
    path = tmp_path / "blocks"
    path.write_bytes(DATA)
    fd = os.open(path, os.O_RDONLY)
    yield fd
    os.close(fd)


def record(record_id: int = 7, blocks_present: int = 4):
    present = bytearray(1)
    for i in range(blocks_present):
        present[0] |= 1 << i
    return SimpleNamespace(id=record_id, size=len(DATA), block_size=BLOCK, present=present,
                           unverified=bytearray(1))


TEMPLATE = b'ETag: "abc"\r\nContent-Type: binary/octet-stream\r\n'


def drained(kernel) -> tuple[list[dict], list[tuple[int, int, int]]]:
    """What the kernel logged since the last drain, as the access log's rows (dicts by
    column), and the blocks read: (record id, block, times)."""
    log, blocks = kernel.drain()
    return kernel_batch(log).to_pylist(), blocks


def answer(kernel, data: bytes, *, use_sendfile: bool = True) -> tuple[int, bytes]:
    server, client = socket.socketpair()
    try:
        server.setblocking(False)
        done = kernel.serve(server.fileno(), data, use_sendfile)
        server.close()
        chunks = []
        while chunk := client.recv(65536):
            chunks.append(chunk)
        return done, b"".join(chunks)
    finally:
        server.close()
        client.close()


def split(response: bytes) -> tuple[bytes, dict[str, str], bytes]:
    head, _, body = response.partition(b"\r\n\r\n")
    status, *lines = head.decode().split("\r\n")
    return status.encode(), dict(line.split(": ", 1) for line in lines), body


@needs_kernel
@pytest.mark.parametrize("use_sendfile", [True, False], ids=["sendfile", "copy"])
@pytest.mark.parametrize(("range_header", "first", "last"), [
    (None, 0, len(DATA) - 1), ("bytes=10-20", 10, 20), ("bytes=4000-9000", 4000, 9000), ("bytes=-5", len(DATA) - 5,
                                                                                         len(DATA) - 1)])
def test_a_hit_is_answered_whole(block_file, use_sendfile, range_header, first, last) -> None:
    kernel = new_kernel(keys=None)
    rec = record()
    kernel.install("bucket", "key", rec, block_file, 1e12, TEMPLATE, None, -1)
    extra = f"Range: {range_header}\r\n" if range_header else ""
    done, response = answer(kernel, f"GET /bucket/key HTTP/1.1\r\nHost: h\r\n{extra}\r\n".encode(),
                            use_sendfile=use_sendfile)
    assert done == sprox.kernel.SENT
    status, headers, body = split(response)
    assert status == (b"HTTP/1.1 200 OK" if range_header is None else b"HTTP/1.1 206 Partial Content")
    assert body == DATA[first:last + 1]
    assert headers["Content-Length"] == str(last - first + 1)
    assert headers["ETag"] == '"abc"' and headers["X-Cache"] == "HIT" and headers["Server"] == "Sprox"
    assert len(headers["x-amz-request-id"]) == 16 and headers["x-amz-request-id"].startswith("0123ABCD")
    if range_header:
        assert headers["Content-Range"] == f"bytes {first}-{last}/{len(DATA)}"
    (logged,), blocks = drained(kernel)
    assert (logged["request_id"], logged["operation"], logged["bucket"], logged["key"], logged["range"],
            logged["status"]) == (headers["x-amz-request-id"], "GetObject", "bucket", "key", range_header,
                                  200 if range_header is None else 206)
    assert (logged["bytes_sent"], logged["cache"], logged["upstream_requests"], logged["upstream_bytes"]) == \
        (last - first + 1, "HIT", 0, 0)
    assert (logged["first_byte"], logged["object_size"]) == (first, len(DATA))
    assert blocks == [(7, block, 1) for block in range(first // BLOCK, last // BLOCK + 1)]
    gets, heads, sent, latency_counts, latency_sum = kernel.take_counters()
    assert (gets, heads, sent, sum(latency_counts)) == (1, 0, last - first + 1, 1)
    assert kernel.take_counters()[:3] == (0, 0, 0)


@needs_kernel
def test_a_drain_in_steps_gives_each_hit_once_in_order(block_file) -> None:
    """drain(limit) takes the oldest `limit` records and leaves the rest waiting (the
    lane drains in steps so that no step holds the loop long)."""
    kernel = new_kernel(keys=None)
    kernel.install("bucket", "key", record(7), block_file, 1e12, TEMPLATE, None, -1)
    for first in range(5):
        head = b"GET /bucket/key HTTP/1.1\r\nRange: bytes=%d-%d\r\n\r\n" % (first, first)
        assert answer(kernel, head)[0] == sprox.kernel.SENT
    assert kernel.ring_waiting == 5
    ranges, reads = [], 0
    for limit, left in ((2, 3), (0, 3), (2, 1), (7, 0)):
        log, blocks = kernel.drain(limit)
        ranges += [row["range"] for row in kernel_batch(log).to_pylist()]
        reads += sum(times for _, _, times in blocks)
        assert kernel.ring_waiting == left
    assert ranges == [f"bytes={i}-{i}" for i in range(5)] and reads == 5
    assert drained(kernel) == ([], [])


@needs_kernel
def test_the_drained_log_has_every_field_and_counts_the_blocks_read(block_file) -> None:
    """drain() makes the access log's columns in C: GETs and HEADs, with and without
    Range and User-Agent, a key outside ASCII; and counts every block each GET read,
    also past the size of its counting table (4,096 blocks of 4 bytes in one GET)."""
    kernel = new_kernel(keys=None)
    kernel.install("bucket", "ключ/ü", record(7), block_file, 1e12, TEMPLATE, None, -1)
    tiny_blocks = len(DATA) // 4
    tiny = SimpleNamespace(id=8, size=len(DATA), block_size=4, present=bytearray(b"\xff" * (tiny_blocks // 8)),
                           unverified=bytearray(tiny_blocks // 8))
    kernel.install("bucket", "tiny", tiny, block_file, 1e12, TEMPLATE, None, -1)
    began = time.time()
    heads = [b"GET /bucket/%D0%BA%D0%BB%D1%8E%D1%87/%C3%BC HTTP/1.1\r\nRange: bytes=0-9\r\n"
             b"User-Agent: duckdb/1.1\r\n\r\n",
             b"HEAD /bucket/%D0%BA%D0%BB%D1%8E%D1%87/%C3%BC HTTP/1.1\r\nUser-Agent: boto3/1.35\r\n\r\n",
             b"GET /bucket/tiny HTTP/1.1\r\n\r\n",
             b"GET /bucket/tiny HTTP/1.1\r\nRange: bytes=0-7\r\nUser-Agent: duckdb/1.1\r\n\r\n"]
    for head in heads:
        assert answer(kernel, head)[0] == sprox.kernel.SENT
    rows, blocks = drained(kernel)
    assert [(row["operation"], row["key"], row["range"], row["status"], row["bytes_sent"], row["user_agent"],
             row["access_key"], row["first_byte"], row["object_size"]) for row in rows] == [
        ("GetObject", "ключ/ü", "bytes=0-9", 206, 10, "duckdb/1.1", None, 0, len(DATA)),
        ("HeadObject", "ключ/ü", None, 200, 0, "boto3/1.35", None, None, len(DATA)),
        ("GetObject", "tiny", None, 200, len(DATA), None, None, 0, len(DATA)),
        ("GetObject", "tiny", "bytes=0-7", 206, 8, "duckdb/1.1", None, 0, len(DATA)),
    ]
    assert all(row["bucket"] == "bucket" and row["cache"] == "HIT" for row in rows)
    assert len({row["request_id"] for row in rows}) == 4 and all(len(row["request_id"]) == 16 for row in rows)
    assert all(began - 1 <= row["time"].timestamp() <= time.time() + 1 and row["latency_ms"] >= 0 for row in rows)
    reads = collections.Counter()
    for record_id, block, times in blocks:
        reads[(record_id, block)] += times
    expected = collections.Counter({(7, 0): 1, **{(8, block): 1 for block in range(tiny_blocks)}})
    expected[(8, 0)] += 1
    expected[(8, 1)] += 1
    assert reads == expected
    assert drained(kernel) == ([], [])


@needs_kernel
def test_head_and_connection_close(block_file) -> None:
    kernel = new_kernel(keys=None)
    kernel.install("bucket", "key", record(), block_file, 1e12, TEMPLATE, None, -1)
    done, response = answer(kernel, b"HEAD /bucket/key HTTP/1.1\r\nConnection: close\r\n\r\n")
    status, headers, body = split(response)
    assert done == sprox.kernel.SENT_CLOSE and body == b""
    assert headers["Content-Length"] == str(len(DATA)) and headers["Connection"] == "close"


@needs_kernel
def test_it_declines_what_it_cannot_answer_alone(block_file) -> None:
    kernel = new_kernel(keys=None)
    kernel.install("bucket", "key", record(blocks_present=2), block_file, 1e12, TEMPLATE, None, -1)
    kernel.install("bucket", "stale", record(8), block_file, 1.0, TEMPLATE, None, -1)
    unverified = record(9)
    unverified.unverified[0] = 1
    kernel.install("bucket", "unverified", unverified, block_file, 1e12, TEMPLATE, None, -1)
    cases = {
        "block 2 missing": b"GET /bucket/key HTTP/1.1\r\n\r\n",
        "stale": b"GET /bucket/stale HTTP/1.1\r\n\r\n",
        "unverified block": b"GET /bucket/unverified HTTP/1.1\r\nRange: bytes=0-1\r\n\r\n",
        "not mirrored": b"GET /bucket/other HTTP/1.1\r\n\r\n",
        "conditional": b"GET /bucket/key HTTP/1.1\r\nRange: bytes=0-1\r\nIf-Match: \"abc\"\r\n\r\n",
        "no-cache": b"GET /bucket/key HTTP/1.1\r\nRange: bytes=0-1\r\nCache-Control: no-cache\r\n\r\n",
        "checksums unknown": b"GET /bucket/key HTTP/1.1\r\nx-amz-checksum-mode: ENABLED\r\n\r\n",
        "unsatisfiable": b"GET /bucket/key HTTP/1.1\r\nRange: bytes=99999-\r\n\r\n",
        "a bucket": b"GET /bucket/ HTTP/1.1\r\n\r\n",
    }
    for why, data in cases.items():
        done, response = answer(kernel, data)
        assert (done, response) == (sprox.kernel.DECLINED, b""), why
    assert drained(kernel) == ([], [])
    # Within the blocks present it answers; forgotten, it declines.
    assert answer(kernel, b"GET /bucket/key HTTP/1.1\r\nRange: bytes=0-8191\r\n\r\n")[0] == sprox.kernel.SENT
    assert kernel.forget("bucket", "key") is True
    assert answer(kernel, b"GET /bucket/key HTTP/1.1\r\nRange: bytes=0-1\r\n\r\n")[0] == sprox.kernel.DECLINED


@needs_kernel
def test_only_keys_the_python_lane_allowed_read_an_entry(block_file) -> None:
    kernel = new_kernel()
    kernel.install("bucket", "key", record(), block_file, 1e12, TEMPLATE, None, kernel.key_slot(ACCESS_KEY))
    signed_by = {key: head_bytes("GET", "/bucket/key", signed_head("GET", "/bucket/key", access_key=key,
                                                                    secret=KEYS[key]))
                 for key in KEYS}
    # (signed in 2024: the kernel checks against the wall clock, so the date is refused
    # by serve(); the key rights are checked on entries, which is what this test is about)
    assert kernel.check_signature(signed_by["AKIDOTHER"], NOW) == "AKIDOTHER"
    assert answer(kernel, signed_by["AKIDOTHER"])[0] == sprox.kernel.DECLINED


@needs_kernel
def test_an_answer_the_socket_cannot_take_is_left_to_the_python_lane(block_file) -> None:
    kernel = new_kernel(keys=None)
    server, client = socket.socketpair()
    try:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        server.setblocking(False)
        rec = SimpleNamespace(id=3, size=len(DATA), block_size=BLOCK, present=bytearray(b"\x0f"),
                              unverified=bytearray(1))
        kernel.install("bucket", "key", rec, block_file, 1e12, TEMPLATE, None, -1)
        done = kernel.serve(server.fileno(), b"GET /bucket/key HTTP/1.1\r\n\r\n", True)
        assert done == sprox.kernel.PARTIAL
        rest, record_id, offset, remaining, first_block, last_block, token, length, close = kernel.take_pending()
        assert (record_id, first_block, last_block, length, close) == (3, 0, 3, len(DATA), False)
        assert drained(kernel) == ([], [])  # logged once the rest is sent
        received = bytearray()

        def read_all() -> None:
            while chunk := client.recv(65536):
                received.extend(chunk)

        reader = threading.Thread(target=read_all)
        reader.start()
        server.setblocking(True)
        server.sendall(rest)
        server.sendall(os.pread(block_file, remaining, offset))
        server.close()
        reader.join(timeout=30)
        assert not reader.is_alive()
        assert split(bytes(received))[2] == DATA
        assert kernel.log_pending(token, len(DATA)) is True
        assert kernel.log_pending(token, len(DATA)) is False  # once only
        (logged,), _ = drained(kernel)
        assert (logged["bytes_sent"], logged["bucket"], logged["key"]) == (len(DATA), "bucket", "key")
    finally:
        server.close()
        client.close()


@needs_kernel
def test_a_name_signed_twice_does_not_cover_an_unsigned_header() -> None:
    """SignedHeaders listing x-amz-date twice, with x-amz-checksum-mode sent unsigned:
    the full verifier refuses it (HeadersNotSigned), and so must the kernel."""
    import hashlib
    import hmac

    timestamp = SIGNED_AT.strftime("%Y%m%dT%H%M%SZ")
    names = "host;x-amz-content-sha256;x-amz-date;x-amz-date"
    canonical = "\n".join(["GET", "/bucket/key", "", "host:127.0.0.1:9000", "x-amz-content-sha256:UNSIGNED-PAYLOAD",
                           f"x-amz-date:{timestamp}", f"x-amz-date:{timestamp}", "", names, "UNSIGNED-PAYLOAD"])
    scope = f"{timestamp[:8]}/us-east-1/s3/aws4_request"
    to_sign = "\n".join(["AWS4-HMAC-SHA256", timestamp, scope, hashlib.sha256(canonical.encode()).hexdigest()])
    key = ("AWS4" + SECRET_KEY).encode()
    for part in (timestamp[:8], "us-east-1", "s3", "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    signature = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
    headers = [("Host", "127.0.0.1:9000"), ("x-amz-content-sha256", "UNSIGNED-PAYLOAD"), ("x-amz-date", timestamp),
               ("Authorization", f"AWS4-HMAC-SHA256 Credential={ACCESS_KEY}/{scope}, SignedHeaders={names}, "
                                 f"Signature={signature}")]
    assert new_kernel().check_signature(head_bytes("GET", "/bucket/key", headers), NOW) == ACCESS_KEY
    unsigned = headers + [("x-amz-checksum-mode", "ENABLED")]
    assert full_verdict("GET", "/bucket/key", unsigned) is None
    assert new_kernel().check_signature(head_bytes("GET", "/bucket/key", unsigned), NOW) is None


@needs_kernel
def test_hosts_that_may_name_a_bucket_under_the_domain_are_declined(block_file) -> None:
    kernel = new_kernel(keys=None, domain="example.com")
    kernel.install("bkt", "key", record(), block_file, 1e12, TEMPLATE, None, -1)
    for host, answered in (("localhost:9000", True), ("example.com", True), ("EXAMPLE.com:80", True),
                           ("bkt.example.com", False), ("bkt.Example.COM:9000", False), (".example.com", False),
                           ("x:y:b.example.com", False), ("[::1]:9000", False)):
        done, _ = answer(kernel, f"GET /bkt/key HTTP/1.1\r\nHost: {host}\r\nRange: bytes=0-1\r\n\r\n".encode())
        assert done == (sprox.kernel.SENT if answered else sprox.kernel.DECLINED), host


@needs_kernel
def test_the_kernel_refuses_none_for_bytes() -> None:
    with pytest.raises(TypeError):
        new_kernel().serve(0, None, True)
