"""Property-based fuzzing of the parsers that read attacker-controlled bytes: the S3
request model, Range headers (compiled module and pure-Python twin) and the
aws-chunked decoder. Each either answers or raises its documented S3 error, never
anything else, and never hangs.

Short by default; `SPROX_FUZZ_EXAMPLES=5000` runs each property longer. A failure
prints the falsifying example and a `@reproduce_failure` blob to replay it.
"""

from __future__ import annotations

import os
from types import ModuleType
from urllib.parse import unquote

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict, CIMultiDictProxy

from sprox._native import _ranges_py
from sprox.s3.errors import S3Error
from sprox.s3.request import (
    MAX_KEY_BYTES,
    PRESIGN_PARAMS,
    parse_request,
    valid_bucket_name,
)
from tests.unit.test_chunked import decode

FUZZ = settings(
    max_examples=int(os.environ.get("SPROX_FUZZ_EXAMPLES", "200")),
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)

# --- the request model: parse_request ----------------------------------------------------------

# Pieces of request targets that matter to a parser: separators, dot segments, escapes
# (valid, invalid UTF-8, overlong, surrogates, truncated), raw control and non-ASCII
# characters, presign and sub-resource parameters, absolute-form prefixes.
_TARGET_PIECES = [
    "/", "//", "?", "&", "=", "#", ".", "..", "../", "..%2F", "%2E%2E", "%2e", "%2F", "%2f", "%5C", "%",
    "%0", "%00", "%01", "%0A", "%0D", "%20", "%25", "%7F", "%C3%A9", "%E2%82%AC", "%FF", "%C0%AF",
    "%ED%A0%80", "%F4%90%80%80", "+", "~", ";", "bkt", "my-bucket", "a.b", "A", "k", "key", "x" * 70,
    "\x00", "\x01", "\t", " ", "\x7f", "é", "€", "\ud800", "\U0001F600",
    "uploads", "uploadId=u", "partNumber=1", "delete", "list-type=2", "versionId=3", "tagging",
    "X-Amz-Signature=abc", "X-Amz-Credential=a%2Fb", "http://", "https://evil.example", "http://[",
    "http://[::1]:80", "http://\uff03x", ":99999", "*",
]
targets = st.one_of(
    st.lists(st.sampled_from(_TARGET_PIECES), max_size=12).map("".join),
    st.lists(st.sampled_from(_TARGET_PIECES), max_size=12).map(lambda pieces: "/" + "".join(pieces)),
    st.text(max_size=40),
    st.text(max_size=40).map(lambda text: "/" + text),
)
methods = st.one_of(
    st.sampled_from(["GET", "HEAD", "PUT", "POST", "DELETE", "OPTIONS", "PATCH", "get", "CONNECT"]),
    st.text(max_size=8),
)
hosts = st.one_of(
    st.sampled_from(["127.0.0.1:9000", "s3.local", "bkt.s3.local", "bkt.s3.local:1", "BKT.S3.LOCAL",
                     ".s3.local", "a..b.s3.local", "[::1]:80", "[", "x:y:z", ""]),
    st.text(max_size=30),
)
_HEADER_NAMES = ["Range", "x-amz-copy-source", "Content-Length", "Transfer-Encoding",
                 "x-amz-content-sha256", "x-amz-decoded-content-length", "Authorization", "X-Other"]
headers = st.builds(
    lambda host, extra: CIMultiDictProxy(CIMultiDict(([("Host", host)] if host is not None else []) + extra)),
    st.none() | hosts,
    st.lists(st.tuples(st.sampled_from(_HEADER_NAMES), st.text(max_size=20)), max_size=4),
)


@FUZZ
@given(method=methods, target=targets, headers=headers, domain=st.sampled_from([None, "s3.local"]))
@example(method="GET", target="http://[x/bkt/k", headers=CIMultiDictProxy(CIMultiDict()), domain=None)
@example(method="GET", target="/bkt/\ud800", headers=CIMultiDictProxy(CIMultiDict()), domain=None)
@example(method="GET", target="/bkt/k?a=\udcff", headers=CIMultiDictProxy(CIMultiDict()), domain=None)
def test_parse_request_returns_a_request_or_raises_s3_error(method, target, headers, domain):
    try:
        request = parse_request(method, target, headers, domain=domain)
    except S3Error as error:
        assert 400 <= error.status < 500, error
        error.to_xml("id")  # whatever the error echoes, its body can be written
        return
    # What a request may hold once parsed.
    assert request.method == method.upper()
    assert isinstance(request.operation, str) and request.operation
    assert request.bucket is None or valid_bucket_name(request.bucket)
    if request.key is not None:
        assert request.bucket is not None and request.key != ""
        assert len(request.key.encode("utf-8")) <= MAX_KEY_BYTES  # encodable, and not too long
    assert not PRESIGN_PARAMS & set(request.query)
    for name, value in request.query.items():
        (name + value).encode("utf-8")
    if target.startswith("/") and not request.virtual_hosted:
        # Keys are taken verbatim: the bytes after "/bucket/", percent-decoded once.
        assert request.raw_path + ("?" + request.raw_query if "?" in target else "") == target
        if request.key is not None:
            assert unquote(request.raw_path, errors="strict") == f"/{request.bucket}/{request.key}"


# --- Range headers: the compiled module and its twin --------------------------------------------

INT64_MAX = 2**63 - 1

try:
    from sprox._native import ranges as _ranges_native
except ImportError:  # not built: tests/unit/test_ranges.py has the guard that fails for that
    _ranges_native = None

IMPLEMENTATIONS = [pytest.param(_ranges_py, id="py")]
if _ranges_native is not None:
    IMPLEMENTATIONS.append(pytest.param(_ranges_native, id="c"))

# Hostile shapes beyond test_ranges' structured ones: positions of thousands of digits
# (int() refuses more than 4300), signs, exponents, other scripts' digits, and headers
# holding thousands of ranges (S3 sends the whole object for any multi-range header).
_huge_digits = st.integers(1, 6000).map(lambda n: "9" * n)
_positions = st.one_of(
    st.integers(0, 200).map(str),
    st.integers(0, 2**70).map(str),
    _huge_digits,
    st.sampled_from(["", "-1", "+1", "1e3", "0x10", "٣", "1_0", " 1", "0" * 40 + "5", str(INT64_MAX + 1)]),
)
_one_range = st.builds(lambda a, sep, b: f"{a}{sep}{b}", _positions, st.sampled_from(["-", "--", " - ", "", "=-"]),
                       _positions)
range_headers = st.one_of(
    _one_range.map(lambda spec: "bytes=" + spec),
    st.lists(_one_range, min_size=2, max_size=3000).map(lambda specs: "bytes=" + ",".join(specs)),
    st.integers(2, 3000).map(lambda n: "bytes=" + ",".join(f"{2 * i}-{2 * i}" for i in range(n))),
    st.text(max_size=60),
    st.text(alphabet="bytes=-0123456789,\t \r\n\x00é٣", max_size=200),
)
object_sizes = st.one_of(st.integers(0, 300), st.integers(0, INT64_MAX), st.sampled_from([0, 1, INT64_MAX]))


def _range_outcome(module: ModuleType, header: str, size: int):
    try:
        return ("returned", module.parse_range(header, size))
    except _ranges_py.RangeNotSatisfiable as error:
        return ("416", error.range_requested, error.object_size, str(error))


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@FUZZ
@given(header=range_headers, size=object_sizes)
def test_range_parsing_answers_only_the_documented_outcomes(impl: ModuleType, header: str, size: int):
    outcome = _range_outcome(impl, header, size)
    if outcome[0] == "416":
        assert outcome[1] == header and outcome[2] == size
        return
    selected = outcome[1]
    assert selected is None or (isinstance(selected, tuple) and 0 <= selected[0] <= selected[1] < size)
    if "," in header.partition("=")[2].strip(" \t,") and selected is not None:
        # Several non-empty ranges are never answered with one of them.
        elements = [e for e in header.partition("=")[2].split(",") if e.strip(" \t")]
        assert len(elements) == 1


@pytest.mark.skipif(_ranges_native is None, reason="the compiled module is not built")
@FUZZ
@given(header=range_headers, size=object_sizes)
def test_range_twins_agree_on_hostile_headers(header: str, size: int):
    assert _range_outcome(_ranges_native, header, size) == _range_outcome(_ranges_py, header, size)


# --- the aws-chunked decoder ----------------------------------------------------------------------

CHUNKED_CODES = {"IncompleteBody", "InvalidChunkSizeError", "InvalidRequest"}


def _framed(data: bytes, sizes: list[int]) -> bytes:
    out, offset, index = [], 0, 0
    while offset < len(data):
        piece = data[offset:offset + sizes[index % len(sizes)]]
        out.append(b"%x\r\n%s\r\n" % (len(piece), piece))
        offset += len(piece)
        index += 1
    return b"".join(out) + b"0\r\n\r\n"


_CHUNKED_PIECES = [b"0", b"1", b"a", b"F", b"ffffffff", b"10", b";", b"chunk-signature=", b"ab" * 32, b"\r\n", b"\r",
                   b"\n", b":", b"x-amz-checksum-crc32:AAAAAA==", b"x-amz-trailer-signature:00", b"data", b" ",
                   b"\x00", b"\xff", b"0\r\n\r\n"]


@st.composite
def chunked_bodies(draw) -> bytes:
    kind = draw(st.sampled_from(["bytes", "pieces", "mutated"]))
    if kind == "bytes":
        return draw(st.binary(max_size=300))
    if kind == "pieces":
        return b"".join(draw(st.lists(st.sampled_from(_CHUNKED_PIECES), max_size=20)))
    # A valid framing with a few bytes changed, cut or inserted.
    body = bytearray(_framed(draw(st.binary(max_size=200)), draw(st.lists(st.integers(1, 64), min_size=1, max_size=4))))
    for _ in range(draw(st.integers(1, 3))):
        position = draw(st.integers(0, len(body)))
        action = draw(st.sampled_from(["flip", "cut", "insert"]))
        if action == "flip" and position < len(body):
            body[position] = draw(st.integers(0, 255))
        elif action == "cut":
            del body[position:position + draw(st.integers(1, 8))]
        else:
            body[position:position] = draw(st.sampled_from(_CHUNKED_PIECES))
    return bytes(body)


@FUZZ
@given(body=chunked_bodies(), feed_sizes=st.lists(st.integers(1, 64), min_size=1, max_size=4),
       with_trailer=st.booleans())
def test_aws_chunked_decoder_decodes_or_raises_a_400(body: bytes, feed_sizes: list[int], with_trailer: bool):
    try:
        data = b"".join(decode(body, with_trailer=with_trailer, feed_sizes=feed_sizes)[0])
    except S3Error as error:
        assert error.status == 400 and error.code in CHUNKED_CODES, error
        return
    # Accepted: the payload came out of the body, frames removed.
    assert len(data) <= len(body)
