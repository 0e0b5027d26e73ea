"""Cache hits answered by the hit kernel (sprox/_native/kernel.pyx) in a real Sprox,
with boto3 as the client: the kernel answers repeated hits, and what it mirrors never
outlives what the cache knows: a write through Sprox, a key without rights to the
bucket, evicted blocks. Each test also runs with SPROX_NO_EXTENSIONS=1, where the
Python lane answers the same requests with the same bytes (the kernel counts 0)."""

from __future__ import annotations

import os
import time
import urllib.error
import urllib.request

import boto3
import pytest
from botocore import UNSIGNED
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.config import Config
from botocore.credentials import Credentials
from botocore.exceptions import ClientError

from tests.data import object_bytes
from tests.functional.test_auth import ADMIN, KEYS_TOML, READER  # READER: bucket "data" only, read only

NO_EXTENSIONS = os.environ.get("SPROX_NO_EXTENSIONS") == "1"  # (read at import: tests hide SPROX_*)
DATA = object_bytes("kernel/data", 2 * 1024 * 1024 + 123)  # three 1 MiB blocks


def client(endpoint: str, key: tuple[str, str]):
    return boto3.session.Session(aws_access_key_id=key[0], aws_secret_access_key=key[1],
                                 region_name="us-east-1").client(
        "s3", endpoint_url=endpoint, config=Config(retries={"max_attempts": 1}))


def metric(endpoint: str, name: str) -> float:
    url = f"{endpoint}/_sprox/metrics"
    signed = AWSRequest(method="GET", url=url)
    S3SigV4Auth(Credentials(*ADMIN), "s3", "us-east-1").add_auth(signed)
    request = urllib.request.Request(url, headers=dict(signed.headers.items()))
    with urllib.request.urlopen(request, timeout=20) as response:
        for line in response.read().decode().splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no metric {name}")


@pytest.fixture(params=["compiled", "twin"])
def sprox(request, start_sprox, tmp_path):
    if request.param == "compiled" and NO_EXTENSIONS:
        pytest.skip("extensions not built")
    config = tmp_path / "sprox.toml"
    config.write_text(KEYS_TOML)
    origin = tmp_path / "origin"
    for bucket in ("data", "private"):
        (origin / bucket).mkdir(parents=True)
        (origin / bucket / "obj").write_bytes(DATA)
    env = {"SPROX_NO_EXTENSIONS": "1"} if request.param == "twin" else None
    proc = start_sprox(tmp_path, "--config", str(config), "--origin-dir", str(origin), "--cache-dir",
                       str(tmp_path / "cache"), "--block-size", "1MiB", *getattr(request, "extra", ()), env=env)
    proc.kernel = request.param == "compiled"
    return proc


def read_until_hit(s3, bucket: str, key: str, **kwargs) -> dict:
    """GET until the answer is a hit (fills finish after the first answer)."""
    deadline = time.monotonic() + 20
    while True:
        response = s3.get_object(Bucket=bucket, Key=key, **kwargs)
        body = response["Body"].read()
        if response["ResponseMetadata"]["HTTPHeaders"].get("x-cache") == "HIT":
            response["body"] = body
            return response
        assert time.monotonic() < deadline, "never a hit"


def mirrored(sprox, s3, bucket: str, key: str) -> None:
    """Read until the object is a hit, and (compiled) until the kernel answers it: a hit
    while its fill settles takes the general path, and it is the fast lane's first hit
    of an object that mirrors it for the kernel. Bounded: 20 reads."""
    read_until_hit(s3, bucket, key)
    if not sprox.kernel:
        return
    before = metric(sprox.endpoint, "sprox_kernel_hits_total")
    for _ in range(20):
        read_until_hit(s3, bucket, key)
        if metric(sprox.endpoint, "sprox_kernel_hits_total") > before:
            return
    raise AssertionError("the kernel never answered")


def test_repeated_hits_are_answered_by_the_kernel(sprox) -> None:
    s3 = client(sprox.endpoint, ADMIN)
    mirrored(sprox, s3, "data", "obj")
    before = metric(sprox.endpoint, "sprox_kernel_hits_total")
    hits_before = metric(sprox.endpoint, 'sprox_object_reads_total{outcome="HIT"}')
    for first, last in ((0, 99), (1_048_000, 1_049_000), (2 * 1024 * 1024, len(DATA) - 1)):
        response = s3.get_object(Bucket="data", Key="obj", Range=f"bytes={first}-{last}")
        assert response["Body"].read() == DATA[first:last + 1]
        assert response["ContentRange"] == f"bytes {first}-{last}/{len(DATA)}"
    assert s3.get_object(Bucket="data", Key="obj")["Body"].read() == DATA
    assert s3.head_object(Bucket="data", Key="obj")["ContentLength"] == len(DATA)
    kernel_hits = metric(sprox.endpoint, "sprox_kernel_hits_total") - before
    assert kernel_hits == (5 if sprox.kernel else 0)
    # Every hit is counted and logged, whichever lane answered it.
    assert metric(sprox.endpoint, 'sprox_object_reads_total{outcome="HIT"}') - hits_before == 5


def test_a_write_through_sprox_is_seen_at_once(sprox) -> None:
    s3 = client(sprox.endpoint, ADMIN)
    mirrored(sprox, s3, "data", "obj")
    new = object_bytes("kernel/new", 5000)
    s3.put_object(Bucket="data", Key="obj", Body=new)
    assert s3.get_object(Bucket="data", Key="obj")["Body"].read() == new
    assert read_until_hit(s3, "data", "obj")["body"] == new
    s3.delete_object(Bucket="data", Key="obj")
    with pytest.raises(ClientError) as exc:
        s3.get_object(Bucket="data", Key="obj")
    assert exc.value.response["Error"]["Code"] == "NoSuchKey"


def test_a_key_reads_only_the_buckets_it_may(sprox) -> None:
    admin, reader = client(sprox.endpoint, ADMIN), client(sprox.endpoint, READER)
    mirrored(sprox, admin, "private", "obj")  # for the admin key
    for _ in range(2):
        with pytest.raises(ClientError) as exc:
            reader.get_object(Bucket="private", Key="obj", Range="bytes=0-9")
        assert exc.value.response["Error"]["Code"] == "AccessDenied"
    read_until_hit(reader, "data", "obj")
    assert read_until_hit(reader, "data", "obj", Range="bytes=5-9")["body"] == DATA[5:10]


def test_evicted_blocks_are_fetched_again(start_sprox, tmp_path) -> None:
    """A cache that holds two of an object's four blocks: every read must still get the
    right bytes, whichever blocks the kernel finds present."""
    if NO_EXTENSIONS:
        pytest.skip("the kernel is not built")
    data = object_bytes("kernel/evicted", 4 * 1024 * 1024)
    origin = tmp_path / "origin"
    (origin / "data").mkdir(parents=True)
    (origin / "data" / "obj").write_bytes(data)
    proc = start_sprox(tmp_path, "--origin-dir", str(origin), "--auth", "none", "--cache-dir",
                       str(tmp_path / "cache"), "--block-size", "1MiB", "--cache-size", "2MiB")
    s3 = boto3.client("s3", endpoint_url=proc.endpoint, region_name="us-east-1",
                      config=Config(signature_version=UNSIGNED))
    # Block 0 mirrored and answered by the kernel (a hit while its fill settles takes
    # the general path; the fast lane's first hit of an object mirrors it) ...
    for _ in range(10):
        assert s3.get_object(Bucket="data", Key="obj", Range="bytes=0-10")["Body"].read() == data[:11]
        if metric_unsigned(proc.endpoint, "sprox_kernel_hits_total") >= 1:
            break
    assert metric_unsigned(proc.endpoint, "sprox_kernel_hits_total") >= 1
    # ... then the other blocks push it out, and come and go: every answer must be right.
    mib = 1024 * 1024
    spans = [(mib, mib + 24), (2 * mib, 2 * mib + 99), (3 * mib, 4 * mib - 1), (0, 10), (10, mib + 4)]
    for round_ in range(3):
        for first, last in spans:
            got = s3.get_object(Bucket="data", Key="obj", Range=f"bytes={first}-{last}")["Body"].read()
            assert got == data[first:last + 1], (round_, first, last)
    assert metric_unsigned(proc.endpoint, "sprox_cache_evicted_blocks_total") > 0


def metric_unsigned(endpoint: str, name: str) -> float:
    with urllib.request.urlopen(f"{endpoint}/_sprox/metrics", timeout=20) as response:
        for line in response.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no metric {name}")


@pytest.mark.parametrize("signature", ["default", "s3v4"])
def test_presigned_urls_are_answered_by_the_kernel(sprox, signature) -> None:
    """boto3 presigns with SigV2 by default, with SigV4 when asked."""
    s3 = client(sprox.endpoint, ADMIN)
    mirrored(sprox, s3, "data", "obj")
    signer = s3 if signature == "default" else boto3.session.Session(
        aws_access_key_id=ADMIN[0], aws_secret_access_key=ADMIN[1], region_name="us-east-1").client(
        "s3", endpoint_url=sprox.endpoint, config=Config(signature_version="s3v4"))
    url = signer.generate_presigned_url("get_object", Params={"Bucket": "data", "Key": "obj"}, ExpiresIn=600)
    assert ("X-Amz-Signature=" in url) == (signature == "s3v4")
    before = metric(sprox.endpoint, "sprox_kernel_hits_total")
    for first, last in ((0, 99), (1000, 5000)):
        request = urllib.request.Request(url, headers={"Range": f"bytes={first}-{last}"})
        with urllib.request.urlopen(request, timeout=20) as response:
            assert response.status == 206 and response.read() == DATA[first:last + 1]
            assert response.headers["X-Cache"] == "HIT"
    assert metric(sprox.endpoint, "sprox_kernel_hits_total") - before == (2 if sprox.kernel else 0)
    # A tampered URL is refused, by whichever lane.
    with pytest.raises(urllib.error.HTTPError) as exc:
        urllib.request.urlopen(url.replace("Expires=", "Expires=1"), timeout=20)
    exc.value.close()
    assert exc.value.code == 403
