"""`sprox report` over known traffic: a real Sprox (subprocess) serves a scripted
sequence of reads whose outcomes and bytes the test counts from the answers; after a
clean stop, the JSON report must give exactly those figures."""

from __future__ import annotations

import json
import subprocess
import sys

import boto3
from botocore.config import Config

from tests.data import object_bytes

KiB = 1024


def run_report(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sprox", "report", *args], capture_output=True, text=True,
                          timeout=120)


def test_report_figures_match_the_traffic_that_made_them(start_sprox, tmp_path):
    cache_dir = tmp_path / "cache"
    proc = start_sprox(tmp_path, "--origin-dir", str(tmp_path / "origin"), "--cache-dir", str(cache_dir),
                       "--block-size", "64KiB", "--ttl", "3600")
    s3 = boto3.session.Session(aws_access_key_id="k", aws_secret_access_key="s", region_name="us-east-1").client(
        "s3", endpoint_url=proc.endpoint, config=Config(s3={"addressing_style": "path"},
                                                        retries={"max_attempts": 1}))
    s3.create_bucket(Bucket="rep")
    sizes = {"hot/a": 300 * KiB, "hot/b": 100 * KiB, "cold/c": 50 * KiB}
    for key, size in sizes.items():
        s3.put_object(Bucket="rep", Key=key, Body=object_bytes(key, size))

    reads = [("hot/a", None), ("hot/a", None), ("hot/a", "bytes=0-999"), ("hot/a", "bytes=70000-200000"),
             ("hot/b", "bytes=10-20"), ("hot/b", None), ("hot/b", None), ("cold/c", None)]
    outcomes = {"HIT": 0, "MISS": 0, "PARTIAL": 0}
    sent = {"HIT": 0, "MISS": 0, "PARTIAL": 0}
    for key, byte_range in reads:
        extra = {"Range": byte_range} if byte_range else {}
        answer = s3.get_object(Bucket="rep", Key=key, **extra)
        body = answer["Body"].read()
        outcome = answer["ResponseMetadata"]["HTTPHeaders"]["x-cache"]
        outcomes[outcome] += 1
        sent[outcome] += len(body)
    assert outcomes["HIT"] >= 4 and outcomes["MISS"] >= 2  # the script's shape, before the report's
    proc.stop()  # a clean stop closes the access log's file

    result = run_report("--cache-dir", str(cache_dir), "--format", "json", "--get-price", "1", "--transfer-price", "2")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)

    ratio = report["hit_ratio"]
    assert (ratio["hits"], ratio["misses"], ratio["partial"]) == (outcomes["HIT"], outcomes["MISS"], outcomes["PARTIAL"])
    handled = sum(outcomes.values())
    assert ratio["requests"] == outcomes["HIT"] / handled
    assert ratio["bytes_sent"] == sum(sent.values())
    by_outcome = {row["outcome"]: row for row in report["outcomes"]}
    for outcome, count in outcomes.items():
        if count:
            assert (by_outcome[outcome]["requests"], by_outcome[outcome]["bytes_sent"]) == (count, sent[outcome])
            if outcome == "HIT":
                assert by_outcome[outcome]["upstream_requests"] == 0
    # Hits fetched nothing, so every byte they sent came from the cache.
    assert ratio["bytes_from_cache"] >= sent["HIT"]

    savings = report["savings"]
    assert savings["object_reads"] == len(reads)
    assert savings["upstream_gets_avoided"] == len(reads) - savings["upstream_requests"]
    assert savings["upstream_bytes_avoided"] == savings["bytes_sent"] - savings["upstream_bytes"]
    assert savings["dollars_saved"] == savings["upstream_gets_avoided"] / 1000 * 1 \
        + savings["upstream_bytes_avoided"] / 1e9 * 2

    assert report["totals"]["requests"] == len(reads) + len(sizes) + 1  # + the PUTs and CreateBucket
    prefixes = {row["name"]: row for row in report["by_prefix"]}
    assert prefixes["rep/hot/"]["requests"] == 7 and prefixes["rep/cold/"]["requests"] == 1
    top = report["top_objects"][0]
    assert (top["key"], top["requests"]) == ("hot/a", 4)
    assert {row["outcome"] for row in report["latency_ms"]} == {o for o, n in outcomes.items() if n}

    what_if = report["what_if"]
    assert what_if["reads"] == len(reads) and what_if["block_size"] == 64 * KiB
    # Blocks touched: a (300 KiB: 5 blocks), b (2 blocks), c (1 block).
    assert what_if["distinct_blocks"] == 8
    largest = what_if["points"][-1]
    assert largest["cache_blocks"] == 8 and largest["lru_hit_ratio"] == largest["s3fifo_hit_ratio"]

    text = run_report("--cache-dir", str(cache_dir))
    assert text.returncode == 0 and "Hit ratio" in text.stdout and "What-if cache sizes" in text.stdout
    page = tmp_path / "report.html"
    html = run_report("--cache-dir", str(cache_dir), "--format", "html", "--output", str(page))
    assert html.returncode == 0 and page.read_text().count("<svg") == 3


def test_the_log_is_readable_while_written_and_survives_sigkill(start_sprox, tmp_path):
    """A record is readable by `sprox report` within a few seconds (the journal beside
    the open Parquet file); SIGKILL loses nothing that was flushed, and the next start
    publishes it as Parquet."""
    import os
    import signal
    import time

    from sprox.analytics.accesslog import read_access_log

    cache_dir = tmp_path / "cache"
    args = ("--origin-dir", str(tmp_path / "origin"), "--cache-dir", str(cache_dir))
    proc = start_sprox(tmp_path, *args)
    s3 = boto3.session.Session(aws_access_key_id="k", aws_secret_access_key="s", region_name="us-east-1").client(
        "s3", endpoint_url=proc.endpoint, config=Config(s3={"addressing_style": "path"},
                                                        retries={"max_attempts": 1}))
    s3.create_bucket(Bucket="log")
    s3.put_object(Bucket="log", Key="k", Body=b"x" * 1000)
    ids = {s3.get_object(Bucket="log", Key="k")["ResponseMetadata"]["RequestId"] for _ in range(20)}
    logs = cache_dir / "logs"

    def logged() -> set[str]:
        return set(read_access_log(logs).column("request_id").to_pylist())

    deadline = time.monotonic() + 30  # flushed every 5 s
    while not ids <= logged():
        assert time.monotonic() < deadline, "records not readable while Sprox runs"
        time.sleep(0.2)
    report = run_report("--logs", str(logs), "--format", "json")
    assert report.returncode == 0, report.stderr
    assert json.loads(report.stdout)["hit_ratio"]["hits"] >= 19
    assert not list(logs.glob("*.parquet"))  # (all of it from the journal: the file is open)

    os.killpg(proc.pid, signal.SIGKILL)
    proc.stop()
    assert ids <= logged()  # a dead writer's journal is read as it is
    again = start_sprox(tmp_path, *args)  # (the log starts before Sprox listens)
    assert list(logs.glob("*.parquet")) and not list(logs.glob("*.journal"))
    assert "recovered" in again.log_text()
    again.stop()
    assert not [p.name for p in logs.iterdir() if not p.name.endswith(".parquet")]
    table = read_access_log(logs)
    assert ids <= set(table.column("request_id").to_pylist())
    assert len(set(table.column("request_id").to_pylist())) == table.num_rows  # nothing twice
