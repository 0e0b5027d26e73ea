"""Render the benchmark results (bench/results/<table>-<run id>.parquet) into the
comparison tables the README shows, with DataFusion SQL over the Parquet files.

    python -m bench.report                          # latest run of each table, Markdown
    python -m bench.report --run 20261125T035203    # one run (every table that has it)
    python -m bench.report --mode full --table hits --format text

Tables: `hits` (cached hits, Sprox vs nginx: req/s, GB/s, ratio, CPU per request),
`olap` (direct vs Sprox cold vs warm vs local files: seconds and upstream GETs) and
`io` (io_uring vs the thread pool: cold reads and block fills). `latest` means, per
table, the newest run that has rows for it (run ids are timestamps), after `--mode`.

Files written by older harnesses stay readable: a column a file lacks is null there and
shows as "–"; a column whose type changed between runs is widened (ints to floats).
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
from datafusion import SessionContext

BENCH_DIR = Path(__file__).resolve().parent
DEFAULT_RESULTS = Path(os.environ.get("SPROX_BENCH_RESULTS_DIR", BENCH_DIR / "results"))
MISSING = "–"
TABLES = ("hits", "olap", "io")

_F, _I, _S, _B = pa.float64(), pa.int64(), pa.string(), pa.bool_()
_RUN = {"run_id": _S, "git_commit": _S, "short_mode": _B, "sprox_mode": _S, "pinned": _B, "cpus": _I,
        "cpu_model": _S}
# The columns each table's SQL reads, with their types: added as nulls where no file has
# them (older harnesses), so the queries always plan.
COLUMNS: dict[str, dict[str, pa.DataType]] = {
    "hits": {**_RUN, "case": _S, "server": _S, "range_size": _I, "response_bytes": _I, "body_bytes": _I,
             "requests": _I, "rounds": _I, "rps": _F,
             "gbps": _F, "server_cpu_us_per_req": _F, "server_cpu_pct": _F, "loadgen_cpu_pct": _F,
             "server_core_busy": _F, "server_core_other": _F, "client_core_busy": _F, "client_core_other": _F,
             "latency_us_p99": _F},
    "olap": {**_RUN, "engine": _S, "query": _S, "mode": _S, "seconds": _F, "upstream_GET": _F, "tpch_sf": _F,
             "rows": _I, "parquet_bytes": _I, "parquet_files": _I, "upstream_latency_ms": _F,
             "upstream_bandwidth_mbps": _F, "rounds": _I, "upstream_get_body_bytes": _F},
    "io": {**_RUN, "kind": _S, "case": _S, "backend": _S, "mbps": _F, "own_cpu_us_per_op": _F,
           "own_cpu_pct": _F, "bound_by": _S, "noise_pct_max": _F, "noise_our_core_pct_max": _F,
           "rounds": _I, "io_threads": _I, "depth": _I, "target_ratio": _F},
}
ROW = "_row"  # file order, then row order within a file: the order the benchmarks ran
BUSY = 90.0  # a pinned core this busy with one side's own work: that side set the pace


class ReportError(Exception):
    """No results to render (empty directory, unknown run)."""


# -- loading ------------------------------------------------------------------------------


def load(results_dir: Path, ctx: SessionContext | None = None) -> SessionContext:
    """A DataFusion session with one table per result kind (`hits`, `olap`, `io`): every
    `<table>-*.parquet` in `results_dir`, schemas merged, plus `_row` (run order). A file
    DataFusion cannot read is skipped with a warning on stderr."""
    ctx = ctx or SessionContext()
    for table, required in COLUMNS.items():
        parts = []
        for path in sorted(Path(results_dir).glob(f"{table}-*.parquet")):
            try:
                data = ctx.read_parquet(str(path)).to_arrow_table()
            except Exception as error:  # noqa: BLE001 - a half-written file must not hide the rest
                print(f"bench.report: skipping {path}: {error}", file=sys.stderr)
                continue
            if "run_id" not in data.column_names:
                data = data.append_column("run_id", pa.array([path.stem.split("-", 1)[1]] * len(data), _S))
            parts.append(data)
        ctx.from_arrow(_merge(parts, required), name=table)
    return ctx


def _merge(parts: Sequence[pa.Table], required: Mapping[str, pa.DataType]) -> pa.Table:
    """One table from files whose columns differ: a missing column is null; a column with
    numeric types in different files becomes float64, with mixed kinds text."""
    names: dict[str, list[pa.DataType]] = {}
    for part in parts:
        for f in part.schema:
            names.setdefault(f.name, []).append(f.type)
    target: dict[str, pa.DataType] = {}
    for name, types in names.items():
        kinds = {t for t in types if not pa.types.is_null(t)}
        if name in required:
            target[name] = required[name]
        elif len(kinds) <= 1:
            target[name] = kinds.pop() if kinds else pa.null()
        elif all(pa.types.is_integer(t) or pa.types.is_floating(t) for t in kinds):
            target[name] = _F
        else:
            target[name] = _S
    for name, kind in required.items():
        target.setdefault(name, kind)
    columns: dict[str, list[pa.Array]] = {name: [] for name in target}
    for part in parts:
        for name, kind in target.items():
            if name not in part.column_names:
                columns[name].append(pa.nulls(len(part), kind))
                continue
            column = part.column(name).combine_chunks() if len(part) else pa.array([], part.schema.field(name).type)
            try:
                columns[name].append(column.cast(kind, safe=False))
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                print(f"bench.report: column {name}: {column.type} is not {kind}; shown blank", file=sys.stderr)
                columns[name].append(pa.nulls(len(part), kind))
    total = sum(len(p) for p in parts)
    arrays = {name: pa.concat_arrays(chunks) if chunks else pa.array([], target[name])
              for name, chunks in columns.items()}
    arrays[ROW] = pa.array(range(total), _I)
    return pa.table(arrays)


def _rows(ctx: SessionContext, sql: str, **params: object) -> list[dict]:
    return ctx.sql(sql, param_values=params or None).to_arrow_table().to_pylist()


def select_run(ctx: SessionContext, table: str, run: str = "latest", mode: str = "any",
               sprox_mode: str = "any") -> str | None:
    """The run to render for `table`: `run` itself if the table has rows for it, or for
    `latest` its newest run; only runs of benchmark mode `mode` (any, full, short) and
    Sprox mode `sprox_mode` (any, cache, passthrough). None when there is no such run."""
    where = [{"any": "TRUE", "full": "short_mode = FALSE", "short": "short_mode = TRUE"}[mode]]
    params: dict[str, object] = {}
    if sprox_mode != "any":
        where.append("sprox_mode = $sprox_mode")
        params["sprox_mode"] = sprox_mode
    if run != "latest":
        where.append("run_id = $run")
        params["run"] = run
    found = _rows(ctx, f"SELECT max(run_id) AS run FROM {table} WHERE {' AND '.join(where)}", **params)
    return found[0]["run"] if found else None


# -- tables -------------------------------------------------------------------------------


@dataclass
class Table:
    """A rendered comparison: a caption, column headers and rows of text cells."""

    name: str
    run_id: str
    caption: str
    headers: list[str]
    rows: list[list[str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _context(ctx: SessionContext, table: str, run_id: str) -> dict:
    return _rows(ctx, f"SELECT git_commit, short_mode, sprox_mode, pinned, cpus, cpu_model FROM {table} "
                      f"WHERE run_id = $run ORDER BY {ROW} LIMIT 1", run=run_id)[0]


def _describe(run_id: str, info: Mapping[str, object]) -> str:
    short = info.get("short_mode")
    mode = "mode unknown" if short is None else "short mode" if short else "full mode"
    return f"run {run_id}, commit {info.get('git_commit') or MISSING}, {mode}"


def _sprox(info: Mapping[str, object]) -> str:
    return {"cache": "Sprox with its cache", "passthrough": "Sprox as a pass-through (no cache)"}.get(
        info.get("sprox_mode"), "Sprox mode unknown")  # type: ignore[arg-type]


# Per row: the pinned cores' busy time used by the server and by the load generator
# (whole-core view, others' share taken out; older rows: the processes' own CPU %).
_OWN_BUSY = """
    CASE WHEN server_core_busy IS NULL THEN server_cpu_pct
         ELSE server_core_busy - coalesce(server_core_other, 0) END AS server_busy,
    CASE WHEN client_core_busy IS NULL THEN loadgen_cpu_pct
         ELSE client_core_busy - coalesce(client_core_other, 0) END AS generator_busy,
    greatest(server_core_other, client_core_other) AS noise"""

HITS_SQL = f"""
WITH run AS (
    SELECT *, {_OWN_BUSY},
           -- bytes per response (older files: only the round's total, body_bytes)
           coalesce(CAST(response_bytes AS DOUBLE), CAST(body_bytes AS DOUBLE) / nullif(requests, 0)) AS size,
           row_number() OVER (PARTITION BY "case", server ORDER BY {ROW} DESC) AS nth
    FROM hits WHERE run_id = $run
),
latest AS (SELECT * FROM run WHERE nth = 1),
cases AS (
    SELECT "case", min({ROW}) AS first_row, max(range_size) AS range_size, max(size) AS size
    FROM latest GROUP BY "case"
)
SELECT c."case", c.range_size, c.size,
       n.rps AS nginx_rps, n.gbps AS nginx_gbps, n.server_cpu_us_per_req AS nginx_cpu_us,
       n.server_busy AS nginx_server_busy, n.generator_busy AS nginx_generator_busy,
       n.latency_us_p99 AS nginx_p99_us, s.latency_us_p99 AS sprox_p99_us,
       s.rps AS sprox_rps, s.gbps AS sprox_gbps, s.server_cpu_us_per_req AS sprox_cpu_us,
       s.server_busy AS sprox_server_busy, s.generator_busy AS sprox_generator_busy,
       s.rps / nullif(n.rps, 0) AS ratio,
       greatest(n.noise, s.noise) AS noise, greatest(n.rounds, s.rounds) AS rounds
FROM cases c
LEFT JOIN latest n ON n."case" = c."case" AND n.server = 'nginx'
LEFT JOIN latest s ON s."case" = c."case" AND s.server = 'sprox'
ORDER BY c.range_size IS NULL, c.range_size, c.first_row
"""


def hits_table(ctx: SessionContext, run_id: str) -> Table:
    """Cached hits, Sprox vs nginx (the README's first table). Req/s is shown for bodies
    under 1 MiB, GB/s from 64 KiB up; the ratio is Sprox req/s over nginx req/s (the
    same bytes per request, so also the GB/s ratio)."""
    info = _context(ctx, "hits", run_id)
    rows = _rows(ctx, HITS_SQL, run=run_id)
    noise = [r["noise"] for r in rows if r["noise"] is not None]
    rounds = {r["rounds"] for r in rows if r["rounds"] is not None}
    details = [_describe(run_id, info), _sprox(info),
               "server and load generator pinned to one core each" if info.get("pinned") else "not pinned"]
    if rounds:
        details.append(f"median of {max(rounds)} round{'s' if max(rounds) != 1 else ''}")
    details.append(f"noise on the pinned cores up to {max(noise):.0f}%" if noise else "noise not recorded")
    table = Table("hits", run_id, f"Cached hits ({'; '.join(details)}):",
                  ["cached hits", "nginx", "Sprox", "Sprox / nginx", "CPU per request, nginx / Sprox",
                   "p99 latency, nginx / Sprox"])
    for r in rows:
        size = r["range_size"] or (round(r["size"]) if r["size"] is not None else None)
        label = r["case"] if size is None else (
            f"{_size(size)} ranges" if r["range_size"] is not None else f"whole {_size(size)} objects")
        if r["case"].endswith("-presigned"):
            label += ", presigned"
        cpu = "" if r["nginx_cpu_us"] is None and r["sprox_cpu_us"] is None else \
            f"{_us(r['nginx_cpu_us'])} / {_us(r['sprox_cpu_us'])}"
        notes = [_generator_note(who, r[f"{key}_server_busy"], r[f"{key}_generator_busy"])
                 for who, key in (("nginx", "nginx"), ("Sprox", "sprox"))]
        if any(notes):
            cpu = f"{cpu} ({'; '.join(n for n in notes if n)})".strip()
        p99 = "" if _missing(r["nginx_p99_us"]) and _missing(r["sprox_p99_us"]) else \
            f"{_latency(r['nginx_p99_us'])} / {_latency(r['sprox_p99_us'])}"
        table.rows.append([label, _throughput(r["nginx_rps"], r["nginx_gbps"], size),
                           _throughput(r["sprox_rps"], r["sprox_gbps"], size), _ratio(r["ratio"]), cpu, p99])
    return table


OLAP_MODES = ("direct", "sprox-cold", "sprox-warm", "nginx-cold", "nginx-warm", "local")
OLAP_SQL = f"""
WITH latest AS (
    SELECT * FROM (
        SELECT *, row_number() OVER (PARTITION BY engine, query, mode ORDER BY {ROW} DESC) AS nth
        FROM olap WHERE run_id = $run
    ) WHERE nth = 1
)
SELECT engine, query, min({ROW}) AS first_row,
       {", ".join(f'''max(CASE WHEN mode = '{m}' THEN seconds END) AS "{m}_s",
       max(CASE WHEN mode = '{m}' THEN "upstream_GET" END) AS "{m}_gets",
       max(CASE WHEN mode = '{m}' THEN "upstream_get_body_bytes" END) AS "{m}_bytes"''' for m in OLAP_MODES)}
FROM latest GROUP BY engine, query ORDER BY first_row
"""
_OLAP_SETUP_SQL = """
SELECT max(tpch_sf) AS sf, max(rows) AS rows, max(parquet_bytes) AS bytes, max(parquet_files) AS files,
       max(upstream_latency_ms) AS latency_ms, max(upstream_bandwidth_mbps) AS bandwidth_mbps
FROM olap WHERE run_id = $run
"""
_NAMES = {"duckdb": "DuckDB", "datafusion": "DataFusion", "q1": "Q1", "q6": "Q6",
          "wide": "wide (80 of 240 columns)"}
# The lineitem queries summed per engine: the cold targets (issue 14) are on all three.
LINEITEM_QUERIES = ("q1", "q6", "selective")


def _generator_note(server: str, server_busy: float | None, generator_busy: float | None) -> str | None:
    """Says when the load generator's core was saturated: the server's figure is then a
    lower bound (README: nginx's 1 MiB ranges)."""
    if generator_busy is None or generator_busy < BUSY:
        return None
    if server_busy is not None and server_busy >= BUSY:
        return f"{server}'s core and the load generator's both saturated"
    return f"{server} bound by the load generator"


def olap_table(ctx: SessionContext, run_id: str) -> Table:
    """OLAP: seconds (upstream GETs, MB) direct, through Sprox cold and warm, through nginx
    proxy_cache (1 MiB slices) cold and warm, and from local files (the README's second
    table), and Sprox cold's time and upstream bytes over direct's; Sprox warm is bold
    when Sprox ran with its cache. Each engine's lineitem queries get a summed row."""
    info = _context(ctx, "olap", run_id)
    setup = _rows(ctx, _OLAP_SETUP_SQL, run=run_id)[0]
    cache = info.get("sprox_mode") == "cache"
    data = [f"scale factor {_plain(setup['sf'])}" if setup["sf"] is not None else None,
            None if setup["rows"] is None else f"{setup['rows'] / 1e6:.0f}M rows" if setup["rows"] >= 10e6
            else f"{setup['rows']:,} rows",
            f"{setup['files']} Parquet files" if setup["files"] is not None else None,
            None if setup["bytes"] is None else f"{setup['bytes'] / 1e9:.2f} GB" if setup["bytes"] >= 1e9
            else f"{setup['bytes'] / 1e6:.1f} MB"]
    latency = f"{_plain(setup['latency_ms'])} ms" if setup["latency_ms"] is not None else "unknown"
    # Older runs recorded no pace: their upstream sent bodies as fast as loopback goes.
    pace = (f" and each GET's body paced at {_plain(setup['bandwidth_mbps'])} MB/s"
            if setup["bandwidth_mbps"] else "")
    caption = (f"OLAP ({_describe(run_id, info)}; {_sprox(info)}"
               f"{': cold and warm are both pass-through' if info.get('sprox_mode') == 'passthrough' else ''}): "
               f"TPC-H lineitem{' (' + ', '.join(d for d in data if d) + ')' if any(data) else ''} and a wide table "
               f"(240 columns, 16k-row groups), from an S3-like "
               f"upstream with {latency} first-byte latency{pace}. Seconds (upstream GETs, MB fetched); "
               f"the last column is Sprox cold over direct, time and upstream bytes:")
    table = Table("olap", run_id, caption, ["engine", "query", "direct", "Sprox cold", "Sprox warm", "nginx cold",
                                            "nginx warm", "local files", "cold / direct"])
    rows = _rows(ctx, OLAP_SQL, run=run_id)
    for r in rows:
        warm = _seconds_gets(r["sprox-warm_s"], r["sprox-warm_gets"])
        table.rows.append([_NAMES.get(r["engine"], r["engine"]), _NAMES.get(r["query"], r["query"]),
                           _seconds_gets(r["direct_s"], r["direct_gets"], r["direct_bytes"]),
                           _seconds_gets(r["sprox-cold_s"], r["sprox-cold_gets"], r["sprox-cold_bytes"]),
                           f"**{warm}**" if cache and warm != MISSING else warm,
                           _seconds_gets(r["nginx-cold_s"], r["nginx-cold_gets"], r["nginx-cold_bytes"]),
                           _seconds_gets(r["nginx-warm_s"], r["nginx-warm_gets"]), _seconds(r["local_s"]),
                           _cold_over_direct(r)])
    for engine in dict.fromkeys(r["engine"] for r in rows):
        mine = {r["query"]: r for r in rows if r["engine"] == engine}
        if not all(q in mine for q in LINEITEM_QUERIES):
            continue
        total = {key: _sum(mine[q][key] for q in LINEITEM_QUERIES)
                 for key in ("direct_s", "direct_gets", "direct_bytes", "sprox-cold_s", "sprox-cold_gets",
                             "sprox-cold_bytes", "sprox-warm_s", "sprox-warm_gets")}
        table.rows.append([_NAMES.get(engine, engine), "+".join(_NAMES.get(q, q) for q in LINEITEM_QUERIES),
                           _seconds_gets(total["direct_s"], total["direct_gets"], total["direct_bytes"]),
                           _seconds_gets(total["sprox-cold_s"], total["sprox-cold_gets"], total["sprox-cold_bytes"]),
                           _seconds_gets(total["sprox-warm_s"], total["sprox-warm_gets"]), MISSING, MISSING,
                           MISSING, _cold_over_direct(total)])
    return table


def _sum(values: Iterable[float | None]) -> float | None:
    values = list(values)
    return None if any(_missing(v) for v in values) else sum(values)


def _cold_over_direct(r: Mapping[str, float | None]) -> str:
    if _missing(r["direct_s"]) or _missing(r["sprox-cold_s"]) or not r["direct_s"]:
        return MISSING
    cell = f"{r['sprox-cold_s'] / r['direct_s']:.2f}x time"
    if not _missing(r["direct_bytes"]) and not _missing(r["sprox-cold_bytes"]) and r["direct_bytes"]:
        cell += f", {r['sprox-cold_bytes'] / r['direct_bytes']:.2f}x bytes"
    return cell


IO_SQL = f"""
WITH latest AS (
    SELECT * FROM (
        SELECT *, row_number() OVER (PARTITION BY "case", backend ORDER BY {ROW} DESC) AS nth
        FROM io WHERE run_id = $run
    ) WHERE nth = 1
),
cases AS (SELECT "case", min({ROW}) AS first_row, max(target_ratio) AS target FROM latest GROUP BY "case")
SELECT c."case", c.target,
       t.mbps AS t_mbps, t.own_cpu_us_per_op AS t_cpu_us, t.own_cpu_pct AS t_cpu_pct, t.bound_by AS t_bound,
       u.mbps AS u_mbps, u.own_cpu_us_per_op AS u_cpu_us, u.own_cpu_pct AS u_cpu_pct, u.bound_by AS u_bound,
       u.mbps / nullif(t.mbps, 0) AS mbps_ratio,
       t.own_cpu_us_per_op / nullif(u.own_cpu_us_per_op, 0) AS ops_per_cpu_ratio,
       greatest(t.noise_our_core_pct_max, u.noise_our_core_pct_max,
                CASE WHEN t.noise_our_core_pct_max IS NULL AND u.noise_our_core_pct_max IS NULL
                     THEN greatest(t.noise_pct_max, u.noise_pct_max) END) AS noise
FROM cases c
LEFT JOIN latest t ON t."case" = c."case" AND t.backend = 'threads'
LEFT JOIN latest u ON u."case" = c."case" AND u.backend = 'uring'
ORDER BY c.first_row
"""


def io_table(ctx: SessionContext, run_id: str) -> Table:
    """io_uring vs the thread pool, per case (cold reads, then block fills), as in
    bench/README.md's disk I/O table: MB/s, CPU µs per operation and CPU % of each
    backend, the MB/s ratio, and operations per CPU-second, uring over threads."""
    info = _context(ctx, "io", run_id)
    setup = _rows(ctx, "SELECT max(io_threads) AS threads, max(rounds) AS rounds FROM io WHERE run_id = $run",
                  run=run_id)[0]
    rows = _rows(ctx, IO_SQL, run=run_id)
    details = [_describe(run_id, info)]
    if setup["threads"] is not None:
        details.append(f"thread pool of {setup['threads']}")
    if setup["rounds"] is not None:
        details.append(f"median of {setup['rounds']} round{'s' if setup['rounds'] != 1 else ''}")
    table = Table("io", run_id, f"Disk I/O, io_uring vs threads ({'; '.join(details)}); noise: others' CPU "
                                "% on our core (all cores when not pinned):",
                  ["case", "threads MB/s, CPU µs/op, CPU %", "uring MB/s, CPU µs/op, CPU %", "uring/threads MB/s",
                   "ops per CPU-s, uring/threads", "bound by, threads / uring", "noise %"])
    for r in rows:
        bound = "" if r["t_bound"] is None and r["u_bound"] is None else \
            f"{r['t_bound'] or MISSING} / {r['u_bound'] or MISSING}"
        table.rows.append([r["case"], _io_cell(r["t_mbps"], r["t_cpu_us"], r["t_cpu_pct"]),
                           _io_cell(r["u_mbps"], r["u_cpu_us"], r["u_cpu_pct"]), _ratio(r["mbps_ratio"]),
                           _ratio(r["ops_per_cpu_ratio"]), bound, _int(r["noise"])])
        if r["target"] is not None and r["mbps_ratio"] is not None:
            met = "met" if r["mbps_ratio"] >= r["target"] else "not met"
            table.notes.append(f"Target: uring >= {_plain(r['target'])}x threads on {r['case']}: "
                               f"{_ratio(r['mbps_ratio'])}x, {met}.")
    return table


RENDERERS = {"hits": hits_table, "olap": olap_table, "io": io_table}


# -- cells --------------------------------------------------------------------------------


def _missing(value: object) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _size(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale and n % scale == 0:
            return f"{n // scale} {unit}"
    return f"{n:,} B"


def _plain(x: float) -> str:
    return f"{x:g}"


def _rps(x: float) -> str:
    return f"{x / 1000:.1f}k" if x >= 1000 else f"{x:.0f}" if x >= 100 else f"{x:.1f}"


def _gbps(x: float) -> str:
    return f"{x:.2f}" if x >= 0.1 else f"{x:.2g}"


def _throughput(rps: float | None, gbps: float | None, body: int | None) -> str:
    parts = []
    if body is None or body < 1 << 20:
        parts.append(f"{_rps(rps)} req/s" if not _missing(rps) else None)
    if body is None or body >= 64 << 10:
        parts.append(f"{_gbps(gbps)} GB/s" if not _missing(gbps) else None)
    shown = [p for p in parts if p]
    return ", ".join(shown) if shown else MISSING


def _ratio(x: float | None) -> str:
    if _missing(x):
        return MISSING
    return f"{x:.2f}" if x >= 0.1 else f"{x:.2g}"


def _us(x: float | None) -> str:
    if _missing(x):
        return MISSING
    return f"{x:.1f} µs" if x < 10 else f"{x:,.0f} µs"


def _latency(us: float | None) -> str:
    if _missing(us):
        return MISSING
    return _us(us) if us < 1000 else f"{us / 1000:.1f} ms"


def _num(x: float | None) -> str:
    if _missing(x):
        return MISSING
    return f"{x:.1f}" if x < 10 else f"{x:,.0f}"


def _int(x: float | None) -> str:
    return MISSING if _missing(x) else f"{x:,.0f}"


def _io_cell(mbps: float | None, cpu_us: float | None, cpu_pct: float | None) -> str:
    if all(_missing(v) for v in (mbps, cpu_us, cpu_pct)):
        return MISSING
    return f"{_int(mbps)}, {_num(cpu_us)}, {_int(cpu_pct)}"


def _seconds(x: float | None) -> str:
    """Two significant digits under 10 s (0.081, 0.30, 4.9), tenths above (13.8)."""
    if _missing(x):
        return MISSING
    if x >= 100:
        return f"{x:,.0f}"
    if x >= 9.95:
        return f"{x:.1f}"
    return f"{x:#.2g}".rstrip(".")


def _seconds_gets(seconds: float | None, gets: float | None, body_bytes: float | None = None) -> str:
    if _missing(seconds):
        return MISSING
    detail = MISSING if _missing(gets) else f"{gets:.0f}"
    if not _missing(body_bytes):
        detail += f", {body_bytes / 1e6:,.0f} MB"
    return f"{_seconds(seconds)} ({detail})"


# -- output -------------------------------------------------------------------------------


def markdown(table: Table) -> str:
    def line(cells: Iterable[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    out = [table.caption, "", line(table.headers), "|" + "---|" * len(table.headers)]
    out += [line(row) for row in table.rows]
    if table.notes:
        out += ["", *table.notes]
    return "\n".join(out)


def text(table: Table) -> str:
    rows = [[c.replace("**", "") for c in row] for row in table.rows]
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(table.headers)]
    out = [table.caption, "  ".join(h.ljust(w) for h, w in zip(table.headers, widths)),
           "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
            for r in rows]
    return "\n".join(out + table.notes)


def report(results_dir: Path = DEFAULT_RESULTS, run: str = "latest", mode: str = "any",
           tables: Sequence[str] = TABLES, fmt: str = "markdown", sprox_mode: str = "any") -> str:
    """The requested tables, rendered, separated by blank lines. Tables without results
    for the chosen run are left out (named on stderr); with none at all: ReportError."""
    if run != "latest" and not re.fullmatch(r"[\w.:-]+", run):
        raise ReportError(f"--run: {run!r} is not a run id (like 20261125T035203) or 'latest'")
    ctx = load(results_dir)
    rendered, absent = [], []
    for name in tables:
        run_id = select_run(ctx, name, run, mode, sprox_mode)
        if run_id is None:
            absent.append(name)
            continue
        table = RENDERERS[name](ctx, run_id)
        rendered.append(markdown(table) if fmt == "markdown" else text(table))
    filters = [f for f, wanted in ((f"{mode} mode", mode), (f"Sprox {sprox_mode}", sprox_mode)) if wanted != "any"]
    where = f"{results_dir}" + ("" if run == "latest" else f" for run {run}") + \
        (f" ({', '.join(filters)})" if filters else "")
    if not rendered:
        raise ReportError(f"no {', '.join(tables)} results in {where}")
    if absent:
        print(f"bench.report: no {', '.join(absent)} results in {where}", file=sys.stderr)
    return "\n\n".join(rendered) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, default=DEFAULT_RESULTS, metavar="DIR",
                        help=f"directory of <table>-<run id>.parquet files (default {DEFAULT_RESULTS})")
    parser.add_argument("--run", default="latest", metavar="RUN_ID|latest",
                        help="run id to render, or latest: per table, its newest run (default)")
    parser.add_argument("--mode", choices=("any", "full", "short"), default="any",
                        help="only runs of this benchmark mode (default any)")
    parser.add_argument("--sprox-mode", choices=("any", "cache", "passthrough"), default="any",
                        help="only runs where Sprox ran with its cache or as a pass-through (default any)")
    parser.add_argument("--table", action="append", choices=TABLES, dest="tables",
                        help="render only this table (repeatable; default all)")
    parser.add_argument("--format", choices=("markdown", "text"), default="markdown")
    args = parser.parse_args(argv)
    try:
        sys.stdout.write(report(args.results, args.run, args.mode, args.tables or TABLES, args.format,
                                args.sprox_mode))
    except ReportError as error:
        print(f"bench.report: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
