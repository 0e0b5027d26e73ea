"""Fixtures for the benchmarks: settings, the load generator, nginx, Sprox, and the
results log (printed at the end, written to bench/results/ as Parquet).

Run: `pytest --benchmark-only bench/` (full) or `SPROX_BENCH_SHORT=1 pytest
--benchmark-only bench/` (about a minute, tiny data: what CI runs). See bench/README.md.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from bench import harness
from bench.harness import (
    CLIENT_CPU,
    PINNED,
    RESULTS,
    SERVER_CPU,
    BenchSprox,
    NginxServer,
    Settings,
    format_table,
    missing,
    nginx_binary,
    sprox_env,
)


def pytest_report_header(config: pytest.Config) -> list[str]:
    pin = f"server on CPU {SERVER_CPU}, load generator on CPU {CLIENT_CPU}" if PINNED else "no CPU pinning"
    return [(f"sprox bench: {'short' if harness.SHORT else 'full'} mode, sprox {harness.sprox_mode()} "
             f"({harness.SPROX_SRC or 'installed sprox'}), {pin}")]


@pytest.fixture(scope="session", autouse=True)
def _isolated_aws_environment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """In-process clients (DuckDB, DataFusion, botocore) see only benchmark settings."""
    directory = tmp_path_factory.mktemp("aws")
    (directory / "config").write_text("")
    (directory / "credentials").write_text("")
    with pytest.MonkeyPatch.context() as mp:
        for name in list(os.environ):
            if name.startswith("AWS_") or (name.startswith("SPROX_") and not name.startswith("SPROX_BENCH_")):
                mp.delenv(name)
        mp.setenv("AWS_CONFIG_FILE", str(directory / "config"))
        mp.setenv("AWS_SHARED_CREDENTIALS_FILE", str(directory / "credentials"))
        mp.setenv("AWS_EC2_METADATA_DISABLED", "true")
        yield


@pytest.fixture(scope="session")
def bench_settings() -> Settings:
    return Settings.load()


@pytest.fixture(scope="session")
def results() -> harness.ResultLog:
    return RESULTS


@pytest.fixture(scope="session")
def loadgen() -> Path:
    """The compiled load generator (bench/loadgen.c)."""
    return harness.loadgen_binary()


@pytest.fixture(scope="session")
def start_nginx(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[Path], NginxServer]]:
    """`start_nginx(root) -> NginxServer`: nginx serving `root`, one worker pinned to the
    server CPU. Skips when nginx is not installed (fails under CI=true)."""
    if nginx_binary() is None:
        missing("nginx is not installed (apt-get install nginx)")
    started: list[NginxServer] = []

    def start(root: Path) -> NginxServer:
        server = NginxServer(tmp_path_factory.mktemp("nginx"), root, cpu=SERVER_CPU)
        started.append(server)
        return server.start()

    yield start
    for server in reversed(started):
        server.stop()


class SproxStarter:
    """Starts `sprox serve` subprocesses (tests/servers.py's SproxProcess) and stops
    them all at the end of the session, or one by one with `stop(proc)`."""

    def __init__(self, tmp_path_factory: pytest.TempPathFactory):
        self.tmp_path_factory = tmp_path_factory
        self.running: list[BenchSprox] = []

    def __call__(self, *args: str, cpu: int | None = None, env: dict[str, str] | None = None) -> BenchSprox:
        """`sprox serve --host 127.0.0.1 --port 0 *args`, pinned to `cpu` if given."""
        base = self.tmp_path_factory.mktemp("sprox")
        proc = BenchSprox(base / "logs", *args, cpu=cpu, env=sprox_env(base, env))
        self.running.append(proc)
        return proc.start()

    def stop(self, proc: BenchSprox) -> None:
        proc.stop()
        if proc in self.running:
            self.running.remove(proc)

    def close(self) -> None:
        for proc in reversed(self.running):
            proc.stop()
        self.running.clear()


@pytest.fixture(scope="session")
def start_sprox(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SproxStarter]:
    starter = SproxStarter(tmp_path_factory)
    yield starter
    starter.close()


# -- reporting ----------------------------------------------------------------------------

_WRITTEN: list[Path] = []


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    _WRITTEN.extend(RESULTS.write())


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    tables = RESULTS.tables
    if not any(tables.values()):
        return
    write = terminalreporter.write_line
    terminalreporter.section(f"sprox bench results (sprox: {harness.sprox_mode()})")
    if tables.get("loadgen"):
        write("\nLoad generator ceiling against nginx (1 worker; generator on its own CPU):")
        write(format_table(
            ["case", "generator", "req/s", "GB/s", "p50 ms", "p99 ms", "generator CPU %", "nginx CPU %", "bound by",
             "noise %"],
            [(r["case"], r["generator"], r["rps"], r["gbps"], _ms(r.get("latency_us_p50")),
              _ms(r.get("latency_us_p99")), r.get("generator_cpu_pct"), r.get("server_cpu_pct"), _bound(r), _noise(r))
             for r in tables["loadgen"]]))
    if tables.get("hits"):
        write(f"\nCache hits: Sprox ({harness.sprox_mode()}) vs nginx, same bytes, same run "
              "(median round; ratio = Sprox / nginx):")
        by_case: dict[str, dict[str, dict]] = {}
        for r in tables["hits"]:
            by_case.setdefault(r["case"], {})[r["server"]] = r
        rows = []
        for case, servers in by_case.items():
            n, s = servers.get("nginx", {}), servers.get("sprox", {})
            rows.append((case, n.get("rps"), n.get("gbps"), _ms(n.get("latency_us_p50")), n.get("server_cpu_us_per_req"),
                         _bound(n) if n else None, s.get("rps"), s.get("gbps"), _ms(s.get("latency_us_p50")),
                         s.get("server_cpu_us_per_req"), _bound(s) if s else None, s.get("ratio"),
                         max((v for v in (_noise(n), _noise(s)) if v is not None), default=None)))
        write(format_table(["case", "nginx req/s", "nginx GB/s", "nginx p50 ms", "nginx CPU us/req", "nginx bound by",
                            "sprox req/s", "sprox GB/s", "sprox p50 ms", "sprox CPU us/req", "sprox bound by",
                            "sprox/nginx", "noise %"], rows))
        write("bound by: the side whose pinned core was >= 90% busy with its own work (server: the server "
              "process plus the loopback softirq the kernel runs on its core; generator: the load generator's).\n"
              "noise %: CPU time on the two pinned cores used by neither the server, the load generator "
              "nor softirq (other processes); above ~10 the numbers are unreliable.")
    if tables.get("olap"):
        write(f"\nOLAP queries over TPC-H lineitem (upstream first-byte latency "
              f"{tables['olap'][0].get('upstream_latency_ms')} ms, GET bodies paced at "
              f"{tables['olap'][0].get('upstream_bandwidth_mbps')} MB/s; median round; upstream requests per round):")
        write(format_table(
            ["engine", "query", "mode", "seconds", "upstream GET", "HEAD", "LIST", "MB from upstream"],
            [(r["engine"], r["query"], r["mode"], r["seconds"], r.get("upstream_GET"), r.get("upstream_HEAD"),
              r.get("upstream_LIST"), None if r.get("upstream_get_body_bytes") is None
              else r["upstream_get_body_bytes"] / 1e6) for r in tables["olap"]]))
    for path in _WRITTEN:
        write(f"results written to {path}")
    if _WRITTEN:
        write(f"README tables: python -m bench.report --run {harness.run_context()['run_id']}")


def _bound(row: dict) -> str:
    """Which pinned core was saturated during the run, if any."""
    def own(prefix: str, fallback: object) -> object:
        # The core's busy time minus what other processes used on it.
        busy = row.get(f"{prefix}_core_busy")
        if busy is None:
            return fallback
        return float(busy) - float(row.get(f"{prefix}_core_other") or 0)

    server = own("server", row.get("server_cpu_pct"))
    generator = own("client", row.get("generator_cpu_pct", row.get("loadgen_cpu_pct")))
    sides = [name for name, busy in (("server", server), ("generator", generator))
             if busy is not None and float(busy) >= 90]
    return "+".join(sides) or "-"


def _noise(row: dict) -> float | None:
    values = [row.get("server_core_other"), row.get("client_core_other")]
    values = [float(v) for v in values if v is not None]
    return max(values) if values else None


def _ms(us: object) -> float | None:
    return None if us is None else float(us) / 1000  # type: ignore[arg-type]
