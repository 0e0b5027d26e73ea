"""`sprox cache warm` and the progress of `sprox cache verify`, run as a user runs them.

    sprox cache warm (subprocess) -> Sprox (subprocess, --auth sigv4) -> FaultProxy -> moto

The upstream's requests are counted (at the fault proxy), data is self-checking, and
the Ctrl-C case stalls the upstream in the middle of a large object, so the interrupt
lands while a block is half-filled: that block must never appear in the index."""

from __future__ import annotations

import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time

import pytest

from sprox.cache import admin
from sprox.progress import format_bytes
from tests.data import check_bytes, object_bytes
from tests.faultproxy import Fault, FaultProxy
from tests.servers import TEST_ACCESS_KEY, TEST_REGION, TEST_SECRET_KEY, s3_client

BLOCK = 64 * 1024
STALL_TIMEOUT = 6  # Sprox's --upstream-timeout in the Ctrl-C test

# Inside the prefix: sizes across block boundaries, an empty object, keys that need
# encoding (space, plus, non-ASCII, a dot segment). Outside: a sibling that shares the
# prefix's first letters, and another directory.
INSIDE = {"pre/a": 3 * BLOCK + 17, "pre/b c+é": 1000, "pre/sub/deep": BLOCK, "pre/empty": 0,
          "pre/./dot": 5000}
OUTSIDE = {"prefix-sibling": 2000, "other/x": 3000}


@pytest.fixture
def proxy(moto_server):
    with FaultProxy(moto_server.endpoint) as faults:
        yield faults


def serve(start_sprox, tmp_path, proxy, upstream_timeout: float = 30):
    return start_sprox(tmp_path, "--upstream", proxy.endpoint, "--upstream-region", TEST_REGION,
                       "--cache-dir", str(tmp_path / "cache"), "--block-size", "64KiB", "--ttl", "3600",
                       "--upstream-timeout", str(upstream_timeout),
                       "--access-key", TEST_ACCESS_KEY, "--secret-key", TEST_SECRET_KEY)


def seed(moto_server, sprox, bucket: str, objects: dict[str, int]):
    s3_client(moto_server.endpoint).create_bucket(Bucket=bucket)
    client = s3_client(sprox.endpoint)
    for key, size in objects.items():
        client.put_object(Bucket=bucket, Key=key, Body=object_bytes(key, size))
    return client


def sprox_cli(env, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sprox", *args], capture_output=True, text=True, env=env,
                          timeout=timeout, check=False)


def x_cache(client, bucket: str, key: str, size: int) -> str:
    answer = client.get_object(Bucket=bucket, Key=key)
    body = answer["Body"].read()
    assert len(body) == size and check_bytes(key, 0, body) is None, key
    return answer["ResponseMetadata"]["HTTPHeaders"]["x-cache"]


def test_warm_caches_every_object_under_the_prefix_and_nothing_else(
        start_sprox, tmp_path, moto_server, proxy, make_client_env):
    sprox = serve(start_sprox, tmp_path, proxy)
    client = seed(moto_server, sprox, "warm1", {**INSIDE, **OUTSIDE})
    cache = str(tmp_path / "cache")
    env = make_client_env(sprox.endpoint)

    first = sprox_cli(env, "cache", "warm", "s3://warm1/pre/", "--cache-dir", cache, "--concurrency", "3")
    assert first.returncode == 0, first.stderr
    total = sum(INSIDE.values())
    size = format_bytes(total)  # 261.9 KiB
    assert re.fullmatch(rf"warmed s3://warm1/pre/: {len(INSIDE)} objects, {size} in [\d.]+ s( \(.*/s\))?; "
                        rf"0 already cached, {len(INSIDE)} fetched, 0 failed\n", first.stdout), first.stdout
    # Not a terminal: plain lines, no carriage returns or escape sequences, ending complete.
    lines = first.stderr.splitlines()
    assert "\r" not in first.stderr and "\x1b" not in first.stderr
    assert lines and all(line.startswith("warm: ") for line in lines), lines
    assert lines[-1].startswith(f"warm: {len(INSIDE)}/{len(INSIDE)} objects, {size}/{size}"), lines
    # One upstream GET per object inside the prefix, none outside.
    for key in {**INSIDE, **OUTSIDE}:
        expected = 1 if key in INSIDE else 0
        assert proxy.count("GET", key) == expected, (key, proxy.requests("GET"))

    proxy.reset_counts()
    for key, size in INSIDE.items():
        assert x_cache(client, "warm1", key, size) == "HIT", key
    assert proxy.count("GET") == 0, proxy.requests("GET")
    for key, size in OUTSIDE.items():
        assert x_cache(client, "warm1", key, size) == "MISS", key

    second = sprox_cli(env, "cache", "warm", "s3://warm1/pre/", "--cache-dir", cache)
    assert second.returncode == 0, second.stderr
    assert f"{len(INSIDE)} already cached, 0 fetched, 0 failed" in second.stdout, second.stdout

    # Pages: the listing follows continuation tokens (two keys a page here).
    from sprox.warm import RequestSigner, Warmer

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AWS_ACCESS_KEY_ID", TEST_ACCESS_KEY)
        mp.setenv("AWS_SECRET_ACCESS_KEY", TEST_SECRET_KEY)
        result = _run(Warmer(sprox.endpoint, "warm1", "pre/", signer=RequestSigner(), page_size=2).run())
    assert (result.total_objects, result.objects, result.hits, result.total_bytes) == \
        (len(INSIDE), len(INSIDE), len(INSIDE), total)

    # A failing object is reported, counted, and makes the exit status 1; the rest is read.
    proxy.inject(Fault.ERROR_500, key="pre/a", times=None)
    purge = sprox_cli(env, "cache", "purge", "s3://warm1/pre/a", "--cache-dir", cache)
    assert purge.returncode == 0, purge.stderr
    failing = sprox_cli(env, "cache", "warm", "s3://warm1/pre/", "--cache-dir", cache)
    proxy.clear()
    assert failing.returncode == 1, failing.stdout + failing.stderr
    assert "sprox: warm: s3://warm1/pre/a: HTTP 500 InternalError" in failing.stderr, failing.stderr
    assert f"{len(INSIDE) - 1} already cached, 0 fetched, 1 failed" in failing.stdout, failing.stdout

    # Unsigned requests are refused by this Sprox: the listing error is clear, exit 1.
    unsigned = {k: v for k, v in env.items() if k not in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    refused = sprox_cli(unsigned, "cache", "warm", "s3://warm1/pre/", "--endpoint", sprox.endpoint)
    assert refused.returncode == 1 and "sprox: error: listing s3://warm1/pre/ failed: HTTP 403" in refused.stderr, \
        refused.stderr


def _run(coroutine):
    import asyncio

    return asyncio.run(coroutine)


def test_warm_needs_a_running_sprox(tmp_path, make_client_env):
    env = make_client_env("http://127.0.0.1:1")
    missing = sprox_cli(env, "cache", "warm", "s3://b/p", "--cache-dir", str(tmp_path / "nothing-here"))
    assert missing.returncode == 1 and "no Sprox is running on the cache" in missing.stderr, missing.stderr
    assert missing.stdout == ""
    bad = sprox_cli(env, "cache", "warm", "b/p", "--cache-dir", str(tmp_path))
    assert bad.returncode == 2 and "s3://" in bad.stderr
    zero = sprox_cli(env, "cache", "warm", "s3://b/p", "--endpoint", "http://127.0.0.1:1", "--concurrency", "0")
    assert zero.returncode == 2 and "--concurrency" in zero.stderr
    unreachable = sprox_cli(env, "cache", "warm", "s3://b/p", "--endpoint", "http://127.0.0.1:1")
    assert unreachable.returncode == 1 and "cannot reach Sprox at http://127.0.0.1:1" in unreachable.stderr


_PROGRESS = re.compile(r"^warm: (\d+)/(\d+) objects, ([\d.]+) (B|KiB|MiB)/")
_UNIT = {"B": 1, "KiB": 1024, "MiB": 2**20}


def interrupt(args: list[str], env, ready) -> tuple[int, str, "LineReader"]:
    """Run `sprox *args`, send it SIGINT (Ctrl-C) once a line of its standard error
    matches `ready`; (exit status, standard output, its standard error's lines)."""
    proc = subprocess.Popen([sys.executable, "-m", "sprox", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        stderr = LineReader(proc.stderr)
        stderr.wait_for(ready, timeout=30)
        proc.send_signal(signal.SIGINT)
        stdout, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    stderr.thread.join(5)
    return proc.returncode, stdout, stderr


class LineReader:
    """The lines a subprocess writes to one pipe, collected by a thread, so a test can
    wait for a line without blocking forever on the pipe."""

    def __init__(self, pipe) -> None:
        self.lines: list[str] = []
        self.changed = threading.Condition()
        self.thread = threading.Thread(target=self._read, args=(pipe,), daemon=True)
        self.thread.start()

    def _read(self, pipe) -> None:
        for line in pipe:
            with self.changed:
                self.lines.append(line.rstrip("\n"))
                self.changed.notify_all()

    def wait_for(self, matches, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        seen = 0
        with self.changed:
            while True:
                for line in self.lines[seen:]:
                    if matches(line):
                        return line
                seen = len(self.lines)
                left = deadline - time.monotonic()
                if left <= 0 or not self.thread.is_alive():
                    raise AssertionError(f"no such line within {timeout} s: {self.lines}")
                self.changed.wait(left)


def test_ctrl_c_stops_cleanly_and_leaves_nothing_half_written(
        start_sprox, tmp_path, moto_server, proxy, make_client_env):
    big, big_size = "pre/big", 32 * BLOCK  # 2 MiB
    small = {f"pre/small{i}": 1000 for i in range(3)}
    # The stall outlasts the warm (interrupted within about 2 s: one progress line) but
    # not Sprox's upstream timeout, so Sprox's fill ends by itself and Sprox stops quickly.
    sprox = serve(start_sprox, tmp_path, proxy, upstream_timeout=STALL_TIMEOUT)
    seed(moto_server, sprox, "warm2", {big: big_size, **small})
    cache = tmp_path / "cache"
    # The big object stalls after 4 whole blocks and part of the fifth.
    cut = 4 * BLOCK + 30_000
    proxy.inject(Fault.STALL_MID_BODY, key=big, after=cut, seconds=60)

    def reading_big(line: str) -> bool:  # the small ones done, and bytes of the big one arrived
        match = _PROGRESS.match(line)
        return bool(match) and int(match[1]) == len(small) and \
            float(match[3]) * _UNIT[match[4]] > sum(small.values()) + BLOCK

    returncode, stdout, stderr = interrupt(["cache", "warm", "s3://warm2/pre/", "--cache-dir", str(cache)],
                                           make_client_env(sprox.endpoint), reading_big)
    assert returncode == 130, (stdout, stderr.lines)
    assert stdout.startswith(f"interrupted: warmed s3://warm2/pre/: {len(small)} of {len(small) + 1} objects"), stdout
    assert "0 failed, 1 reads cancelled" in stdout and "nothing half-written" in stdout, stdout
    assert "Traceback" not in "\n".join(stderr.lines)

    assert sprox.stop() == 0  # with its fill of the big object still stalled
    env = make_client_env("http://127.0.0.1:1")
    # The stopped Sprox left its `endpoint` file behind: warm still knows none runs.
    stale = sprox_cli(env, "cache", "warm", "s3://warm2/pre/", "--cache-dir", str(cache))
    assert stale.returncode == 1 and "no Sprox is running" in stale.stderr, stale.stderr

    # Only whole blocks were published: of the big object, at most the 4 complete ones.
    db = sqlite3.connect(cache / "index.sqlite")
    try:
        (object_id,) = db.execute("SELECT id FROM objects WHERE bucket = 'warm2' AND key = ?", (big,)).fetchone()
        published = [idx for (idx,) in db.execute("SELECT idx FROM blocks WHERE object_id = ?", (object_id,))]
    finally:
        db.close()
    assert published and max(published) < cut // BLOCK, published
    verified = sprox_cli(env, "cache", "verify", "--cache-dir", str(cache))
    assert verified.returncode == 0, verified.stderr
    assert re.match(rf"checked {len(published) + len(small)} blocks, dropped 0 damaged \(in [\d.]+ s\)\n$",
                    verified.stdout), verified.stdout
    assert all(line.startswith("verify: ") for line in verified.stderr.splitlines()), verified.stderr
    assert verified.stderr.splitlines()[-1].startswith(
        f"verify: {len(published) + len(small)}/{len(published) + len(small)} blocks"), verified.stderr

    # Ctrl-C at the command: it stops between blocks, says what it did, exits 130.
    returncode, out, lines = interrupt(["cache", "verify", "--cache-dir", str(cache)], env,
                                       lambda line: line == "verify: reading the index")  # Ctrl-C is handled
    assert returncode == 130, (out, lines.lines)
    assert re.match(r"interrupted: checked \d+ of \d+ blocks, dropped 0 damaged", out), out

    # Interrupting verify keeps what it did: a damaged block it reached stays dropped.
    record = admin_records(cache)[0]  # the first verify checks (same load order)
    with open(cache / "blocks" / record.file_name, "r+b") as f:
        f.seek(record.block_range(record.present_blocks()[0])[0] + 10)
        f.write(b"\xff" * 8)
    checks = []
    stopped = admin.verify(cache, progress=lambda checked, damaged: checks.append(checked),
                           stop=lambda: len(checks) >= 2)
    assert stopped["interrupted"] and stopped["checked"] == 2 and stopped["damaged"] == 1, stopped
    rest = admin.verify(cache)
    assert rest == {"checked": stopped["total"] - 1, "damaged": 0, "total": stopped["total"] - 1,
                    "interrupted": False}

    # Restarted, Sprox serves the big object exactly, the stall long gone.
    proxy.clear()
    sprox = serve(start_sprox, tmp_path, proxy)
    answer = s3_client(sprox.endpoint).get_object(Bucket="warm2", Key=big)
    body = answer["Body"].read()
    assert len(body) == big_size and check_bytes(big, 0, body) is None
    assert answer["ResponseMetadata"]["HTTPHeaders"]["x-cache"] == "PARTIAL"


def admin_records(cache):
    from sprox.cache.index import CacheIndex

    index = CacheIndex(cache / "index.sqlite")
    index.open()
    try:
        return list(index.records())
    finally:
        index.close()
