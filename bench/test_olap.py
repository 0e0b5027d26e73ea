"""OLAP engines reading Parquet over S3: TPC-H lineitem (>= 1 GB of Parquet at the
full-mode scale factor, 6) served by bench/upstream.py as S3 serves it: a 20 ms
first-byte latency, and each GET's body paced at 80 MB/s (SPROX_BENCH_LATENCY_MS,
SPROX_BENCH_BANDWIDTH_MBPS).

For DuckDB (httpfs) and DataFusion, four queries (TPC-H Q1 and Q6, a selective range
of order keys that row-group statistics prune to a few row groups, and `wide`: a third
of the 240 columns of a wide table in 16k-row groups, many ~128 KiB range reads; see
bench/datasets.py wide_table), each in six modes:

- `local`: the engine reads the Parquet files from local disk (the floor);
- `direct`: the engine talks to the upstream itself;
- `sprox-cold`: through a fresh Sprox (new, empty cache directory) in front of the
  upstream;
- `nginx-cold`: the same through the peer a user would pick instead, nginx
  `proxy_cache` with 1 MiB slices (bench/harness.py NGINX_PROXY_CACHE_CONF), one
  worker, like Sprox's one process;
- `sprox-warm`, `nginx-warm`: through the same two again, after their cold runs filled
  their caches, measured by one test whose sessions alternate between the two (this
  VM's speed drifts by ±15% over minutes: measured one after the other, two equal
  servers could differ by 10%).

Every round opens a fresh engine session, so nothing the engine caches carries from
one round to the next; DuckDB's own HTTP/Parquet caches are also switched off. Each
round's wall time and the upstream's request counts (GET, HEAD, LIST, bytes) are
recorded; results must equal the local run's. Without a cache in Sprox, `sprox-cold`
and `sprox-warm` are both pass-through and are labelled so.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

import pytest

from bench.datasets import TPCH_BUCKET, WIDE_COLUMNS, TpchData, duckdb_extension, tpch_data, wide_table
from bench.harness import (
    TEST_ACCESS_KEY,
    TEST_REGION,
    TEST_SECRET_KEY,
    BenchSprox,
    NginxServer,
    UpstreamProcess,
    sprox_args,
    sprox_mode,
    stats_delta,
)

# Generating the full-mode data set takes minutes the first time (then it is reused).
pytestmark = pytest.mark.timeout(3600)

ENGINES = ("duckdb", "datafusion")
QUERY_NAMES = ("q1", "q6", "selective", "wide")
MODES = ("local", "direct", "sprox-cold", "nginx-cold", "warm")  # warm: Sprox and nginx, alternating


def queries(data: TpchData) -> dict[str, str]:
    """SQL over a table named `lineitem`, valid in both DuckDB and DataFusion."""
    low = data.max_orderkey // 2
    return {
        # TPC-H Q1: a scan of nearly every row, seven columns.
        "q1": """
            SELECT l_returnflag, l_linestatus, sum(l_quantity) AS sum_qty,
                   sum(l_extendedprice) AS sum_base_price,
                   sum(l_extendedprice * (1 - l_discount)) AS sum_disc_price,
                   sum(l_extendedprice * (1 - l_discount) * (1 + l_tax)) AS sum_charge,
                   avg(l_quantity) AS avg_qty, avg(l_extendedprice) AS avg_price,
                   avg(l_discount) AS avg_disc, count(*) AS count_order
            FROM lineitem
            WHERE l_shipdate <= DATE '1998-09-02'
            GROUP BY l_returnflag, l_linestatus
            ORDER BY l_returnflag, l_linestatus""",
        # TPC-H Q6: four columns, a selective filter on all rows.
        "q6": """
            SELECT sum(l_extendedprice * l_discount) AS revenue
            FROM lineitem
            WHERE l_shipdate >= DATE '1994-01-01' AND l_shipdate < DATE '1995-01-01'
              AND l_discount BETWEEN 0.05 AND 0.07 AND l_quantity < 24""",
        # A point-ish lookup: files are sorted by l_orderkey, so row-group statistics
        # leave one or two row groups to read.
        "selective": f"""
            SELECT count(*) AS n, sum(l_extendedprice) AS total, min(l_shipdate) AS first_ship
            FROM lineitem
            WHERE l_orderkey BETWEEN {low} AND {low + 20000}""",
        # The wide table (datasets.wide_table): every third of its 240 columns, in every
        # row group: ~80 small range reads per row group, the pattern of wide OLAP tables.
        "wide": "SELECT count(*) AS n, " + ", ".join(f"sum(c{k}) AS s{k}" for k in range(1, WIDE_COLUMNS, 3))
                + " FROM lineitem",
    }


# -- engines --------------------------------------------------------------------------------


class DuckDBEngine:
    name = "duckdb"

    def __init__(self) -> None:
        self.httpfs = duckdb_extension("httpfs")

    def open(self, endpoint: str | None):
        import duckdb

        con = duckdb.connect()
        con.execute("SET enable_progress_bar = false")
        if endpoint is not None:
            con.execute(f"LOAD '{self.httpfs}'")
            # Measure the network path, not DuckDB's own caches.
            for setting in ("enable_external_file_cache", "enable_http_metadata_cache", "parquet_metadata_cache"):
                try:
                    con.execute(f"SET {setting} = false")
                except duckdb.Error:
                    pass  # not in this DuckDB version
            host = endpoint.removeprefix("http://")
            con.execute(f"CREATE SECRET bench (TYPE s3, KEY_ID '{TEST_ACCESS_KEY}', SECRET '{TEST_SECRET_KEY}', "
                        f"REGION '{TEST_REGION}', ENDPOINT '{host}', URL_STYLE 'path', USE_SSL false)")
        return con

    def run(self, con, source: str, sql: str) -> list[tuple]:
        con.execute(f"CREATE OR REPLACE TEMP VIEW lineitem AS SELECT * FROM read_parquet('{source}/*.parquet')")
        return con.execute(sql).fetchall()

    def close(self, con) -> None:
        con.close()


class DataFusionEngine:
    name = "datafusion"

    def open(self, endpoint: str | None):
        from datafusion import SessionContext

        ctx = SessionContext()
        if endpoint is not None:
            from datafusion.object_store import AmazonS3

            store = AmazonS3(bucket_name=TPCH_BUCKET, region=TEST_REGION, access_key_id=TEST_ACCESS_KEY,
                             secret_access_key=TEST_SECRET_KEY, endpoint=endpoint, allow_http=True)
            ctx.register_object_store("s3://", store, TPCH_BUCKET)
        return ctx

    def run(self, ctx, source: str, sql: str) -> list[tuple]:
        ctx.register_parquet("lineitem", source + "/")
        table = ctx.sql(sql).to_arrow_table()
        return [tuple(row.values()) for row in table.to_pylist()]

    def close(self, ctx) -> None:
        pass


def same_rows(got: list[tuple], want: list[tuple]) -> bool:
    if len(got) != len(want):
        return False
    for a_row, b_row in zip(got, want):
        if len(a_row) != len(b_row):
            return False
        for a, b in zip(a_row, b_row):
            if isinstance(a, (float, Decimal)) and isinstance(b, (float, Decimal)):
                # Parallel aggregation sums floats in any order.
                if not math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-9):
                    return False
            elif a != b:
                return False
    return True


# -- fixture ----------------------------------------------------------------------------------


@dataclass
class Olap:
    settings: object
    data: TpchData
    upstream: UpstreamProcess
    start_sprox: Callable[..., BenchSprox]
    stop_sprox: Callable[[BenchSprox], None]
    work: Path
    engines: dict
    sql: dict[str, str]
    expected: dict[tuple[str, str], list[tuple]]
    warm: dict[tuple[str, str, str], object]  # (engine, query, "sprox"|"nginx") -> its server, filled

    def new_server(self, kind: str):
        """A fresh Sprox, or nginx proxy_cache peer, with an empty cache."""
        if kind == "nginx":
            upstream = self.upstream.endpoint.removeprefix("http://")
            return NginxServer(self.work / f"nginx-{time.monotonic_ns()}", proxy_to=upstream).start()
        cache = self.work / f"cache-{time.monotonic_ns()}"
        return self.start_sprox(*sprox_args(upstream=self.upstream.endpoint, cache_dir=cache,
                                            cache_size=f"{max(2, int(3 * self.data.total_bytes / 2**30) + 1)}GiB"))

    def stop_server(self, server) -> None:
        if isinstance(server, NginxServer):
            server.stop()
        else:
            self.stop_sprox(server)

    def source(self, mode: str, query: str) -> str:
        table = "wide" if query == "wide" else "lineitem"  # (each engine reads it as `lineitem`)
        if mode == "local":
            return str(self.data.root / TPCH_BUCKET / table)
        return f"s3://{TPCH_BUCKET}/{table}"


@pytest.fixture(scope="module")
def olap(bench_settings, start_sprox, tmp_path_factory) -> Olap:
    try:
        import datafusion  # noqa: F401
        import duckdb  # noqa: F401
    except ImportError as exc:
        from bench.harness import missing

        missing(f"{exc.name} is not installed")
    duckdb_extension("httpfs")
    data = tpch_data(bench_settings)
    wide_table(data)
    work = tmp_path_factory.mktemp("olap")
    upstream = UpstreamProcess(work / "upstream", data.root, bench_settings.upstream_latency_ms,
                               bench_settings.upstream_bandwidth_mbps).start()
    olap = Olap(bench_settings, data, upstream, start_sprox, start_sprox.stop, work,
                {"duckdb": DuckDBEngine(), "datafusion": DataFusionEngine()}, queries(data), {}, {})
    yield olap
    for server in olap.warm.values():
        olap.stop_server(server)
    upstream.stop()


# At least, for the warm and local modes (full mode; short mode: 1 warm, 3 local): warm
# sessions vary by ±10%.
WARM_ROUNDS = 9
PARAMS = [(e, q, m) for e in ENGINES for q in QUERY_NAMES for m in MODES]


def session_record(olap: Olap, key: tuple[str, str], label: str, rows: list[tuple], seconds: float,
                   before: dict | None) -> dict:
    """What a finished session measured: its seconds and the upstream requests since
    `before` (an upstream /_stats snapshot; None for local files). Its rows must equal
    the local run's."""
    assert same_rows(rows, olap.expected[key]), f"{label}: {rows} != {olap.expected[key]}"
    return {"seconds": seconds, **(stats_delta(before, olap.upstream.stats()) if before is not None else {})}


def timed_session(olap: Olap, eng, endpoint: str, source: str, sql: str, key: tuple[str, str]) -> dict:
    """One fresh engine session through `endpoint`, outside pytest-benchmark's timing."""
    before = olap.upstream.stats()
    session = eng.open(endpoint)
    started = time.perf_counter()
    try:
        rows = eng.run(session, source, sql)
    finally:
        seconds = time.perf_counter() - started
        eng.close(session)
    return session_record(olap, key, f"{eng.name} {key[1]} {endpoint}", rows, seconds, before)


def warm_server(olap: Olap, eng, kind: str, source: str, sql: str, key: tuple[str, str]):
    """The `kind` server its cold test filled, or (that test did not run, e.g. -k) a
    new one filled by one unmeasured session."""
    proc = olap.warm.get((*key, kind))
    if proc is None:
        proc = olap.new_server(kind)
        olap.warm[(*key, kind)] = proc
        timed_session(olap, eng, proc.endpoint, source, sql, key)
    return proc


@pytest.mark.parametrize(("engine", "query", "mode"), PARAMS, ids=[f"{e}-{q}-{m}" for e, q, m in PARAMS])
def test_olap(benchmark, olap: Olap, results, engine: str, query: str, mode: str) -> None:
    """One mode's rounds, each a fresh engine session. The `warm` mode measures Sprox
    and the nginx peer together: their sessions alternate (nginx, Sprox, Sprox, nginx,
    nginx, Sprox, ...), so the VM's drift over minutes (±15% here) falls on both alike,
    and it records a `sprox-warm` and an `nginx-warm` row; pytest-benchmark times the
    Sprox sessions."""
    settings = olap.settings
    eng = olap.engines[engine]
    sql = olap.sql[query]
    source = olap.source(mode, query)
    key = (engine, query)

    if key not in olap.expected:
        session = eng.open(None)
        try:
            olap.expected[key] = eng.run(session, olap.source("local", query), sql)
        finally:
            eng.close(session)

    kind = "sprox" if mode == "warm" else mode.partition("-")[0]  # "sprox" or "nginx" for the caching modes
    server: dict[str, object] = {"proc": None}
    peer = None  # the warm mode's nginx, whose sessions alternate with Sprox's
    peer_rounds: list[dict] = []
    if mode == "warm":
        server["proc"] = warm_server(olap, eng, "sprox", source, sql, key)
        peer = warm_server(olap, eng, "nginx", source, sql, key)

    def peer_round() -> None:
        peer_rounds.append(timed_session(olap, eng, peer.endpoint, source, sql, key))

    rounds: list[dict] = []
    pending: dict = {}

    def finish_round() -> None:
        if pending:
            rounds.append(session_record(olap, key, f"{engine} {query} {mode}", pending.pop("rows"),
                                         pending.pop("seconds"), pending.pop("before")))

    def setup():
        finish_round()
        if peer is not None and len(rounds) % 2 == 0:
            if rounds:
                peer_round()  # after the odd Sprox round before this one
            peer_round()  # before this even one
        if mode.endswith("-cold"):
            if server["proc"] is not None:
                olap.stop_server(server["proc"])
            server["proc"] = olap.new_server(kind)
        endpoint = None
        if mode == "direct":
            endpoint = olap.upstream.endpoint
        elif server["proc"] is not None:
            endpoint = server["proc"].endpoint
        session = eng.open(endpoint)
        pending["before"] = olap.upstream.stats() if endpoint else None
        pending["session"] = session
        return (session,), {}

    def one_round(session) -> None:
        started = time.perf_counter()
        try:
            pending["rows"] = eng.run(session, source, sql)
        finally:
            pending["seconds"] = time.perf_counter() - started
            eng.close(pending.pop("session"))

    label = "sprox-warm" if mode == "warm" else mode
    if label.startswith("sprox"):
        label = f"{label} ({sprox_mode()})"
    benchmark.group = f"olap {engine} {query}"
    benchmark.name = f"{engine} {query} {label}" + (" (alternating with nginx-warm)" if peer is not None else "")
    # Warm and local rounds take a second or two, and vary by 1.5x from session to
    # session: they get more rounds (each a fresh session) for a median that holds.
    # Cold and direct rounds take 5-20 s each.
    rounds_wanted = settings.olap_rounds
    if mode == "local" or (mode == "warm" and not settings.short):
        rounds_wanted = max(settings.olap_rounds, 3 if settings.short else WARM_ROUNDS)
    benchmark.pedantic(one_round, setup=setup, rounds=rounds_wanted, iterations=1)
    finish_round()
    if peer is not None and len(rounds) % 2 == 0:
        peer_round()  # after the last, odd, Sprox round
    if mode.endswith("-cold") and server["proc"] is not None:
        previous = olap.warm.pop((*key, kind), None)
        if previous is not None:
            olap.stop_server(previous)
        olap.warm[(*key, kind)] = server["proc"]  # the warm test reuses what this one filled
    if mode == "warm":
        for name in ("sprox", "nginx"):
            olap.stop_server(olap.warm.pop((*key, name)))

    def result_row(row_mode: str, measured: list[dict]) -> dict:
        seconds = [r["seconds"] for r in measured]
        median_round = sorted(measured, key=lambda r: r["seconds"])[len(measured) // 2]
        return {
            "engine": engine, "query": query, "mode": row_mode, "tpch_sf": olap.data.sf,
            "parquet_bytes": olap.data.total_bytes, "parquet_files": len(olap.data.files), "rows": olap.data.rows,
            "upstream_latency_ms": settings.upstream_latency_ms,
            "upstream_bandwidth_mbps": settings.upstream_bandwidth_mbps, "rounds": len(measured),
            "seconds": statistics.median(seconds), "seconds_min": min(seconds), "seconds_all": seconds,
            **{f"upstream_{k}": median_round.get(k) for k in ("GET", "HEAD", "LIST", "OTHER", "get_body_bytes")},
            "upstream_GET_all": [r.get("GET") for r in measured],
        }

    row = result_row("sprox-warm" if mode == "warm" else mode, rounds)
    results.add("olap", row)
    if peer is not None:
        results.add("olap", result_row("nginx-warm", peer_rounds))
    benchmark.extra_info.update({k: v for k, v in row.items() if not isinstance(v, list)})
