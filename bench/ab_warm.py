"""Warm OLAP sessions, Sprox against nginx proxy_cache, interleaved session by session.

    python -m bench.ab_warm wide duckdb --sessions 12

`test_olap.py` runs all of one server's warm sessions, then the other's; on a VM whose
speed drifts by ±15% over minutes, that can put a 10% difference between two servers
that are equal. Here both warm caches stand side by side (each filled by one session
first) and the sessions alternate (Sprox, nginx, nginx, Sprox, ...), so drift falls
on both alike. It also times `ListObjectsV2` (boto3) direct, through Sprox and through
nginx, the one request of a warm query that reaches the upstream (neither caches
listings by default).

Same data, upstream (20 ms first-byte latency, `--latency-ms`; GET bodies paced as
SPROX_BENCH_BANDWIDTH_MBPS says, 80 MB/s by default) and servers as test_olap.py;
everything binds 127.0.0.1, runs a bounded number of sessions and stops what it
started. Prints the medians; `bench/README.md` says when to use it.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from bench.datasets import TPCH_BUCKET, tpch_data, wide_table
from bench.harness import (
    TEST_ACCESS_KEY,
    TEST_REGION,
    TEST_SECRET_KEY,
    BenchSprox,
    NginxServer,
    Settings,
    UpstreamProcess,
    sprox_args,
)
from bench.test_olap import QUERY_NAMES, DataFusionEngine, DuckDBEngine, queries

LIST_CALLS = 30  # per endpoint; the first 5 warm the connection and are not counted


def warm_sessions(engine, endpoints: dict[str, str], source: str, sql: str, sessions: int) -> dict[str, list[float]]:
    """Seconds of each warm session per server; one unmeasured session each first fills
    its cache."""
    times: dict[str, list[float]] = {name: [] for name in endpoints}
    names = list(endpoints)
    for turn in range(sessions + 1):
        order = names if turn % 2 == 0 else names[::-1]
        for name in order:
            session = engine.open(endpoints[name])
            try:
                started = time.perf_counter()
                engine.run(session, source, sql)
                elapsed = time.perf_counter() - started
            finally:
                engine.close(session)
            if turn > 0:
                times[name].append(elapsed)
    return times


def list_latency(endpoint: str, prefix: str) -> float:
    """Median milliseconds of a boto3 ListObjectsV2 of `prefix` against `endpoint`."""
    import boto3
    from botocore.config import Config

    s3 = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=TEST_ACCESS_KEY,
                      aws_secret_access_key=TEST_SECRET_KEY, region_name=TEST_REGION,
                      config=Config(s3={"addressing_style": "path"}))
    seconds = []
    for _ in range(LIST_CALLS):
        started = time.perf_counter()
        s3.list_objects_v2(Bucket=TPCH_BUCKET, Prefix=prefix)
        seconds.append(time.perf_counter() - started)
    return 1000 * statistics.median(seconds[5:])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ab_warm", description=__doc__.split("\n\n")[0])
    parser.add_argument("query", choices=QUERY_NAMES)
    parser.add_argument("engine", choices=("duckdb", "datafusion"))
    parser.add_argument("--sessions", type=int, default=12, help="measured warm sessions per server (12)")
    parser.add_argument("--latency-ms", type=float, default=20.0, help="upstream first-byte latency (20)")
    args = parser.parse_args(argv)
    if args.sessions < 1:
        parser.error("--sessions must be at least 1")

    settings = Settings.load()
    data = tpch_data(settings)
    wide_table(data)
    sql = queries(data)[args.query]
    table = "wide" if args.query == "wide" else "lineitem"
    source = f"s3://{TPCH_BUCKET}/{table}"
    engine = DuckDBEngine() if args.engine == "duckdb" else DataFusionEngine()

    with tempfile.TemporaryDirectory(prefix="sprox-ab-") as tmp:
        work = Path(tmp)
        upstream = UpstreamProcess(work / "upstream", data.root, args.latency_ms,
                                   settings.upstream_bandwidth_mbps).start()
        nginx = sprox = None
        try:
            nginx = NginxServer(work / "nginx", proxy_to=upstream.endpoint.removeprefix("http://")).start()
            cache_size = f"{max(2, int(3 * data.total_bytes / 2**30) + 1)}GiB"
            sprox = BenchSprox(work / "sprox", *sprox_args(upstream=upstream.endpoint, cache_dir=work / "cache",
                                                           cache_size=cache_size)).start()
            times = warm_sessions(engine, {"sprox": sprox.endpoint, "nginx": nginx.endpoint}, source, sql,
                                  args.sessions)
            lists = {name: list_latency(endpoint, f"{table}/") for name, endpoint in
                     (("direct", upstream.endpoint), ("sprox", sprox.endpoint), ("nginx", nginx.endpoint))}
        finally:
            if sprox is not None:
                sprox.stop(grace=10)
            if nginx is not None:
                nginx.stop()
            upstream.stop()

    print(f"{args.engine} {args.query}, warm, {args.sessions} interleaved sessions each "
          f"(upstream first-byte latency {args.latency_ms:g} ms):")
    for name, seconds in times.items():
        print(f"  {name:6} median {statistics.median(seconds):.3f} s, min {min(seconds):.3f} s")
    ratio = statistics.median(times["sprox"]) / statistics.median(times["nginx"])
    print(f"  Sprox / nginx (median seconds): {ratio:.3f}")
    print("ListObjectsV2 (boto3), median ms: " + ", ".join(f"{name} {ms:.1f}" for name, ms in lists.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
