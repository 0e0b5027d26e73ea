"""`--peers`: a write through one node makes its peers forget the key before the write
is answered; probes; what the invalidation route refuses. Real Sprox processes; two
nodes share one origin directory (a shared bucket, as S3 is to a tier)."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
import xml.etree.ElementTree as ET

import boto3
import pytest
from botocore.config import Config

from sprox.peers import INVALIDATE_PATH
from sprox.warm import RequestSigner
from tests.conftest import TEST_ACCESS_KEY, TEST_SECRET_KEY
from tests.servers import HOST, free_ports

KEYS = ("--access-key", TEST_ACCESS_KEY, "--secret-key", TEST_SECRET_KEY)


def client(endpoint: str):
    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id=TEST_ACCESS_KEY,
                        aws_secret_access_key=TEST_SECRET_KEY,
                        config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}))


def metric(endpoint: str, sample: str) -> float:
    url = f"{endpoint}/_sprox/metrics"
    signed = RequestSigner(key=(TEST_ACCESS_KEY, TEST_SECRET_KEY)).headers("GET", url)
    with urllib.request.urlopen(urllib.request.Request(url, headers=signed), timeout=10) as response:
        for line in response.read().decode().splitlines():
            if line.startswith(sample + " "):
                return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no sample {sample}")


def post(url: str, body: bytes, headers: dict[str, str]) -> tuple[int, bytes]:
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.read()


def test_a_write_through_one_node_is_seen_at_once_through_the_other(start_sprox, tmp_path):
    origin = tmp_path / "origin"
    port_a, port_b = free_ports(2)
    peers = f"localhost:{port_a},{HOST}:{port_b}"  # a name, resolved (to 127.0.0.1: IPv4 first)
    a = start_sprox(tmp_path, "--port", str(port_a), "--origin-dir", str(origin), "--cache-dir",
                    str(tmp_path / "cache-a"), "--ttl", "3600", "--list-ttl", "3600", "--peers", peers, *KEYS)
    b = start_sprox(tmp_path, "--port", str(port_b), "--origin-dir", str(origin), "--cache-dir",
                    str(tmp_path / "cache-b"), "--ttl", "3600", "--list-ttl", "3600", "--peers", peers, *KEYS)
    s3a, s3b = client(a.endpoint), client(b.endpoint)
    s3a.create_bucket(Bucket="shared")
    s3a.put_object(Bucket="shared", Key="k", Body=b"one")
    s3a.put_object(Bucket="shared", Key="gone", Body=b"soon deleted")
    for _ in range(2):  # b caches both objects and the listing (trusted for an hour)
        assert s3b.get_object(Bucket="shared", Key="k")["Body"].read() == b"one"
        assert s3b.get_object(Bucket="shared", Key="gone")["Body"].read() == b"soon deleted"
        assert [o["Key"] for o in s3b.list_objects_v2(Bucket="shared")["Contents"]] == ["gone", "k"]

    s3a.put_object(Bucket="shared", Key="k", Body=b"two")
    s3a.put_object(Bucket="shared", Key="new", Body=b"new")
    s3a.delete_objects(Bucket="shared", Delete={"Objects": [{"Key": "gone"}]})
    assert s3b.get_object(Bucket="shared", Key="k")["Body"].read() == b"two"
    with pytest.raises(s3b.exceptions.NoSuchKey):
        s3b.get_object(Bucket="shared", Key="gone")
    assert [o["Key"] for o in s3b.list_objects_v2(Bucket="shared")["Contents"]] == ["k", "new"]
    # Every object write told b (five); a skipped itself (its own address is in --peers).
    assert metric(b.endpoint, "sprox_peer_invalidations_received_total") == 5
    assert metric(a.endpoint, "sprox_peer_invalidations_received_total") == 0
    assert metric(a.endpoint, 'sprox_peer_invalidations_total{result="failed"}') == 0
    # A refused write changed nothing, so no one is told.
    with pytest.raises(s3a.exceptions.NoSuchBucket):
        s3a.put_object(Bucket="nobucket", Key="k", Body=b"x")
    assert metric(b.endpoint, "sprox_peer_invalidations_received_total") == 5


def test_an_unreachable_peer_is_counted_retried_and_does_not_fail_the_write(start_sprox, tmp_path):
    origin = tmp_path / "origin"
    port_a, port_b = free_ports(2)
    args = ("--origin-dir", str(origin), "--peers", f"{HOST}:{port_b}", *KEYS)
    a = start_sprox(tmp_path, "--port", str(port_a), "--cache-dir", str(tmp_path / "cache-a"), *args)
    s3a = client(a.endpoint)
    s3a.create_bucket(Bucket="bkt")  # (no peer told: not an object write)
    s3a.put_object(Bucket="bkt", Key="k", Body=b"x")  # b is down: answered all the same
    assert s3a.get_object(Bucket="bkt", Key="k")["Body"].read() == b"x"
    assert metric(a.endpoint, 'sprox_peer_invalidations_total{result="failed"}') >= 1
    assert metric(a.endpoint, "sprox_peer_invalidations_retrying") == 1
    assert "did not take an invalidation" in a.log_text()
    # The peer comes up: the retry reaches it.
    b = start_sprox(tmp_path, "--port", str(port_b), "--cache-dir", str(tmp_path / "cache-b"),
                    "--origin-dir", str(origin), *KEYS)
    deadline = time.monotonic() + 60
    while metric(b.endpoint, "sprox_peer_invalidations_received_total") < 1:
        assert time.monotonic() < deadline, "the retry never reached the peer"
        time.sleep(0.1)  # (retries back off 1, 2, 4 s ...)
    assert metric(a.endpoint, 'sprox_peer_invalidations_total{result="ok"}') == 1
    assert metric(a.endpoint, "sprox_peer_invalidations_retrying") == 0


def _error_code(body: bytes) -> str:
    root = ET.fromstring(body)
    assert root.findtext("RequestId")
    return root.findtext("Code") or ""


def test_the_invalidation_route_refuses_what_a_peer_would_not_send(start_sprox, tmp_path):
    cfg = tmp_path / "sprox.toml"
    cfg.write_text(f'access_key = "{TEST_ACCESS_KEY}"\nsecret_key = "{TEST_SECRET_KEY}"\n'
                   '[[keys]]\naccess_key = "reader"\nsecret_key = "rs"\nbuckets = ["b"]\nwrite = false\n')
    proc = start_sprox(tmp_path, "--origin-dir", str(tmp_path / "origin"), "--config", str(cfg))
    url = proc.endpoint + INVALIDATE_PATH
    body = json.dumps({"bucket": "b", "keys": ["k"], "node": "n"}).encode()
    signer = RequestSigner(key=(TEST_ACCESS_KEY, TEST_SECRET_KEY))

    status, answer = post(url, body, {})
    assert (status, _error_code(answer)) == (403, "AccessDenied")
    status, answer = post(url, body, RequestSigner(key=("reader", "rs")).headers("POST", url, body))
    assert (status, _error_code(answer)) == (403, "AccessDenied")
    other = json.dumps({"bucket": "b", "keys": None, "node": "n"}).encode()
    status, answer = post(url, other, signer.headers("POST", url, body))  # signed for another body
    assert (status, _error_code(answer)) == (400, "XAmzContentSHA256Mismatch")
    for bad in (b"not json", b"[]", b'{"bucket": ""}', b'{"bucket": "b", "keys": "k"}'):
        status, answer = post(url, bad, signer.headers("POST", url, bad))
        assert (status, _error_code(answer)) == (400, "MalformedPOSTRequest"), bad
    status, answer = post(url, body, signer.headers("POST", url, body))
    assert (status, json.loads(answer)) == (200, {"invalidated": 1})
    # What nodes of the version before took (an older node's call, in a rolling
    # upgrade): up to 1 MiB, while calls are sent in bodies of at most 512 KiB.
    large = json.dumps({"bucket": "b", "keys": [f"{i:04d}" + "k" * 1000 for i in range(1000)],
                        "node": "n"}).encode()
    assert 1000 * 1000 < len(large) <= 1024 * 1024
    status, answer = post(url, large, signer.headers("POST", url, large))
    assert (status, json.loads(answer)) == (200, {"invalidated": 1000})
    # (escaped as \u00e9 by json.dumps: 6 bytes each)
    too_large = json.dumps({"bucket": "b", "keys": ["\u00e9" * 200] * 1000, "node": "n"}).encode()
    assert len(too_large) > 1024 * 1024
    status, answer = post(url, too_large, signer.headers("POST", url, too_large))
    assert (status, _error_code(answer)) == (400, "EntityTooLarge")


def test_liveness_and_readiness_answer_unsigned_probes(start_sprox, tmp_path):
    proc = start_sprox(tmp_path, "--origin-dir", str(tmp_path / "origin"), *KEYS)
    for path, status in (("live", "alive"), ("ready", "ready")):
        with urllib.request.urlopen(f"{proc.endpoint}/_sprox/{path}", timeout=10) as response:
            assert (response.status, json.loads(response.read())) == (200, {"status": status})
    with pytest.raises(urllib.error.HTTPError) as info:  # everything else on the data port is signed
        urllib.request.urlopen(f"{proc.endpoint}/_sprox/health", timeout=10)
    info.value.close()
    assert info.value.code == 403


@pytest.mark.parametrize("ttl", ["3600", "inf"])
def test_a_node_of_a_tier_revalidates_what_it_cached_before_it_restarted(start_sprox, tmp_path, ttl):
    """A node that was down missed its peers' invalidations: after a restart its records
    are checked with the origin once before they are served again (not trusted for the
    rest of their --ttl, even an infinite one)."""
    origin = tmp_path / "origin"
    port, gone_peer = free_ports(2)
    node_args = ("--port", str(port), "--origin-dir", str(origin), "--cache-dir", str(tmp_path / "cache"),
                 "--ttl", ttl, "--peers", f"{HOST}:{gone_peer}", *KEYS)
    node = start_sprox(tmp_path, *node_args)
    s3 = client(node.endpoint)
    s3.create_bucket(Bucket="bkt")
    s3.put_object(Bucket="bkt", Key="k", Body=b"old")
    for _ in range(2):
        assert s3.get_object(Bucket="bkt", Key="k")["Body"].read() == b"old"
    node.stop()
    # Meanwhile another node of the tier took a write (and could not tell this one).
    other = start_sprox(tmp_path, "--origin-dir", str(origin), "--cache-dir", str(tmp_path / "cache-other"), *KEYS)
    client(other.endpoint).put_object(Bucket="bkt", Key="k", Body=b"new")
    other.stop()
    node = start_sprox(tmp_path, *node_args)
    answer = client(node.endpoint).get_object(Bucket="bkt", Key="k")
    assert answer["Body"].read() == b"new"
