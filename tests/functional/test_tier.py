"""Three Sprox nodes behind nginx's consistent hashing (deploy/nginx/sprox-tier.conf),
SigV4 on, moto as the upstream (behind a recording proxy that counts what reaches it).

What a tier must do: real clients work through it; each object is fetched upstream once
however often it is read through the tier; a write through the tier is seen at once by
reads and by listings (with --list-ttl on, the listing of a bucket is cached on the node
its name hashes to, which is not the node a write of a key reaches: --peers tells it);
SIGKILL of one node during reads loses no read and returns no wrong byte, and the node,
started again, rejoins.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import os
import time
import urllib.request
from pathlib import Path

import boto3
import pytest

from tests.conftest import sprox_env
from tests.servers import TEST_ACCESS_KEY, TEST_REGION, TEST_SECRET_KEY
from tests.tier import Tier, nginx_binary

pytestmark = pytest.mark.slow

BUCKET = "tier"
OBJECTS = {f"data/part-{i:02d}.bin": os.urandom(300_000 + 4099 * i) for i in range(9)}


@pytest.fixture(scope="module")
def tier(tmp_path_factory: pytest.TempPathFactory, moto_server, aws_files) -> Tier:
    if nginx_binary() is None:
        if os.environ.get("CI"):
            pytest.fail("nginx not found: CI installs it")
        pytest.skip("nginx not installed")
    direct = boto3.client("s3", endpoint_url=moto_server.endpoint, region_name=TEST_REGION,
                          aws_access_key_id=TEST_ACCESS_KEY, aws_secret_access_key=TEST_SECRET_KEY)
    try:
        direct.create_bucket(Bucket=BUCKET)
    except direct.exceptions.BucketAlreadyOwnedByYou:
        pass
    for key, data in OBJECTS.items():
        direct.put_object(Bucket=BUCKET, Key=key, Body=data)
    tier = Tier(tmp_path_factory.mktemp("tier"), moto_server.endpoint,
                lambda log_dir: sprox_env(log_dir, aws_files)).start()
    yield tier
    tier.stop()


def read(s3, key: str, attempts: int = 3) -> bytes:
    """GetObject and the whole body, tried again on a connection error as an
    application would (a node killed mid-answer cuts the body short)."""
    for attempt in range(attempts):
        try:
            return s3.get_object(Bucket=BUCKET, Key=key)["Body"].read()
        except Exception:
            if attempt == attempts - 1:
                raise
    raise AssertionError("unreachable")


def test_each_object_is_fetched_upstream_once_through_the_tier(tier: Tier) -> None:
    s3 = tier.client()
    before = {key: tier.proxy.count("GET", key) for key in OBJECTS}
    for _ in range(3):
        for key, data in OBJECTS.items():
            assert read(s3, key) == data
            part = s3.get_object(Bucket=BUCKET, Key=key, Range="bytes=1000-70999")["Body"].read()
            assert part == data[1000:71000]
    fetched = {key: tier.proxy.count("GET", key) - before[key] for key in OBJECTS}
    assert fetched == {key: 1 for key in OBJECTS}
    # The objects are spread over the nodes (hashing), not all on one.
    reads = [tier.metric(i, "sprox_object_reads_total") for i in range(3)]
    assert sum(1 for n in reads if n > 0) >= 2, reads


def test_a_write_through_the_tier_is_seen_at_once_by_listings_and_reads(tier: Tier) -> None:
    s3 = tier.client()
    listed = {o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix="data/")["Contents"]}
    assert set(OBJECTS) <= listed  # the listing is now cached (--list-ttl 300) on one node
    received_before = sum(tier.metric(i, "sprox_peer_invalidations_received_total") for i in range(3))
    for i in range(8):  # keys hashed to every node: most land away from the listing's node
        key = f"data/new-{i}.bin"
        s3.put_object(Bucket=BUCKET, Key=key, Body=b"new %d" % i)
        listed = {o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix="data/")["Contents"]}
        assert key in listed, f"write {i} missing from the tier's listing"
    # Rewrite cached objects and delete others with one DeleteObjects (it lands on the
    # bucket's node, not on the nodes that cache the keys): reads see it at once.
    keys = sorted(OBJECTS)
    for key in keys[:3]:
        assert read(s3, key) == OBJECTS[key]  # cached
        s3.put_object(Bucket=BUCKET, Key=key, Body=b"rewritten " + key.encode())
        assert read(s3, key) == b"rewritten " + key.encode()
    for key in keys[3:5]:
        assert read(s3, key) == OBJECTS[key]  # cached
    s3.delete_objects(Bucket=BUCKET, Delete={"Objects": [{"Key": k} for k in keys[3:5]]})
    for key in keys[3:5]:
        with pytest.raises(s3.exceptions.NoSuchKey):
            s3.get_object(Bucket=BUCKET, Key=key)
    listed = {o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix="data/")["Contents"]}
    assert not listed & set(keys[3:5])
    received = sum(tier.metric(i, "sprox_peer_invalidations_received_total") for i in range(3))
    assert received - received_before >= 2 * 8  # every write told both other nodes
    assert sum(tier.metric(i, 'sprox_peer_invalidations_total{result="failed"}') for i in range(3)) == 0


def test_sigkill_of_a_node_during_reads_loses_no_read_and_the_node_rejoins(tier: Tier) -> None:
    s3 = tier.client(retries={"max_attempts": 5, "mode": "standard"})
    keys = sorted(OBJECTS)[5:]
    expected = {key: OBJECTS[key] for key in keys}
    for key in keys:  # warm: the reads below are served by whichever node holds each
        assert read(s3, key) == expected[key]
    # The node to kill: one that serves some of these keys.
    reads_before = [tier.metric(i, "sprox_object_reads_total") for i in range(3)]
    for key in keys:
        read(s3, key)
    victim = max(range(3), key=lambda i: tier.metric(i, "sprox_object_reads_total") - reads_before[i])
    node = tier.nodes[victim]
    assert node is not None

    done = []  # reads finished, across the readers (list.append is atomic)

    def reader(n: int) -> int:
        bad = 0
        for round_ in range(n):
            key = keys[round_ % len(keys)]
            if hashlib.sha256(read(s3, key)).digest() != hashlib.sha256(expected[key]).digest():
                bad += 1
            done.append(key)
        return bad

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(reader, 40) for _ in range(4)]
        deadline = time.monotonic() + 30  # kill once reads are under way
        while len(done) < 8 and time.monotonic() < deadline and not any(f.done() for f in futures):
            time.sleep(0.002)
        os.kill(node.pid, 9)
        wrong = [f.result(timeout=120) for f in futures]
    assert wrong == [0, 0, 0, 0]
    node.stop()
    # Started again on its port and cache, it rejoins: ready, and nginx sends it its share again.
    rejoined = tier.start_node(victim)
    with urllib.request.urlopen(f"{rejoined.endpoint}/_sprox/ready", timeout=10) as response:
        assert response.status == 200
    deadline = time.monotonic() + 60
    while tier.metric(victim, "sprox_object_reads_total") == 0:
        assert time.monotonic() < deadline, "nginx never sent the restarted node a read"
        for key in keys:
            assert read(s3, key) == expected[key]
        time.sleep(0.2)  # nginx tries a failed node again after fail_timeout (5 s)


def test_report_over_the_nodes_logs_gives_the_tier_and_each_node(tier: Tier) -> None:
    """`sprox report --logs` over the three nodes' log directories, while they run (and
    after one was killed and restarted): the tier's figures and a row per node."""
    import json
    import subprocess
    import sys

    s3 = tier.client()
    ids = set()
    seen = {}
    for key in sorted(OBJECTS)[5:]:
        for _ in range(3):
            headers = s3.get_object(Bucket=BUCKET, Key=key)["ResponseMetadata"]["HTTPHeaders"]
            ids.add(headers["x-amz-request-id"])  # Sprox's own id, as logged
            seen[headers["x-amz-request-id"]] = (key, headers)
    dirs = [str(tier.work / f"cache-{i}" / "logs") for i in range(3)]

    def report() -> dict:
        result = subprocess.run([sys.executable, "-m", "sprox", "report", "--logs", *dirs, "--format", "json"],
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    deadline = time.monotonic() + 30  # each node flushes its log every 5 s
    while True:
        figures = report()
        from sprox.analytics.accesslog import read_access_log
        logged = {rid for d in dirs for rid in read_access_log(d).column("request_id").to_pylist()}
        if ids <= logged:
            break
        assert time.monotonic() < deadline, f"the reads never showed in the nodes' logs: {[seen[i] for i in ids - logged]}, " \
            f"{[sorted(p.name for p in Path(d).iterdir()) for d in dirs]}"
        time.sleep(0.5)
    assert figures["logs"] == dirs
    by_node = {row["name"]: row for row in figures["by_node"]}
    assert set(by_node) <= set(dirs) and len(by_node) >= 2
    handled = figures["hit_ratio"]["hits"] + figures["hit_ratio"]["misses"] + figures["hit_ratio"]["partial"]
    assert sum(row["handled"] for row in by_node.values()) == handled
