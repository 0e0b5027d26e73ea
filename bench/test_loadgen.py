"""The load generator's ceiling: how fast each available generator drives nginx (one
worker pinned to the server CPU; the generator pinned to the other CPU).

Generators: bench/loadgen.c copying bodies into a 4 MiB buffer (`loadgen-copy`, what a
real client pays and what the hit benchmarks use by default) and discarding them in the
kernel (`loadgen-discard`), wrk and h2load (HTTP/1.1) when installed. Each gets the same connections
and duration; wrk and h2load send one fixed range (they cannot cycle through a list of
signed requests without per-request scripting), loadgen the precomputed list.

A generator is not the bottleneck when its CPU use stays well under 100% while nginx's
approaches 100%, or when a cheaper generator gets no more out of the same nginx.
"""

from __future__ import annotations

import random
import re
import resource
import shutil
import subprocess
import time

import pytest

from bench.datasets import HITS_BUCKET, hits_data
from bench.harness import (
    CLIENT_CPU,
    HOST,
    SERVER_CPU,
    KiB,
    MiB,
    RequestSigner,
    cpu_busy,
    cpu_times,
    flatten_load,
    missing,
    pin_preexec,
    process_cpu_seconds,
    run_load,
    write_request_file,
)

CASES = (("range-4KiB", 4 * KiB), ("range-1MiB", 1 * MiB), ("whole-object", None))
GENERATORS = ("loadgen-copy", "loadgen-discard", "wrk", "h2load")

_UNITS = {"us": 1.0, "ms": 1e3, "s": 1e6, "m": 60e6}


def _duration_us(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    assert match, f"not a duration: {text!r}"
    return float(match.group(1)) * _UNITS[match.group(2)]


def _run_external(argv: list[str], seconds: float, server_pids: list[int]) -> tuple[str, float, float, float, dict]:
    """Run a generator pinned to the client CPU: (stdout, wall s, its CPU s, server CPU s,
    per-core busy figures)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    server_before = sum(process_cpu_seconds(p) for p in server_pids)
    times_before = cpu_times()
    started = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60,
                          preexec_fn=pin_preexec(CLIENT_CPU), check=False)
    wall = time.perf_counter() - started
    times_after = cpu_times()
    cores = {"server_core": cpu_busy(times_before, times_after, SERVER_CPU),
             "client_core": cpu_busy(times_before, times_after, CLIENT_CPU)}
    server_cpu = sum(process_cpu_seconds(p) for p in server_pids) - server_before
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise RuntimeError(f"{argv[0]} failed ({done.returncode}): {done.stderr}{done.stdout}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    cores["server_core"]["other"] = max(0.0, cores["server_core"].get("busy", 0) - cores["server_core"].get("softirq", 0)
                                        - 100 * server_cpu / wall)
    cores["client_core"]["other"] = max(0.0, cores["client_core"].get("busy", 0) - cores["client_core"].get("softirq", 0)
                                        - 100 * cpu / wall)
    return done.stdout, wall, cpu, server_cpu, cores


def run_wrk(url: str, headers: dict[str, str], seconds: float, connections: int, body: int,
            server_pids: list[int]) -> dict:
    argv = ["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--latency"]
    for name, value in headers.items():
        argv += ["-H", f"{name}: {value}"]
    out, wall, cpu, server_cpu, cores = _run_external([*argv, url], seconds, server_pids)
    match = re.search(r"(\d+) requests in ([\d.]+\w+),", out)
    assert match, out
    requests, elapsed = int(match.group(1)), _duration_us(match.group(2)) / 1e6
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    latency = {p: _duration_us(v) for p, v in re.findall(r"^\s+(50|99)%\s+(\S+)$", out, re.MULTILINE)}
    return {"requests": requests, "elapsed_s": elapsed, "rps": requests / elapsed,
            "gbps": requests * body / elapsed / 1e9, "errors": int(bad.group(1)) if bad else 0,
            "latency_us": {"p50": latency.get("50"), "p99": latency.get("99")},
            "generator_cpu_pct": 100 * cpu / wall, "server_cpu_pct": 100 * server_cpu / elapsed, **cores}


def run_h2load(url: str, headers: dict[str, str], seconds: float, connections: int, body: int,
               server_pids: list[int]) -> dict:
    argv = ["h2load", "--h1", "-t1", f"-c{connections}", "-D", f"{max(1, round(seconds))}"]
    for name, value in headers.items():
        argv += ["-H", f"{name}: {value}"]
    out, wall, cpu, server_cpu, cores = _run_external([*argv, url], seconds, server_pids)
    finished = re.search(r"finished in ([\d.]+\w+), ([\d.]+) req/s", out)
    counts = re.search(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed", out)
    assert finished and counts, out
    elapsed = _duration_us(finished.group(1)) / 1e6
    done = int(counts.group(3))
    return {"requests": done, "elapsed_s": elapsed, "rps": done / elapsed, "gbps": done * body / elapsed / 1e9,
            "errors": int(counts.group(5)), "latency_us": {"p50": None, "p99": None},
            "generator_cpu_pct": 100 * cpu / wall, "server_cpu_pct": 100 * server_cpu / elapsed, **cores}


@pytest.fixture(scope="module")
def ceiling(bench_settings, start_nginx, loadgen, tmp_path_factory):
    data = hits_data(bench_settings)
    nginx = start_nginx(data.root)
    work = tmp_path_factory.mktemp("ceiling")
    signer = RequestSigner(HOST, nginx.port)
    cases = {}
    for name, size in CASES:
        if size is None:
            objects = data.whole_objects
            records = [(signer.raw("GET", HITS_BUCKET, o.key), o.size) for o in objects]
            fixed = (f"/{HITS_BUCKET}/{objects[0].key}", {}, objects[0].size)
        else:
            obj = data.range_object
            rnd = random.Random(f"{name}-{obj.size}")
            records = []
            for _ in range(bench_settings.distinct_ranges):
                offset = rnd.randrange(0, obj.size - size + 1)
                records.append((signer.raw("GET", HITS_BUCKET, obj.key, {"Range": f"bytes={offset}-{offset + size - 1}"}), size))
            fixed = (f"/{HITS_BUCKET}/{obj.key}", {"Range": f"bytes=0-{size - 1}"}, size)
        file = work / f"{name}.requests"
        write_request_file(file, records)
        cases[name] = (file, fixed)
    return bench_settings, nginx, cases


@pytest.mark.parametrize("generator", GENERATORS)
@pytest.mark.parametrize("case", [c[0] for c in CASES])
def test_loadgen_ceiling(benchmark, ceiling, results, case: str, generator: str) -> None:
    settings, nginx, cases = ceiling
    file, (path, headers, body) = cases[case]
    tool = generator.split("-")[0]
    if tool in ("wrk", "h2load") and shutil.which(tool) is None:
        # The harness's rule: a missing tool skips here, and fails under CI=true.
        missing(f"{tool} is not installed (apt-get install {'wrk' if tool == 'wrk' else 'nghttp2-client'})")
    seconds = settings.target_seconds
    reports: list[dict] = []

    def one_round() -> None:
        pids = nginx.worker_pids()
        if tool == "loadgen":
            report = run_load(nginx.port, file, seconds=seconds, connections=settings.connections,
                              mode=generator.split("-")[1], server_pids=pids)
            report["generator_cpu_pct"] = report["loadgen_cpu_pct"]
        elif tool == "wrk":
            report = run_wrk(f"http://{HOST}:{nginx.port}{path}", headers, seconds, settings.connections, body, pids)
        else:
            report = run_h2load(f"http://{HOST}:{nginx.port}{path}", headers, seconds, settings.connections, body, pids)
        reports.append(report)

    benchmark.group = f"loadgen ceiling {case}"
    benchmark.name = f"{case} {generator}"
    benchmark.pedantic(one_round, rounds=1, iterations=1)
    report = reports[0]
    assert report["errors"] == 0, f"{generator}: {report['errors']} errors"
    keep = ("requests", "elapsed_s", "rps", "gbps", "errors", "latency_us", "generator_cpu_pct", "server_cpu_pct",
            "server_cpu_us_per_req", "mode", "server_core", "client_core")
    row = {"case": case, "generator": generator, "body_bytes": body, "connections": settings.connections,
           **flatten_load({k: v for k, v in report.items() if k in keep})}
    results.add("loadgen", row)
    benchmark.extra_info.update({k: v for k, v in row.items() if v is not None})
