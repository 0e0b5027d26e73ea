"""A tier of three Sprox nodes behind nginx (deploy/nginx/sprox-tier.conf, with this
test's addresses), moto behind a recording proxy as their upstream; used by
tests/functional/test_tier.py and, as the origin "tier", by the client suite."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import boto3
from botocore.config import Config as BotoConfig

from tests.faultproxy import FaultProxy
from tests.servers import HOST, TEST_ACCESS_KEY, TEST_REGION, TEST_SECRET_KEY, SproxProcess, free_ports, tcp_accepts

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "deploy" / "nginx" / "sprox-tier.conf"


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
    def __init__(self, work: Path, moto_endpoint: str, env_for) -> None:
        """`env_for(log_dir)`: a node's environment (tests/conftest.py sprox_env)."""
        self.work = work
        self.proxy = FaultProxy(moto_endpoint)
        self.nginx_port, *self.node_ports = free_ports(4)
        self.nodes: list[SproxProcess | None] = [None, None, None]
        self.env_for = env_for
        self.nginx: subprocess.Popen | None = None

    def node_args(self, i: int) -> list[str]:
        peers = ",".join(f"{HOST}:{p}" for p in self.node_ports)  # itself too: a node skips itself
        return ["--port", str(self.node_ports[i]), "--upstream", self.proxy.endpoint,
                "--upstream-region", TEST_REGION, "--upstream-addressing", "path",
                "--access-key", TEST_ACCESS_KEY, "--secret-key", TEST_SECRET_KEY,
                "--cache-dir", str(self.work / f"cache-{i}"), "--list-ttl", "300", "--peers", peers]

    def start_node(self, i: int) -> SproxProcess:
        log_dir = self.work / f"node-{i}-{time.monotonic_ns()}"
        node = SproxProcess(log_dir, *self.node_args(i), env=self.env_for(log_dir))
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
        from sprox.warm import RequestSigner

        signer = RequestSigner(key=(TEST_ACCESS_KEY, TEST_SECRET_KEY))
        url = f"{node.endpoint}/_sprox/metrics"
        request = urllib.request.Request(url, headers=signer.headers("GET", url))
        with urllib.request.urlopen(request, timeout=10) as response:
            text = response.read().decode()
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith(name) and (len(line) == len(name) or line[len(name)] in " {"))

    def log_text(self) -> str:
        return "\n".join(f"--- node {i} ---\n{node.log_text()}" for i, node in enumerate(self.nodes)
                         if node is not None)


class TierUnderTest:
    """The tier where the client suite expects a SproxUnderTest: clients reach nginx;
    buckets are made at (and objects read back from) the moto upstream."""

    origin = "tier"
    origin_dir = None

    def __init__(self, tier: Tier, upstream) -> None:
        self.tier = tier
        self.sprox = tier  # (log_text)
        self.upstream = upstream

    @property
    def endpoint(self) -> str:
        return self.tier.endpoint

    @property
    def port(self) -> int:
        return self.tier.nginx_port
