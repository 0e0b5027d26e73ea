"""bench/report.py renders the README's benchmark tables from the Parquet results.

Result files are written by the harness's own `ResultLog` (the real schema: run context
columns, flattened load reports, per-table normalization), with rows shaped like the
ones bench/test_hits.py, test_olap.py and test_io.py record, and known figures.
"""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bench import harness, report
from bench.report import MISSING, ReportError

REAL_RESULTS = Path(report.__file__).resolve().parent / "results"
KiB, MiB = 1 << 10, 1 << 20


def context(run_id: str, *, short: bool = False, sprox_mode: str = "cache") -> dict[str, object]:
    return {"run_id": run_id, "timestamp": "2026-11-25T03:52:03+0000", "git_commit": "abc1234", "short_mode": short,
            "sprox_mode": sprox_mode, "sprox_src": "installed", "pinned": True, "nginx_tcp_nopush": False, "cpus": 2,
            "cpu_model": "Test CPU", "kernel": "6.1", "python": "3.11.2"}


def write_run(monkeypatch: pytest.MonkeyPatch, directory: Path, run_id: str, tables: dict[str, list[dict]],
              **ctx: object) -> None:
    """Write one run's tables the way the benchmarks do: harness.RESULTS.add, then write."""
    monkeypatch.setattr(harness, "RESULTS_DIR", directory)
    monkeypatch.setattr(harness, "run_context", lambda: context(run_id, **ctx))  # type: ignore[arg-type]
    log = harness.ResultLog()
    for table, rows in tables.items():
        for row in rows:
            log.add(table, row)
    log.write()


def load_report(rps: float, body: int, *, server_cpu_us: float, server_busy: float = 99.0,
                client_busy: float = 50.0, other: float = 0.0, seconds: float = 4.0, p99: int = 150) -> dict:
    """What harness.run_load returns: the generator's JSON plus CPU accounting."""
    requests = int(rps * seconds)
    return {
        "requests": requests, "errors": 0, "incomplete": 0, "reconnects": 0, "body_bytes": requests * body,
        "elapsed_s": seconds, "rps": rps, "gbps": rps * body / 1e9,
        "latency_us": {"mean": 80.0, "p50": 70, "p90": 90, "p99": p99, "p999": 300, "max": 900},
        "status": {"206": requests}, "x_cache": {"HIT": requests, "MISS": 0, "PARTIAL": 0, "BYPASS": 0, "other": 0,
                                                 "absent": 0},
        "connections": 8, "mode": "copy", "cpu_user_s": 1.0, "cpu_sys_s": 1.0, "first_error": "",
        "loadgen_cpu_pct": client_busy, "server_cpu_s": server_cpu_us * requests / 1e6,
        "server_cpu_pct": server_busy, "server_cpu_us_per_req": server_cpu_us, "truncated": False,
        "server_core": {"busy": server_busy + other, "softirq": 20.0, "steal": 0.0, "other": other},
        "client_core": {"busy": client_busy, "softirq": 1.0, "steal": 0.0, "other": 0.0},
    }


def hits_row(case: str, server: str, range_size: int | None, body: int, median: dict,
             nginx_rps: float | None = None) -> dict:
    """As bench/test_hits.py records it."""
    row = {"case": case, "server": server, "range_size": range_size, "requests_per_round": 1000, "rounds": 3,
           "rps_all": [median["rps"]] * 3, "rps_stdev": 0.0, **harness.flatten_load(median), "response_bytes": body}
    if server == "sprox":
        row["ratio"] = median["rps"] / nginx_rps if nginx_rps else None
    return row


def olap_row(engine: str, query: str, mode: str, seconds: float, gets: int | None) -> dict:
    """As bench/test_olap.py records it."""
    return {"engine": engine, "query": query, "mode": mode, "tpch_sf": 6.0, "parquet_bytes": 1_330_000_000,
            "parquet_files": 12, "rows": 35_996_850, "upstream_latency_ms": 20.0, "upstream_bandwidth_mbps": 80.0,
            "rounds": 2, "seconds": seconds,
            "seconds_min": seconds, "seconds_all": [seconds, seconds], "upstream_GET": gets,
            "upstream_HEAD": None if gets is None else 0, "upstream_LIST": None if gets is None else 1,
            "upstream_OTHER": None if gets is None else 0, "upstream_get_body_bytes": None if gets is None else 10**6,
            "upstream_GET_all": [gets, gets]}


def io_row(kind: str, case: str, backend: str, mbps: float, cpu_us: float, cpu_pct: float, bound: str,
           noise: float = 1.0, **extra: object) -> dict:
    """As bench/test_io.py's summarize() records it (the columns that matter here)."""
    return {"kind": kind, "case": case, "backend": backend, "uring_native": True, "pinned_cpu": 0,
            "io_threads": 16 if backend == "threads" else None, "ring_entries": 256 if backend == "uring" else None,
            "mode": "direct", "io_size": 64 * KiB, "depth": 32, "rounds": 3, "mbps_all": [mbps] * 3,
            "mbps_stdev": 0.0, "mbps_max": mbps, "spread_pct": 0.0, "noise_pct_max": noise + 5,
            "noise_our_core_pct_max": noise, "truncated_rounds": 0, "ops": 1000, "bytes": 1000 * 64 * KiB,
            "seconds": 1.0, "own_cpu_s": 0.1, "own_cpu_pct": cpu_pct, "mbps": mbps, "ops_per_s": mbps * 16,
            "own_cpu_us_per_op": cpu_us, "bound_by": bound, **extra}


def hits_tables() -> dict[str, list[dict]]:
    nginx = {"4k": load_report(100_000, 4 * KiB, server_cpu_us=9.0, p99=900),
             "1m": load_report(6_400, MiB, server_cpu_us=118.0, server_busy=75.0, client_busy=97.0),
             "whole": load_report(44.0, 64 * MiB, server_cpu_us=21_422.0, seconds=5.0)}
    sprox = {"4k": load_report(12_500, 4 * KiB, server_cpu_us=77.0, other=3.0, p99=4_500),
             "1m": load_report(5_120, MiB, server_cpu_us=189.0)}
    return {"hits": [
        hits_row("range-4KiB", "nginx", 4 * KiB, 4 * KiB, nginx["4k"]),
        hits_row("range-4KiB", "sprox", 4 * KiB, 4 * KiB, sprox["4k"], nginx_rps=100_000),
        hits_row("range-1MiB", "nginx", MiB, MiB, nginx["1m"]),
        hits_row("range-1MiB", "sprox", MiB, MiB, sprox["1m"], nginx_rps=6_400),
        hits_row("whole-object", "nginx", None, 64 * MiB, nginx["whole"]),  # no Sprox row: blank cells
    ]}


def olap_tables() -> dict[str, list[dict]]:
    rows = []
    for mode, seconds, gets in (("local", 0.68, None), ("direct", 8.3, 613), ("sprox-cold", 6.9, 300),
                                ("sprox-warm", 1.31, 0), ("nginx-cold", 7.5, 1250), ("nginx-warm", 1.1, 0)):
        rows.append(olap_row("duckdb", "q1", mode, seconds, gets))
    for query, direct, cold in (("q6", 10.0, 3.0), ("selective", 0.5, 0.4)):
        rows.append(olap_row("duckdb", query, "direct", direct, 100))
        rows.append(olap_row("duckdb", query, "sprox-cold", cold, 100))
        rows.append(olap_row("duckdb", query, "sprox-warm", 0.1, 0))
    for mode, seconds, gets in (("local", 0.016, None), ("direct", 0.08, 15), ("sprox-cold", 0.17, 14)):
        rows.append(olap_row("datafusion", "selective", mode, seconds, gets))  # no warm round
    return {"olap": rows}


def io_tables() -> dict[str, list[dict]]:
    return {"io": [
        io_row("read", "read-64KiB-direct", "threads", 900.0, 70.0, 98.0, "cpu"),
        io_row("read", "read-64KiB-direct", "uring", 1_440.0, 40.0, 75.0, "device", noise=12.0,
               ratio=1.6, cpu_ratio=40 / 70, target_ratio=1.4, target_met=True),
        io_row("fill", "fill-random-direct", "threads", 2_000.0, 1_000.0, 15.0, "device"),
        io_row("fill", "fill-random-direct", "uring", 1_500.0, 500.0, 8.0, "device", ratio=0.75, cpu_ratio=0.5),
    ]}


@pytest.fixture
def results(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Two runs: an older short one, and the newer full run with every table."""
    old = {"hits": [hits_row("range-4KiB", "nginx", 4 * KiB, 4 * KiB, load_report(1.0, 4 * KiB, server_cpu_us=1.0))]}
    write_run(monkeypatch, tmp_path, "20261125T010000", old, short=True)
    write_run(monkeypatch, tmp_path, "20261125T020000", {**hits_tables(), **olap_tables(), **io_tables()})
    return tmp_path


def rows_of(markdown: str, header: str) -> dict[str, list[str]]:
    """The body rows of the Markdown table whose header starts with `header`, by first cell."""
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {header} |"))
    assert lines[start + 1].startswith("|---|")
    body = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        body.append([c.strip() for c in line.strip("|").split(" | ")])
    return {" ".join(r[:2]) if header == "engine" else r[0]: r for r in body}


def test_hits_table_figures_ratio_and_blank_cells(results: Path) -> None:
    out = report.report(results, tables=["hits"])
    rows = rows_of(out, "cached hits")
    assert out.splitlines()[2] == ("| cached hits | nginx | Sprox | Sprox / nginx | CPU per request, nginx / Sprox "
                                   "| p99 latency, nginx / Sprox |")
    assert rows["4 KiB ranges"] == ["4 KiB ranges", "100.0k req/s", "12.5k req/s", "0.12", "9.0 µs / 77 µs",
                                    "900 µs / 4.5 ms"]
    # 1 MiB and up: GB/s only; nginx's generator core was saturated, its own was not.
    assert rows["1 MiB ranges"] == ["1 MiB ranges", "6.71 GB/s", "5.37 GB/s", "0.80",
                                    "118 µs / 189 µs (nginx bound by the load generator)", "150 µs / 150 µs"]
    assert rows["whole 64 MiB objects"] == ["whole 64 MiB objects", "2.95 GB/s", MISSING, MISSING,
                                            f"21,422 µs / {MISSING}", f"150 µs / {MISSING}"]
    assert list(rows) == ["4 KiB ranges", "1 MiB ranges", "whole 64 MiB objects"]
    assert "run 20261125T020000, commit abc1234, full mode" in out
    assert "median of 3 rounds; noise on the pinned cores up to 3%" in out


def test_olap_table_seconds_gets_and_missing_mode(results: Path) -> None:
    out = report.report(results, tables=["olap"])
    rows = rows_of(out, "engine")
    assert rows["DuckDB Q1"] == ["DuckDB", "Q1", "8.3 (613, 1 MB)", "6.9 (300, 1 MB)", "**1.3 (0)**",
                                 "7.5 (1250, 1 MB)", "1.1 (0)", "0.68", "0.83x time, 1.00x bytes"]
    assert rows["DataFusion selective"] == ["DataFusion", "selective", "0.080 (15, 1 MB)", "0.17 (14, 1 MB)", MISSING,
                                            MISSING, MISSING, "0.016", "2.12x time, 1.00x bytes"]
    # Each engine's lineitem queries, summed (only where all three ran): 8.3 + 10 + 0.5
    # direct, 6.9 + 3 + 0.4 cold.
    assert rows["DuckDB Q1+Q6+selective"] == ["DuckDB", "Q1+Q6+selective", "18.8 (813, 3 MB)", "10.3 (500, 3 MB)",
                                              "1.5 (0)", MISSING, MISSING, MISSING, "0.55x time, 1.00x bytes"]
    assert list(rows) == ["DuckDB Q1", "DuckDB Q6", "DuckDB selective", "DataFusion selective",
                          "DuckDB Q1+Q6+selective"]
    assert "scale factor 6, 36M rows, 12 Parquet files, 1.33 GB" in out
    assert "20 ms first-byte latency and each GET's body paced at 80 MB/s" in out


def test_io_table_ratios(results: Path) -> None:
    out = report.report(results, tables=["io"])
    rows = rows_of(out, "case")
    assert rows["read-64KiB-direct"] == ["read-64KiB-direct", "900, 70, 98", "1,440, 40, 75", "1.60", "1.75",
                                         "cpu / device", "12"]
    assert rows["fill-random-direct"] == ["fill-random-direct", "2,000, 1,000, 15", "1,500, 500, 8", "0.75",
                                          "2.00", "device / device", "1"]
    assert "Target: uring >= 1.4x threads on read-64KiB-direct: 1.60x, met." in out


def test_run_selection(results: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    ctx = report.load(results)
    assert report.select_run(ctx, "hits") == "20261125T020000"
    assert report.select_run(ctx, "hits", mode="short") == "20261125T010000"
    assert report.select_run(ctx, "olap", mode="short") is None
    assert report.select_run(ctx, "hits", sprox_mode="passthrough") is None
    assert report.select_run(ctx, "hits", run="20261125T010000") == "20261125T010000"
    # The old run has hits only: the other tables are named on stderr, not rendered.
    out = report.report(results, run="20261125T010000")
    assert "Cached hits (run 20261125T010000" in out and "OLAP" not in out
    assert "no olap, io results" in capsys.readouterr().err
    with pytest.raises(ReportError):
        report.report(results, run="20990101T000000")
    with pytest.raises(ReportError):
        report.report(results, run="x'; DROP TABLE hits; --")


def test_old_files_missing_columns_and_changed_types(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file from an older harness (no per-response size, no CPU figures, no core
    accounting) next to a newer one whose `rounds` is a float: both load."""
    pq.write_table(pa.table({
        "run_id": ["20261124T000000"] * 2, "short_mode": [False] * 2, "sprox_mode": ["cache"] * 2,
        "case": ["range-64KiB"] * 2, "server": ["nginx", "sprox"], "range_size": [64 * KiB] * 2,
        "rounds": [1, 1], "requests": [1000, 500], "body_bytes": [1000 * 64 * KiB, 500 * 64 * KiB],
        "rps": [70_000.0, 35_000.0], "gbps": [4.59, 2.29], "unused": pa.nulls(2),
    }), tmp_path / "hits-20261124T000000.parquet")
    pq.write_table(pa.table({"run_id": ["20261123T000000"], "case": ["range-4KiB"], "server": ["nginx"],
                             "rounds": [1.5], "unused": ["text"]}), tmp_path / "hits-20261123T000000.parquet")
    (tmp_path / "hits-20261122T000000.parquet").write_bytes(b"not parquet")  # skipped with a warning
    out = report.report(tmp_path, tables=["hits"])
    rows = rows_of(out, "cached hits")
    assert rows["64 KiB ranges"] == ["64 KiB ranges", "70.0k req/s, 4.59 GB/s", "35.0k req/s, 2.29 GB/s", "0.50", "", ""]
    assert "commit –" in out and "noise not recorded" in out


def test_command_line(results: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert report.main(["--results", str(results), "--table", "olap", "--format", "text"]) == 0
    out = capsys.readouterr().out
    assert "**" not in out and "1.3 (0)" in out and out.splitlines()[1].split() == [
        "engine", "query", "direct", "Sprox", "cold", "Sprox", "warm", "nginx", "cold", "nginx", "warm", "local",
        "files", "cold", "/", "direct"]
    assert report.main(["--results", str(results / "nothing-here")]) == 1
    assert "no hits, olap, io results" in capsys.readouterr().err


def test_renders_the_real_results_directory() -> None:
    """The results a benchmark run wrote. .ci/run runs the short benchmarks before the
    tests, so under CI=true there must be some: rendering what CI produced is the point."""
    if not any(REAL_RESULTS.glob("*.parquet")):
        if os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no"):
            pytest.fail("CI=true but bench/results/ is empty: .ci/run runs the short benchmarks first")
        pytest.skip("no results in bench/results/ (run the benchmarks first)")
    ctx = report.load(REAL_RESULTS)
    for name, render in report.RENDERERS.items():
        run_id = report.select_run(ctx, name)
        if run_id is not None:
            table = render(ctx, run_id)
            assert table.rows and all(len(row) == len(table.headers) for row in table.rows)
            report.markdown(table), report.text(table)
