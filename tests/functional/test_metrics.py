"""`/_sprox/metrics` over known traffic: a real Sprox (subprocess), scripted reads whose
outcomes the test counts from the answers, then the exposition's figures."""

from __future__ import annotations

import re
import time
import urllib.request

import boto3
from botocore.config import Config

from tests.data import object_bytes

SAMPLE = re.compile(r'^([a-z_]+)(?:\{(.*)\})? (\S+)$')


def scrape(endpoint: str) -> dict[tuple[str, tuple], float]:
    with urllib.request.urlopen(f"{endpoint}/_sprox/metrics", timeout=10) as response:
        assert response.headers["Content-Type"].startswith("text/plain")
        text = response.read().decode()
    samples = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            assert line.startswith(("# HELP ", "# TYPE ")) or not line, line
            continue
        match = SAMPLE.match(line)
        assert match, f"not a Prometheus sample line: {line!r}"
        name, labels, value = match.groups()
        pairs = tuple(sorted(re.findall(r'(\w+)="([^"]*)"', labels or "")))
        samples[(name, pairs)] = float(value)
    return samples


def test_metrics_count_what_was_served(start_sprox, tmp_path):
    proc = start_sprox(tmp_path, "--origin-dir", str(tmp_path / "origin"), "--cache-dir", str(tmp_path / "cache"),
                       "--block-size", "64KiB", "--ttl", "3600")
    s3 = boto3.session.Session(aws_access_key_id="k", aws_secret_access_key="s", region_name="us-east-1").client(
        "s3", endpoint_url=proc.endpoint, config=Config(s3={"addressing_style": "path"},
                                                        retries={"max_attempts": 1}))
    s3.create_bucket(Bucket="met")
    body = object_bytes("met/obj", 200_000)
    s3.put_object(Bucket="met", Key="obj", Body=body)
    outcomes: dict[str, int] = {}
    sent: dict[str, int] = {}
    for extra in ({}, {}, {"Range": "bytes=0-99"}, {"Range": "bytes=100000-199999"}):
        answer = s3.get_object(Bucket="met", Key="obj", **extra)
        data = answer["Body"].read()
        outcome = answer["ResponseMetadata"]["HTTPHeaders"]["x-cache"]
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
        sent[outcome] = sent.get(outcome, 0) + len(data)

    # A fill writes its last block (and is timed) after its answer: scrape again until
    # the cache has settled, within a bound.
    deadline = time.monotonic() + 15
    while True:
        m = scrape(proc.endpoint)
        settled = m[("sprox_cache_blocks", ())] == 4 and \
            m[("sprox_cache_fill_seconds_count", ())] == m[("sprox_cache_fills_total", ())]
        if settled or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert m[("sprox_requests_total", (("operation", "GetObject"), ("status", "2xx")))] == 4
    assert m[("sprox_requests_total", (("operation", "PutObject"), ("status", "2xx")))] == 1
    for outcome, count in outcomes.items():
        assert m[("sprox_object_reads_total", (("outcome", outcome),))] == count
        assert m[("sprox_sent_bytes_total", (("outcome", outcome),))] == sent[outcome]
        assert m[("sprox_get_latency_seconds_count", (("outcome", outcome),))] == count
        assert m[("sprox_get_latency_seconds_bucket", (("le", "+Inf"), ("outcome", outcome)))] == count
    assert m[("sprox_cache_objects", ())] == 1
    assert m[("sprox_cache_blocks", ())] == 4  # 200,000 bytes in 64 KiB blocks
    assert m[("sprox_cache_bytes", ())] == len(body)
    fills = m[("sprox_cache_fills_total", ())]
    assert fills >= 1 and m[("sprox_cache_fill_seconds_count", ())] == fills
    assert m[("sprox_fast_lane_hits_total", ())] <= outcomes.get("HIT", 0)
    assert m[("sprox_connections", ())] >= 1  # the scrape's own, at least
    assert m[("sprox_connections_refused_total", ())] == 0
