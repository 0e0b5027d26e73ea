"""Cache hits: Sprox serving bytes it holds vs nginx serving the same bytes from local
files, in the same run, each server on one pinned CPU, the load generator on another.

Cases: random ranges of 4 KiB (signed in the header, and presigned), 64 KiB and 1 MiB
within one large object (1 GiB; 64 MiB in short mode), and whole objects (64 MiB; 16
MiB in short mode). Sprox runs with
`--origin-dir` on the directory nginx serves, verifies SigV4 (requests are signed with
botocore and nginx gets the very same bytes), and, when it has a cache, caches into a
fresh directory. Every byte is read once through Sprox before measuring (checked
against the self-checking pattern); with a cache, every measured response must say
`X-Cache: HIT`.

A round sends the same number of requests to both servers: the number nginx serves in
`target_seconds` (measured just before), so pytest-benchmark's times compare directly;
a slower server's round is cut at `target_seconds * cap_factor` (`truncated`). The
numbers that matter (req/s, GB/s, latency, server CPU per request, Sprox/nginx ratio)
are in each benchmark's `extra_info`, in the table printed at the end, and in
bench/results/hits-<run>.parquet.
"""

from __future__ import annotations

import random
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from bench.datasets import HITS_BUCKET, ByteChecker, HitsData, hits_data
from bench.harness import (
    HOST,
    SERVER_CPU,
    KiB,
    MiB,
    RequestSigner,
    flatten_load,
    run_load,
    sprox_args,
    sprox_has_cache,
    sprox_mode,
    stream_get,
    write_request_file,
)

SIGNATURE_MAX_AGE = 600  # re-sign after 10 minutes; SigV4 allows 15


@dataclass(frozen=True)
class HitCase:
    name: str
    range_size: int | None  # None: whole objects
    presigned: bool = False  # SigV4 in the query (a presigned URL) instead of the header


CASES = (
    HitCase("range-4KiB", 4 * KiB),
    HitCase("range-4KiB-presigned", 4 * KiB, presigned=True),
    HitCase("range-64KiB", 64 * KiB),
    HitCase("range-1MiB", 1 * MiB),
    HitCase("whole-object", None),
)
SERVERS = ("nginx", "sprox")


@dataclass
class Plan:
    """The signed requests of one case, and how many a round sends."""

    file: Path
    samples: list[tuple[str, dict[str, str], str, int, int]]  # path, headers, key, offset, length
    body_bytes: int  # per request
    signed_at: float
    requests_per_round: int | None = None
    nginx_calibration: dict = field(default_factory=dict)


class HitsBench:
    def __init__(self, settings, data: HitsData, nginx, sprox, work_dir: Path, loadgen: Path):
        self.settings = settings
        self.data = data
        self.nginx = nginx
        self.sprox = sprox
        self.work_dir = work_dir
        self.loadgen = loadgen
        self.signer = RequestSigner(HOST, sprox.port)
        self.plans: dict[str, Plan] = {}
        self.medians: dict[tuple[str, str], dict] = {}

    def port(self, server: str) -> int:
        return self.nginx.port if server == "nginx" else self.sprox.port

    def server_pids(self, server: str) -> list[int]:
        return self.nginx.worker_pids() if server == "nginx" else [self.sprox.pid]

    # -- warm-up ----------------------------------------------------------------------

    def warm(self) -> None:
        """Read every object once through Sprox, checking every byte."""
        for obj in self.data.objects:
            path, headers = self.signer.headers("GET", HITS_BUCKET, obj.key)
            status, _, length = stream_get(self.sprox.port, path, headers, ByteChecker(obj.key))
            assert status == 200 and length == obj.size, f"warm-up GET {obj.key}: {status}, {length} bytes"

    def check_samples(self, server: str, plan: Plan) -> None:
        """A few of the case's requests, bytes checked; through Sprox with a cache, each
        must be a hit."""
        for path, headers, key, offset, length in plan.samples:
            headers = dict(headers)
            status, response_headers, got = stream_get(self.port(server), path, headers, ByteChecker(key, offset))
            assert status in (200, 206) and got == length, f"{server} {path} {headers.get('Range')}: {status}, {got} bytes"
            if server == "sprox" and sprox_has_cache():
                assert response_headers.get("X-Cache") == "HIT", \
                    f"warmed range not a cache hit: {headers.get('Range')} -> X-Cache {response_headers.get('X-Cache')}"

    # -- requests ---------------------------------------------------------------------

    def plan(self, case: HitCase) -> Plan:
        plan = self.plans.get(case.name)
        if plan is None or time.time() - plan.signed_at > SIGNATURE_MAX_AGE:
            fresh = self._sign(case)
            if plan is not None:
                fresh.requests_per_round, fresh.nginx_calibration = plan.requests_per_round, plan.nginx_calibration
            plan = self.plans[case.name] = fresh
        if plan.requests_per_round is None:
            self._calibrate(plan)
        return plan

    def _sign(self, case: HitCase) -> Plan:
        records, samples = [], []
        signed_at = time.time()
        if case.range_size is None:
            for obj in self.data.whole_objects:
                records.append((self.signer.raw("GET", HITS_BUCKET, obj.key), obj.size))
                path, headers = self.signer.headers("GET", HITS_BUCKET, obj.key)
                samples.append((path, headers, obj.key, 0, obj.size))
            body = self.data.whole_objects[0].size
        else:
            obj, size = self.data.range_object, case.range_size
            rnd = random.Random(f"{case.name}-{obj.size}")
            for i in range(self.settings.distinct_ranges):
                offset = rnd.randrange(0, obj.size - size + 1)
                extra = {"Range": f"bytes={offset}-{offset + size - 1}"}
                records.append((self.signer.raw("GET", HITS_BUCKET, obj.key, extra, presigned=case.presigned),
                                size))
                if i < 8:
                    sign = self.signer.presigned if case.presigned else self.signer.headers
                    path, headers = sign("GET", HITS_BUCKET, obj.key, extra)
                    samples.append((path, headers, obj.key, offset, size))
            body = size
        file = self.work_dir / f"{case.name}.requests"
        write_request_file(file, records)
        return Plan(file, samples, body, signed_at)

    def _calibrate(self, plan: Plan) -> None:
        report = run_load(self.nginx.port, plan.file, seconds=self.settings.calibration_seconds,
                          connections=self.settings.connections, mode=self.settings.loadgen_mode,
                          server_pids=self.server_pids("nginx"))
        assert report["errors"] == 0, f"nginx calibration failed: {report['first_error']}"
        plan.nginx_calibration = report
        plan.requests_per_round = max(int(report["rps"] * self.settings.target_seconds), 8 * self.settings.connections)


@pytest.fixture(scope="module")
def hits(bench_settings, start_nginx, start_sprox, loadgen, tmp_path_factory) -> HitsBench:
    data = hits_data(bench_settings)
    nginx = start_nginx(data.root)
    work = tmp_path_factory.mktemp("hits")
    total = sum(o.size for o in data.objects)
    cache_size = f"{max(1, 2 * total // (1 << 30) + 1)}GiB"
    sprox = start_sprox(*sprox_args(origin_dir=data.root, cache_dir=work / "cache", cache_size=cache_size),
                        cpu=SERVER_CPU)
    bench = HitsBench(bench_settings, data, nginx, sprox, work, loadgen)
    bench.warm()
    return bench


@pytest.mark.parametrize(("case", "server"), [(c, s) for c in CASES for s in SERVERS],
                         ids=[f"{c.name}-{s}" for c in CASES for s in SERVERS])
def test_hits(benchmark, hits: HitsBench, results, case: HitCase, server: str) -> None:
    settings = hits.settings
    plan = hits.plan(case)
    hits.check_samples(server, plan)
    reports: list[dict] = []

    def one_round() -> None:
        reports.append(run_load(
            hits.port(server), plan.file, seconds=settings.target_seconds * settings.cap_factor,
            max_requests=plan.requests_per_round, connections=settings.connections,
            mode=settings.loadgen_mode, server_pids=hits.server_pids(server)))

    benchmark.group = f"hits {case.name}"
    benchmark.name = f"{case.name} {server}" + (f" ({sprox_mode()})" if server == "sprox" else "")
    benchmark.pedantic(one_round, rounds=settings.rounds, iterations=1)

    for report in reports:
        assert report["errors"] == 0, f"{server}: {report['errors']} errors, first: {report['first_error']}"
        assert report["requests"] > 0
        if server == "sprox" and sprox_has_cache():
            assert report["x_cache"]["HIT"] == report["requests"], \
                f"not every warmed request was a cache hit: {report['x_cache']}"

    median = sorted(reports, key=lambda r: r["rps"])[len(reports) // 2]
    row = {
        "case": case.name, "server": server, "range_size": case.range_size,
        "requests_per_round": plan.requests_per_round, "rounds": len(reports),
        "rps_all": [r["rps"] for r in reports], "rps_stdev": statistics.pstdev(r["rps"] for r in reports),
        **flatten_load(median),
        # Bytes per response; the load report's body_bytes is the round's total.
        "response_bytes": plan.body_bytes,
    }
    if server == "sprox":
        nginx = hits.medians.get((case.name, "nginx"))
        row["ratio"] = median["rps"] / nginx["rps"] if nginx else None
    hits.medians[(case.name, server)] = median
    results.add("hits", row)
    benchmark.extra_info.update({k: v for k, v in row.items() if not isinstance(v, (list, dict))})
