"""LocalOrigin: a directory served as S3, driven with parsed S3 requests.

Each test runs a scenario against a fresh origin in `tmp_path` (`asyncio.run`, no
plugin). Object bytes come from `tests.data` (byte i is a function of (key, i)), XML
answers are also fed to botocore's own parser where a client would read them, and an
autouse guard fails any file-system call made on the event loop thread.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import re
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, unquote_plus

import botocore.parsers
import botocore.session
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict, CIMultiDictProxy

from sprox.s3 import xml as s3xml
from sprox.s3.body import RequestBody
from sprox.s3.conditions import http_date, parse_http_date
from sprox.s3.errors import S3Error
from sprox.s3.request import parse_request
from sprox.upstream import local
from sprox.upstream.local import (
    LocalOrigin,
    Representation,
    decode_segment,
    encode_segment,
    key_to_names,
    s3_url_encode,
)
from tests.data import assert_bytes, object_bytes

NS = "{http://s3.amazonaws.com/doc/2006-03-01/}"
MiB = 1024 * 1024
BUCKET = "bkt"


# --- harness -------------------------------------------------------------------------


@dataclass
class Result:
    status: int
    headers: CIMultiDict
    body: bytes
    code: str | None = None  # S3 error code when the origin raised

    def xml(self):
        assert self.body.startswith(b'<?xml version="1.0" encoding="UTF-8"?>'), self.body[:80]
        root = s3xml.ET.fromstring(self.body)
        assert root.tag.startswith(NS), root.tag
        return root

    def texts(self, path: str) -> list[str]:
        """Texts of the elements at `path` ("Contents/Key") below the root."""
        return [e.text or "" for e in self.xml().iterfind(_ns(path))]

    def text(self, path: str) -> str | None:
        found = self.texts(path)
        return found[0] if found else None


def _ns(path: str) -> str:
    return "/".join(NS + part for part in path.split("/"))


def target(key: str, query: str = "", bucket: str = BUCKET) -> str:
    path = f"/{bucket}/{quote(key, safe='/')}"
    return f"{path}?{query}" if query else path


def aws_chunked(chunks: list[bytes], trailer: str, value: str) -> tuple[bytes, dict]:
    """An unsigned aws-chunked body of `chunks` with one trailer, as current SDKs send
    it, and the headers that announce it."""
    framed = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks)
    framed += b"0\r\n" + f"{trailer}:{value}".encode() + b"\r\n\r\n"
    headers = {"Content-Encoding": "aws-chunked", "x-amz-content-sha256": "STREAMING-UNSIGNED-PAYLOAD-TRAILER",
               "x-amz-decoded-content-length": str(sum(map(len, chunks))), "x-amz-trailer": trailer}
    return framed, headers


async def call(origin: LocalOrigin, method: str, target_: str, headers: dict | None = None,
               body: bytes | RequestBody | None = None) -> Result:
    """One request through the origin, the way the front end makes it."""
    hdrs = CIMultiDict(headers or {})
    if isinstance(body, bytes) and "Content-Length" not in hdrs:
        hdrs["Content-Length"] = str(len(body))
    proxy = CIMultiDictProxy(hdrs)
    request = parse_request(method, target_, proxy)
    if isinstance(body, bytes):
        reader = asyncio.StreamReader()
        reader.feed_data(body)
        reader.feed_eof()
        request.body = RequestBody.from_headers(reader, proxy)
    elif body is not None:
        request.body = body
    try:
        response = await origin.send(request)
    except S3Error as exc:
        return Result(exc.status, CIMultiDict(exc.headers), exc.to_xml("test"), exc.code)
    try:
        chunks = [chunk async for chunk in response.iter_body()]
    finally:
        await response.close()
    assert all(len(c) <= local.CHUNK_SIZE for c in chunks)
    return Result(response.status, response.headers, b"".join(chunks))


def run(root: Path, scenario, *, bucket: str | None = BUCKET):
    """Run `scenario(origin)` against a started origin on `root`, then close it and
    check that no descriptor leaked."""
    fds_before = set(os.listdir("/proc/self/fd"))

    async def main():
        origin = LocalOrigin(root)
        await origin.start()
        try:
            if bucket:
                assert (await call(origin, "PUT", f"/{bucket}")).status == 200
            return await scenario(origin)
        finally:
            await origin.close()

    result = asyncio.run(main())
    leaked = set(os.listdir("/proc/self/fd")) - fds_before
    # Allow descriptors that were closed again by the time we look (listing races).
    leaked = {fd for fd in leaked if os.path.exists(f"/proc/self/fd/{fd}")}
    assert not leaked, f"descriptors leaked: {[os.readlink(f'/proc/self/fd/{fd}') for fd in leaked]}"
    return result


async def put(origin, key: str, data: bytes, headers: dict | None = None, bucket: str = BUCKET) -> Result:
    result = await call(origin, "PUT", target(key, bucket=bucket), headers, data)
    assert result.status == 200, (key, result.code, result.body)
    return result


async def get(origin, key: str, headers: dict | None = None, query: str = "") -> Result:
    return await call(origin, "GET", target(key, query), headers)


# Loaded at import: reading botocore's data files inside a scenario would trip the
# event-loop guard below.
S3_MODEL = botocore.session.get_session().get_service_model("s3")


def botocore_parse(operation: str, result: Result) -> dict:
    """What boto3 would return for this answer (rest-xml parser, S3 model)."""
    parser = botocore.parsers.create_parser("rest-xml")
    return parser.parse({"body": result.body, "headers": dict(result.headers), "status_code": result.status},
                        S3_MODEL.operation_model(operation).output_shape)


def md5_hex(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


# --- no file-system work on the event loop -------------------------------------------

from tests.guards import no_blocking_on_loop  # noqa: E402,F401  (autouse: applies to this module)


# --- key encoding ----------------------------------------------------------------------

valid_text = st.text(st.characters(exclude_categories=("Cs",)), min_size=1, max_size=40)
percent_heavy = st.text(st.sampled_from(["%", "2", "5", "E", "e", "F", ".", "/", "a", "\x00", "\n", "\x85", "é"]),
                        min_size=1, max_size=20)


@settings(max_examples=500)
@given(st.one_of(valid_text, percent_heavy))
def test_key_encoding_is_safe_and_reversible(key):
    try:
        names = key_to_names(key)
    except S3Error as exc:
        assert exc.code == "KeyTooLongError"
        return
    bucket_dir = "/srv/root/bkt"
    for name in names:
        assert name not in ("", ".", "..")
        assert "/" not in name and "\x00" not in name
        assert not any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F for c in name)
    resolved = os.path.normpath(os.path.join(bucket_dir, *names))
    assert resolved.startswith(bucket_dir + "/")
    assert "/".join(decode_segment(name) for name in names) == key


@given(st.lists(st.one_of(valid_text, percent_heavy), min_size=2, max_size=2, unique=True))
def test_key_encoding_is_injective(pair):
    a, b = pair
    assert [encode_segment(s) for s in a.split("/")] != [encode_segment(s) for s in b.split("/")]


@pytest.mark.parametrize("segment, name", [
    ("", "%"), (".", "%2E"), ("..", "%2E%2E"), ("...", "..."), ("%", "%25"), ("100%", "100%"),
    ("100%.csv", "100%.csv"), ("%41", "%2541"), ("%2F", "%252F"), ("a\x00b", "a%00b"), ("tab\t", "tab%09"),
    ("é", "é"), ("\x85", "%C2%85"), ("%%", "%%"), ("%4", "%4"),
])
def test_segment_encoding_table(segment, name):
    assert encode_segment(segment) == name
    assert decode_segment(name) == segment


@pytest.mark.parametrize("name", ["a%2Fb", "%2e", "%41", "%FF", "a\udcffb", "x%2E", "tab\t"])
def test_names_no_key_encodes_to_are_not_keys(name):
    assert decode_segment(name) is None


def test_segment_too_long():
    key_to_names("a" * 255)
    with pytest.raises(S3Error) as info:
        key_to_names("a" * 256)
    assert info.value.code == "KeyTooLongError"
    with pytest.raises(S3Error):
        key_to_names("x/" + "\x01" * 86)  # 258 bytes once encoded


TRICKY_KEYS = ["../escape", "a/../b", "./x", "a/./b", "a//b", "/lead", "trail/", "%2F", "a%2Fb", "nul\x00x",
               "ctl\x01\n", "100%", "%", "%25", "p/.", "p/..", "...", "sp ace+plus~", "é/ü", "a/%/b", "..a", "x/..", "q//"]


def test_tricky_keys_round_trip_and_stay_inside_the_bucket(tmp_path):
    async def scenario(origin):
        for key in TRICKY_KEYS:
            await put(origin, key, object_bytes(key, 100 + len(key)))
        for key in TRICKY_KEYS:
            result = await get(origin, key)
            assert result.status == 200, (key, result.code)
            assert_bytes(key, 0, result.body, 100 + len(key))
        listed = await call(origin, "GET", f"/{BUCKET}?list-type=2&encoding-type=url")
        keys = [unquote_plus(k) for k in listed.texts("Contents/Key")]
        assert keys == sorted(TRICKY_KEYS)
        for key in TRICKY_KEYS:
            assert (await call(origin, "DELETE", target(key))).status == 204
        assert (await call(origin, "GET", f"/{BUCKET}?list-type=2")).texts("Contents/Key") == []

    root = tmp_path / "root"
    # Everything written outside the state dir is inside the bucket dir.
    outside_before = set(os.listdir(tmp_path))
    run(root, scenario)
    assert set(os.listdir(tmp_path)) == outside_before | {"root"}
    assert sorted(os.listdir(root)) == [".sprox", BUCKET]
    assert os.listdir(root / BUCKET) == []  # deleted "folders" vanish


# --- buckets ---------------------------------------------------------------------------


def test_bucket_operations(tmp_path):
    root = tmp_path / "root"
    (root / "lost+found").mkdir(parents=True)  # not a valid bucket name
    (root / "dropped-bucket").mkdir()
    (root / "file-not-bucket").write_bytes(b"x")

    async def scenario(origin):
        rows = [
            # (method, target, expected status, expected error code)
            ("PUT", "/alpha", 200, None),
            ("PUT", "/alpha", 409, "BucketAlreadyOwnedByYou"),
            ("HEAD", "/alpha", 200, None),
            ("HEAD", "/missing", 404, "NoSuchBucket"),
            ("GET", "/alpha?location", 200, None),
            ("GET", "/missing?list-type=2", 404, "NoSuchBucket"),
            ("DELETE", "/missing", 404, "NoSuchBucket"),
            ("GET", "/alpha?versioning", 501, "NotImplemented"),
        ]
        for method, path, status, code in rows:
            result = await call(origin, method, path)
            assert (result.status, result.code) == (status, code), (method, path, result.body)

        created = await call(origin, "PUT", "/zeta", {"Content-Type": "application/xml"},
                             b"<CreateBucketConfiguration><LocationConstraint>eu-west-1</LocationConstraint>"
                             b"</CreateBucketConfiguration>")
        assert created.status == 200 and created.headers["Location"] == "/zeta"

        head = await call(origin, "HEAD", "/alpha")
        assert head.headers["x-amz-bucket-region"] == "us-east-1"
        location = await call(origin, "GET", "/alpha?location")
        assert location.xml().tag == NS + "LocationConstraint" and not location.xml().text
        # (boto3 reads the root's text itself, through a handler: empty means us-east-1.)
        assert botocore_parse("GetBucketLocation", location).get("LocationConstraint") is None

        listing = await call(origin, "GET", "/")
        assert listing.headers["Content-Type"] == "application/xml"
        parsed = botocore_parse("ListBuckets", listing)
        assert [b["Name"] for b in parsed["Buckets"]] == ["alpha", BUCKET, "dropped-bucket", "zeta"]
        assert parsed["Owner"]["ID"] == local.OWNER_ID

        await put(origin, "dir/x", b"data", bucket="alpha")
        full = await call(origin, "DELETE", "/alpha")
        assert (full.status, full.code) == (409, "BucketNotEmpty")
        assert (await call(origin, "DELETE", "/alpha/dir/x")).status == 204
        assert (await call(origin, "DELETE", "/alpha")).status == 204
        assert (await call(origin, "HEAD", "/alpha")).status == 404
        # Recreated, it is a new empty bucket.
        assert (await call(origin, "PUT", "/alpha")).status == 200
        assert (await call(origin, "GET", "/alpha?list-type=2")).texts("Contents/Key") == []

    run(root, scenario)


# --- objects: put / get / head -------------------------------------------------------


def test_put_get_head_round_trip_with_metadata(tmp_path):
    key = "data/part-0001.parquet"
    size = 3 * local.CHUNK_SIZE + 17
    data = object_bytes(key, size)
    stored = {
        "Content-Type": "application/vnd.apache.parquet",
        "Content-Encoding": "gzip",
        "Content-Disposition": 'attachment; filename="x.parquet"',
        "Content-Language": "en",
        "Cache-Control": "max-age=60",
        "Expires": "Thu, 01 Dec 2094 16:00:00 GMT",
    }

    async def scenario(origin):
        result = await put(origin, key, data, {**stored, "x-amz-meta-Owner": "Alice", "x-amz-meta-empty": ""})
        assert result.headers["ETag"] == f'"{md5_hex(data)}"'
        for method in ("GET", "HEAD"):
            got = await call(origin, method, target(key))
            assert got.status == 200
            for name, value in stored.items():
                assert got.headers[name] == value
            assert got.headers["x-amz-meta-owner"] == "Alice"
            assert got.headers["x-amz-meta-empty"] == ""
            assert got.headers["Content-Length"] == str(size)
            assert got.headers["ETag"] == f'"{md5_hex(data)}"'
            assert got.headers["Accept-Ranges"] == "bytes"
            mtime = (await asyncio.to_thread(os.stat, tmp_path / "root" / BUCKET / key)).st_mtime
            assert got.headers["Last-Modified"] == http_date(mtime)
            assert got.body == (data if method == "GET" else b"")
        # A PUT without a Content-Type gets S3's default.
        await put(origin, "plain", b"abc")
        assert (await call(origin, "HEAD", target("plain"))).headers["Content-Type"] == "binary/octet-stream"
        # Overwrite replaces data and metadata.
        await put(origin, key, b"new", {"Content-Type": "text/plain"})
        got = await get(origin, key)
        assert got.body == b"new" and got.headers["Content-Type"] == "text/plain"
        assert "x-amz-meta-owner" not in got.headers
        # Empty objects.
        await put(origin, "empty", b"")
        empty = await get(origin, "empty")
        assert (empty.status, empty.body, empty.headers["ETag"]) == (200, b"", f'"{md5_hex(b"")}"')

    run(tmp_path / "root", scenario)
    # Nothing of Sprox's own lives in the bucket tree, and no temp file is left.
    bucket_files = sorted(str(p.relative_to(tmp_path / "root" / BUCKET))
                          for p in (tmp_path / "root" / BUCKET).rglob("*") if p.is_file())
    assert bucket_files == ["data/part-0001.parquet", "empty", "plain"]
    assert os.listdir(tmp_path / "root" / ".sprox" / "tmp") == []


def test_representation_drops_aws_chunked_and_limits_metadata():
    headers = CIMultiDict({"Content-Encoding": "aws-chunked, gzip", "x-amz-meta-A": "1"})
    headers.add("x-amz-meta-a", "2")
    rep = Representation.from_request(headers)
    assert rep.headers == {"Content-Encoding": "gzip"}
    assert rep.metadata == {"x-amz-meta-a": "1,2"}
    assert rep.content_type == "binary/octet-stream"
    assert Representation.from_request(CIMultiDict({"Content-Encoding": "aws-chunked"})).headers == {}
    with pytest.raises(S3Error) as info:
        Representation.from_request(CIMultiDict({"x-amz-meta-big": "x" * 3000}))
    assert info.value.code == "MetadataTooLarge"


def test_missing_objects(tmp_path):
    async def scenario(origin):
        await put(origin, "file", b"x")
        await put(origin, "dir/inner", b"x")
        for key in ("nope", "dir", "dir/", "file/sub", "a" * 300, "dir/inner/deeper"):
            for method in ("GET", "HEAD"):
                result = await call(origin, method, target(key))
                assert (result.status, result.code) == (404, "NoSuchKey"), (method, key)
        result = await call(origin, "GET", "/other-bucket/key")
        assert (result.status, result.code) == (404, "NoSuchBucket")
        result = await call(origin, "PUT", "/other-bucket/key", body=b"x")
        assert (result.status, result.code) == (404, "NoSuchBucket")

    run(tmp_path / "root", scenario)


def test_object_and_folder_of_the_same_name_conflict(tmp_path):
    async def scenario(origin):
        await put(origin, "a", b"file")
        result = await call(origin, "PUT", target("a/b"), body=b"x")
        assert (result.status, result.code) == (409, "ObjectConflict")
        assert b"local-directory origin" in result.body
        await put(origin, "x/y", b"inner")
        result = await call(origin, "PUT", target("x"), body=b"x")
        assert (result.status, result.code) == (409, "ObjectConflict")
        # A folder marker and its contents coexist.
        await put(origin, "x/", b"")
        keys = (await call(origin, "GET", f"/{BUCKET}?list-type=2")).texts("Contents/Key")
        assert keys == ["a", "x/", "x/y"]
        # Once the folder is gone the name is free again.
        for key in ("x/", "x/y"):
            await call(origin, "DELETE", target(key))
        await put(origin, "x", b"now a file")

    run(tmp_path / "root", scenario)
    assert os.listdir(tmp_path / "root" / ".sprox" / "tmp") == []


def test_files_dropped_on_disk_are_objects(tmp_path):
    root = tmp_path / "root"
    (root / BUCKET / "reports").mkdir(parents=True)
    csv = root / BUCKET / "reports" / "2024.csv"
    csv_bytes = b"a,b\n1,2\n"
    csv.write_bytes(csv_bytes)
    (root / BUCKET / "archive.csv.gz").write_bytes(b"\x1f\x8b....")
    (root / BUCKET / "blob").write_bytes(b"\x00\x01")
    (root / BUCKET / "100% done.txt").write_bytes(b"percent")
    (root / BUCKET / "not%2Fa key").write_bytes(b"hidden")  # no key encodes to this name
    (root / BUCKET / "empty-dir").mkdir()
    os.mkfifo(root / BUCKET / "fifo")

    async def scenario(origin):
        listing = await call(origin, "GET", f"/{BUCKET}?list-type=2")
        assert listing.texts("Contents/Key") == ["100% done.txt", "archive.csv.gz", "blob", "reports/2024.csv"]
        assert listing.texts("Contents/ETag")[3] == f'"{md5_hex(csv_bytes)}"'
        head = await call(origin, "HEAD", target("reports/2024.csv"))
        assert head.headers["Content-Type"] == "text/csv"
        assert head.headers["ETag"] == f'"{md5_hex(csv_bytes)}"'
        assert (await call(origin, "HEAD", target("archive.csv.gz"))).headers["Content-Type"] == "application/gzip"
        assert (await call(origin, "HEAD", target("blob"))).headers["Content-Type"] == "application/octet-stream"
        assert (await get(origin, "100% done.txt")).body == b"percent"
        assert (await call(origin, "GET", target("fifo"))).code == "NoSuchKey"
        # Changed by hand: the ETag follows the bytes.
        changed = b"changed, longer\n"
        await asyncio.to_thread(csv.write_bytes, changed)
        assert (await call(origin, "HEAD", target("reports/2024.csv"))).headers["ETag"] == f'"{md5_hex(changed)}"'
        # Touched without a change: stored metadata survives.
        await put(origin, "typed", b"same", {"Content-Type": "text/x-custom", "x-amz-meta-k": "v"})
        typed = root / BUCKET / "typed"
        st = await asyncio.to_thread(os.stat, typed)
        await asyncio.to_thread(os.utime, typed, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
        head = await call(origin, "HEAD", target("typed"))
        assert head.headers["Content-Type"] == "text/x-custom" and head.headers["x-amz-meta-k"] == "v"

    run(root, scenario, bucket=None)
    # The computed ETags were cached in sidecars, outside the bucket tree.
    sidecars = list((root / ".sprox" / "meta" / BUCKET).rglob("*.json"))
    assert len(sidecars) >= 5


# --- ranges and parts ----------------------------------------------------------------

SIZE = 1000
RANGE_TABLE = [
    # (Range header, status, (first, last) or None for the whole object)
    (None, 200, None),
    ("bytes=0-99", 206, (0, 99)),
    ("bytes=990-", 206, (990, 999)),
    ("bytes=-10", 206, (990, 999)),
    ("bytes=-5000", 206, (0, 999)),
    ("bytes=0-99999", 206, (0, 999)),
    ("bytes=999-999", 206, (999, 999)),
    ("bytes=1000-", 416, None),
    ("bytes=5-2", 200, None),
    ("bytes=0-1,5-6", 200, None),
    ("items=0-1", 200, None),
]


@pytest.mark.parametrize("range_header, status, span", RANGE_TABLE)
def test_ranges(tmp_path, range_header, status, span):
    key = "ranged"

    async def scenario(origin):
        await put(origin, key, object_bytes(key, SIZE))
        headers = {"Range": range_header} if range_header else {}
        for method in ("GET", "HEAD"):
            result = await call(origin, method, target(key), headers)
            assert result.status == status
            if status == 416:
                assert result.code == "InvalidRange"
                assert result.headers["Content-Range"] == f"bytes */{SIZE}"
                continue
            first, last = span or (0, SIZE - 1)
            assert result.headers["Content-Length"] == str(last - first + 1)
            if status == 206:
                assert result.headers["Content-Range"] == f"bytes {first}-{last}/{SIZE}"
            else:
                assert "Content-Range" not in result.headers
            if method == "GET":
                assert_bytes(key, first, result.body, last - first + 1)

    run(tmp_path / "root", scenario)


def test_range_on_empty_object_is_unsatisfiable(tmp_path):
    async def scenario(origin):
        await put(origin, "empty", b"")
        result = await get(origin, "empty", {"Range": "bytes=0-"})
        assert (result.status, result.code) == (416, "InvalidRange")

    run(tmp_path / "root", scenario)


# --- conditional requests ----------------------------------------------------------------

MTIME = 1_700_000_000  # whole seconds: Last-Modified cannot be finer


def _dates():
    return {"before": http_date(MTIME - 1), "at": http_date(MTIME), "after": http_date(MTIME + 1)}


CONDITION_TABLE = [
    # (headers, expected status); ETAG and dates substituted below
    ({}, 200),
    ({"If-Match": "ETAG"}, 200),
    ({"If-Match": "ETAG_BARE"}, 200),
    ({"If-Match": '"other", ETAG'}, 200),
    ({"If-Match": "*"}, 200),
    ({"If-Match": '"other"'}, 412),
    ({"If-Unmodified-Since": "at"}, 200),
    ({"If-Unmodified-Since": "before"}, 412),
    ({"If-Match": "ETAG", "If-Unmodified-Since": "before"}, 200),  # If-Match wins
    ({"If-None-Match": "ETAG"}, 304),
    ({"If-None-Match": "*"}, 304),
    ({"If-None-Match": '"other"'}, 200),
    ({"If-Modified-Since": "at"}, 304),
    ({"If-Modified-Since": "after"}, 304),
    ({"If-Modified-Since": "before"}, 200),
    ({"If-Modified-Since": "not a date"}, 200),
    ({"If-None-Match": '"other"', "If-Modified-Since": "after"}, 200),  # If-None-Match wins
    ({"If-None-Match": "ETAG", "If-Modified-Since": "before"}, 304),
    ({"If-Match": '"other"', "If-None-Match": "ETAG"}, 412),  # 412 before 304
    ({"If-Unmodified-Since": "before", "If-Modified-Since": "before"}, 412),
    ({"If-Match": '"other"', "Range": "bytes=5000-"}, 412),  # conditions before ranges
]


@pytest.mark.parametrize("headers, status", CONDITION_TABLE)
def test_conditional_requests(tmp_path, headers, status):
    data = b"conditional body"
    etag = f'"{md5_hex(data)}"'
    dates = _dates()

    def fill(value: str) -> str:
        if value in dates:
            return dates[value]
        return value.replace("ETAG_BARE", md5_hex(data)).replace("ETAG", etag)

    async def scenario(origin):
        await put(origin, "obj", data)
        path = tmp_path / "root" / BUCKET / "obj"
        await asyncio.to_thread(os.utime, path, (MTIME, MTIME))
        for method in ("GET", "HEAD"):
            result = await call(origin, method, target("obj"), {k: fill(v) for k, v in headers.items()})
            assert result.status == status, (method, headers, result.code)
            if status == 304:
                assert result.headers["ETag"] == etag
                assert result.headers["Last-Modified"] == http_date(MTIME)
            if status == 412:
                assert result.code == "PreconditionFailed"

    run(tmp_path / "root", scenario)


def test_http_dates():
    assert http_date(784111777.9) == "Sun, 06 Nov 1994 08:49:37 GMT"
    for text in ("Sun, 06 Nov 1994 08:49:37 GMT", "Sunday, 06-Nov-94 08:49:37 GMT", "Sun Nov  6 08:49:37 1994"):
        assert parse_http_date(text) == 784111777
    for junk in (None, "", "yesterday", "Sun, 99 Nov 1994 08:49:37 GMT"):
        assert parse_http_date(junk) is None


def test_response_overrides(tmp_path):
    async def scenario(origin):
        await put(origin, "doc", b"x", {"Content-Type": "text/plain", "Cache-Control": "no-cache"})
        query = ("response-content-type=application%2Fjson&response-content-language=fr"
                 "&response-expires=Wed%2C%2021%20Oct%202015%2007%3A28%3A00%20GMT&response-cache-control=max-age%3D5"
                 "&response-content-disposition=inline&response-content-encoding=identity")
        for method in ("GET", "HEAD"):
            result = await call(origin, method, target("doc", query))
            assert result.headers.getall("Content-Type") == ["application/json"]
            assert result.headers.getall("Cache-Control") == ["max-age=5"]
            assert result.headers["Content-Language"] == "fr"
            assert result.headers["Expires"] == "Wed, 21 Oct 2015 07:28:00 GMT"
            assert result.headers["Content-Disposition"] == "inline"
            assert result.headers["Content-Encoding"] == "identity"

    run(tmp_path / "root", scenario)


# --- checksums ---------------------------------------------------------------------------


def _crc32(data: bytes) -> str:
    return b64(zlib.crc32(data).to_bytes(4, "big"))


def _botocore(algorithm: str, data: bytes) -> str:
    """The value botocore (the client) sends for `data`, from its own checksum classes."""
    from botocore import httpchecksum

    if algorithm == "md5":  # not one of botocore's
        return b64(hashlib.md5(data).digest())
    checksum = httpchecksum._CHECKSUM_CLS[algorithm]()
    checksum.update(data)
    return checksum.b64digest()


def _crc32c(data: bytes) -> str:
    return _botocore("crc32c", data)


def test_checksum_reference_values() -> None:
    """The published check values ("123456789") of the CRCs botocore computes here."""
    assert base64.b64decode(_crc32c(b"123456789")).hex() == "e3069283"
    assert base64.b64decode(_botocore("crc64nvme", b"123456789")).hex() == "ae8b14860a799888"


PAYLOAD = b"checksummed payload " * 1000
CHECKSUM_TABLE = [
    # (headers, status, error code, checksum header echoed)
    ({"Content-MD5": b64(hashlib.md5(PAYLOAD).digest())}, 200, None, None),
    ({"Content-MD5": b64(hashlib.md5(b"other").digest())}, 400, "BadDigest", None),
    ({"Content-MD5": "not base64!"}, 400, "InvalidDigest", None),
    ({"Content-MD5": b64(b"short")}, 400, "InvalidDigest", None),
    ({"x-amz-checksum-crc32": _crc32(PAYLOAD)}, 200, None, "x-amz-checksum-crc32"),
    ({"x-amz-checksum-crc32": _crc32(b"other")}, 400, "BadDigest", None),
    ({"x-amz-checksum-crc32": "AAAA"}, 400, "InvalidRequest", None),
    ({"x-amz-checksum-crc32c": _crc32c(PAYLOAD)}, 200, None, "x-amz-checksum-crc32c"),
    ({"x-amz-checksum-crc32c": _crc32c(b"x")}, 400, "BadDigest", None),
    *[({f"x-amz-checksum-{a}": _botocore(a, PAYLOAD)}, 200, None, f"x-amz-checksum-{a}")
      for a in ("crc64nvme", "sha512", "md5", "xxhash64", "xxhash3", "xxhash128")],
    *[({f"x-amz-checksum-{a}": _botocore(a, b"other")}, 400, "BadDigest", None)
      for a in ("crc64nvme", "sha512", "md5", "xxhash64", "xxhash3", "xxhash128")],
    ({"x-amz-checksum-sha1": b64(hashlib.sha1(PAYLOAD).digest())}, 200, None, "x-amz-checksum-sha1"),
    ({"x-amz-checksum-sha256": b64(hashlib.sha256(PAYLOAD).digest())}, 200, None, "x-amz-checksum-sha256"),
    ({"x-amz-checksum-sha256": b64(hashlib.sha256(b"x").digest())}, 400, "BadDigest", None),
    ({"x-amz-checksum-crc32": _crc32(PAYLOAD), "x-amz-checksum-sha1": b64(hashlib.sha1(PAYLOAD).digest())},
     400, "InvalidRequest", None),
    ({"x-amz-sdk-checksum-algorithm": "CRC32"}, 200, None, "x-amz-checksum-crc32"),
    ({"x-amz-sdk-checksum-algorithm": "MD4"}, 400, "InvalidRequest", None),
]


@pytest.mark.parametrize("headers, status, code, echoed", CHECKSUM_TABLE)
def test_put_checksums(tmp_path, headers, status, code, echoed):
    async def scenario(origin):
        result = await call(origin, "PUT", target("obj"), headers, PAYLOAD)
        assert (result.status, result.code) == (status, code)
        if echoed:
            assert result.headers[echoed] == _botocore(echoed.removeprefix("x-amz-checksum-"), PAYLOAD)
            # Returned on a full GET when the client asks for it.
            got = await get(origin, "obj", {"x-amz-checksum-mode": "ENABLED"})
            assert got.headers[echoed] == result.headers[echoed]
            ranged = await get(origin, "obj", {"x-amz-checksum-mode": "ENABLED", "Range": "bytes=0-9"})
            assert echoed not in ranged.headers
        exists = (await call(origin, "HEAD", target("obj"))).status == 200
        assert exists == (status == 200)

    run(tmp_path / "root", scenario)
    assert os.listdir(tmp_path / "root" / ".sprox" / "tmp") == []


@pytest.mark.parametrize("trailer_value, status", [(_crc32(PAYLOAD), 200), (_crc32(b"x"), 400)])
def test_put_checksum_in_trailer(tmp_path, trailer_value, status):
    framed, headers = aws_chunked([PAYLOAD[:8192], PAYLOAD[8192:]], "x-amz-checksum-crc32", trailer_value)

    async def scenario(origin):
        result = await call(origin, "PUT", target("obj"), headers, framed)
        assert result.status == status
        if status == 200:
            assert result.headers["x-amz-checksum-crc32"] == trailer_value
            assert (await get(origin, "obj")).body == PAYLOAD

    run(tmp_path / "root", scenario)


def test_put_aws_chunked_body(tmp_path):
    """A real aws-chunked body (unsigned, trailing CRC32), as current SDKs send it."""
    framed, headers = aws_chunked([PAYLOAD[:8192], PAYLOAD[8192:]], "x-amz-checksum-crc32", _crc32(PAYLOAD))
    headers["Content-Type"] = "text/plain"

    async def scenario(origin):
        result = await call(origin, "PUT", target("chunked"), headers, framed)
        assert result.status == 200, result.body
        got = await get(origin, "chunked")
        assert got.body == PAYLOAD
        assert "Content-Encoding" not in got.headers  # aws-chunked is framing, not content
        assert got.headers["Content-Type"] == "text/plain"

    run(tmp_path / "root", scenario)


def test_conditional_put(tmp_path):
    async def scenario(origin):
        assert (await call(origin, "PUT", target("k"), {"If-None-Match": "*"}, b"one")).status == 200
        second = await call(origin, "PUT", target("k"), {"If-None-Match": "*"}, b"two")
        assert (second.status, second.code) == (412, "PreconditionFailed")
        stale = await call(origin, "PUT", target("k"), {"If-Match": '"0123"'}, b"two")
        assert (stale.status, stale.code) == (412, "PreconditionFailed")
        fresh = await call(origin, "PUT", target("k"), {"If-Match": f'"{md5_hex(b"one")}"'}, b"two")
        assert fresh.status == 200
        assert (await get(origin, "k")).body == b"two"
        absent = await call(origin, "PUT", target("nope"), {"If-Match": '"x"'}, b"x")
        assert (absent.status, absent.code) == (404, "NoSuchKey")

    run(tmp_path / "root", scenario)


# --- copy ----------------------------------------------------------------------------


def test_copy_object(tmp_path):
    key = "src dir/ünïcode key+1"
    data = object_bytes(key, 70_000)

    async def scenario(origin):
        await put(origin, key, data, {"Content-Type": "text/csv", "x-amz-meta-a": "1"})
        source = f"/{BUCKET}/{quote(key)}"
        copied = await call(origin, "PUT", target("copy"), {"x-amz-copy-source": source})
        assert copied.status == 200
        parsed = botocore_parse("CopyObject", copied)
        assert parsed["CopyObjectResult"]["ETag"] == f'"{md5_hex(data)}"'
        head = await call(origin, "HEAD", target("copy"))
        assert head.headers["Content-Type"] == "text/csv" and head.headers["x-amz-meta-a"] == "1"
        assert_bytes(key, 0, (await get(origin, "copy")).body, len(data))

        replaced = await call(origin, "PUT", target("copy2"), {
            "x-amz-copy-source": f"{BUCKET}/{quote(key)}?versionId=null", "x-amz-metadata-directive": "REPLACE",
            "Content-Type": "text/plain", "x-amz-meta-b": "2"})
        assert replaced.status == 200
        head = await call(origin, "HEAD", target("copy2"))
        assert head.headers["Content-Type"] == "text/plain" and "x-amz-meta-a" not in head.headers
        assert head.headers["x-amz-meta-b"] == "2"

        rows = [
            ({"x-amz-copy-source": source, "x-amz-copy-source-if-match": '"nope"'}, 412, "PreconditionFailed"),
            ({"x-amz-copy-source": source, "x-amz-copy-source-if-none-match": f'"{md5_hex(data)}"'},
             412, "PreconditionFailed"),
            ({"x-amz-copy-source": source, "x-amz-copy-source-if-modified-since": http_date(4e9)},
             412, "PreconditionFailed"),
            ({"x-amz-copy-source": source, "x-amz-copy-source-if-unmodified-since": http_date(1e9)},
             412, "PreconditionFailed"),
            ({"x-amz-copy-source": source, "x-amz-copy-source-if-match": f'"{md5_hex(data)}"',
              "x-amz-copy-source-if-unmodified-since": http_date(1e9)}, 200, None),
            ({"x-amz-copy-source": f"/{BUCKET}/missing"}, 404, "NoSuchKey"),
            ({"x-amz-copy-source": "/no-such-bucket/x"}, 404, "NoSuchBucket"),
            ({"x-amz-copy-source": "just-a-bucket"}, 400, "InvalidArgument"),
            ({"x-amz-copy-source": source, "x-amz-metadata-directive": "MERGE"}, 400, "InvalidArgument"),
        ]
        for headers, status, code in rows:
            result = await call(origin, "PUT", target("copy3"), headers)
            assert (result.status, result.code) == (status, code), headers

        itself = await call(origin, "PUT", target(key), {"x-amz-copy-source": source})
        assert (itself.status, itself.code) == (400, "InvalidRequest")
        itself = await call(origin, "PUT", target(key), {"x-amz-copy-source": source,
                                                         "x-amz-metadata-directive": "REPLACE",
                                                         "Content-Type": "application/x-new"})
        assert itself.status == 200
        head = await call(origin, "HEAD", target(key))
        assert head.headers["Content-Type"] == "application/x-new"
        assert_bytes(key, 0, (await get(origin, key)).body, len(data))

    run(tmp_path / "root", scenario)


# --- delete --------------------------------------------------------------------------


def test_delete_object_and_empty_folders(tmp_path):
    async def scenario(origin):
        await put(origin, "a/b/c/d", b"x")
        await put(origin, "a/keep", b"x")
        assert (await call(origin, "DELETE", target("a/b/c/d"))).status == 204
        assert (await call(origin, "DELETE", target("a/b/c/d"))).status == 204  # idempotent
        assert (await call(origin, "DELETE", target("a"))).status == 204  # a folder: nothing happens
        assert (await call(origin, "GET", f"/{BUCKET}?list-type=2")).texts("Contents/Key") == ["a/keep"]

    run(tmp_path / "root", scenario)
    assert os.listdir(tmp_path / "root" / BUCKET / "a") == ["keep"]


def _delete_body(keys, quiet=False, doctype=b"") -> bytes:
    objects = b"".join(b"<Object><Key>%s</Key></Object>" % s3xml.escape(k).encode() for k in keys)
    quiet_xml = b"<Quiet>true</Quiet>" if quiet else b""
    return (b'<?xml version="1.0" encoding="UTF-8"?>' + doctype +
            b'<Delete xmlns="http://s3.amazonaws.com/doc/2006-03-01/">' + quiet_xml + objects + b"</Delete>")


def test_delete_objects(tmp_path):
    async def scenario(origin):
        keys = ["k1", "dir/k2", "a&b<c>"]
        for key in keys:
            await put(origin, key, b"x")
        result = await call(origin, "POST", f"/{BUCKET}?delete", {}, _delete_body(keys + ["missing"]))
        assert result.status == 200
        parsed = botocore_parse("DeleteObjects", result)
        assert sorted(d["Key"] for d in parsed["Deleted"]) == sorted(keys + ["missing"])
        assert (await call(origin, "GET", f"/{BUCKET}?list-type=2")).texts("Contents/Key") == []

        await put(origin, "q", b"x")
        quiet = await call(origin, "POST", f"/{BUCKET}?delete", {}, _delete_body(["q"], quiet=True))
        assert quiet.status == 200 and quiet.texts("Deleted") == [] and quiet.texts("Error") == []
        assert (await call(origin, "HEAD", target("q"))).status == 404

        bad_bodies = [
            _delete_body([f"k{i}" for i in range(1001)]),
            _delete_body([]),
            b"<Delete><Object><Key>x</Key></Object>",
            b"<NotDelete/>",
            _delete_body(["x"], doctype=b'<!DOCTYPE d [<!ENTITY e "boom">]>'),
            b"\xff\xfe<Delete/>",
        ]
        for body in bad_bodies:
            result = await call(origin, "POST", f"/{BUCKET}?delete", {}, body)
            assert (result.status, result.code) == (400, "MalformedXML"), body[:60]

    run(tmp_path / "root", scenario)


# --- multipart -----------------------------------------------------------------------


def _complete_body(parts: list[tuple[int, str]]) -> bytes:
    inner = "".join(f"<Part><PartNumber>{n}</PartNumber><ETag>{s3xml.escape(e)}</ETag></Part>" for n, e in parts)
    return f"<CompleteMultipartUpload>{inner}</CompleteMultipartUpload>".encode()


async def _start_upload(origin, key, headers=None) -> str:
    result = await call(origin, "POST", target(key, "uploads"), headers)
    assert result.status == 200
    parsed = botocore_parse("CreateMultipartUpload", result)
    assert (parsed["Bucket"], parsed["Key"]) == (BUCKET, key)
    return parsed["UploadId"]


async def _upload_part(origin, key, upload_id, number, data) -> str:
    result = await call(origin, "PUT", target(key, f"partNumber={number}&uploadId={upload_id}"), {}, data)
    assert result.status == 200, result.body
    assert result.headers["ETag"] == f'"{md5_hex(data)}"'
    return result.headers["ETag"]


def test_multipart_upload(tmp_path):
    key = "big/object.bin"
    sizes = [5 * MiB, 5 * MiB + 3, 1234]
    data = object_bytes(key, sum(sizes))
    offsets = [0, sizes[0], sizes[0] + sizes[1]]
    pieces = [data[o:o + s] for o, s in zip(offsets, sizes)]

    async def scenario(origin):
        upload_id = await _start_upload(origin, key, {"Content-Type": "application/x-big", "x-amz-meta-m": "v"})
        etags = [await _upload_part(origin, key, upload_id, n + 1, piece) for n, piece in enumerate(pieces)]
        # Re-uploading a part replaces it.
        etags[2] = await _upload_part(origin, key, upload_id, 3, pieces[2])

        listed = await call(origin, "GET", target(key, f"uploadId={upload_id}"))
        parsed = botocore_parse("ListParts", listed)
        assert [(p["PartNumber"], p["ETag"], p["Size"]) for p in parsed["Parts"]] == \
            [(n + 1, etags[n], sizes[n]) for n in range(3)]
        page = botocore_parse("ListParts", await call(origin, "GET", target(
            key, f"uploadId={upload_id}&max-parts=1&part-number-marker=1")))
        assert [p["PartNumber"] for p in page["Parts"]] == [2] and page["IsTruncated"]
        assert page["NextPartNumberMarker"] == 2

        uploads = botocore_parse("ListMultipartUploads", await call(origin, "GET", f"/{BUCKET}?uploads"))
        assert [(u["Key"], u["UploadId"]) for u in uploads["Uploads"]] == [(key, upload_id)]

        done = await call(origin, "POST", target(key, f"uploadId={upload_id}"), {},
                          _complete_body(list(zip([1, 2, 3], etags))))
        assert done.status == 200, done.body
        result = botocore_parse("CompleteMultipartUpload", done)
        expected = hashlib.md5(b"".join(hashlib.md5(p).digest() for p in pieces)).hexdigest() + "-3"
        assert result["ETag"] == f'"{expected}"'
        assert (result["Bucket"], result["Key"]) == (BUCKET, key)
        assert result["Location"].endswith(f"/{BUCKET}/{key}")

        whole = await get(origin, key)
        assert whole.headers["ETag"] == f'"{expected}"'
        assert whole.headers["Content-Type"] == "application/x-big" and whole.headers["x-amz-meta-m"] == "v"
        assert_bytes(key, 0, whole.body, len(data))
        for number in (1, 2, 3):
            part = await get(origin, key, query=f"partNumber={number}")
            first, size = offsets[number - 1], sizes[number - 1]
            assert part.status == 206
            assert part.headers["Content-Range"] == f"bytes {first}-{first + size - 1}/{len(data)}"
            assert part.headers["x-amz-mp-parts-count"] == "3"
            assert_bytes(key, first, part.body, size)
        head = await call(origin, "HEAD", target(key, "partNumber=2"))
        assert (head.status, head.headers["Content-Length"]) == (206, str(sizes[1]))
        for query, status, code in [("partNumber=4", 416, "InvalidPartNumber"),
                                    ("partNumber=0", 400, "InvalidArgument"),
                                    ("partNumber=x", 400, "InvalidArgument")]:
            result = await get(origin, key, query=query)
            assert (result.status, result.code) == (status, code)
        both = await get(origin, key, {"Range": "bytes=0-1"}, query="partNumber=1")
        assert (both.status, both.code) == (400, "InvalidRequest")

        # The upload is gone.
        again = await call(origin, "POST", target(key, f"uploadId={upload_id}"), {},
                           _complete_body(list(zip([1, 2, 3], etags))))
        assert (again.status, again.code) == (404, "NoSuchUpload")

    run(tmp_path / "root", scenario)
    assert os.listdir(tmp_path / "root" / ".sprox" / "uploads") == []


def test_single_part_object_part_number(tmp_path):
    async def scenario(origin):
        await put(origin, "single", b"0123456789")
        first = await get(origin, "single", query="partNumber=1")
        assert (first.status, first.body, first.headers["Content-Range"]) == (206, b"0123456789", "bytes 0-9/10")
        assert "x-amz-mp-parts-count" not in first.headers
        second = await get(origin, "single", query="partNumber=2")
        assert (second.status, second.code) == (416, "InvalidPartNumber")

    run(tmp_path / "root", scenario)


def test_multipart_errors(tmp_path):
    key = "mp"
    small = b"s" * 1024
    big = object_bytes(key, 5 * MiB)

    async def scenario(origin):
        upload_id = await _start_upload(origin, key)
        e_small = await _upload_part(origin, key, upload_id, 1, small)
        e_big = await _upload_part(origin, key, upload_id, 2, big)
        e_last = await _upload_part(origin, key, upload_id, 3, small)
        rows = [
            ([(1, e_small), (2, e_big)], 400, "EntityTooSmall"),
            ([(2, e_big), (1, e_small)], 400, "InvalidPartOrder"),
            ([(2, e_big), (2, e_big)], 400, "InvalidPartOrder"),
            ([(2, e_big), (4, e_last)], 400, "InvalidPart"),
            ([(2, '"0000"'), (3, e_last)], 400, "InvalidPart"),
            ([], 400, "MalformedXML"),
        ]
        for parts, status, code in rows:
            result = await call(origin, "POST", target(key, f"uploadId={upload_id}"), {}, _complete_body(parts))
            assert (result.status, result.code) == (status, code), parts
        for number in ("0", "10001", "abc"):
            result = await call(origin, "PUT", target(key, f"partNumber={number}&uploadId={upload_id}"), {}, b"x")
            assert (result.status, result.code) == (400, "InvalidArgument")
        for bad_id in ("../../../etc", "nope", upload_id + "x"):
            result = await call(origin, "PUT", target(key, f"partNumber=1&uploadId={quote(bad_id)}"), {}, b"x")
            assert (result.status, result.code) == (404, "NoSuchUpload"), bad_id
        wrong_key = await call(origin, "PUT", target("other", f"partNumber=1&uploadId={upload_id}"), {}, b"x")
        assert wrong_key.code == "NoSuchUpload"
        # Unquoted ETags are accepted, and parts may skip numbers.
        done = await call(origin, "POST", target(key, f"uploadId={upload_id}"), {},
                          _complete_body([(2, e_big.strip('"')), (3, e_last)]))
        assert done.status == 200, done.body
        assert_bytes(key, 0, (await get(origin, key, {"Range": f"bytes=0-{len(big) - 1}"})).body, len(big))
        assert (await get(origin, key, {"Range": f"bytes={len(big)}-"})).body == small

        upload_id = await _start_upload(origin, "aborted")
        await _upload_part(origin, "aborted", upload_id, 1, small)
        assert (await call(origin, "DELETE", target("aborted", f"uploadId={upload_id}"))).status == 204
        gone = await call(origin, "DELETE", target("aborted", f"uploadId={upload_id}"))
        assert (gone.status, gone.code) == (404, "NoSuchUpload")
        assert (await call(origin, "HEAD", target("aborted"))).status == 404

    run(tmp_path / "root", scenario)


def test_upload_part_copy(tmp_path):
    source_key = "source"
    data = object_bytes(source_key, 6 * MiB)

    async def scenario(origin):
        await put(origin, source_key, data)
        upload_id = await _start_upload(origin, "dest")
        copy_source = {"x-amz-copy-source": f"/{BUCKET}/{source_key}"}
        first = await call(origin, "PUT", target("dest", f"partNumber=1&uploadId={upload_id}"),
                           {**copy_source, "x-amz-copy-source-range": f"bytes=0-{5 * MiB - 1}"})
        assert first.status == 200, first.body
        e1 = botocore_parse("UploadPartCopy", first)["CopyPartResult"]["ETag"]
        assert e1 == f'"{md5_hex(data[:5 * MiB])}"'
        second = await call(origin, "PUT", target("dest", f"partNumber=2&uploadId={upload_id}"),
                            {**copy_source, "x-amz-copy-source-range": f"bytes={5 * MiB}-{6 * MiB - 1}"})
        e2 = botocore_parse("UploadPartCopy", second)["CopyPartResult"]["ETag"]
        for bad in ("bytes=0-", f"bytes=0-{6 * MiB}", "bytes=5-1", "0-1"):
            result = await call(origin, "PUT", target("dest", f"partNumber=3&uploadId={upload_id}"),
                                {**copy_source, "x-amz-copy-source-range": bad})
            assert (result.status, result.code) == (400, "InvalidArgument"), bad
        done = await call(origin, "POST", target("dest", f"uploadId={upload_id}"), {},
                          _complete_body([(1, e1), (2, e2)]))
        assert done.status == 200
        assert_bytes(source_key, 0, (await get(origin, "dest")).body, len(data))

    run(tmp_path / "root", scenario)


# --- listing -------------------------------------------------------------------------


def test_list_objects_v2_format(tmp_path):
    keys = ["a b+c~d", "dir/one", "dir/two", "dir/sub/three", "é", "z"]

    async def scenario(origin):
        for key in keys:
            await put(origin, key, object_bytes(key, len(key)))
        result = await call(origin, "GET", f"/{BUCKET}?list-type=2&delimiter=%2F&fetch-owner=true")
        assert result.headers["Content-Type"] == "application/xml"
        parsed = botocore_parse("ListObjectsV2", result)
        assert [c["Key"] for c in parsed["Contents"]] == ["a b+c~d", "z", "é"]
        assert [p["Prefix"] for p in parsed["CommonPrefixes"]] == ["dir/"]
        assert parsed["KeyCount"] == 4 and parsed["IsTruncated"] is False and parsed["MaxKeys"] == 1000
        assert parsed["Delimiter"] == "/" and parsed["Name"] == BUCKET
        first = parsed["Contents"][0]
        assert first["Size"] == len("a b+c~d") and first["StorageClass"] == "STANDARD"
        assert first["ETag"] == f'"{md5_hex(object_bytes("a b+c~d", 7))}"'
        assert first["Owner"]["ID"] == local.OWNER_ID
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", result.texts("Contents/LastModified")[0])

        no_owner = await call(origin, "GET", f"/{BUCKET}?list-type=2")
        assert no_owner.texts("Contents/Owner/ID") == []

        encoded = await call(origin, "GET", f"/{BUCKET}?list-type=2&encoding-type=url&prefix=a%20b&start-after=a")
        assert encoded.texts("Contents/Key") == ["a+b%2Bc%7Ed"]
        assert encoded.text("Prefix") == "a+b" and encoded.text("StartAfter") == "a"
        assert encoded.text("EncodingType") == "url"
        assert unquote_plus(encoded.texts("Contents/Key")[0]) == "a b+c~d"
        assert s3_url_encode("é/x y*") == "%C3%A9/x+y*"

        rows = [
            ("max-keys=abc", 400, "InvalidArgument"),
            ("max-keys=-1", 400, "InvalidArgument"),
            ("encoding-type=base64", 400, "InvalidArgument"),
            ("continuation-token=", 400, "InvalidArgument"),
            ("continuation-token=__8%3D", 400, "InvalidArgument"),  # base64 of bytes that are not UTF-8
            ("continuation-token=a", 400, "InvalidArgument"),
        ]
        for query, status, code in rows:
            result = await call(origin, "GET", f"/{BUCKET}?list-type=2&{query}")
            assert (result.status, result.code) == (status, code), query

        zero = await call(origin, "GET", f"/{BUCKET}?list-type=2&max-keys=0")
        assert (zero.text("KeyCount"), zero.text("IsTruncated"), zero.texts("Contents")) == ("0", "false", [])
        capped = await call(origin, "GET", f"/{BUCKET}?list-type=2&max-keys=5000")
        assert capped.text("MaxKeys") == "1000"

        v1 = await call(origin, "GET", f"/{BUCKET}?delimiter=/&max-keys=2")
        parsed = botocore_parse("ListObjects", v1)
        assert [c["Key"] for c in parsed["Contents"]] == ["a b+c~d"]
        assert [p["Prefix"] for p in parsed["CommonPrefixes"]] == ["dir/"]
        assert parsed["IsTruncated"] is True and parsed["NextMarker"] == "dir/" and parsed["Marker"] == ""
        assert parsed["Contents"][0]["Owner"]["ID"] == local.OWNER_ID
        no_delimiter = await call(origin, "GET", f"/{BUCKET}?max-keys=2")
        assert no_delimiter.text("NextMarker") is None and no_delimiter.text("IsTruncated") == "true"
        encoded_v1 = await call(origin, "GET", f"/{BUCKET}?encoding-type=url&marker=a%20b%2Bc~d&max-keys=1"
                                               f"&delimiter=/")
        assert encoded_v1.text("Marker") == "a+b%2Bc%7Ed" and encoded_v1.text("NextMarker") == "dir/"

        # The trailing slash DuckDB adds changes nothing.
        assert (await call(origin, "GET", f"/{BUCKET}/?list-type=2")).texts("Contents/Key") == sorted(keys)

    run(tmp_path / "root", scenario)


def model_entries(keys: list[str], prefix: str, delimiter: str) -> list[str]:
    """S3's listing, by definition: keys under `prefix`, rolled up at the first
    `delimiter` after it, in UTF-8 binary order. Common prefixes end with the delimiter."""
    entries = set()
    for key in keys:
        if not key.startswith(prefix):
            continue
        found = key.find(delimiter, len(prefix)) if delimiter else -1
        entries.add(key[: found + len(delimiter)] if found >= 0 else key)
    return sorted(entries, key=lambda e: e.encode())


async def list_all(origin, version: int, prefix: str, delimiter: str, max_keys: int, start: str = ""):
    """Follow the pagination as a client does; every page's entries, in order."""
    pages = []
    params = {"prefix": prefix, "delimiter": delimiter, "max-keys": str(max_keys)}
    if version == 2:
        params["list-type"] = "2"
        if start:
            params["start-after"] = start
    elif start:
        params["marker"] = start
    for _ in range(100):
        query = "&".join(f"{k}={quote(v, safe='')}" for k, v in params.items())
        result = await call(origin, "GET", f"/{BUCKET}?{query}")
        assert result.status == 200, result.body
        keys = result.texts("Contents/Key")
        prefixes = result.texts("CommonPrefixes/Prefix")
        page = sorted(keys + prefixes, key=lambda e: e.encode())
        assert len(page) <= max_keys
        if version == 2:
            assert result.text("KeyCount") == str(len(page))
        pages.append(page)
        if result.text("IsTruncated") != "true":
            return pages
        if version == 2:
            params["continuation-token"] = result.text("NextContinuationToken")
        else:
            params["marker"] = result.text("NextMarker") if delimiter else keys[-1]
    raise AssertionError("pagination does not end")


key_alphabet = st.sampled_from(["a", "b", "/", "-", ".", "%", "é", "~"])
keys_strategy = st.lists(st.text(key_alphabet, min_size=1, max_size=6), min_size=0, max_size=12, unique=True)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(keys=keys_strategy,
       prefix=st.text(st.sampled_from(["a", "b", "/"]), max_size=2),
       delimiter=st.sampled_from(["", "/", "a", "b/", "-", "%"]),
       max_keys=st.integers(1, 4),
       start=st.text(st.sampled_from(["a", "b", "/"]), max_size=3))
def test_listing_matches_a_model_of_s3(keys, prefix, delimiter, max_keys, start):
    with tempfile.TemporaryDirectory() as directory:
        async def scenario(origin):
            stored = []
            for key in keys:
                result = await call(origin, "PUT", target(key), {}, b"x")
                if result.status == 409:
                    # Only a key that is a folder of a stored key, or the reverse, is refused.
                    assert any(k.startswith(key + "/") or key.startswith(k + "/") for k in stored)
                    continue
                assert result.status == 200
                stored.append(key)
            expected = model_entries(stored, prefix, delimiter)
            for version in (1, 2):
                pages = await list_all(origin, version, prefix, delimiter, max_keys)
                assert [e for page in pages for e in page] == expected
                # Entries are pages of exactly max_keys until the last.
                assert all(len(page) == max_keys for page in pages[:-1])
                after = await list_all(origin, version, prefix, delimiter, 1000, start)
                assert [e for page in after for e in page] == [e for e in expected if e.encode() > start.encode()]

        run(Path(directory) / "root", scenario)


def test_listing_a_common_prefix_marker_skips_the_whole_prefix(tmp_path):
    async def scenario(origin):
        for key in ["asdf", "boo/bar", "boo/baz/xyzzy", "cquux/thud", "cquux/bla"]:
            await put(origin, key, b"x")
        # ceph s3-tests test_bucket_list_delimiter_prefix: the marker "boo/" is a prefix.
        result = await call(origin, "GET", f"/{BUCKET}?delimiter=/&marker=boo/&max-keys=1")
        assert result.texts("CommonPrefixes/Prefix") == ["cquux/"] and result.text("IsTruncated") == "false"
        assert result.text("NextMarker") is None
        # A start key inside a common prefix skips that prefix too.
        inside = await call(origin, "GET", f"/{BUCKET}?list-type=2&delimiter=/&start-after=boo/bar")
        assert inside.texts("CommonPrefixes/Prefix") == ["cquux/"]
        # Without a delimiter the keys after it are listed.
        flat = await call(origin, "GET", f"/{BUCKET}?list-type=2&start-after=boo/bar")
        assert flat.texts("Contents/Key") == ["boo/baz/xyzzy", "cquux/bla", "cquux/thud"]

    run(tmp_path / "root", scenario)


def test_list_multipart_uploads_with_prefix_and_pages(tmp_path):
    async def scenario(origin):
        ids = {}
        for key in ["logs/a", "logs/b", "data/c", "x"]:
            ids[key] = await _start_upload(origin, key)
        everything = botocore_parse("ListMultipartUploads", await call(origin, "GET", f"/{BUCKET}?uploads"))
        assert [u["Key"] for u in everything["Uploads"]] == ["data/c", "logs/a", "logs/b", "x"]
        logs = botocore_parse("ListMultipartUploads", await call(origin, "GET", f"/{BUCKET}?uploads&prefix=logs/"))
        assert [u["Key"] for u in logs["Uploads"]] == ["logs/a", "logs/b"]
        rolled = botocore_parse("ListMultipartUploads", await call(origin, "GET", f"/{BUCKET}?uploads&delimiter=/"))
        assert [p["Prefix"] for p in rolled["CommonPrefixes"]] == ["data/", "logs/"]
        assert [u["Key"] for u in rolled["Uploads"]] == ["x"]
        page = botocore_parse("ListMultipartUploads", await call(origin, "GET", f"/{BUCKET}?uploads&max-uploads=2"))
        assert page["IsTruncated"] and [u["Key"] for u in page["Uploads"]] == ["data/c", "logs/a"]
        rest = botocore_parse("ListMultipartUploads", await call(
            origin, "GET", f"/{BUCKET}?uploads&key-marker={page['NextKeyMarker']}"
                           f"&upload-id-marker={page['NextUploadIdMarker']}"))
        assert [u["Key"] for u in rest["Uploads"]] == ["logs/b", "x"] and not rest["IsTruncated"]

    run(tmp_path / "root", scenario)


# --- wire format details -------------------------------------------------------------


def test_xml_escaping_and_safe_parsing():
    body = s3xml.render("R", [("K", 'a&b<c>"d\re\x01'), ("N", 3), ("B", False), ("Skip", None),
                              ("L", [("X", "1")])])
    assert body == (b'<?xml version="1.0" encoding="UTF-8"?>\n<R xmlns="http://s3.amazonaws.com/doc/2006-03-01/">'
                    b"<K>a&amp;b&lt;c&gt;&quot;d&#13;e&#x1;</K><N>3</N><B>false</B><L><X>1</X></L></R>")
    for hostile in (b'<!DOCTYPE x [<!ENTITY a "b">]><x>&a;</x>', b'<x xmlns:y="z"><!ENTITY a "b"></x>',
                    b"<x>", b"\xc3", "<?xml version='1.0' encoding='UTF-16'?><x/>".encode("utf-16")):
        with pytest.raises(S3Error) as info:
            s3xml.parse(hostile)
        assert info.value.code == "MalformedXML"
    assert s3xml.local_name(s3xml.parse(b'\xef\xbb\xbf<a xmlns="ns"><b>1</b></a>').tag) == "a"


def test_unsupported_operations_are_not_implemented(tmp_path):
    async def scenario(origin):
        await put(origin, "k", b"x")
        for method, path in [("GET", target("k", "tagging")), ("PUT", target("k", "acl")),
                             ("GET", f"/{BUCKET}?versions"), ("POST", target("k", "restore"))]:
            result = await call(origin, method, path)
            assert (result.status, result.code) == (501, "NotImplemented"), path

    run(tmp_path / "root", scenario)


def test_state_directory_is_never_a_bucket(tmp_path):
    async def scenario(origin):
        for path in ("/.sprox", "/.sprox/tmp"):
            with pytest.raises(S3Error) as info:
                parse_request("GET", path, CIMultiDictProxy(CIMultiDict()))
            assert info.value.code == "InvalidBucketName"
        assert origin.description == f"local directory {tmp_path / 'root'}"

    run(tmp_path / "root", scenario)
    assert all((tmp_path / "root" / ".sprox" / d).is_dir() for d in ("tmp", "meta", "uploads"))


# --- concurrency and odd trees -------------------------------------------------------


def test_concurrent_writes_never_mix_bytes_and_etags(tmp_path):
    """Same-size versions of one key written back to back: every read's ETag is the
    MD5 of the bytes it returned (file times alone cannot tell such versions apart)."""

    async def scenario(origin):
        async def writer(i):
            for round_ in range(15):
                await put(origin, "hot", object_bytes(f"v{i}-{round_}", 4096))

        async def reader():
            for _ in range(60):
                got = await get(origin, "hot")
                if got.status == 200:
                    assert got.headers["ETag"] == f'"{md5_hex(got.body)}"'
                    assert len(got.body) == 4096

        await put(origin, "hot", object_bytes("v", 4096))
        await asyncio.gather(*[writer(i) for i in range(4)], *[reader() for _ in range(4)])

    run(tmp_path / "root", scenario)


def test_concurrent_writes_and_deletes_in_one_folder(tmp_path):
    """Deletes prune the folder other writers are putting objects into."""

    async def scenario(origin):
        async def worker(i):
            for round_ in range(10):
                key = f"shared/dir/k{i}"
                await put(origin, key, object_bytes(f"{key}-{round_}", 1000))
                assert_bytes(f"{key}-{round_}", 0, (await get(origin, key)).body, 1000)
                assert (await call(origin, "DELETE", target(key))).status == 204

        await asyncio.gather(*[worker(i) for i in range(12)])
        assert (await call(origin, "GET", f"/{BUCKET}?list-type=2")).texts("Contents/Key") == []

    run(tmp_path / "root", scenario)
    assert os.listdir(tmp_path / "root" / BUCKET) == []


def test_symlinks_placed_by_the_operator(tmp_path):
    root = tmp_path / "root"
    outside = tmp_path / "dataset"
    outside.mkdir()
    (outside / "table.csv").write_bytes(b"x,y\n")
    (root / BUCKET).mkdir(parents=True)
    (root / BUCKET / "linked").symlink_to(outside)
    (root / BUCKET / "loop").mkdir()
    (root / BUCKET / "loop" / "again").symlink_to(root / BUCKET / "loop")
    (root / BUCKET / "loop" / "file").write_bytes(b"f")

    async def scenario(origin):
        listing = await call(origin, "GET", f"/{BUCKET}?list-type=2")
        assert listing.texts("Contents/Key") == ["linked/table.csv", "loop/file"]
        assert (await get(origin, "linked/table.csv")).body == b"x,y\n"
        await call(origin, "DELETE", target("loop/file"))
        result = await call(origin, "DELETE", f"/{BUCKET}")
        assert (result.status, result.code) == (409, "BucketNotEmpty")

    run(root, scenario, bucket=None)
    assert (outside / "table.csv").exists()
