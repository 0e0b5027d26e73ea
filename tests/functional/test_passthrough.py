"""Sprox as an S3 endpoint, run as a subprocess in front of each origin: the local
directory, moto's server and SeaweedFS (which checks signatures, so every passing
request through it proves Sprox's re-signing), each with the block cache on and off
(`--no-cache`, pure pass-through): both must show the same S3 semantics.

Protocol behaviour is a table of raw HTTP rows, run against every origin; operations
are driven with boto3, the reference client.
"""

from __future__ import annotations

import http.client
import uuid
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError

from tests.data import check_bytes, object_bytes
from tests.gaps import known_gap
from tests.servers import SproxUnderTest

ORIGINS = ["local", "moto", "seaweedfs"]
MODES = ["cache", "no-cache"]
S3_NS = "{http://s3.amazonaws.com/doc/2006-03-01/}"


@pytest.fixture(scope="module", params=[(o, m) for o in ORIGINS for m in MODES], ids=lambda p: f"{p[0]}-{p[1]}")
def sprox(request, _module_sprox, tmp_path_factory):
    origin, mode = request.param
    base = tmp_path_factory.mktemp(f"sprox-{origin}-{mode}")
    upstream = None
    if origin == "local":
        (base / "origin").mkdir()
        args = ["--origin-dir", str(base / "origin")]
    else:
        upstream = request.getfixturevalue("moto_server" if origin == "moto" else "seaweed_server")
        args = ["--upstream", upstream.endpoint, "--upstream-region", "us-east-1"]
    if mode == "no-cache":
        args.append("--no-cache")
    proc = _module_sprox(base, *args)
    return SproxUnderTest(proc, origin, origin_dir=base / "origin" if origin == "local" else None, upstream=upstream)


def client_for(endpoint: str, key: str = "client-key", secret: str = "client-secret", **extra):
    # Keys differ from the upstream's (testing/testing): were the client's
    # Authorization forwarded, SeaweedFS would reject it.
    session = boto3.session.Session(aws_access_key_id=key, aws_secret_access_key=secret,
                                    region_name="us-east-1")
    return session.client("s3", endpoint_url=endpoint, config=Config(
        s3={"addressing_style": "path"}, retries={"max_attempts": 1}, **extra))


def raw(endpoint: str, method: str, target: str, headers: dict | None = None, body: bytes | None = None):
    host, port = endpoint.removeprefix("http://").rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        conn.request(method, target, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


def error_code(body: bytes) -> str:
    return ET.fromstring(body).findtext("Code") or ""


SIZE = 300_000
KEY = "data/obj.bin"


@pytest.fixture(scope="module")
def seeded(sprox):
    s3 = client_for(sprox.endpoint)
    bucket = f"pt-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=bucket)
    s3.put_object(Bucket=bucket, Key=KEY, Body=object_bytes(KEY, SIZE), ContentType="application/x-test",
                  Metadata={"colour": "blue"})
    head = s3.head_object(Bucket=bucket, Key=KEY)
    return sprox, bucket, head


@dataclass
class Row:
    name: str
    method: str = "GET"
    query: str = ""
    headers: dict = field(default_factory=dict)
    status: int = 200
    span: tuple[int, int] | None = (0, SIZE - 1)  # inclusive bytes expected in the body
    content_range: str | None = None
    code: str | None = None  # S3 error code expected in the XML body
    extra: dict = field(default_factory=dict)  # response headers expected
    upstream_quirk: dict = field(default_factory=dict)  # (origin, mode) -> reason it differs from S3


PAST = "Sat, 01 Jan 2000 00:00:00 GMT"
FUTURE = "Fri, 01 Jan 2100 00:00:00 GMT"
ROWS = [
    Row("plain"),
    Row("range a-b", headers={"Range": "bytes=100-199"}, status=206, span=(100, 199),
        content_range=f"bytes 100-199/{SIZE}"),
    Row("range across the end", headers={"Range": f"bytes=299990-{SIZE + 50}"}, status=206,
        span=(299990, SIZE - 1), content_range=f"bytes 299990-{SIZE - 1}/{SIZE}"),
    Row("open range a-", headers={"Range": "bytes=299000-"}, status=206, span=(299000, SIZE - 1),
        content_range=f"bytes 299000-{SIZE - 1}/{SIZE}"),
    Row("suffix -n", headers={"Range": "bytes=-16384"}, status=206, span=(SIZE - 16384, SIZE - 1),
        content_range=f"bytes {SIZE - 16384}-{SIZE - 1}/{SIZE}"),
    Row("suffix longer than the object", headers={"Range": "bytes=-999999"}, status=206,
        span=(0, SIZE - 1), content_range=f"bytes 0-{SIZE - 1}/{SIZE}"),
    Row("unsatisfiable range", headers={"Range": f"bytes={SIZE}-"}, status=416, span=None, code="InvalidRange"),
    Row("if-match true", headers={"If-Match": "{etag}"}),
    Row("if-match false", headers={"If-Match": '"0000"'}, status=412, span=None, code="PreconditionFailed"),
    Row("if-none-match true", headers={"If-None-Match": "{etag}"}, status=304, span=None),
    Row("if-none-match false", headers={"If-None-Match": '"0000"'}),
    Row("if-modified-since future", headers={"If-Modified-Since": FUTURE}, status=304, span=None),
    Row("if-modified-since past", headers={"If-Modified-Since": PAST}),
    Row("if-unmodified-since past", headers={"If-Unmodified-Since": PAST}, status=412, span=None,
        code="PreconditionFailed"),
    Row("response-content-type", query="response-content-type=text%2Fplain",
        extra={"content-type": "text/plain"}),
    Row("head", method="HEAD", span=None, extra={"content-length": str(SIZE), "content-type": "application/x-test",
                                                 "x-amz-meta-colour": "blue"}),
    Row("head with range", method="HEAD", headers={"Range": "bytes=0-9"}, status=206, span=None,
        content_range=f"bytes 0-9/{SIZE}", extra={"content-length": "10"},
        upstream_quirk={("seaweedfs", "no-cache"): "SeaweedFS answers a ranged HEAD with 200 (seen "
                        "directly, without Sprox); with the cache, Sprox answers from its record"}),
    Row("get missing key", query="", status=404, span=None, code="NoSuchKey"),
]


@pytest.mark.parametrize("row", ROWS, ids=[r.name for r in ROWS])
def test_object_reads_follow_s3_semantics(request, seeded, row: Row):
    sprox, bucket, head = seeded
    mode = "no-cache" if "--no-cache" in sprox.sprox.args else "cache"
    if (sprox.origin, mode) in row.upstream_quirk:
        known_gap(request, row.upstream_quirk[(sprox.origin, mode)])
    key = "data/missing" if row.code == "NoSuchKey" else KEY
    target = f"/{bucket}/{key}" + (f"?{row.query}" if row.query else "")
    headers = {k: v.format(etag=head["ETag"]) for k, v in row.headers.items()}
    status, got, body = raw(sprox.endpoint, row.method, target, headers)
    assert status == row.status, body[:500]
    if row.span is not None:
        first, last = row.span
        assert len(body) == last - first + 1
        assert check_bytes(KEY, first, body) is None
        assert got["etag"] == head["ETag"]
    if row.content_range is not None:
        assert got["content-range"] == row.content_range
    if row.code is not None:
        assert error_code(body) == row.code
        assert ET.fromstring(body).findtext("RequestId")
    if status == 304 or row.method == "HEAD":
        assert body == b""
    for name, value in row.extra.items():
        assert got.get(name) == value, name


def test_operations_round_trip_through_boto3(sprox):
    s3 = client_for(sprox.endpoint)
    bucket = f"ops-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=bucket)
    assert bucket in [b["Name"] for b in s3.list_buckets()["Buckets"]]
    s3.head_bucket(Bucket=bucket)
    assert s3.get_bucket_location(Bucket=bucket)["LocationConstraint"] in (None, "us-east-1")

    keys = ["a/1", "a/2", "a/b/3", "b/4", "c", "sp ace+plus", "pct%2Fkey"]
    if sprox.origin != "seaweedfs":
        # SeaweedFS itself (without Sprox) rejects dot segments and collapses "//".
        keys += ["dots/../x", "double//slash"]
    for key in keys:
        s3.put_object(Bucket=bucket, Key=key, Body=object_bytes(key, 1000))
    for key in keys:
        assert check_bytes(key, 0, s3.get_object(Bucket=bucket, Key=key)["Body"].read()) is None

    listed = s3.list_objects_v2(Bucket=bucket)
    assert [o["Key"] for o in listed["Contents"]] == sorted(keys)
    by_delim = s3.list_objects_v2(Bucket=bucket, Prefix="a/", Delimiter="/")
    assert [o["Key"] for o in by_delim["Contents"]] == ["a/1", "a/2"]
    assert [p["Prefix"] for p in by_delim["CommonPrefixes"]] == ["a/b/"]
    page1 = s3.list_objects_v2(Bucket=bucket, MaxKeys=2)
    page2 = s3.list_objects_v2(Bucket=bucket, MaxKeys=100, ContinuationToken=page1["NextContinuationToken"])
    assert [o["Key"] for o in page1["Contents"] + page2["Contents"]] == sorted(keys)
    v1 = s3.list_objects(Bucket=bucket, Marker="b/4")
    assert [o["Key"] for o in v1["Contents"]] == [k for k in sorted(keys) if k > "b/4"]

    s3.copy_object(Bucket=bucket, Key="copy", CopySource={"Bucket": bucket, "Key": "a/1"})
    assert check_bytes("a/1", 0, s3.get_object(Bucket=bucket, Key="copy")["Body"].read()) is None
    s3.delete_object(Bucket=bucket, Key="copy")
    with pytest.raises(ClientError) as info:
        s3.head_object(Bucket=bucket, Key="copy")
    assert info.value.response["Error"]["Code"] in ("404", "NoSuchKey")

    deleted = s3.delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": k} for k in keys]})
    assert sorted(d["Key"] for d in deleted["Deleted"]) == sorted(keys)
    assert s3.list_objects_v2(Bucket=bucket)["KeyCount"] == 0
    s3.delete_bucket(Bucket=bucket)


def test_multipart_upload_through_sprox(sprox):
    s3 = client_for(sprox.endpoint)
    bucket = f"mp-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=bucket)
    key = "big/object"
    part = 5 * 1024 * 1024
    data = object_bytes(key, 2 * part + 1234)
    upload = s3.create_multipart_upload(Bucket=bucket, Key=key, ContentType="application/x-big")
    uid = upload["UploadId"]
    assert uid in [u["UploadId"] for u in s3.list_multipart_uploads(Bucket=bucket).get("Uploads", [])]
    etags = []
    for number, start in enumerate(range(0, len(data), part), start=1):
        r = s3.upload_part(Bucket=bucket, Key=key, UploadId=uid, PartNumber=number, Body=data[start:start + part])
        etags.append({"PartNumber": number, "ETag": r["ETag"]})
    assert [p["PartNumber"] for p in s3.list_parts(Bucket=bucket, Key=key, UploadId=uid)["Parts"]] == [1, 2, 3]
    done = s3.complete_multipart_upload(Bucket=bucket, Key=key, UploadId=uid, MultipartUpload={"Parts": etags})
    assert done["ETag"].strip('"').endswith("-3")
    body = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
    assert len(body) == len(data) and check_bytes(key, 0, body) is None

    # UploadPartCopy, then abort: the upload disappears.
    second = s3.create_multipart_upload(Bucket=bucket, Key="copy-target")["UploadId"]
    s3.upload_part_copy(Bucket=bucket, Key="copy-target", UploadId=second, PartNumber=1,
                        CopySource={"Bucket": bucket, "Key": key}, CopySourceRange="bytes=0-1023")
    s3.abort_multipart_upload(Bucket=bucket, Key="copy-target", UploadId=second)
    with pytest.raises(ClientError) as info:
        s3.list_parts(Bucket=bucket, Key="copy-target", UploadId=second)
    assert info.value.response["Error"]["Code"] == "NoSuchUpload"


def test_list_with_trailing_slash_after_bucket(seeded):
    sprox, bucket, _ = seeded
    for target in (f"/{bucket}?list-type=2&prefix=data%2F", f"/{bucket}/?list-type=2&prefix=data%2F"):
        status, _, body = raw(sprox.endpoint, "GET", target)
        assert status == 200
        assert [k.text for k in ET.fromstring(body).iter(f"{S3_NS}Key")] == [KEY]


def test_upstream_errors_reach_the_client_as_s3_xml(sprox):
    status, headers, body = raw(sprox.endpoint, "GET", "/no-such-bucket-here-1/key")
    assert status == 404 and error_code(body) == "NoSuchBucket"
    assert headers["content-type"].startswith("application/")


def test_sproxs_own_errors_are_s3_xml_with_request_id(sprox):
    status, headers, body = raw(sprox.endpoint, "GET", "/xy/key")  # too short a bucket name
    assert status == 400
    root = ET.fromstring(body)
    assert root.findtext("Code") == "InvalidBucketName"
    assert root.findtext("RequestId") == headers["x-amz-request-id"]


def test_unsigned_trailer_and_signed_streaming_uploads(sprox):
    """aws-chunked bodies as SDKs send them, framed by hand: the unsigned form with a
    trailing CRC32, and the signed form (chunk signatures are not checked with
    --auth none)."""
    import base64
    import zlib

    s3 = client_for(sprox.endpoint)
    bucket = f"chunk-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=bucket)
    payload = object_bytes("chunked", 200_000)
    crc = base64.b64encode(zlib.crc32(payload).to_bytes(4, "big")).decode()

    def frame(signed: bool, trailer: bool) -> bytes:
        out = b""
        for i in range(0, len(payload), 65536):
            piece = payload[i:i + 65536]
            ext = b";chunk-signature=" + b"0" * 64 if signed else b""
            out += f"{len(piece):x}".encode() + ext + b"\r\n" + piece + b"\r\n"
        out += b"0" + (b";chunk-signature=" + b"0" * 64 if signed else b"") + b"\r\n"
        if trailer:
            out += f"x-amz-checksum-crc32:{crc}\r\n".encode()
        return out + b"\r\n"

    cases = {
        "unsigned-trailer": ("STREAMING-UNSIGNED-PAYLOAD-TRAILER", False, True),
        "signed": ("STREAMING-AWS4-HMAC-SHA256-PAYLOAD", True, False),
    }
    for name, (mode, signed, trailer) in cases.items():
        body = frame(signed, trailer)
        headers = {"x-amz-content-sha256": mode, "Content-Encoding": "aws-chunked",
                   "x-amz-decoded-content-length": str(len(payload)), "Content-Length": str(len(body))}
        if trailer:
            headers["x-amz-trailer"] = "x-amz-checksum-crc32"
        status, _, answer = raw(sprox.endpoint, "PUT", f"/{bucket}/{name}", headers, body)
        assert status == 200, answer
        got = s3.get_object(Bucket=bucket, Key=name)
        assert got.get("ContentEncoding") in (None, "")
        assert got["Body"].read() == payload, name


def _chunked_put(endpoint: str, target: str, pieces, headers: dict | None = None):
    """PUT with Transfer-Encoding: chunked and no Content-Length (what `curl -T -` sends)."""
    host, port = endpoint.removeprefix("http://").rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    try:
        conn.request("PUT", target, body=iter(pieces), headers=headers or {}, encode_chunked=True)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def test_chunked_put_without_content_length_streams_to_the_origin(sprox):
    s3 = client_for(sprox.endpoint)
    bucket = f"te-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=bucket)
    payload = object_bytes("te-chunked", 3 * 1024 * 1024 + 123)
    pieces = [payload[i:i + 100_000] for i in range(0, len(payload), 100_000)]
    status, answer = _chunked_put(sprox.endpoint, f"/{bucket}/streamed", pieces)
    assert status == 200, answer
    got = s3.get_object(Bucket=bucket, Key="streamed")
    assert got["ContentLength"] == len(payload) and got["Body"].read() == payload
    # An empty chunked body is an empty object.
    status, answer = _chunked_put(sprox.endpoint, f"/{bucket}/empty", [])
    assert status == 200, answer
    assert s3.get_object(Bucket=bucket, Key="empty")["Body"].read() == b""


def _ceph_chunked_put(client, bucket: str):
    """ceph/s3-tests `test_object_write_with_chunked_transfer_encoding`: boto3's PutObject
    with `Transfer-Encoding: chunked` added before the call, so no Content-Length."""
    def add_header(**kwargs):
        kwargs["params"]["headers"]["Transfer-Encoding"] = "chunked"

    client.meta.events.register("before-call.s3.PutObject", add_header)
    try:
        return client.put_object(Bucket=bucket, Key="foo", Body="bar")["ResponseMetadata"]["HTTPStatusCode"]
    except ClientError as exc:
        return exc.response["ResponseMetadata"]["HTTPStatusCode"]


def test_ceph_s3_tests_chunked_transfer_encoding_answers_as_the_upstream_does(sprox):
    bucket = f"ceph-{uuid.uuid4().hex[:12]}"
    client_for(sprox.endpoint).create_bucket(Bucket=bucket)
    through = _ceph_chunked_put(client_for(sprox.endpoint), bucket)
    if sprox.upstream is not None:
        from tests.servers import s3_client

        assert through == _ceph_chunked_put(s3_client(sprox.upstream.endpoint), bucket)  # as direct
    assert through == 200
    assert client_for(sprox.endpoint).get_object(Bucket=bucket, Key="foo")["Body"].read() == b"bar"


def test_an_upload_over_s3s_size_limit_is_refused_before_its_body(sprox):
    """S3 takes at most 5 GiB in one PUT: a larger declared length is EntityTooLarge at
    once, without waiting for (or forwarding) a byte of it."""
    host, port = sprox.endpoint.removeprefix("http://").rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        conn.putrequest("PUT", "/any-bucket/huge")
        conn.putheader("Content-Length", str(5 * 1024**3 + 1))
        conn.endheaders()
        conn.send(b"x" * 1000)
        response = conn.getresponse()
        status, body = response.status, response.read()
    finally:
        conn.close()
    assert status == 400 and error_code(body) == "EntityTooLarge", body


CHECKSUMS = ["CRC32", "CRC32C", "CRC64NVME", "SHA1", "SHA256"]


def _stored_checksum(sprox, bucket: str, key: str, algorithm: str) -> str | None:
    """What the origin itself says it stored (straight from it, not through Sprox)."""
    if sprox.upstream is not None:
        from tests.servers import s3_client

        return s3_client(sprox.upstream.endpoint).head_object(
            Bucket=bucket, Key=key, ChecksumMode="ENABLED").get(f"Checksum{algorithm}")
    import asyncio

    from sprox.upstream.local import LocalOrigin

    async def head() -> str | None:
        from multidict import CIMultiDict, CIMultiDictProxy

        from sprox.s3.request import parse_request

        origin = LocalOrigin(sprox.origin_dir)
        await origin.start()
        try:
            answer = await origin.send(parse_request("HEAD", f"/{bucket}/{key}", CIMultiDictProxy(
                CIMultiDict({"x-amz-checksum-mode": "ENABLED"}))))
            await answer.close()
            return answer.headers.get(f"x-amz-checksum-{algorithm.lower()}")
        finally:
            await origin.close()

    return asyncio.run(head())


def test_checksums_reach_the_origin_and_come_back_on_reads_that_ask(sprox):
    """The checksum a client sends is stored upstream; a full GET or HEAD with
    x-amz-checksum-mode: ENABLED returns it, from the origin and from the cache alike
    (the record keeps it); a range, or a read that does not ask, gets none (as S3)."""
    s3 = client_for(sprox.endpoint)
    bucket = f"sum-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=bucket)
    payload = object_bytes("checksummed", 700_000)
    for algorithm in CHECKSUMS:
        key = f"obj-{algorithm}"
        sent = s3.put_object(Bucket=bucket, Key=key, Body=payload, ChecksumAlgorithm=algorithm)
        value = sent[f"Checksum{algorithm}"]
        assert _stored_checksum(sprox, bucket, key, algorithm) == value
        # A ranged read first: the record is made without the checksums, then learns them.
        ranged = s3.get_object(Bucket=bucket, Key=key, Range="bytes=0-99", ChecksumMode="ENABLED")
        assert ranged["Body"].read() == payload[:100] and f"Checksum{algorithm}" not in ranged
        for attempt in range(2):  # the origin's answer (or a learning HEAD), then the cache's
            got = s3.get_object(Bucket=bucket, Key=key, ChecksumMode="ENABLED")
            assert got[f"Checksum{algorithm}"] == value, (algorithm, attempt)
            assert got["Body"].read() == payload  # (botocore verifies the checksum as it reads)
        assert s3.head_object(Bucket=bucket, Key=key, ChecksumMode="ENABLED")[f"Checksum{algorithm}"] == value
        plain = raw(sprox.endpoint, "GET", f"/{bucket}/{key}")  # no x-amz-checksum-mode
        assert plain[0] == 200 and not any(h.startswith("x-amz-checksum-") for h in plain[1])


def test_a_trailing_checksum_reaches_the_origin(request, sprox):
    """aws-chunked with the checksum in the trailer (what SDKs send over TLS): Sprox
    verifies it and forwards it in a trailer of its own, so the origin stores it."""
    import base64
    import zlib

    if sprox.origin == "moto":
        known_gap(request, "moto decodes an unsigned-trailer upload but does not store its trailing checksum "
                     "(the same sent to it directly)")
    s3 = client_for(sprox.endpoint)
    bucket = f"trail-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=bucket)
    payload = object_bytes("trailing", 600_000)
    crc = base64.b64encode(zlib.crc32(payload).to_bytes(4, "big")).decode()
    body = b"".join(f"{len(payload[i:i + 65536]):x}\r\n".encode() + payload[i:i + 65536] + b"\r\n"
                    for i in range(0, len(payload), 65536))
    body += b"0\r\n" + f"x-amz-checksum-crc32:{crc}\r\n\r\n".encode()
    headers = {"x-amz-content-sha256": "STREAMING-UNSIGNED-PAYLOAD-TRAILER", "Content-Encoding": "aws-chunked",
               "x-amz-decoded-content-length": str(len(payload)), "x-amz-trailer": "x-amz-checksum-crc32",
               "Content-Length": str(len(body))}
    status, _, answer = raw(sprox.endpoint, "PUT", f"/{bucket}/trailed", headers, body)
    assert status == 200, answer
    assert _stored_checksum(sprox, bucket, "trailed", "CRC32") == crc
    got = s3.get_object(Bucket=bucket, Key="trailed", ChecksumMode="ENABLED")
    assert got["ChecksumCRC32"] == crc and got["Body"].read() == payload
    assert got.get("ContentEncoding") in (None, "")


def test_sigv4_auth_mode_verifies_client_signatures(start_sprox, tmp_path):
    proc = start_sprox(tmp_path, "--origin-dir", str(tmp_path / "origin"),
                       "--access-key", "sprox-ak", "--secret-key", "sprox-sk")
    good = client_for(proc.endpoint, "sprox-ak", "sprox-sk")
    good.create_bucket(Bucket="authed")
    good.put_object(Bucket="authed", Key="k", Body=b"v")
    assert good.get_object(Bucket="authed", Key="k")["Body"].read() == b"v"
    for key, secret, code in [("sprox-ak", "wrong", "SignatureDoesNotMatch"),
                              ("nobody", "sprox-sk", "InvalidAccessKeyId")]:
        with pytest.raises(ClientError) as info:
            client_for(proc.endpoint, key, secret).get_object(Bucket="authed", Key="k")
        assert info.value.response["Error"]["Code"] == code
    status, _, body = raw(proc.endpoint, "GET", "/authed/k")
    assert status == 403 and error_code(body) == "AccessDenied"


def test_virtual_hosted_requests(start_sprox, tmp_path):
    origin = tmp_path / "origin"
    proc = start_sprox(tmp_path, "--origin-dir", str(origin), "--domain", "s3.test")
    s3 = client_for(proc.endpoint)
    s3.create_bucket(Bucket="vhost")
    s3.put_object(Bucket="vhost", Key="dir/file.txt", Body=b"hello")
    status, _, body = raw(proc.endpoint, "GET", "/dir/file.txt", {"Host": f"vhost.s3.test:{proc.port}"})
    assert (status, body) == (200, b"hello")


def test_unreachable_upstream_is_a_502(start_sprox, tmp_path):
    import socket

    # A port bound but never listened on refuses connections, and stays ours (no other
    # process can start listening there) for as long as the test holds it.
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        port = held.getsockname()[1]
        proc = start_sprox(tmp_path, "--upstream", f"http://127.0.0.1:{port}", "--upstream-timeout", "5")
        status, headers, body = raw(proc.endpoint, "GET", "/bucket/key")
    assert status == 502 and error_code(body) == "BadGateway"
    assert headers["x-amz-request-id"]


def test_wrong_trailing_checksum_is_bad_digest_and_stores_nothing(sprox):
    s3 = client_for(sprox.endpoint)
    bucket = f"crc-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=bucket)
    payload = object_bytes("bad-crc", 100_000)
    body = (f"{len(payload):x}\r\n".encode() + payload + b"\r\n0\r\n"
            + b"x-amz-checksum-crc32:AAAAAA==\r\n\r\n")
    headers = {"x-amz-content-sha256": "STREAMING-UNSIGNED-PAYLOAD-TRAILER", "Content-Encoding": "aws-chunked",
               "x-amz-decoded-content-length": str(len(payload)), "x-amz-trailer": "x-amz-checksum-crc32",
               "Content-Length": str(len(body))}
    status, _, answer = raw(sprox.endpoint, "PUT", f"/{bucket}/obj", headers, body)
    assert status == 400, answer
    assert error_code(answer) == "BadDigest"
    assert s3.list_objects_v2(Bucket=bucket)["KeyCount"] == 0


@pytest.mark.parametrize("algorithm", ["crc32", "crc32c", "crc64nvme", "sha1", "sha256", "sha512", "md5",
                                       "xxhash64", "xxhash3", "xxhash128"])
def test_a_wrong_checksum_header_on_a_plain_put_is_bad_digest_and_stores_nothing(sprox, algorithm):
    """Sprox checks every algorithm S3 offers itself, whatever the origin supports."""
    import base64

    from sprox.s3.checksums import DIGEST_SIZES

    s3 = client_for(sprox.endpoint)
    bucket = f"hdr-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=bucket)
    wrong = base64.b64encode(bytes(DIGEST_SIZES[algorithm])).decode()
    status, _, answer = raw(sprox.endpoint, "PUT", f"/{bucket}/obj", {f"x-amz-checksum-{algorithm}": wrong},
                            object_bytes("hdr", 300_000))
    assert status == 400 and error_code(answer) == "BadDigest", answer
    assert s3.list_objects_v2(Bucket=bucket)["KeyCount"] == 0


def test_a_large_delete_objects_body_is_parsed_off_the_loop_and_deletes_every_key(sprox_local):
    """Over 64 KiB of DeleteObjects XML is parsed on a thread (frontend.py); every key
    it names is deleted, and the cache forgets them."""
    s3 = client_for(sprox_local.endpoint)
    bucket = f"bulk-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=bucket)
    keys = [f"{'k' * 240}-{i:04d}" for i in range(300)]  # about 90 KiB of XML
    for key in keys:
        s3.put_object(Bucket=bucket, Key=key, Body=b"x")
    assert s3.get_object(Bucket=bucket, Key=keys[0])["Body"].read() == b"x"  # cached now
    answer = s3.delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": k} for k in keys]})
    assert len(answer.get("Deleted", [])) == len(keys) and not answer.get("Errors")
    assert s3.list_objects_v2(Bucket=bucket)["KeyCount"] == 0
    with pytest.raises(ClientError):
        s3.get_object(Bucket=bucket, Key=keys[0])
