"""Who may do what through a Sprox that verifies SigV4, end to end (Sprox as a
subprocess, real clients): signed streaming uploads with chained chunk signatures,
declared payload hashes, per-key bucket rights in both lanes (cached bytes included),
and admin routes moved off the data port."""

from __future__ import annotations

import hashlib
import json
import http.client
import subprocess
import sys
import time
import urllib.error
import urllib.request
from urllib.parse import urlsplit

import boto3
import pytest
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.config import Config
from botocore.credentials import Credentials
from botocore.exceptions import ClientError

from tests.data import object_bytes
from tests.streaming_signer import frame_signed, signing_key

ADMIN = ("admin-key", "admin-secret")
READER = ("reader-key", "reader-secret")  # bucket "data" only, read only
LOGS = ("logs-key", "logs-secret")  # buckets "logs-*", read and write

KEYS_TOML = f"""
[[keys]]
access_key = "{ADMIN[0]}"
secret_key = "{ADMIN[1]}"

[[keys]]
access_key = "{READER[0]}"
secret_key = "{READER[1]}"
buckets = ["data"]
write = false

[[keys]]
access_key = "{LOGS[0]}"
secret_key = "{LOGS[1]}"
buckets = ["logs-*"]
"""


def client(endpoint: str, key: tuple[str, str]):
    return boto3.session.Session(aws_access_key_id=key[0], aws_secret_access_key=key[1],
                                 region_name="us-east-1").client(
        "s3", endpoint_url=endpoint,
        config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}))


def code_of(exc: pytest.ExceptionInfo) -> str:
    return exc.value.response["Error"]["Code"]


@pytest.fixture(params=["local", "seaweedfs"])
def keyed_sprox(request, start_sprox, tmp_path):
    """Sprox with the three keys above, before the local origin or SeaweedFS (which
    checks Sprox's own signatures upstream)."""
    config = tmp_path / "sprox.toml"
    config.write_text(KEYS_TOML)
    if request.param == "local":
        args = ["--origin-dir", str(tmp_path / "origin")]
    else:
        upstream = request.getfixturevalue("seaweed_server")
        args = ["--upstream", upstream.endpoint, "--upstream-region", "us-east-1"]
    proc = start_sprox(tmp_path, "--config", str(config), *args)
    admin = client(proc.endpoint, ADMIN)
    suffix = f"{time.monotonic_ns() % 10**9}"
    buckets = {"data": "data", "secret": f"secret-{suffix}", "logs": f"logs-{suffix}"}
    for name in buckets.values():
        try:
            admin.create_bucket(Bucket=name)
        except ClientError as exc:  # "data" survives from another test on SeaweedFS
            if exc.response["Error"]["Code"] not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise
    return proc, buckets


# -- signed streaming uploads ----------------------------------------------------------


class _StreamingAuth(S3SigV4Auth):
    """botocore's own S3 signer, signing the seed request of a streaming upload."""

    def __init__(self, credentials: Credentials, payload_hash: str) -> None:
        super().__init__(credentials, "s3", "us-east-1")
        self._payload_hash = payload_hash

    def payload(self, request: AWSRequest) -> str:
        return self._payload_hash


def streaming_put(endpoint: str, key: tuple[str, str], bucket: str, name: str, payload: bytes, *,
                  trailers: dict[str, str] | None = None, tamper=None) -> tuple[int, bytes]:
    """PUT `payload` as a signed aws-chunked stream (seed signed by botocore, chunks by
    tests/streaming_signer.py); `tamper(framed) -> framed` changes the body on the wire."""
    mode = "STREAMING-AWS4-HMAC-SHA256-PAYLOAD" + ("-TRAILER" if trailers else "")
    headers = {"Content-Encoding": "aws-chunked", "x-amz-decoded-content-length": str(len(payload))}
    if trailers:
        headers["x-amz-trailer"] = ",".join(trailers)
    # The framed length does not depend on the signatures' values, only on their size.
    dummy = frame_signed(payload, 65536, key=b"k", timestamp="t", scope="s", seed_signature="0" * 64,
                         trailers=trailers)
    headers["Content-Length"] = str(len(dummy))
    request = AWSRequest(method="PUT", url=f"{endpoint}/{bucket}/{name}", headers=headers)
    _StreamingAuth(Credentials(*key), mode).add_auth(request)
    prepared = request.prepare()
    timestamp = prepared.headers["X-Amz-Date"]
    seed = prepared.headers["Authorization"].rsplit("Signature=", 1)[1]
    framed = frame_signed(payload, 65536, key=signing_key(key[1], timestamp[:8], "us-east-1"),
                          timestamp=timestamp, scope=f"{timestamp[:8]}/us-east-1/s3/aws4_request",
                          seed_signature=seed, trailers=trailers)
    assert len(framed) == len(dummy)
    if tamper is not None:
        framed = tamper(framed)
    parts = urlsplit(endpoint)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    try:
        conn.request("PUT", f"/{bucket}/{name}", body=framed, headers=dict(prepared.headers.items()))
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def test_signed_streaming_uploads_are_verified_chunk_by_chunk(keyed_sprox):
    import base64
    import zlib

    proc, buckets = keyed_sprox
    bucket = buckets["logs"]
    admin = client(proc.endpoint, ADMIN)
    payload = object_bytes("streamed", 300_000)  # five chunks and the final one
    crc = base64.b64encode(zlib.crc32(payload).to_bytes(4, "big")).decode()

    status, body = streaming_put(proc.endpoint, ADMIN, bucket, "plain", payload)
    assert status == 200, body
    status, body = streaming_put(proc.endpoint, ADMIN, bucket, "trailer", payload,
                                 trailers={"x-amz-checksum-crc32": crc})
    assert status == 200, body
    for name in ("plain", "trailer"):
        assert admin.get_object(Bucket=bucket, Key=name)["Body"].read() == payload

    def flip_a_byte(framed: bytes) -> bytes:  # in the third chunk's data
        at = 2 * 65536 + 1000
        return framed[:at] + bytes([framed[at] ^ 1]) + framed[at + 1:]

    status, body = streaming_put(proc.endpoint, ADMIN, bucket, "tampered", payload, tamper=flip_a_byte)
    assert status == 403 and b"<Code>SignatureDoesNotMatch</Code>" in body and b"<RequestId>" in body
    # Signed for another key's secret: the seed fails before any chunk.
    status, body = streaming_put(proc.endpoint, (ADMIN[0], "not-the-secret"), bucket, "wrong-key", payload)
    assert status == 403 and b"SignatureDoesNotMatch" in body
    for name in ("tampered", "wrong-key"):  # nothing of a refused upload was stored
        with pytest.raises(ClientError) as caught:
            admin.head_object(Bucket=bucket, Key=name)
        assert caught.value.response["Error"]["Code"] in ("404", "NoSuchKey")


def test_a_body_that_does_not_match_its_declared_hash_is_refused(keyed_sprox):
    proc, buckets = keyed_sprox
    bucket = buckets["logs"]
    admin = client(proc.endpoint, ADMIN)
    data = object_bytes("hashed", 700_000)

    def put(declared_for: bytes) -> tuple[int, bytes]:
        request = AWSRequest(method="PUT", url=f"{proc.endpoint}/{bucket}/hashed", data=data)
        _StreamingAuth(Credentials(*ADMIN), hashlib.sha256(declared_for).hexdigest()).add_auth(request)
        parts = urlsplit(proc.endpoint)
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
        try:
            conn.request("PUT", f"/{bucket}/hashed", body=data, headers=dict(request.prepare().headers.items()))
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()

    status, body = put(b"something else")
    assert status == 400 and b"<Code>XAmzContentSHA256Mismatch</Code>" in body, body
    with pytest.raises(ClientError):
        admin.head_object(Bucket=bucket, Key="hashed")
    assert put(data)[0] == 200
    assert admin.get_object(Bucket=bucket, Key="hashed")["Body"].read() == data


# -- per-key bucket rights ---------------------------------------------------------------


def test_keys_reach_only_their_buckets_even_for_cached_bytes(keyed_sprox):
    proc, buckets = keyed_sprox
    admin, reader, logs = (client(proc.endpoint, k) for k in (ADMIN, READER, LOGS))
    body = object_bytes("shared", 200_000)
    for bucket in buckets.values():
        admin.put_object(Bucket=bucket, Key="obj", Body=body)
        # Cached by the admin: whole object, then a range (both lanes answer hits).
        assert admin.get_object(Bucket=bucket, Key="obj")["Body"].read() == body
        assert admin.get_object(Bucket=bucket, Key="obj", Range="bytes=10-99")["Body"].read() == body[10:100]

    # The reader: bucket "data", reading only.
    assert reader.get_object(Bucket="data", Key="obj")["Body"].read() == body
    assert reader.get_object(Bucket="data", Key="obj", Range="bytes=10-99")["Body"].read() == body[10:100]
    assert reader.head_object(Bucket="data", Key="obj")["ContentLength"] == len(body)
    for call in (lambda: reader.get_object(Bucket=buckets["secret"], Key="obj"),
                 lambda: reader.get_object(Bucket=buckets["secret"], Key="obj", Range="bytes=10-99"),
                 lambda: reader.head_object(Bucket=buckets["secret"], Key="obj"),
                 lambda: reader.get_object(Bucket=buckets["secret"], Key="missing"),
                 lambda: reader.list_objects_v2(Bucket=buckets["secret"]),
                 lambda: reader.put_object(Bucket="data", Key="new", Body=b"x"),
                 lambda: reader.delete_object(Bucket="data", Key="obj"),
                 lambda: reader.list_buckets()):
        with pytest.raises(ClientError) as caught:
            call()
        assert caught.value.response["Error"]["Code"] in ("AccessDenied", "403"), caught.value.response

    # The logs key: its pattern's buckets, read and write; no copying out of others.
    logs.put_object(Bucket=buckets["logs"], Key="mine", Body=b"mine")
    assert logs.get_object(Bucket=buckets["logs"], Key="obj")["Body"].read() == body
    with pytest.raises(ClientError) as caught:
        logs.copy_object(Bucket=buckets["logs"], Key="stolen", CopySource={"Bucket": buckets["secret"], "Key": "obj"})
    assert code_of(caught) == "AccessDenied"
    with pytest.raises(ClientError) as caught:
        logs.get_object(Bucket="data", Key="obj")
    assert code_of(caught) == "AccessDenied"
    assert admin.get_object(Bucket="data", Key="obj")["Body"].read() == body  # nothing was deleted


# -- admin routes off the data port --------------------------------------------------------


@pytest.mark.parametrize("admin_port", ["0", "free"])
def test_admin_routes_can_leave_the_data_port(start_sprox, tmp_path, admin_port):
    from tests.servers import free_port

    cache_dir = tmp_path / "cache"
    proc = start_sprox(tmp_path, "--origin-dir", str(tmp_path / "origin"), "--cache-dir", str(cache_dir),
                       "--admin-port", str(free_port()) if admin_port == "free" else admin_port)
    admin_url = proc.wait_for_line(lambda line: "admin:" in line).split()[1]
    assert admin_url.startswith("http://127.0.0.1:") and admin_url.endswith("/_sprox/")
    with urllib.request.urlopen(admin_url + "health", timeout=10) as response:
        assert response.status == 200
    # On the data port, /_sprox/health is an S3 request like any other.
    parts = urlsplit(proc.endpoint)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    try:
        conn.request("GET", "/_sprox/health")
        response = conn.getresponse()
        body = response.read()
    finally:
        conn.close()
    assert response.status != 200 and b"<Error>" in body and b"<RequestId>" in body
    # `sprox cache stats` finds the running process's counters on the admin port.
    result = subprocess.run([sys.executable, "-m", "sprox", "cache", "stats", "--cache-dir", str(cache_dir)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "running:" in result.stdout, result.stdout + result.stderr
    proc.stop()
    assert proc.returncode == 0, proc.log_text()  # (stop() itself bounds the wait: SIGTERM, then its grace)


# -- SigV2: boto3's default presigned URLs, and `signature_version="s3"` ---------------------


def v2_client(endpoint: str, key: tuple[str, str]):
    """boto3 signing every request with SigV2 in the Authorization header."""
    return boto3.session.Session(aws_access_key_id=key[0], aws_secret_access_key=key[1],
                                 region_name="us-east-1").client(
        "s3", endpoint_url=endpoint,
        config=Config(signature_version="s3", s3={"addressing_style": "path"}, retries={"max_attempts": 1}))


def default_client(endpoint: str, key: tuple[str, str]):
    """boto3 with nothing but the endpoint and keys: its presigned URLs are SigV2."""
    return boto3.session.Session(aws_access_key_id=key[0], aws_secret_access_key=key[1],
                                 region_name="us-east-1").client("s3", endpoint_url=endpoint)


def fetch(url: str, method: str = "GET", headers: dict[str, str] | None = None) -> tuple[int, dict, bytes]:
    """What a browser or curl does with a URL: nothing but the URL (and `headers`)."""
    request = urllib.request.Request(url, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, {k.lower(): v for k, v in response.headers.items()}, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, {k.lower(): v for k, v in exc.headers.items()}, exc.read()


def signed_admin(endpoint: str, method: str, path: str, key: tuple[str, str]) -> tuple[int, bytes]:
    """An admin route, signed by `key` with SigV4 in the header (botocore's signer)."""
    request = AWSRequest(method=method, url=endpoint + path)
    S3SigV4Auth(Credentials(*key), "s3", "us-east-1").add_auth(request)
    status, _, body = fetch(endpoint + path, method, dict(request.headers.items()))
    return status, body


def fast_lane_hits(endpoint: str) -> int:
    status, body = signed_admin(endpoint, "GET", "/_sprox/cache/stats", ADMIN)
    assert status == 200, body
    return json.loads(body)["fast_lane_hits"]


def test_boto3_default_presigned_url_works_and_stays_a_fast_lane_hit(keyed_sprox):
    proc, buckets = keyed_sprox
    body = object_bytes("presigned-v2", 300_000)
    client(proc.endpoint, ADMIN).put_object(Bucket=buckets["logs"], Key="shared/report.bin", Body=body)
    url = default_client(proc.endpoint, LOGS).generate_presigned_url(
        "get_object", Params={"Bucket": buckets["logs"], "Key": "shared/report.bin"}, ExpiresIn=600)
    assert "AWSAccessKeyId=" in url and "X-Amz-" not in url  # SigV2, as boto3 makes it by default
    status, headers, got = fetch(url)
    assert status == 200 and got == body
    # The first read's fill finishes writing after its answer: until then hits take the
    # general path. Wait (bounded) until the fast lane answers one.
    deadline = time.monotonic() + 15
    while True:
        before = fast_lane_hits(proc.endpoint)
        assert fetch(url)[2] == body
        if fast_lane_hits(proc.endpoint) == before + 1:
            break
        assert time.monotonic() < deadline, "the presigned GET never became a fast-lane hit"
    before = fast_lane_hits(proc.endpoint)
    status, headers, got = fetch(url)
    assert (status, headers["x-cache"]) == (200, "HIT") and got == body
    status, headers, got = fetch(url, headers={"Range": "bytes=1000-1999"})  # Range is not signed in V2
    assert status == 206 and got == body[1000:2000]
    assert fast_lane_hits(proc.endpoint) == before + 2

    # S3's answers: expired 403 AccessDenied "Request has expired"; tampered 403
    # SignatureDoesNotMatch; and a key's bucket rights, exactly as for SigV4.
    expired = default_client(proc.endpoint, LOGS).generate_presigned_url(
        "get_object", Params={"Bucket": buckets["logs"], "Key": "shared/report.bin"}, ExpiresIn=-60)
    status, _, error = fetch(expired)
    assert status == 403 and b"<Code>AccessDenied</Code>" in error and b"Request has expired" in error
    assert b"<RequestId>" in error
    tampered = url.replace("shared/report.bin", "shared/other.bin")
    status, _, error = fetch(tampered)
    assert status == 403 and b"<Code>SignatureDoesNotMatch</Code>" in error
    elsewhere = default_client(proc.endpoint, LOGS).generate_presigned_url(
        "get_object", Params={"Bucket": buckets["secret"], "Key": "shared/report.bin"}, ExpiresIn=600)
    status, _, error = fetch(elsewhere)
    assert status == 403 and b"<Code>AccessDenied</Code>" in error


def test_a_presigned_put_keeps_the_headers_it_was_signed_with(keyed_sprox):
    """boto3's SigV2 presigned URL carries x-amz-* headers (metadata here) as query
    parameters: they reach the origin as the headers they are."""
    proc, buckets = keyed_sprox
    url = default_client(proc.endpoint, LOGS).generate_presigned_url(
        "put_object", Params={"Bucket": buckets["logs"], "Key": "uploaded", "Metadata": {"colour": "blue"}},
        ExpiresIn=600)
    assert "x-amz-meta-colour=blue" in url
    status, _, body = _put(url, b"presigned body")
    assert status == 200, body
    got = client(proc.endpoint, ADMIN).get_object(Bucket=buckets["logs"], Key="uploaded")
    assert got["Body"].read() == b"presigned body" and got["Metadata"] == {"colour": "blue"}
    status, _, body = _put(url.replace("colour=blue", "colour=red"), b"x")
    assert status == 403 and b"<Code>SignatureDoesNotMatch</Code>" in body


def _put(url: str, data: bytes) -> tuple[int, dict, bytes]:
    """PUT like curl -T: the URL and the bytes (no Content-Type, which V2 would sign)."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    try:
        conn.request("PUT", f"{parts.path}?{parts.query}", body=data)
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


def test_sigv2_signed_clients_read_write_and_list_within_their_rights(keyed_sprox):
    proc, buckets = keyed_sprox
    bucket = buckets["logs"]
    writer, reader = v2_client(proc.endpoint, LOGS), v2_client(proc.endpoint, READER)
    body = object_bytes("sigv2-header", 100_000)
    writer.put_object(Bucket=bucket, Key="a b+c.bin", Body=body, ContentType="application/x-test",
                      Metadata={"colour": "blue"})
    got = writer.get_object(Bucket=bucket, Key="a b+c.bin")
    assert got["Body"].read() == body and got["Metadata"] == {"colour": "blue"}
    assert writer.get_object(Bucket=bucket, Key="a b+c.bin", Range="bytes=5-9")["Body"].read() == body[5:10]
    assert [o["Key"] for o in writer.list_objects(Bucket=bucket, Prefix="a ")["Contents"]] == ["a b+c.bin"]
    client(proc.endpoint, ADMIN).put_object(Bucket="data", Key="v2-read", Body=b"readable")
    assert reader.get_object(Bucket="data", Key="v2-read")["Body"].read() == b"readable"
    for call in (lambda: reader.put_object(Bucket="data", Key="v2-write", Body=b"x"),
                 lambda: reader.get_object(Bucket=bucket, Key="a b+c.bin")):
        with pytest.raises(ClientError) as caught:
            call()
        assert code_of(caught) == "AccessDenied"
    wrong = v2_client(proc.endpoint, (LOGS[0], "not-the-secret"))
    with pytest.raises(ClientError) as caught:
        wrong.get_object(Bucket=bucket, Key="a b+c.bin")
    assert code_of(caught) == "SignatureDoesNotMatch"
    writer.delete_object(Bucket=bucket, Key="a b+c.bin")


# -- admin routes on the data port, with keys ---------------------------------------------------

ADMIN_ROUTES = [("GET", "/_sprox/health"), ("GET", "/_sprox/cache/stats"), ("GET", "/_sprox/metrics"),
                ("POST", "/_sprox/cache/purge")]


def test_admin_routes_on_the_data_port_answer_only_signed_requests(start_sprox, tmp_path):
    config = tmp_path / "sprox.toml"
    config.write_text(KEYS_TOML)
    cache_dir = tmp_path / "cache"
    proc = start_sprox(tmp_path, "--config", str(config), "--origin-dir", str(tmp_path / "origin"),
                       "--cache-dir", str(cache_dir))
    for method, path in ADMIN_ROUTES:
        status, _, body = fetch(proc.endpoint + path, method)  # anonymous
        assert status == 403 and b"<Code>AccessDenied</Code>" in body and b"<RequestId>" in body, (path, body)
        assert b"hits" not in body and b"sprox_" not in body
        status, body = signed_admin(proc.endpoint, method, path, ADMIN)
        assert status == 200, (path, body)
        for limited in (READER, LOGS):  # keys limited to some buckets: no cache-wide figures
            status, body = signed_admin(proc.endpoint, method, path, limited)
            assert status == 403 and b"<Code>AccessDenied</Code>" in body, (path, body)
        status, body = signed_admin(proc.endpoint, method, path, (ADMIN[0], "not-the-secret"))
        assert status == 403 and b"<Code>SignatureDoesNotMatch</Code>" in body
    # A SigV2 presigned URL of the admin key is a signature too.
    url = default_client(proc.endpoint, ADMIN).generate_presigned_url(
        "get_object", Params={"Bucket": "_sprox", "Key": "metrics"}, ExpiresIn=60)
    status, _, body = fetch(url)
    assert status == 200 and b"sprox_requests_total" in body

    # `sprox cache stats|purge` sign with a key of the same configuration; without one
    # the purge is refused, and says how to give it one.
    run = [sys.executable, "-m", "sprox", "cache"]
    result = subprocess.run([*run, "stats", "--cache-dir", str(cache_dir), "--config", str(config)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "running:" in result.stdout, result.stdout + result.stderr
    result = subprocess.run([*run, "purge", "--cache-dir", str(cache_dir), "--config", str(config)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "purged 0 objects" in result.stdout, result.stdout + result.stderr
    result = subprocess.run([*run, "purge", "--cache-dir", str(cache_dir)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 1 and "HTTP 403" in result.stderr and "--admin-port" in result.stderr


def test_with_keys_the_admin_port_still_serves_unsigned_requests(start_sprox, tmp_path):
    config = tmp_path / "sprox.toml"
    config.write_text(KEYS_TOML)
    proc = start_sprox(tmp_path, "--config", str(config), "--origin-dir", str(tmp_path / "origin"),
                       "--admin-port", "0")
    admin_url = proc.wait_for_line(lambda line: "admin:" in line).split()[1]
    assert admin_url.startswith("http://127.0.0.1:")
    for path in ("health", "metrics", "cache/stats"):
        status, _, body = fetch(admin_url + path)
        assert status == 200, body  # Prometheus scrapes unsigned, on loopback
    status, _, body = fetch(proc.endpoint + "/_sprox/metrics")  # on the data port: an S3 request
    assert status in (400, 403) and b"<Error>" in body and b"sprox_" not in body
