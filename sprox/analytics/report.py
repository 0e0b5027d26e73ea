"""`sprox report`: what the cache did and what it saved, from the access log, by
DataFusion SQL; and what other cache sizes would have done (`whatif.py`).

`build_report()` returns one plain dict (the JSON form); `render_text()` and
`render_html()` present it. Definitions, used in every form:

- object reads: GetObject and HeadObject requests.
- hit ratio by requests: HIT / (HIT + MISS + PARTIAL) among object reads the cache
  handled (BYPASS and pass-through reads are not counted either way).
- bytes served from the cache: what was sent to clients minus what was fetched
  upstream for those reads (never below 0 per request); byte hit ratio: that over all
  bytes sent for those reads.
- upstream GETs avoided: object reads (each would have been one upstream request
  without Sprox) minus the upstream requests Sprox made for them. Bytes avoided: bytes
  sent minus bytes fetched. Both are net: a cold cache that over-fetches shows
  negative savings, as it should.
- prefetch: Sprox's own GETs ahead of clients (access-log rows of operation `Prefetch`:
  cache `PREFETCH` rows are the GETs, with their upstream bytes; `USED` and `WASTED`
  rows count prefetched bytes later read by a client, or evicted unread, in
  `bytes_sent`). They are not client requests: not in the request counts, but their
  upstream requests and bytes are in every upstream total and are subtracted from the
  savings.
- dollars saved: GETs avoided at `Prices.get_per_1000` per 1,000 plus bytes avoided at
  `Prices.transfer_per_gb` per GB (10^9 bytes). Defaults: S3 Standard GET requests
  ($0.0004 per 1,000) and data transfer out to the internet ($0.09 per GB); set your
  own with --get-price and --transfer-price (transfer within a region is often free).
"""

from __future__ import annotations

import html
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pyarrow as pa

from ..progress import format_bytes
from . import whatif
from .accesslog import read_access_log

DEFAULT_GET_PRICE = 0.0004  # dollars per 1,000 GET requests (S3 Standard)
DEFAULT_TRANSFER_PRICE = 0.09  # dollars per GB transferred out (S3, first 10 TB/month)
OBJECT_READS = "('GetObject', 'HeadObject')"
CLIENT_REQUESTS = "operation <> 'Prefetch'"  # Sprox's own prefetch rows are not requests
CACHED = "('HIT', 'MISS', 'PARTIAL')"
# Bytes a request was served from the cache: what it sent beyond what it fetched.
CACHED_BYTES = "CASE WHEN bytes_sent > upstream_bytes THEN bytes_sent - upstream_bytes ELSE 0 END"
TOP = 10
MAX_TIME_POINTS = 48
# Time buckets, smallest first: the report uses the smallest that gives at most
# MAX_TIME_POINTS points over the period.
TIME_BUCKETS = [(60, "1 minute"), (300, "5 minutes"), (900, "15 minutes"), (3600, "1 hour"),
                (6 * 3600, "6 hours"), (86400, "1 day"), (7 * 86400, "7 days")]
# The miss-ratio curve replays at most this many block accesses (the latest ones).
MAX_TRACE_ACCESSES = 2_000_000


@dataclass(frozen=True)
class Prices:
    get_per_1000: float = DEFAULT_GET_PRICE
    transfer_per_gb: float = DEFAULT_TRANSFER_PRICE


def build_report(logs: Path | Sequence[Path], *, since: datetime | None = None, until: datetime | None = None,
                 prices: Prices = Prices(), block_size: int = 128 * 1024,
                 cache_size: int | None = None, curve: bool = True) -> dict[str, Any]:
    """The report over one log directory, or over several (the nodes of a tier: then
    the figures are the tier's as a whole, and `by_node` splits them per directory)."""
    from datafusion import SessionContext

    directories = [Path(logs)] if isinstance(logs, (str, os.PathLike)) else [Path(d) for d in logs]
    table = _read_nodes(directories)
    table = _window(table, since, until)
    ctx = SessionContext()
    batches = table.to_batches() or [pa.RecordBatch.from_pylist([], schema=table.schema)]
    ctx.register_record_batches("log", [batches])

    def rows(sql: str) -> list[dict[str, Any]]:
        return ctx.sql(sql).to_arrow_table().to_pylist()

    report: dict[str, Any] = {
        "logs": str(directories[0]) if len(directories) == 1 else [str(d) for d in directories],
        "period": _period(rows, since, until),
        "prices": {"get_per_1000": prices.get_per_1000, "transfer_per_gb": prices.transfer_per_gb},
    }
    report["totals"] = _totals(rows)
    report["outcomes"] = rows(f"""
        SELECT cache AS outcome, count(*) AS requests, sum(bytes_sent) AS bytes_sent,
               sum(upstream_requests) AS upstream_requests, sum(upstream_bytes) AS upstream_bytes
        FROM log WHERE operation IN {OBJECT_READS} AND cache IS NOT NULL
        GROUP BY cache ORDER BY cache""")
    report["hit_ratio"] = _ratios(rows)
    report["prefetch"] = _prefetch(rows)
    report["savings"] = _savings(rows, prices)
    report["over_time"] = _over_time(rows, report["period"])
    for name, expr in (("by_bucket", "bucket"),
                       ("by_prefix", "concat(bucket, '/', CASE WHEN strpos(key, '/') > 0 "
                                     "THEN split_part(key, '/', 1) || '/' ELSE '' END)"),
                       ("by_client", "CASE WHEN user_agent IS NULL OR user_agent = '' THEN '(none)' "
                                     "ELSE split_part(user_agent, ' ', 1) END")):
        report[name] = _grouped(rows, expr)
    if len(directories) > 1:
        report["by_node"] = _grouped(rows, "node")
    report["latency_ms"] = rows(f"""
        SELECT cache AS outcome, count(*) AS requests,
               approx_percentile_cont(latency_ms, 0.5) AS p50,
               approx_percentile_cont(latency_ms, 0.9) AS p90,
               approx_percentile_cont(latency_ms, 0.99) AS p99, max(latency_ms) AS max
        FROM log WHERE operation = 'GetObject' AND cache IN {CACHED}
        GROUP BY cache ORDER BY cache""")
    report["latency_histogram"] = _histogram(rows)
    report["top_objects"] = rows(f"""
        SELECT bucket, key, count(*) AS requests, sum(bytes_sent) AS bytes_sent,
               sum(CASE WHEN cache = 'HIT' THEN 1 ELSE 0 END) AS hits
        FROM log WHERE operation = 'GetObject' AND key IS NOT NULL
        GROUP BY bucket, key ORDER BY requests DESC, bytes_sent DESC, bucket, key LIMIT {TOP}""")
    if curve:
        report["what_if"] = _what_if(rows, block_size, cache_size)
    return report


def _read_nodes(directories: list[Path]) -> pa.Table:
    """One directory's log; or several, each row with a `node` column naming its
    directory (as given)."""
    if len(directories) == 1:
        return read_access_log(directories[0])
    tables = []
    for directory in directories:
        table = read_access_log(directory)
        tables.append(table.append_column("node", pa.array([str(directory)] * table.num_rows, pa.string())))
    return pa.concat_tables(tables)


# -- sections --------------------------------------------------------------------------


def _window(table: pa.Table, since: datetime | None, until: datetime | None) -> pa.Table:
    import pyarrow.compute as pc

    if since is not None:
        table = table.filter(pc.greater_equal(table["time"], pa.scalar(since, pa.timestamp("us", tz="UTC"))))
    if until is not None:
        table = table.filter(pc.less(table["time"], pa.scalar(until, pa.timestamp("us", tz="UTC"))))
    return table


def _period(rows, since, until) -> dict[str, Any]:
    (row,) = rows(f"SELECT min(time) AS first, max(time) AS last, count(*) AS requests FROM log "
                  f"WHERE {CLIENT_REQUESTS}")
    return {"since": _iso(since), "until": _iso(until), "first_request": _iso(row["first"]),
            "last_request": _iso(row["last"]), "requests": row["requests"]}


def _totals(rows) -> dict[str, Any]:
    (row,) = rows(f"""
        SELECT coalesce(sum(CASE WHEN {CLIENT_REQUESTS} THEN 1 ELSE 0 END), 0) AS requests,
               coalesce(sum(CASE WHEN {CLIENT_REQUESTS} THEN bytes_sent ELSE 0 END), 0) AS bytes_sent,
               coalesce(sum(CASE WHEN operation IN {OBJECT_READS} THEN 1 ELSE 0 END), 0) AS object_reads,
               coalesce(sum(upstream_requests), 0) AS upstream_requests,
               coalesce(sum(upstream_bytes), 0) AS upstream_bytes,
               coalesce(sum(CASE WHEN status >= 500 THEN 1 ELSE 0 END), 0) AS server_errors,
               coalesce(sum(CASE WHEN status >= 400 AND status < 500 THEN 1 ELSE 0 END), 0) AS client_errors
        FROM log""")
    return row


def _ratios(rows) -> dict[str, Any]:
    (row,) = rows(f"""
        SELECT coalesce(sum(CASE WHEN cache = 'HIT' THEN 1 ELSE 0 END), 0) AS hits,
               coalesce(sum(CASE WHEN cache = 'MISS' THEN 1 ELSE 0 END), 0) AS misses,
               coalesce(sum(CASE WHEN cache = 'PARTIAL' THEN 1 ELSE 0 END), 0) AS partial,
               coalesce(sum(bytes_sent), 0) AS bytes_sent,
               coalesce(sum({CACHED_BYTES}), 0) AS bytes_from_cache
        FROM log WHERE operation IN {OBJECT_READS} AND cache IN {CACHED}""")
    handled = row["hits"] + row["misses"] + row["partial"]
    row["requests"] = _ratio(row["hits"], handled)
    row["bytes"] = _ratio(row["bytes_from_cache"], row["bytes_sent"])
    return row


def _savings(rows, prices: Prices) -> dict[str, Any]:
    (row,) = rows(f"""
        SELECT coalesce(sum(CASE WHEN operation IN {OBJECT_READS} THEN 1 ELSE 0 END), 0) AS object_reads,
               coalesce(sum(upstream_requests), 0) AS upstream_requests,
               coalesce(sum(CASE WHEN operation IN {OBJECT_READS} THEN bytes_sent ELSE 0 END), 0) AS bytes_sent,
               coalesce(sum(upstream_bytes), 0) AS upstream_bytes
        FROM log WHERE operation IN {OBJECT_READS} OR (operation = 'Prefetch' AND cache = 'PREFETCH')""")
    gets = row["object_reads"] - row["upstream_requests"]
    transferred = row["bytes_sent"] - row["upstream_bytes"]
    get_dollars = gets / 1000 * prices.get_per_1000
    byte_dollars = transferred / 1e9 * prices.transfer_per_gb
    return {**row, "upstream_gets_avoided": gets, "upstream_bytes_avoided": transferred,
            "dollars_saved_requests": get_dollars, "dollars_saved_transfer": byte_dollars,
            "dollars_saved": get_dollars + byte_dollars}


def _prefetch(rows) -> dict[str, Any]:
    (row,) = rows("""
        SELECT coalesce(sum(CASE WHEN cache = 'PREFETCH' THEN upstream_requests ELSE 0 END), 0) AS requests,
               coalesce(sum(CASE WHEN cache = 'PREFETCH' THEN upstream_bytes ELSE 0 END), 0) AS fetched_bytes,
               coalesce(sum(CASE WHEN cache = 'PREFETCH' AND status >= 400 THEN 1 ELSE 0 END), 0) AS failures,
               coalesce(sum(CASE WHEN cache = 'USED' THEN bytes_sent ELSE 0 END), 0) AS used_bytes,
               coalesce(sum(CASE WHEN cache = 'WASTED' THEN bytes_sent ELSE 0 END), 0) AS wasted_bytes
        FROM log WHERE operation = 'Prefetch'""")
    # Prefetched bytes still cached and not read yet are neither used nor wasted.
    row["used_ratio"] = _ratio(row["used_bytes"], row["used_bytes"] + row["wasted_bytes"])
    return row


def _over_time(rows, period: dict[str, Any]) -> dict[str, Any]:
    if period["first_request"] is None:
        return {"bucket": None, "points": []}
    span = (_parse_iso(period["last_request"]) - _parse_iso(period["first_request"])).total_seconds()
    seconds, width = next(((s, w) for s, w in TIME_BUCKETS if span / s <= MAX_TIME_POINTS), TIME_BUCKETS[-1])
    points = rows(f"""
        SELECT date_bin(interval '{width}', time, timestamp '1970-01-01T00:00:00Z') AS start,
               count(*) AS requests,
               sum(CASE WHEN operation IN {OBJECT_READS} AND cache = 'HIT' THEN 1 ELSE 0 END) AS hits,
               sum(CASE WHEN operation IN {OBJECT_READS} AND cache IN {CACHED} THEN 1 ELSE 0 END) AS handled,
               sum(bytes_sent) AS bytes_sent, sum(upstream_requests) AS upstream_requests
        FROM log GROUP BY start ORDER BY start""")
    for point in points:
        point["start"] = _iso(point["start"])
        point["hit_ratio"] = _ratio(point["hits"], point["handled"])
    return {"bucket": width, "bucket_seconds": seconds, "points": points}


def _grouped(rows, expr: str) -> list[dict[str, Any]]:
    out = rows(f"""
        SELECT {expr} AS name, count(*) AS requests,
               sum(CASE WHEN cache = 'HIT' THEN 1 ELSE 0 END) AS hits,
               sum(CASE WHEN cache IN {CACHED} THEN 1 ELSE 0 END) AS handled,
               sum(bytes_sent) AS bytes_sent, sum({CACHED_BYTES}) AS bytes_from_cache
        FROM log WHERE operation IN {OBJECT_READS}
        GROUP BY {expr} ORDER BY requests DESC, name LIMIT {TOP}""")
    for row in out:
        row["hit_ratio"] = _ratio(row["hits"], row["handled"])
        row["byte_hit_ratio"] = _ratio(row["bytes_from_cache"], row["bytes_sent"])
    return out


def _histogram(rows) -> list[dict[str, Any]]:
    """Latency counts per outcome in power-of-two buckets of milliseconds."""
    out = rows(f"""
        SELECT cache AS outcome,
               CAST(power(2, ceil(log2(greatest(latency_ms, 0.125)))) AS DOUBLE) AS upper_ms,
               count(*) AS requests
        FROM log WHERE operation = 'GetObject' AND cache IN {CACHED}
        GROUP BY outcome, upper_ms ORDER BY outcome, upper_ms""")
    return out


def _what_if(rows, block_size: int, cache_size: int | None) -> dict[str, Any]:
    reads = rows("""
        SELECT bucket, key, first_byte, bytes_sent FROM log
        WHERE operation = 'GetObject' AND status IN (200, 206) AND first_byte IS NOT NULL
              AND bytes_sent > 0
        ORDER BY time, request_id""")
    trace = whatif.trace_of(((f"{r['bucket']}/{r['key']}", r["first_byte"], r["bytes_sent"]) for r in reads),
                            block_size)
    truncated = len(trace) > MAX_TRACE_ACCESSES
    if truncated:
        trace = trace[-MAX_TRACE_ACCESSES:]
    points = whatif.miss_ratio_curve(trace, block_size)
    best = whatif.knee(points)
    return {
        "block_size": block_size,
        "reads": len(reads),
        "block_accesses": len(trace),
        "distinct_blocks": len({a.block for a in trace}),
        "truncated_to_latest": MAX_TRACE_ACCESSES if truncated else None,
        "cache_size": cache_size,
        "points": [
            {"cache_bytes": p.bytes, "cache_blocks": p.blocks, "lru_hit_ratio": p.lru_hit_ratio,
             "lru_byte_hit_ratio": p.lru_byte_hit_ratio, "s3fifo_hit_ratio": p.s3fifo_hit_ratio,
             "s3fifo_byte_hit_ratio": p.s3fifo_byte_hit_ratio}
            for p in points],
        "smallest_size_for_90_percent_of_benefit": best.bytes if best is not None else None,
    }


# -- helpers ---------------------------------------------------------------------------


def _ratio(part: float, whole: float) -> float | None:
    return part / whole if whole else None


def _iso(value: datetime | None) -> str | None:
    if value is None:
        return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=timezone.utc)
    return value.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")


def _parse_iso(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def to_json(report: dict[str, Any]) -> str:
    return json.dumps(report, indent=2, sort_keys=False) + "\n"


# -- text ------------------------------------------------------------------------------


def pct(x: float | None) -> str:
    return "-" if x is None else f"{x * 100:.1f}%"


def render_text(report: dict[str, Any]) -> str:
    out: list[str] = []
    add = out.append
    period = report["period"]
    logs = report["logs"]
    add(f"Sprox cache report: {logs if isinstance(logs, str) else ', '.join(logs)}")
    add(f"  {period['requests']} requests, {period['first_request'] or '-'} to {period['last_request'] or '-'}")
    t, r, s = report["totals"], report["hit_ratio"], report["savings"]
    add("")
    add("Hit ratio")
    add(f"  by requests: {pct(r['requests'])}  ({r['hits']} hits, {r['partial']} partial, {r['misses']} misses)")
    add(f"  by bytes:    {pct(r['bytes'])}  ({format_bytes(r['bytes_from_cache'])} of "
        f"{format_bytes(r['bytes_sent'])} from the cache)")
    add("")
    add("Upstream")
    add(f"  requests made: {t['upstream_requests']}  bytes fetched: {format_bytes(t['upstream_bytes'])}")
    add(f"  GETs avoided:  {s['upstream_gets_avoided']}  bytes avoided: {format_bytes(s['upstream_bytes_avoided'])}")
    p = report["prices"]
    add(f"  saved:         ${s['dollars_saved']:.4f}  (${p['get_per_1000']}/1,000 GETs: "
        f"${s['dollars_saved_requests']:.4f}; ${p['transfer_per_gb']}/GB: ${s['dollars_saved_transfer']:.4f})")
    f = report.get("prefetch")
    if f and f["requests"]:
        add("")
        add("Prefetch (Parquet scans, ahead of clients)")
        add(f"  GETs: {f['requests']}  fetched: {format_bytes(f['fetched_bytes'])}  failed: {f['failures']}")
        add(f"  used: {format_bytes(f['used_bytes'])}  wasted: {format_bytes(f['wasted_bytes'])}  "
            f"(used share of decided bytes: {pct(f['used_ratio'])}; the rest is cached, not read yet)")
    if report["latency_ms"]:
        add("")
        add("Latency of GETs (ms)      p50       p90       p99       max")
        for row in report["latency_ms"]:
            add(f"  {row['outcome']:<8} {row['requests']:>8}  {row['p50']:>8.2f}  {row['p90']:>8.2f}  "
                f"{row['p99']:>8.2f}  {row['max']:>8.2f}")
    for title, key in (("By node", "by_node"), ("By bucket", "by_bucket"), ("By prefix", "by_prefix"),
                       ("By client", "by_client")):
        if report.get(key):
            add("")
            add(f"{title:<40} requests   hit ratio  bytes")
            for row in report[key]:
                add(f"  {str(row['name'])[:38]:<38} {row['requests']:>8}   {pct(row['hit_ratio']):>8}  "
                    f"{format_bytes(row['bytes_sent'])}")
    if report["top_objects"]:
        add("")
        add("Most-read objects                        requests  hits  bytes")
        for row in report["top_objects"]:
            name = f"{row['bucket']}/{row['key']}"
            add(f"  {name[:38]:<38} {row['requests']:>8} {row['hits']:>5}  {format_bytes(row['bytes_sent'])}")
    over = report["over_time"]
    if over["points"]:
        add("")
        add(f"Hit ratio over time (per {over['bucket']})")
        for point in over["points"]:
            ratio = point["hit_ratio"]
            bar = "#" * round((ratio or 0) * 40)
            add(f"  {point['start']}  {pct(ratio):>6}  {bar}")
    what = report.get("what_if")
    if what and what["points"]:
        add("")
        add(f"What-if cache sizes ({what['block_accesses']} block accesses of {format_bytes(what['block_size'])} "
            f"blocks; {what['distinct_blocks']} distinct)")
        add("  cache size     LRU hits   Sprox (S3-FIFO) hits")
        for point in what["points"]:
            add(f"  {format_bytes(point['cache_bytes']):>10}   {pct(point['lru_hit_ratio']):>8}   "
                f"{pct(point['s3fifo_hit_ratio']):>8}")
        knee = what["smallest_size_for_90_percent_of_benefit"]
        if knee is not None:
            add(f"  {format_bytes(knee)} reaches 90% of the best hit ratio on this trace.")
    return "\n".join(out) + "\n"


# -- HTML ------------------------------------------------------------------------------


def _svg_line_chart(series: list[tuple[str, str, list[tuple[float, float]]]], *, x_label: str, y_label: str,
                    log_x: bool = False, x_ticks: list[tuple[float, str]] | None = None,
                    marker: tuple[float, str] | None = None, width: int = 640, height: int = 280) -> str:
    """An SVG line chart; `series` are (name, colour, [(x, y)]) with y in 0..1."""
    left, bottom, top, right = 56, 40, 16, 16
    xs = [x for _, _, pts in series for x, _ in pts]
    if not xs:
        return "<p>(no data)</p>"
    fx = (lambda v: math.log10(max(v, 1e-12))) if log_x else (lambda v: v)
    lo, hi = fx(min(xs)), fx(max(xs))
    if hi == lo:
        hi = lo + 1

    def px(x: float) -> float:
        return left + (fx(x) - lo) / (hi - lo) * (width - left - right)

    def py(y: float) -> float:
        return height - bottom - y * (height - bottom - top)

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="11">']
    for i in range(6):
        y = i / 5
        parts.append(f'<line x1="{left}" x2="{width - right}" y1="{py(y):.1f}" y2="{py(y):.1f}" stroke="#ddd"/>')
        parts.append(f'<text x="{left - 6}" y="{py(y) + 4:.1f}" text-anchor="end">{y * 100:.0f}%</text>')
    ticks = x_ticks or []
    for i, (x, label) in enumerate(ticks):
        anchor = "start" if i == 0 else "end" if i == len(ticks) - 1 else "middle"
        parts.append(f'<text x="{px(x):.1f}" y="{height - bottom + 16}" text-anchor="{anchor}">'
                     f'{html.escape(label)}</text>')
    if marker is not None and min(xs) <= marker[0] <= max(xs):
        x = px(marker[0])
        parts.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{top}" y2="{height - bottom}" stroke="#999" '
                     f'stroke-dasharray="4 3"/><text x="{x + 4:.1f}" y="{top + 24}">{html.escape(marker[1])}</text>')
    parts.append(f'<text x="{(left + width - right) / 2}" y="{height - 6}" text-anchor="middle">'
                 f'{html.escape(x_label)}</text>')
    parts.append(f'<text x="12" y="{(top + height - bottom) / 2}" transform="rotate(-90 12 '
                 f'{(top + height - bottom) / 2})" text-anchor="middle">{html.escape(y_label)}</text>')
    for n, (name, colour, pts) in enumerate(series):
        path = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in pts)
        parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="2" points="{path}"/>')
        for x, y in pts:
            parts.append(f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="2.5" fill="{colour}"/>')
        parts.append(f'<text x="{left + 10 + 150 * n}" y="{top + 10}" fill="{colour}">{html.escape(name)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _svg_histogram(rows: list[dict[str, Any]], width: int = 640, height: int = 240) -> str:
    if not rows:
        return "<p>(no data)</p>"
    uppers = sorted({r["upper_ms"] for r in rows})
    outcomes = sorted({r["outcome"] for r in rows})
    colours = {"HIT": "#2a9d8f", "MISS": "#e76f51", "PARTIAL": "#e9c46a"}
    counts = {(r["outcome"], r["upper_ms"]): r["requests"] for r in rows}
    peak = max(counts.values())
    left, bottom, top = 56, 40, 20
    slot = (width - left - 10) / len(uppers)
    bar = slot / (len(outcomes) + 1)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'font-family="sans-serif" font-size="11">']
    for i, upper in enumerate(uppers):
        x0 = left + i * slot
        parts.append(f'<text x="{x0 + slot / 2:.1f}" y="{height - bottom + 14}" text-anchor="middle">'
                     f'≤{upper:g}</text>')
        for j, outcome in enumerate(outcomes):
            n = counts.get((outcome, upper), 0)
            h = n / peak * (height - bottom - top)
            parts.append(f'<rect x="{x0 + j * bar:.1f}" y="{height - bottom - h:.1f}" width="{bar:.1f}" '
                         f'height="{h:.1f}" fill="{colours.get(outcome, "#888")}"><title>{outcome} '
                         f'≤{upper:g} ms: {n}</title></rect>')
    for j, outcome in enumerate(outcomes):
        parts.append(f'<text x="{left + 80 * j}" y="12" fill="{colours.get(outcome, "#888")}">{outcome}</text>')
    parts.append(f'<text x="{(left + width) / 2}" y="{height - 6}" text-anchor="middle">latency (ms, '
                 f'power-of-two buckets)</text></svg>')
    return "".join(parts)


def _short_time(iso: str) -> str:
    return _parse_iso(iso).strftime("%m-%d %H:%M UTC")


def render_html(report: dict[str, Any]) -> str:
    """One self-contained page: no scripts, no external resources."""
    esc = html.escape
    text = render_text(report)
    over = report["over_time"]["points"]
    charts = []
    if over:
        t0 = _parse_iso(over[0]["start"]).timestamp()
        pts = [(_parse_iso(p["start"]).timestamp() - t0, p["hit_ratio"]) for p in over if p["hit_ratio"] is not None]
        ticks = [(pts[0][0], _short_time(over[0]["start"])), (pts[-1][0], _short_time(over[-1]["start"]))] \
            if pts else []
        charts.append(("Hit ratio over time", _svg_line_chart(
            [("hit ratio (requests)", "#264653", pts)], x_label=f"time (per {report['over_time']['bucket']})",
            y_label="hit ratio", x_ticks=ticks)))
    what = report.get("what_if")
    if what and what["points"]:
        points = what["points"]
        lru = [(p["cache_bytes"], p["lru_hit_ratio"]) for p in points]
        fifo = [(p["cache_bytes"], p["s3fifo_hit_ratio"]) for p in points if p["s3fifo_hit_ratio"] is not None]
        ticks = [(p["cache_bytes"], format_bytes(p["cache_bytes"])) for p in points[:: max(1, len(points) // 6)]]
        charts.append(("Miss-ratio curve: hit ratio at other cache sizes", _svg_line_chart(
            [("LRU", "#e76f51", lru), ("Sprox (S3-FIFO)", "#2a9d8f", fifo)], x_label="cache size (log scale)",
            y_label="hit ratio", log_x=True, x_ticks=ticks,
            marker=(what["cache_size"], f"--cache-size {format_bytes(what['cache_size'])}")
            if what.get("cache_size") else None)))
    charts.append(("Latency of GETs", _svg_histogram(report["latency_histogram"])))
    body = "".join(f"<h2>{esc(title)}</h2>{svg}" for title, svg in charts)
    return (
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>Sprox cache report</title>"
        "<style>body{font-family:sans-serif;max-width:980px;margin:2em auto;color:#222}"
        "pre{background:#f6f6f6;padding:1em;overflow-x:auto}h2{margin-top:1.6em}</style></head><body>"
        f"<h1>Sprox cache report</h1>{body}<h2>Figures</h2><pre>{esc(text)}</pre>"
        f"<h2>JSON</h2><details><summary>all figures as JSON</summary><pre>{esc(to_json(report))}</pre>"
        "</details></body></html>\n"
    )
