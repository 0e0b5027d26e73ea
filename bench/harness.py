"""What every benchmark here shares: settings (full or short mode), CPU pinning, the
servers (nginx, Sprox, the bench upstream), the load generator, signed requests, and
the results log written as Parquet.

Nothing here listens beyond 127.0.0.1, and every load run is bounded in time.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import http.client
import json
import os
import platform
import re
import shlex
import shutil
import struct
import subprocess
import sys
import threading
import time
import urllib.request
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Self
from urllib.parse import quote

import pytest

from tests.servers import (
    HOST,
    TEST_ACCESS_KEY,
    TEST_REGION,
    TEST_SECRET_KEY,
    ServerStartError,
    SproxProcess,
    free_port,
    subprocess_env,
    terminate,
)

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
DATA_DIR = Path(os.environ.get("SPROX_BENCH_DATA_DIR", BENCH_DIR / ".data"))
RESULTS_DIR = Path(os.environ.get("SPROX_BENCH_RESULTS_DIR", BENCH_DIR / "results"))
BUILD_DIR = BENCH_DIR / ".build"

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no")


SHORT = _flag("SPROX_BENCH_SHORT")
IN_CI = _flag("CI")


def missing(reason: str) -> None:
    """Skip for a missing tool or package; in CI (CI=true) that is a broken setup: fail."""
    if IN_CI:
        pytest.fail(f"{reason} (CI=true: benchmarks must run, not skip)")
    pytest.skip(reason)


# -- settings ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    """Sizes and durations for one mode. Short mode (SPROX_BENCH_SHORT=1) keeps every
    benchmark to about a second on tiny data, so CI runs the whole suite cheaply."""

    short: bool
    range_object_size: int  # the object random ranges are read from
    whole_object_size: int  # objects read whole
    whole_object_count: int
    distinct_ranges: int  # precomputed signed requests per range size, cycled
    connections: int  # load generator connections (one request in flight each)
    calibration_seconds: float  # nginx run that sizes the request count
    target_seconds: float  # a round lasts about this long against nginx
    cap_factor: float  # a round is cut at target_seconds * cap_factor
    rounds: int
    tpch_sf: float
    tpch_files: int
    olap_rounds: int
    upstream_latency_ms: float
    # Each upstream GET body's pace in MB/s (10^6 bytes), as one S3 GET streams; 0: unpaced.
    upstream_bandwidth_mbps: float = 80.0
    # "copy": bodies are read into a 4 MiB buffer, as a real client does. "discard":
    # the kernel drops them (MSG_TRUNC). On loopback, copy is the fairer default: while a
    # reader copies, the kernel runs more of the receive-side TCP work on the reader's
    # core, whereas with discard nearly all of it lands on the server's core as softirq
    # (measured: bench/README.md).
    loadgen_mode: str = "copy"

    @classmethod
    def load(cls) -> Settings:
        if SHORT:
            base = cls(short=True, range_object_size=64 * MiB, whole_object_size=16 * MiB,
                       whole_object_count=2, distinct_ranges=512, connections=8,
                       calibration_seconds=0.3, target_seconds=1.0, cap_factor=2.0, rounds=1,
                       tpch_sf=0.01, tpch_files=2, olap_rounds=1, upstream_latency_ms=20.0)
        else:
            # 16 connections: where a per-request stall shows in the p99 (the hit
            # kernel's drain was one: 4.5 ms at 16, hidden at 8).
            base = cls(short=False, range_object_size=1 * GiB, whole_object_size=64 * MiB,
                       whole_object_count=4, distinct_ranges=4096, connections=16,
                       calibration_seconds=1.0, target_seconds=4.0, cap_factor=3.0, rounds=3,
                       tpch_sf=6.0, tpch_files=12, olap_rounds=2, upstream_latency_ms=20.0)
        overrides = {
            "connections": ("SPROX_BENCH_CONNECTIONS", int),
            "target_seconds": ("SPROX_BENCH_SECONDS", float),
            "rounds": ("SPROX_BENCH_ROUNDS", int),
            "tpch_sf": ("SPROX_BENCH_SF", float),
            "olap_rounds": ("SPROX_BENCH_OLAP_ROUNDS", int),
            "upstream_latency_ms": ("SPROX_BENCH_LATENCY_MS", float),
            "upstream_bandwidth_mbps": ("SPROX_BENCH_BANDWIDTH_MBPS", float),
            "loadgen_mode": ("SPROX_BENCH_LOADGEN_MODE", str),
        }
        changes = {}
        for name, (env, parse) in overrides.items():
            if os.environ.get(env):
                try:
                    changes[name] = parse(os.environ[env])
                except ValueError:
                    raise pytest.UsageError(f"{env}: {os.environ[env]!r} is not a valid {parse.__name__}") from None
        if changes.get("loadgen_mode", "copy") not in ("copy", "discard"):
            raise pytest.UsageError(f"SPROX_BENCH_LOADGEN_MODE: {changes['loadgen_mode']!r} is not copy or discard")
        return dataclasses.replace(base, **changes)


# -- CPU pinning ------------------------------------------------------------------------


def _pinning() -> tuple[int | None, int | None]:
    if _flag("SPROX_BENCH_NO_PIN"):
        return None, None
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return None, None
    return cpus[0], cpus[1]


# The server under test (nginx or Sprox) runs on SERVER_CPU, the load generator on
# CLIENT_CPU: each side gets exactly one core, so Sprox and nginx compete on equal terms
# and neither steals cycles from the generator.
SERVER_CPU, CLIENT_CPU = _pinning()
PINNED = SERVER_CPU is not None


def pin_process(pid: int, cpu: int | None) -> None:
    """Pin every thread of process `pid` to `cpu` (threads it starts later inherit)."""
    if cpu is None:
        return
    try:
        tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except FileNotFoundError:
        return
    for tid in tids:
        try:
            os.sched_setaffinity(tid, {cpu})
        except (ProcessLookupError, PermissionError):
            pass


def _taskset(cpu: int | None) -> list[str]:
    if cpu is None:
        return []
    taskset = shutil.which("taskset")
    return [taskset, "-c", str(cpu)] if taskset else []


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU time of process `pid` (all its threads), in seconds."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = text[text.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_times() -> dict[int, list[int]]:
    """Per-CPU jiffies from /proc/stat: user, nice, system, idle, iowait, irq, softirq, steal."""
    times = {}
    with open("/proc/stat") as stat:
        for line in stat:
            if line.startswith("cpu") and line[3].isdigit():
                fields = line.split()
                times[int(fields[0][3:])] = [int(v) for v in fields[1:9]]
    return times


def cpu_busy(before: Mapping[int, list[int]], after: Mapping[int, list[int]], cpu: int | None) -> dict[str, float]:
    """How busy `cpu` was between two `cpu_times()` snapshots, in percent: `busy` (all
    but idle and iowait), `softirq` (network processing lands here) and `steal`."""
    if cpu is None or cpu not in before or cpu not in after:
        return {}
    delta = [b - a for a, b in zip(before[cpu], after[cpu])]
    total = sum(delta) or 1
    return {"busy": 100 * (total - delta[3] - delta[4]) / total, "softirq": 100 * delta[6] / total,
            "steal": 100 * delta[7] / total}


def child_pids(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


# -- Sprox ------------------------------------------------------------------------------


# SPROX_BENCH_SPROX_SRC: a source tree whose `sprox` package is benchmarked instead of
# the installed one (put first on the Sprox subprocess's PYTHONPATH), e.g. an export of
# another commit, to compare two versions on the same machine.
SPROX_SRC = os.environ.get("SPROX_BENCH_SPROX_SRC") or None
FORCE_PASSTHROUGH = _flag("SPROX_BENCH_NO_CACHE")


def _sprox_pythonpath() -> dict[str, str]:
    if not SPROX_SRC:
        return {}
    # PYTHONSAFEPATH: `python -m` would otherwise put the working directory (often a
    # checkout with its own `sprox/`) ahead of PYTHONPATH.
    return {"PYTHONPATH": os.pathsep.join(p for p in (SPROX_SRC, os.environ.get("PYTHONPATH")) if p),
            "PYTHONSAFEPATH": "1"}


@functools.cache
def sprox_help() -> str:
    """`python -m sprox serve --help`, run the way the benchmarks start Sprox."""
    done = subprocess.run([sys.executable, "-m", "sprox", "serve", "--help"], capture_output=True,
                          text=True, timeout=60, cwd=REPO_DIR, env=subprocess_env(_sprox_pythonpath()), check=False)
    if done.returncode != 0:
        raise RuntimeError(f"`sprox serve --help` failed:\n{done.stderr}")
    return done.stdout


def sprox_supports(flag: str) -> bool:
    return re.search(rf"(^|\s|\[){re.escape(flag)}(\s|=|,|\]|$)", sprox_help(), re.MULTILINE) is not None


def sprox_has_cache() -> bool:
    """Whether this Sprox has the block cache (`--cache-dir`) and the run uses it.
    Without it (or with SPROX_BENCH_NO_CACHE=1) Sprox runs as a pass-through proxy and
    results are labelled "passthrough"."""
    return sprox_supports("--cache-dir") and not FORCE_PASSTHROUGH


def sprox_mode() -> str:
    return "cache" if sprox_has_cache() else "passthrough"


def sprox_args(*, origin_dir: Path | None = None, upstream: str | None = None,
               cache_dir: Path | None = None, cache_size: str = "8GiB", auth: bool = True) -> list[str]:
    """Arguments for `sprox serve`: the origin, client keys (clients sign with
    testing/testing and Sprox verifies, as deployed), and the cache when this Sprox has
    one. SPROX_BENCH_SPROX_ARGS appends more (e.g. "--block-size 1MiB")."""
    args: list[str] = []
    if origin_dir is not None:
        args += ["--origin-dir", str(origin_dir)]
    if upstream is not None:
        args += ["--upstream", upstream, "--upstream-region", TEST_REGION]
        if sprox_supports("--upstream-addressing"):
            args += ["--upstream-addressing", "path"]
    if auth:
        args += ["--access-key", TEST_ACCESS_KEY, "--secret-key", TEST_SECRET_KEY]
    args += ["--log-level", "warning"]
    if cache_dir is not None and sprox_has_cache():
        args += ["--cache-dir", str(cache_dir)]
        if sprox_supports("--cache-size"):
            args += ["--cache-size", cache_size]
        if sprox_supports("--ttl"):
            args += ["--ttl", "86400"]  # no revalidation in the middle of a measurement
    elif FORCE_PASSTHROUGH and sprox_supports("--no-cache"):
        args += ["--no-cache"]
    args += shlex.split(os.environ.get("SPROX_BENCH_SPROX_ARGS", ""))
    return args


def sprox_env(base_dir: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for a Sprox subprocess: upstream keys testing/testing, empty AWS
    config files, XDG directories under `base_dir`."""
    aws = base_dir / "aws"
    aws.mkdir(parents=True, exist_ok=True)
    (aws / "config").write_text("")
    (aws / "credentials").write_text("")
    return subprocess_env({
        "AWS_CONFIG_FILE": str(aws / "config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(aws / "credentials"),
        "AWS_ACCESS_KEY_ID": TEST_ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": TEST_SECRET_KEY,
        "AWS_EC2_METADATA_DISABLED": "true",
        "XDG_DATA_HOME": str(base_dir / "xdg-data"),
        "XDG_CACHE_HOME": str(base_dir / "xdg-cache"),
        **_sprox_pythonpath(),
        **(extra or {}),
    })


class BenchSprox(SproxProcess):
    """`SproxProcess` (tests/servers.py), optionally pinned to one CPU from exec on
    (`taskset`), so every thread it ever starts runs on that CPU."""

    def __init__(self, log_dir: Path, *args: str, cpu: int | None = None,
                 env: Mapping[str, str] | None = None):
        super().__init__(log_dir, *args, env=env)
        self.cpu = cpu
        self.argv = [*_taskset(cpu), *self.argv]

    def start(self) -> BenchSprox:
        super().start()
        pin_process(self.pid, self.cpu)  # no-op after taskset; the fallback without it
        return self


# -- nginx ------------------------------------------------------------------------------

# What both nginx configurations share: one worker, no access log, sendfile, long
# keep-alive, every path in the work directory.
_NGINX_PRELUDE = """\
{user}worker_processes 1;
{affinity}pid {work}/nginx.pid;
error_log {work}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush {nopush};
    keepalive_requests 100000000;
    keepalive_timeout 300s;
    client_body_temp_path {work}/client_body;
    proxy_temp_path {work}/proxy;
    fastcgi_temp_path {work}/fastcgi;
    uwsgi_temp_path {work}/uwsgi;
    scgi_temp_path {work}/scgi;
"""

NGINX_CONF = """\
# Written by bench/harness.py: a minimal static file server, the reference for hits.
""" + _NGINX_PRELUDE + """\
    default_type application/octet-stream;
    server {{
        listen {host}:{port};
        root {root};
    }}
}}
"""


# The peer a user would put in front of S3 instead of Sprox: nginx's proxy_cache with
# 1 MiB slices (the slice module turns every read into aligned 1 MiB range requests and
# caches each slice), keyed without the signature so every client shares it. The bench
# upstream does not verify signatures, so a slice request re-signed by no one is fine.
# Requests with a query (listings) are not cached, as Sprox does not cache them by
# default (--list-ttl): a listing cached for days would hide new objects.
NGINX_PROXY_CACHE_CONF = """\
# Written by bench/harness.py: nginx proxy_cache with 1 MiB slices in front of an upstream.
""" + _NGINX_PRELUDE + """\
    proxy_cache_path {work}/cache levels=1:2 keys_zone=slices:64m max_size=64g inactive=7d use_temp_path=off;
    upstream origin {{
        server {upstream};
        keepalive 64;
    }}
    server {{
        listen {host}:{port};
        location / {{
            slice 1m;
            proxy_cache slices;
            proxy_cache_key "$request_method $request_uri $slice_range";
            proxy_set_header Range $slice_range;
            proxy_cache_valid 200 206 7d;
            proxy_cache_bypass $args;
            proxy_no_cache $args;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $http_host;
            proxy_pass http://origin;
        }}
    }}
}}
"""


# tcp_nopush (TCP_CORK) is off by default: on loopback (MSS ~64 KiB) it holds the last
# partial segment of a ~64 KiB response until the client's delayed ACK, ~40 ms, which
# makes nginx serve 64 KiB ranges at ~200 req/s instead of ~30,000 (measured here; see
# bench/README.md). SPROX_BENCH_NGINX_NOPUSH=1 turns it on.
NGINX_NOPUSH = _flag("SPROX_BENCH_NGINX_NOPUSH")


def nginx_binary() -> str | None:
    return shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.access(p, os.X_OK)), None)


class NginxServer:
    """nginx serving `root` on a free port of 127.0.0.1: one worker, pinned to `cpu`,
    sendfile on, no access log; config, pid, logs and temp paths all in `work_dir`.
    With `proxy_to` ("host:port"), the proxy_cache peer in front of that upstream
    instead (NGINX_PROXY_CACHE_CONF, its cache in `work_dir`/cache)."""

    def __init__(self, work_dir: Path, root: Path | None = None, cpu: int | None = None,
                 startup_timeout: float = 15.0, proxy_to: str | None = None):
        self.work_dir = Path(work_dir)
        self.root = Path(root) if root is not None else None
        self.proxy_to = proxy_to
        self.cpu = cpu
        self.startup_timeout = startup_timeout
        self.port = 0
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def conf_path(self) -> Path:
        return self.work_dir / "nginx.conf"

    def log_text(self) -> str:
        out = []
        for name in ("nginx.log", "error.log"):
            try:
                out.append((self.work_dir / name).read_text(errors="replace"))
            except OSError:
                pass
        return "\n".join(out)

    def worker_pids(self) -> list[int]:
        return child_pids(self._proc.pid) if self._proc else []

    def start(self) -> Self:
        binary = nginx_binary()
        if binary is None:
            raise ServerStartError("nginx not found (apt-get install nginx)")
        self.work_dir.mkdir(parents=True, exist_ok=True)
        for attempt in range(3):
            self.port = free_port()
            common = dict(
                user="user root;\n" if os.geteuid() == 0 else "",  # workers must read the data
                affinity=f"worker_cpu_affinity {1 << self.cpu:b};\n" if self.cpu is not None else "",
                work=self.work_dir, host=HOST, port=self.port, nopush="on" if NGINX_NOPUSH else "off")
            if self.proxy_to is not None:
                self.conf_path.write_text(NGINX_PROXY_CACHE_CONF.format(upstream=self.proxy_to, **common))
            else:
                assert self.root is not None
                self.conf_path.write_text(NGINX_CONF.format(root=self.root.resolve(), **common))
            with open(self.work_dir / "nginx.log", "ab") as log:
                self._proc = subprocess.Popen(
                    [*_taskset(self.cpu), binary, "-p", f"{self.work_dir}/", "-c", str(self.conf_path),
                     "-e", str(self.work_dir / "error.log"), "-g", "daemon off;"],
                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            try:
                self._wait_ready()
            except ServerStartError:
                log_text = self.log_text()
                self.stop()
                if attempt < 2 and "Address already in use" in log_text:
                    continue
                raise
            for pid in [self._proc.pid, *self.worker_pids()]:
                pin_process(pid, self.cpu)
            return self
        raise AssertionError("unreachable")

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while True:
            assert self._proc is not None
            if self._proc.poll() is not None:
                raise ServerStartError(f"nginx exited with status {self._proc.returncode}:\n{self.log_text()}")
            try:
                conn = http.client.HTTPConnection(HOST, self.port, timeout=1)
                conn.request("GET", "/")
                conn.getresponse().read()
                conn.close()
                if self.worker_pids():
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise ServerStartError(f"nginx not ready after {self.startup_timeout:.0f}s:\n{self.log_text()}")
            time.sleep(0.05)

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        terminate(proc, 5)  # SIGTERM is nginx's fast shutdown

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# -- the bench upstream -----------------------------------------------------------------


class UpstreamProcess:
    """`python -m bench.upstream --root ROOT --latency-ms MS --bandwidth-mbps MBPS` on a
    free port."""

    LISTENING = re.compile(r"listening on (http://\S+)")

    def __init__(self, log_dir: Path, root: Path, latency_ms: float, bandwidth_mbps: float = 0.0,
                 startup_timeout: float = 30.0):
        self.log_dir = Path(log_dir)
        self.root = Path(root)
        self.latency_ms = latency_ms
        self.bandwidth_mbps = bandwidth_mbps
        self.startup_timeout = startup_timeout
        self.endpoint: str | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._reader: threading.Thread | None = None
        self._lines: list[str] = []

    def start(self) -> UpstreamProcess:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_dir / "upstream.stderr.log", "ab") as stderr:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "bench.upstream", "--root", str(self.root), "--port", "0",
                 "--latency-ms", str(self.latency_ms), "--bandwidth-mbps", str(self.bandwidth_mbps)],
                cwd=REPO_DIR, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=stderr,
                env=subprocess_env({"PYTHONUNBUFFERED": "1"}), start_new_session=True)
        ready = threading.Event()

        def read() -> None:
            assert self._proc is not None and self._proc.stdout is not None
            for raw in self._proc.stdout:
                line = raw.decode(errors="replace").rstrip()
                self._lines.append(line)
                match = self.LISTENING.search(line)
                if match and self.endpoint is None:
                    self.endpoint = match.group(1)
                    ready.set()

        self._reader = threading.Thread(target=read, name="upstream-stdout", daemon=True)
        self._reader.start()
        deadline = time.monotonic() + self.startup_timeout
        while not ready.wait(0.05):
            if self._proc.poll() is not None or time.monotonic() > deadline:
                stderr_text = (self.log_dir / "upstream.stderr.log").read_text(errors="replace")
                self.stop()
                raise ServerStartError(f"bench upstream did not start:\n{stderr_text}")
        return self

    def stats(self) -> dict:
        assert self.endpoint is not None
        with urllib.request.urlopen(f"{self.endpoint}/_stats", timeout=10) as response:
            return json.load(response)

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        terminate(proc, 5)
        if self._reader is not None:
            self._reader.join(5)  # ends at EOF, now that the process is gone
        if proc.stdout is not None:
            proc.stdout.close()


def stats_delta(before: Mapping[str, object], after: Mapping[str, object]) -> dict[str, int]:
    """Upstream requests between two `/_stats` snapshots."""
    keys = ("GET", "HEAD", "LIST", "OTHER", "get_body_bytes", "ranged_gets")
    return {k: int(after[k]) - int(before[k]) for k in keys}  # type: ignore[call-overload]


# -- signed requests --------------------------------------------------------------------

USER_AGENT = "Boto3/1.40 md/Botocore#1.40 ua/2.1 os/linux lang/python#3.11 (sprox-bench)"


class RequestSigner:
    """Builds S3 requests signed with SigV4 (botocore) for `host:port`, as bytes ready
    to send: signed in the Authorization header, or presigned (the signature in the
    query, as boto3's generate_presigned_url makes it; other headers, such as Range,
    unsigned). A signature stays valid for 15 minutes after it was made."""

    def __init__(self, host: str, port: int, access_key: str = TEST_ACCESS_KEY,
                 secret_key: str = TEST_SECRET_KEY, region: str = TEST_REGION):
        from botocore.auth import S3SigV4Auth, S3SigV4QueryAuth
        from botocore.credentials import Credentials

        self.host, self.port = host, port
        credentials = Credentials(access_key, secret_key)
        self._auth = S3SigV4Auth(credentials, "s3", region)
        self._query_auth = S3SigV4QueryAuth(credentials, "s3", region, expires=900)

    @property
    def authority(self) -> str:
        return f"{self.host}:{self.port}"

    def headers(self, method: str, bucket: str, key: str, extra: Mapping[str, str] | None = None
                ) -> tuple[str, dict[str, str]]:
        """(path, headers) of a signed request; headers include Host."""
        from botocore.awsrequest import AWSRequest

        path = f"/{bucket}/{quote(key, safe='/~')}"
        request = AWSRequest(method=method, url=f"http://{self.authority}{path}", headers=dict(extra or {}))
        self._auth.add_auth(request)
        headers = {"Host": self.authority, "User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
        headers.update((k, v) for k, v in request.headers.items())
        return path, headers

    def presigned(self, method: str, bucket: str, key: str, extra: Mapping[str, str] | None = None
                  ) -> tuple[str, dict[str, str]]:
        """(path with the presigned query, headers): `extra` is sent, not signed."""
        from botocore.awsrequest import AWSRequest

        path = f"/{bucket}/{quote(key, safe='/~')}"
        request = AWSRequest(method=method, url=f"http://{self.authority}{path}")
        self._query_auth.add_auth(request)
        target = request.url.split(self.authority, 1)[1]
        return target, {"Host": self.authority, "User-Agent": USER_AGENT, "Accept-Encoding": "identity",
                        **(extra or {})}

    def raw(self, method: str, bucket: str, key: str, extra: Mapping[str, str] | None = None, *,
            presigned: bool = False) -> bytes:
        path, headers = (self.presigned if presigned else self.headers)(method, bucket, key, extra)
        lines = [f"{method} {path} HTTP/1.1", *(f"{k}: {v}" for k, v in headers.items())]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def write_request_file(path: Path, records: Iterable[tuple[bytes, int]]) -> int:
    """Write (request bytes, expected body length or -1) records for the load generator."""
    count = 0
    with open(path, "wb") as out:
        for raw, expected in records:
            out.write(struct.pack("<IIq", len(raw), 0, expected))
            out.write(raw)
            count += 1
    return count


def stream_get(port: int, path: str, headers: Mapping[str, str], sink=None, chunk: int = 8 * MiB,
               timeout: float = 120) -> tuple[int, http.client.HTTPMessage, int]:
    """GET over a fresh connection; `sink(offset, bytes)` sees the body piece by piece.
    Returns (status, headers, body length); a status >= 300 raises AssertionError with
    the response body (an S3 error document) in the message."""
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        conn.request("GET", path, headers=dict(headers))
        response = conn.getresponse()
        if response.status >= 300:
            body = response.read(64 * KiB).decode(errors="replace")
            raise AssertionError(f"GET {path} ({headers.get('Range', 'whole object')}): HTTP {response.status}: {body}")
        total = 0
        while True:
            data = response.read(chunk)
            if not data:
                break
            if sink is not None:
                sink(total, data)
            total += len(data)
        return response.status, response.headers, total
    finally:
        conn.close()


# -- load generator ---------------------------------------------------------------------


def loadgen_binary() -> Path:
    """bench/loadgen.c compiled with gcc (once per source version, into bench/.build)."""
    source = BENCH_DIR / "loadgen.c"
    digest = hashlib.sha256(source.read_bytes()).hexdigest()[:12]
    binary = BUILD_DIR / f"loadgen-{digest}"
    if binary.exists():
        return binary
    compiler = shutil.which(os.environ.get("CC", "gcc")) or shutil.which("cc")
    if compiler is None:
        missing("no C compiler (gcc) to build bench/loadgen.c: apt-get install gcc")
    BUILD_DIR.mkdir(parents=True, exist_ok=True)
    tmp = binary.with_name(f"{binary.name}.{os.getpid()}.tmp")
    done = subprocess.run([compiler, "-O2", "-Wall", "-Wextra", "-o", str(tmp), str(source)],
                          capture_output=True, text=True, timeout=120, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"compiling {source} failed:\n{done.stderr}")
    os.replace(tmp, binary)
    return binary


def pin_preexec(cpu: int | None):
    """A `preexec_fn` pinning a child process to `cpu` before it execs (None: no-op)."""
    if cpu is None:
        return None
    return lambda: os.sched_setaffinity(0, {cpu})


def run_load(port: int, request_file: Path, *, seconds: float, max_requests: int | None = None,
             connections: int = 8, mode: str = "copy", grace: float = 10.0,
             server_pids: Sequence[int] = ()) -> dict:
    """One bounded load generator run (pinned to CLIENT_CPU). Returns its JSON report
    plus the server's CPU use over the run (`server_cpu_s`, per request, percent)."""
    argv = [str(loadgen_binary()), "-a", HOST, "-p", str(port), "-f", str(request_file),
            "-c", str(connections), "-d", f"{seconds:.3f}", "-g", f"{grace:.1f}", "-m", mode]
    if max_requests is not None:
        argv += ["-n", str(max_requests)]
    cpu_before = sum(process_cpu_seconds(p) for p in server_pids)
    times_before = cpu_times()
    done = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + grace + 60,
                          preexec_fn=pin_preexec(CLIENT_CPU), check=False)
    times_after = cpu_times()
    cpu_after = sum(process_cpu_seconds(p) for p in server_pids)
    if done.returncode != 0:
        raise RuntimeError(f"load generator failed ({done.returncode}): {done.stderr}{done.stdout}")
    report = json.loads(done.stdout)
    elapsed = report["elapsed_s"] or 1e-9
    report["loadgen_cpu_pct"] = 100 * (report["cpu_user_s"] + report["cpu_sys_s"]) / elapsed
    if server_pids:
        report["server_cpu_s"] = cpu_after - cpu_before
        report["server_cpu_pct"] = 100 * report["server_cpu_s"] / elapsed
        report["server_cpu_us_per_req"] = 1e6 * report["server_cpu_s"] / max(report["requests"], 1)
    report["truncated"] = max_requests is not None and report["requests"] < max_requests
    # Whole-core view: what else ran on the two CPUs (other processes on a shared
    # machine show up as busy time that neither the server nor the generator used).
    report["server_core"] = cpu_busy(times_before, times_after, SERVER_CPU)
    report["client_core"] = cpu_busy(times_before, times_after, CLIENT_CPU)
    # "other": busy time not spent in the server process, the generator or softirq; a
    # rough noise gauge (a few percent is normal; tens of percent means a busy machine).
    if server_pids and report["server_core"]:
        core = report["server_core"]
        core["other"] = max(0.0, core["busy"] - core["softirq"] - report["server_cpu_pct"])
    if report["client_core"]:
        core = report["client_core"]
        core["other"] = max(0.0, core["busy"] - core["softirq"] - report["loadgen_cpu_pct"])
    return report


def flatten_load(report: Mapping[str, object], prefix: str = "") -> dict[str, object]:
    """A load report as flat columns (for Parquet and extra_info)."""
    row: dict[str, object] = {}
    for key, value in report.items():
        if isinstance(value, Mapping):
            for sub, v in value.items():
                row[f"{prefix}{key}_{sub}"] = v
        else:
            row[f"{prefix}{key}"] = value
    return row


# -- results ----------------------------------------------------------------------------


@functools.cache
def run_context() -> dict[str, object]:
    """What every result row carries: when, which code, which mode, which machine."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_DIR, capture_output=True,
                                text=True, timeout=10, check=False).stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        commit = None
    cpu_model = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "run_id": time.strftime("%Y%m%dT%H%M%S"),
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "git_commit": commit,
        "short_mode": SHORT,
        "sprox_mode": sprox_mode(),
        "sprox_src": SPROX_SRC or "installed",
        "pinned": PINNED,
        "nginx_tcp_nopush": NGINX_NOPUSH,
        "cpus": os.cpu_count(),
        "cpu_model": cpu_model,
        "kernel": platform.release(),
        "python": platform.python_version(),
    }


class ResultLog:
    """Rows per table, written to bench/results/<table>-<run id>.parquet at the end."""

    def __init__(self) -> None:
        self.tables: dict[str, list[dict[str, object]]] = defaultdict(list)

    def add(self, table: str, row: Mapping[str, object]) -> None:
        self.tables[table].append({**run_context(), **row})

    def write(self) -> list[Path]:
        if not any(self.tables.values()):
            return []
        import pyarrow as pa
        import pyarrow.parquet as pq

        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        written = []
        for table, rows in self.tables.items():
            if not rows:
                continue
            columns: dict[str, None] = {}
            for row in rows:
                columns.update(dict.fromkeys(row))
            normalized = [{c: row.get(c) for c in columns} for row in rows]
            for column in columns:
                _normalize_column(normalized, column)
            path = RESULTS_DIR / f"{table}-{run_context()['run_id']}.parquet"
            pq.write_table(pa.Table.from_pylist(normalized), path)
            written.append(path)
        return written


def _normalize_column(rows: list[dict[str, object]], column: str) -> None:
    """Give a column one Parquet type: ints mixed with floats become floats, anything
    structured (or mixed with text) becomes JSON text."""
    values = [r[column] for r in rows if r[column] is not None]
    kinds = {bool if isinstance(v, bool) else int if isinstance(v, int) else float if isinstance(v, float)
             else str if isinstance(v, str) else object for v in values}
    if kinds <= {int} or kinds <= {float} or kinds <= {bool} or kinds <= {str}:
        return
    if kinds <= {int, float}:
        convert = float
    else:
        def convert(v: object) -> object:
            return v if isinstance(v, str) else json.dumps(v, default=str)
    for r in rows:
        if r[column] is not None:
            r[column] = convert(r[column])


RESULTS = ResultLog()


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    def cell(v: object) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:,.3f}" if abs(v) < 100 else f"{v:,.0f}"
        return str(v)

    text = [[cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in text)) if text else len(h) for i, h in enumerate(headers)]
    out = ["  ".join(h.ljust(w) for h, w in zip(headers, widths)),
           "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in text]
    return "\n".join(out)
