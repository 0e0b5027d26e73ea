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
import re
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import boto3
import pytest
from botocore.config import Config as BotoConfig

from tests.conftest import TEST_ACCESS_KEY, TEST_REGION, TEST_SECRET_KEY, sprox_env
from tests.faultproxy import FaultProxy
from tests.servers import HOST, SproxProcess, free_ports, tcp_accepts

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
RECIPE = REPO / "deploy" / "nginx" / "sprox-tier.conf"
BUCKET = "tier"
OBJECTS = {f"data/part-{i:02d}.bin": os.urandom(300_000 + 4099 * i) for i in range(9)}


def nginx_binary() -> str | None:
    return shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx")
                                          if os.path.exists(p)), None)


def render_recipe(work: Path, port: int, nodes: list[int]) -> str:
    """deploy/nginx/sprox-tier.conf with this test's nodes and listen address, and
    nginx's own files in `work`. The rest is the recipe as users get it."""
    text = RECIPE.read_text()
    servers = [line for line in text.splitlines() if re.match(r"\s*server 10\.0\.0\.\d+:9000 ", line)]
    assert len(servers) == 3, "the recipe's server lines changed: update this test"
    text = text.replace(servers[0], "\n".join(
        servers[0].replace("10.0.0.11:9000", f"{HOST}:{p}") for p in nodes))
    for line in servers[1:]:
        text = text.replace(line + "\n", "")
    text = text.replace("listen 9000;", f"listen {HOST}:{port};")
    text = text.replace("worker_processes auto;", "worker_processes 1;\n"
                        f"pid {work}/nginx.pid;\nerror_log {work}/error.log warn;")
    temp = "".join(f"    {kind}_temp_path {work}/{kind};\n"
                   for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    return text.replace("http {\n", "http {\n" + temp, 1)


class Tier:
    def __init__(self, work: Path, moto_endpoint: str, aws_files: dict[str, str]) -> None:
        self.work = work
        self.proxy = FaultProxy(moto_endpoint)
        self.nginx_port, *self.node_ports = free_ports(4)
        self.nodes: list[SproxProcess | None] = [None, None, None]
        self.aws_files = aws_files
        self.nginx: subprocess.Popen | None = None

    def node_args(self, i: int) -> list[str]:
        peers = ",".join(f"{HOST}:{p}" for p in self.node_ports)  # itself too: a node skips itself
        return ["--port", str(self.node_ports[i]), "--upstream", self.proxy.endpoint,
                "--upstream-region", TEST_REGION, "--upstream-addressing", "path",
                "--access-key", TEST_ACCESS_KEY, "--secret-key", TEST_SECRET_KEY,
                "--cache-dir", str(self.work / f"cache-{i}"), "--list-ttl", "300", "--peers", peers]

    def start_node(self, i: int) -> SproxProcess:
        log_dir = self.work / f"node-{i}-{time.monotonic_ns()}"
        node = SproxProcess(log_dir, *self.node_args(i), env=sprox_env(log_dir, self.aws_files))
        self.nodes[i] = node.start()
        return node

    def start(self) -> Tier:
        self.proxy.__enter__()
        for i in range(3):
            self.start_node(i)
        conf = self.work / "nginx.conf"
        conf.write_text(render_recipe(self.work, self.nginx_port, self.node_ports))
        with open(self.work / "nginx.stderr", "wb") as stderr:
            self.nginx = subprocess.Popen([nginx_binary(), "-c", str(conf), "-p", str(self.work), "-g",
                                           "daemon off;"], stdout=subprocess.DEVNULL, stderr=stderr,
                                          start_new_session=True)
        deadline = time.monotonic() + 15
        while not tcp_accepts(self.nginx_port):
            if self.nginx.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("nginx did not start: " + (self.work / "nginx.stderr").read_text()
                                   + (self.work / "error.log").read_text() if (self.work / "error.log").exists()
                                   else "")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        if self.nginx is not None:
            self.nginx.terminate()
            self.nginx.wait(10)
        for node in self.nodes:
            if node is not None:
                node.stop()
        self.proxy.__exit__(None, None, None)

    @property
    def endpoint(self) -> str:
        return f"http://{HOST}:{self.nginx_port}"

    def client(self, **config):
        return boto3.client("s3", endpoint_url=self.endpoint, region_name=TEST_REGION,
                            aws_access_key_id=TEST_ACCESS_KEY, aws_secret_access_key=TEST_SECRET_KEY,
                            config=BotoConfig(**config))

    def metric(self, i: int, name: str) -> float:
        node = self.nodes[i]
        assert node is not None
        signer = RequestSignerForNode()
        url = f"{node.endpoint}/_sprox/metrics"
        request = urllib.request.Request(url, headers=signer.headers("GET", url))
        with urllib.request.urlopen(request, timeout=10) as response:
            text = response.read().decode()
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith(name) and (len(line) == len(name) or line[len(name)] in " {"))


def RequestSignerForNode():
    from sprox.warm import RequestSigner

    return RequestSigner(key=(TEST_ACCESS_KEY, TEST_SECRET_KEY))


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
    tier = Tier(tmp_path_factory.mktemp("tier"), moto_server.endpoint, aws_files).start()
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
