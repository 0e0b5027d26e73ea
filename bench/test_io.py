"""The cache's disk I/O: io_uring (`UringBackend`) vs the thread pool (`ThreadBackend`,
16 workers, the cache's default), same files, same offsets, same run.

Reads ("is a cold read cheaper through io_uring?"): 64 KiB and 1 MiB reads of one large
file (1 GiB; 64 MiB in short mode; generated once into bench/.data/io/ with the
self-checking pattern of tests/data.py and reused) at aligned offsets in random order:
the file's read-size pieces, shuffled, so no two reads of a round overlap. Exactly 32
reads are in flight from one asyncio loop; a round reads `read_bytes_per_round` (1 GiB;
short 128 MiB; buffered rounds at most the file once) and is cut at `round_cap_s`. Two
ways to be cold:

- ``direct``: the file opened with O_DIRECT and the backend made with
  ``direct_io=True``; no read is served from the page cache. The primary mode.
- ``buffered``: the file opened plainly (what the cache does today), with
  ``posix_fadvise(POSIX_FADV_DONTNEED)`` on the whole file before each round. DONTNEED
  is advisory: the kernel drops only clean, unmapped, unlocked pages, and readahead may
  bring in pieces before they are asked for. ``cold %`` (bytes this process read from
  the block device / bytes asked for, from /proc/self/io) says what really happened:
  ~100 is cold, more is readahead, less is page-cache hits.

Either way "cold" is the guest's view: on a VM whose disk is a host file (this one:
virtio on Firecracker), the host's page cache may answer, so a read costs a virtio
round trip rather than flash latency.

Fills ("what does writing a cache block cost?"): 4 MiB blocks (the cache's default block
size) written into a fresh sparse file (ftruncate'd to its final size, as block files
are), sequentially or at random block offsets, 8 in flight, `write_blocks_per_round`
per round. Variants: ``buffered`` (what the cache does: into the page cache; the
following fdatasync is timed separately, outside the benchmark, as ``sync s`` and
``MB/s with sync``), ``buffered-crc`` (plus zlib.crc32 of each block on a separate
16-thread pool while the write runs, as `ObjectCache.persist` does) and ``direct``
(O_DIRECT from page-aligned buffers, so the data reaches the device before the write
completes). Each fill test first writes one whole round untimed (on a VM the first
touch of fresh guest memory is slow, and the first buffered round would pay for it).

The process (its loop, the thread pools, io_uring's workers) is pinned to the server
CPU, as Sprox is in the hit benchmarks (SPROX_BENCH_NO_PIN=1: not pinned). Each test
first does an untimed warm-up (thread pool started, ring bound to the loop). Both
backends get the same offsets, in the same order.

Reported per case and backend (median round): MB/s, ops/s, this process's CPU time per
operation and in all (every thread, io_uring's workers included), whether the CPU or the
device set the pace, cold %, the uring/threads ratio (on the uring row), the spread of
the rounds, and noise gauges: ``noise %`` (CPU time on all cores used by others, in % of
one core: other processes, plus kernel work such as interrupts and kworkers), ``our
core %`` (the same on the pinned core) and ``disk other MB`` (block-device traffic
during the round that was not this process's). Results are in
each benchmark's extra_info, in the "disk I/O" table at the end of the run and in
bench/results/io-<run>.parquet. The issue's target, uring >= 1.4x threads on cold
64 KiB reads, is printed as met or not; benchmarks report, they don't fail on timings.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import random
import resource
import shutil
import statistics
import tempfile
import time
import zlib
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Self

import pytest

from bench.harness import (
    DATA_DIR,
    RESULTS,
    SERVER_CPU,
    GiB,
    KiB,
    MiB,
    Settings,
    cpu_busy,
    cpu_times,
    format_table,
)
from sprox import uring
from sprox.cache.io import IOBackend, aligned_buffer, make_backend
from tests.data import check_bytes, expected_bytes

BACKENDS = ("threads", "uring")  # threads first: the uring row gets the ratio
IO_THREADS = 16  # ThreadBackend's workers (the cache's default, --io-threads)
RING_ENTRIES = 256  # make_backend's default
READ_DEPTH = 32  # reads in flight
WRITE_DEPTH = 8  # block writes in flight
BLOCK_SIZE = 4 * MiB  # the cache's default block size
CRC_THREADS = 16  # ObjectCache's executor, where persist() runs zlib.crc32
TARGET_CASE = "read-64KiB-direct"
TARGET_RATIO = 1.4
TABLE = "io"
IO_DIR = DATA_DIR / "io"


@dataclass(frozen=True)
class IoSettings:
    short: bool
    read_file_size: int
    read_bytes_per_round: int  # ops per round = this / read size
    write_blocks_per_round: int
    round_cap_s: float  # a round stops issuing operations after this long
    rounds: int

    @classmethod
    def of(cls, settings: Settings) -> IoSettings:
        if settings.short:
            return cls(True, settings.range_object_size, 128 * MiB, 32, 3.0, settings.rounds)
        return cls(False, settings.range_object_size, 1 * GiB, 256, 15.0, settings.rounds)


@dataclass(frozen=True)
class ReadCase:
    name: str
    size: int
    direct: bool


@dataclass(frozen=True)
class FillCase:
    name: str
    pattern: str  # "sequential" or "random"
    direct: bool
    crc: bool


READ_CASES = (
    ReadCase("read-64KiB-direct", 64 * KiB, True),
    ReadCase("read-1MiB-direct", 1 * MiB, True),
    ReadCase("read-64KiB-buffered", 64 * KiB, False),
    ReadCase("read-1MiB-buffered", 1 * MiB, False),
)
FILL_CASES = (
    FillCase("fill-sequential-buffered", "sequential", False, False),
    FillCase("fill-sequential-buffered-crc", "sequential", False, True),
    FillCase("fill-sequential-direct", "sequential", True, False),
    FillCase("fill-random-buffered", "random", False, False),
    FillCase("fill-random-buffered-crc", "random", False, True),
    FillCase("fill-random-direct", "random", True, False),
)

# case name -> backend -> median row, for the uring/threads ratio
_MEDIANS: dict[str, dict[str, dict]] = {}


# -- environment ----------------------------------------------------------------------------


@contextlib.contextmanager
def pinned(cpu: int | None) -> Iterator[None]:
    """Pin the calling thread to `cpu`; threads started inside inherit it (the thread
    pools, io_uring's io-wq workers). The old affinity comes back on exit."""
    if cpu is None:
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def make_io(name: str, direct: bool) -> IOBackend:
    try:
        return make_backend(name, direct_io=direct, io_threads=IO_THREADS, ring_entries=RING_ENTRIES)
    except RuntimeError as error:  # io_uring refused (old kernel, seccomp, sysctl): not a bug here
        pytest.skip(str(error))


def open_file(path: Path, flags: int, direct: bool) -> int:
    try:
        return os.open(path, flags | (os.O_DIRECT if direct else 0), 0o600)
    except OSError as error:
        if direct and error.errno == errno.EINVAL:
            pytest.skip(f"{path.parent}: the filesystem does not support O_DIRECT")
        raise


def _own_io() -> tuple[int, int] | None:
    """(read_bytes, write_bytes) this process caused at the block layer (/proc/self/io)."""
    try:
        fields = dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())
        return int(fields["read_bytes"]), int(fields["write_bytes"])
    except (OSError, KeyError, ValueError):
        return None


def _device_stat(path: Path) -> Path | None:
    device = os.stat(path).st_dev
    stat = Path(f"/sys/dev/block/{os.major(device)}:{os.minor(device)}/stat")
    return stat if stat.exists() else None


def _device_io(stat: Path | None) -> tuple[int, int] | None:
    """(bytes read, bytes written) by the block device so far, everyone's."""
    if stat is None:
        return None
    try:
        fields = stat.read_text().split()
        return int(fields[2]) * 512, int(fields[6]) * 512
    except (OSError, IndexError, ValueError):
        return None


def _own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)  # every thread, io-wq workers included
    return usage.ru_utime + usage.ru_stime


class Meter:
    """CPU and disk accounting around one round."""

    def __init__(self, device_stat: Path | None) -> None:
        self.device_stat = device_stat

    def __enter__(self) -> Self:
        self.started = time.perf_counter()
        self.cpu = _own_cpu()
        self.times = cpu_times()
        self.io = _own_io()
        self.device = _device_io(self.device_stat)
        return self

    def __exit__(self, *exc: object) -> None:
        wall = time.perf_counter() - self.started or 1e-9
        own_cpu = _own_cpu() - self.cpu
        times = cpu_times()
        io, device = _own_io(), _device_io(self.device_stat)
        cores = {cpu: cpu_busy(self.times, times, cpu) for cpu in times}
        busy = {cpu: core.get("busy", 0.0) for cpu, core in cores.items()}
        own_pct = 100 * own_cpu / wall
        self.report: dict[str, object] = {
            "own_cpu_s": own_cpu,
            "own_cpu_pct": own_pct,
            # Busy time on all cores that this process did not use, in % of one core.
            "noise_pct": max(0.0, sum(busy.values()) - own_pct),
            # Time the hypervisor gave our virtual CPUs to someone else (a VM's noise).
            "steal_pct": sum(core.get("steal", 0.0) for core in cores.values()),
        }
        if SERVER_CPU is not None and SERVER_CPU in busy:
            # Pinned, every thread of ours runs there: the rest competed with us directly.
            self.report["noise_our_core_pct"] = max(0.0, busy[SERVER_CPU] - own_pct)
        own = None if io is None or self.io is None else (io[0] - self.io[0], io[1] - self.io[1])
        everyone = None if device is None or self.device is None else (device[0] - self.device[0],
                                                                        device[1] - self.device[1])
        if own is not None:
            self.report["own_disk_read_bytes"], self.report["own_disk_write_bytes"] = own
        if everyone is not None:
            self.report["device_read_bytes"], self.report["device_write_bytes"] = everyone
        if own is not None and everyone is not None:
            # Buffered writes reach the device later (writeback), so in those rounds
            # this counts others' traffic only; a rough gauge either way.
            self.report["disk_other_mb"] = max(0, sum(everyone) - sum(own)) / 1e6


# -- the data -------------------------------------------------------------------------------


def read_file(size: int) -> Path:
    """The file random reads come from (self-checking: the key is its name), made once."""
    path = IO_DIR / f"random-read-{size // MiB}MiB.bin"
    if path.exists() and path.stat().st_size == size:
        return path
    IO_DIR.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as out:
            step = 8 * MiB
            out.writelines(expected_bytes(path.name, offset, min(step, size - offset))
                           for offset in range(0, size, step))
            out.flush()
            os.fsync(out.fileno())  # no dirty pages: O_DIRECT reads would flush them first
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _remove_stale_work_dirs() -> None:
    """Fill directories left by runs that died (their pid is in the name)."""
    for stale in IO_DIR.glob("fill-*"):
        try:
            pid = int(stale.name.split("-")[1])
        except (IndexError, ValueError):
            continue
        if pid != os.getpid() and not Path(f"/proc/{pid}").exists():
            shutil.rmtree(stale, ignore_errors=True)


@dataclass
class IoBench:
    settings: IoSettings
    read_path: Path
    work: Path  # fill files, removed at the end
    device_stat: Path | None


@pytest.fixture(scope="module")
def io_bench(bench_settings: Settings) -> Iterator[IoBench]:
    settings = IoSettings.of(bench_settings)
    path = read_file(settings.read_file_size)
    _remove_stale_work_dirs()
    work = Path(tempfile.mkdtemp(prefix=f"fill-{os.getpid()}-", dir=IO_DIR))
    try:
        yield IoBench(settings, path, work, _device_stat(path))
    finally:
        shutil.rmtree(work, ignore_errors=True)


# -- rounds ---------------------------------------------------------------------------------


async def read_round(io: IOBackend, fd: int, size: int, offsets: Sequence[int], depth: int,
                     deadline: float, keep: int = 2) -> dict:
    """`depth` readers share `offsets`, one read in flight each, until the offsets run
    out or `deadline` passes. Keeps `keep` results to check afterwards."""
    pending = iter(offsets)
    samples: list[tuple[int, object]] = []

    async def reader() -> tuple[int, int]:
        ops = done = 0
        for offset in pending:
            data = await io.pread(fd, offset, size)
            if len(data) != size:
                raise AssertionError(f"short read at {offset}: {len(data)} of {size} bytes")
            ops += 1
            done += size
            if len(samples) < keep:
                samples.append((offset, data))
            if time.perf_counter() >= deadline:
                break
        return ops, done

    started = time.perf_counter()
    counts = await asyncio.gather(*(reader() for _ in range(depth)))
    elapsed = time.perf_counter() - started
    ops = sum(c[0] for c in counts)
    return {"ops": ops, "bytes": sum(c[1] for c in counts), "seconds": elapsed,
            "truncated": ops < len(offsets), "samples": samples}


async def fill_round(io: IOBackend, fd: int, offsets: Sequence[int], blocks: Sequence[object],
                     crcs: Sequence[int], depth: int, deadline: float,
                     crc_pool: ThreadPoolExecutor | None) -> dict:
    """`depth` writers share the block offsets (block i gets `blocks[i % len(blocks)]`);
    with `crc_pool`, each block's CRC32 is computed there while it is written."""
    loop = asyncio.get_running_loop()
    pending = iter(enumerate(offsets))

    async def writer() -> tuple[int, int]:
        ops = done = 0
        for i, offset in pending:
            data = blocks[i % len(blocks)]
            crc = loop.run_in_executor(crc_pool, zlib.crc32, data) if crc_pool is not None else None
            written = await io.pwrite(fd, offset, data)  # type: ignore[arg-type]
            if crc is not None and await crc != crcs[i % len(blocks)]:
                raise AssertionError(f"CRC32 of block {i} is wrong")
            ops += 1
            done += written
            if time.perf_counter() >= deadline:
                break
        return ops, done

    started = time.perf_counter()
    counts = await asyncio.gather(*(writer() for _ in range(depth)))
    elapsed = time.perf_counter() - started
    ops = sum(c[0] for c in counts)
    return {"ops": ops, "bytes": sum(c[1] for c in counts), "seconds": elapsed, "truncated": ops < len(offsets)}


# -- results --------------------------------------------------------------------------------


def summarize(kind: str, case_name: str, backend: str, rounds: list[dict], extra: dict) -> dict:
    """The result row: the median round (by MB/s), every round's MB/s, the ratio."""
    for r in rounds:
        seconds = r["seconds"] or 1e-9
        r["mbps"] = r["bytes"] / seconds / 1e6
        r["ops_per_s"] = r["ops"] / seconds
        r["own_cpu_us_per_op"] = 1e6 * r["own_cpu_s"] / max(r["ops"], 1)
    median = sorted(rounds, key=lambda r: r["mbps"])[len(rounds) // 2]
    row = {
        "kind": kind, "case": case_name, "backend": backend, "uring_native": uring.NATIVE,
        "pinned_cpu": SERVER_CPU, "io_threads": IO_THREADS if backend == "threads" else None,
        "ring_entries": RING_ENTRIES if backend == "uring" else None, **extra,
        "rounds": len(rounds), "mbps_all": [r["mbps"] for r in rounds],
        "mbps_stdev": statistics.pstdev(r["mbps"] for r in rounds),
        "mbps_max": max(r["mbps"] for r in rounds),
        # How far apart the rounds were, in % of the median: large means a noisy run.
        "spread_pct": 100 * (max(r["mbps"] for r in rounds) - min(r["mbps"] for r in rounds)) / median["mbps"],
        "noise_pct_max": max(r.get("noise_pct", 0.0) for r in rounds),
        "noise_our_core_pct_max": max((r["noise_our_core_pct"] for r in rounds if "noise_our_core_pct" in r),
                                      default=None),
        "truncated_rounds": sum(bool(r["truncated"]) for r in rounds),
        **{k: v for k, v in median.items() if k not in ("samples", "truncated")},
    }
    # What set the pace: the CPU (pinned: our core was >= 90% busy, with us or with
    # others; not pinned: we used >= 90% of every core we may use), else the device.
    if SERVER_CPU is not None:
        saturated = median["own_cpu_pct"] + median.get("noise_our_core_pct", 0.0) >= 90
    else:
        saturated = median["own_cpu_pct"] >= 90 * len(os.sched_getaffinity(0))
    row["bound_by"] = "cpu" if saturated else "device"
    if "own_disk_read_bytes" in median and kind == "read":
        row["cold_pct"] = 100 * median["own_disk_read_bytes"] / max(median["bytes"], 1)
    _MEDIANS.setdefault(case_name, {})[backend] = row
    threads = _MEDIANS[case_name].get("threads")
    if backend == "uring" and threads:
        row["ratio"] = row["mbps"] / threads["mbps"]
        # CPU time per operation, uring / threads; its inverse is how many more
        # operations uring does per CPU-second (the bound when threads are CPU-bound).
        row["cpu_ratio"] = row["own_cpu_us_per_op"] / threads["own_cpu_us_per_op"] \
            if threads["own_cpu_us_per_op"] else None
        if case_name == TARGET_CASE:
            row["target_ratio"] = TARGET_RATIO
            row["target_met"] = row["ratio"] >= TARGET_RATIO
    return row


def record(benchmark, row: dict) -> None:
    RESULTS.add(TABLE, row)
    benchmark.extra_info.update({k: v for k, v in row.items() if v is not None and not isinstance(v, (list, dict))})


class IoSummary:
    """Prints the disk I/O table after the run (a plugin registered by this module, so
    the shared conftest needs no entry for it)."""

    @pytest.hookimpl(trylast=True)
    def pytest_terminal_summary(self, terminalreporter, exitstatus: int, config: pytest.Config) -> None:
        rows = RESULTS.tables.get(TABLE)
        if not rows:
            return
        write = terminalreporter.write_line
        terminalreporter.section("sprox bench: disk I/O, io_uring vs threads")
        reads = [r for r in rows if r["kind"] == "read"]
        fills = [r for r in rows if r["kind"] == "fill"]
        if reads:
            write(f"\nRandom reads, {READ_DEPTH} in flight from one loop (median round; threads: "
                  f"{IO_THREADS} workers; ratio = uring / threads MB/s):")
            write(format_table(
                ["case", "backend", "MB/s", "ops/s", "CPU us/op", "CPU %", "bound by", "cold %", "uring/threads",
                 "noise %", "our core %", "disk other MB", "spread %", "rounds"],
                [(r["case"], r["backend"], r["mbps"], r["ops_per_s"], r["own_cpu_us_per_op"], r["own_cpu_pct"],
                  r["bound_by"], r.get("cold_pct"),
                  r.get("ratio"), r.get("noise_pct_max"), r.get("noise_our_core_pct_max"), r.get("disk_other_mb"),
                  r["spread_pct"], _rounds(r)) for r in reads]))
        if fills:
            write(f"\nBlock fills, {BLOCK_SIZE // MiB} MiB blocks into a sparse file, {WRITE_DEPTH} in flight "
                  f"(median round; MB/s with sync: including the fdatasync after the round):")
            write(format_table(
                ["case", "backend", "MB/s", "blocks/s", "CPU us/block", "CPU %", "bound by", "sync s",
                 "MB/s with sync", "uring/threads", "noise %", "our core %", "disk other MB", "spread %", "rounds"],
                [(r["case"], r["backend"], r["mbps"], r["ops_per_s"], r["own_cpu_us_per_op"], r["own_cpu_pct"],
                  r["bound_by"], r.get("sync_s"),
                  r.get("mbps_with_sync"), r.get("ratio"), r.get("noise_pct_max"), r.get("noise_our_core_pct_max"),
                  r.get("disk_other_mb"), r["spread_pct"], _rounds(r)) for r in fills]))
        write("CPU %: this process's CPU time (every thread, io_uring's workers included) over the round, "
              "in % of one core; bound by: cpu when the pinned core was >= 90% busy (this process plus "
              "others; not pinned: this process used >= 90% of its cores), else device (waited for the disk).\n"
              "cold %: bytes this process read from the block device / bytes asked for (/proc/self/io).\n"
              "noise %: worst round's CPU busy time on all cores not used by this process, in % of one core "
              "(other processes, interrupts, kworkers); our core %: the same on the core this process was "
              "pinned to, where it competed directly. Above ~10, rerun.\n"
              "disk other MB: block-device traffic during the round that was not this process's; "
              "spread %: (fastest - slowest round) / median, in MB/s.")
        target = next((r for r in reads if r["case"] == TARGET_CASE and r.get("ratio") is not None), None)
        if target is not None:
            threads = _MEDIANS[TARGET_CASE]["threads"]
            verdict = "met" if target["target_met"] else "NOT met"
            efficiency = (f"; reads per CPU-second: uring {1 / target['cpu_ratio']:.2f}x threads"
                          if target.get("cpu_ratio") else "")
            write(f"target: io_uring >= {TARGET_RATIO}x threads on cold 64 KiB reads (O_DIRECT): "
                  f"{target['ratio']:.2f}x, {verdict} (threads {threads['bound_by']}-bound at "
                  f"{threads['own_cpu_pct']:.0f}% CPU, uring {target['bound_by']}-bound at "
                  f"{target['own_cpu_pct']:.0f}%){efficiency}")


def _rounds(row: dict) -> str:
    cut = f", {row['truncated_rounds']} cut" if row.get("truncated_rounds") else ""
    return f"{row['rounds']}{cut}"


@pytest.fixture(scope="module", autouse=True)
def _io_summary(request: pytest.FixtureRequest) -> None:
    manager = request.config.pluginmanager
    if not manager.has_plugin("sprox-bench-io-summary"):
        manager.register(IoSummary(), "sprox-bench-io-summary")


# -- benchmarks -----------------------------------------------------------------------------


def _params(cases: Sequence[ReadCase | FillCase]) -> dict:
    pairs = [(c, b) for c in cases for b in BACKENDS]
    return {"argvalues": pairs, "ids": [f"{c.name}-{b}" for c, b in pairs]}


@pytest.mark.parametrize(("case", "backend_name"), **_params(READ_CASES))
def test_io_read(benchmark, io_bench: IoBench, case: ReadCase, backend_name: str) -> None:
    settings = io_bench.settings
    size, path = case.size, io_bench.read_path
    file_size = settings.read_file_size
    # Offsets: the file's `size`-aligned pieces in random order, so no two reads of a
    # round overlap. Buffered rounds read each piece at most once (a second read would
    # be a page-cache hit); direct rounds may go over the file again (short mode).
    slots = file_size // size
    ops = settings.read_bytes_per_round // size
    if not case.direct:
        ops = min(ops, slots)
    # The same offsets for both backends: one list per round, and one for the warm-up.
    rnd = random.Random(f"{case.name}-{file_size}")

    def offsets(n: int) -> list[int]:
        out: list[int] = []
        while len(out) < n:
            order = list(range(slots))
            rnd.shuffle(order)
            out += [slot * size for slot in order]
        return out[:n]

    warmup = offsets(2 * READ_DEPTH)
    per_round = [offsets(ops) for _ in range(settings.rounds)]
    fd = open_file(path, os.O_RDONLY, case.direct)
    rounds: list[dict] = []
    try:
        with pinned(SERVER_CPU):
            io = make_io(backend_name, case.direct)
            loop = asyncio.new_event_loop()
            try:
                loop.run_until_complete(read_round(io, fd, size, warmup, READ_DEPTH, time.perf_counter() + 30))

                def setup() -> None:
                    if not case.direct:
                        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # advisory; see cold %

                def one_round() -> None:
                    deadline = time.perf_counter() + settings.round_cap_s
                    with Meter(io_bench.device_stat) as meter:
                        report = loop.run_until_complete(
                            read_round(io, fd, size, per_round[len(rounds) % len(per_round)], READ_DEPTH, deadline))
                    rounds.append({**report, **meter.report})

                benchmark.group = f"io {case.name}"
                benchmark.name = f"{case.name} {backend_name}"
                benchmark.pedantic(one_round, setup=setup, rounds=settings.rounds, iterations=1)
            finally:
                loop.run_until_complete(io.close())
                loop.close()
    finally:
        os.close(fd)

    for r in rounds:
        assert r["ops"] > 0
        for offset, data in r.pop("samples"):
            bad = check_bytes(path.name, offset, bytes(data))  # type: ignore[call-overload]
            assert bad is None, f"{backend_name}: wrong byte at {bad} in a read at {offset}"
    row = summarize("read", case.name, backend_name, rounds, {
        "mode": "direct" if case.direct else "buffered", "io_size": size, "depth": READ_DEPTH,
        "file_bytes": file_size, "ops_per_round": ops, "round_cap_s": settings.round_cap_s,
    })
    record(benchmark, row)


@pytest.mark.parametrize(("case", "backend_name"), **_params(FILL_CASES))
def test_io_fill(benchmark, io_bench: IoBench, case: FillCase, backend_name: str) -> None:
    settings = io_bench.settings
    count = settings.write_blocks_per_round
    order = list(range(count))
    if case.pattern == "random":
        random.Random(f"{case.name}-{count}").shuffle(order)
    offsets = [i * BLOCK_SIZE for i in order]
    # WRITE_DEPTH distinct blocks, cycled. Buffered: bytes, as fills hand them over.
    # Direct: page-aligned buffers, so the backend writes them without a bounce copy.
    source = [random.Random(f"block-{i}").randbytes(BLOCK_SIZE) for i in range(WRITE_DEPTH)]
    crcs = [zlib.crc32(b) for b in source]
    blocks: list[object] = list(source)
    if case.direct:
        blocks = []
        for data in source:
            buffer = aligned_buffer(BLOCK_SIZE)
            buffer[:] = data
            blocks.append(buffer)
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL
    state: dict[str, object] = {"fd": None, "path": None}
    rounds: list[dict] = []

    def new_file(tag: str) -> int:
        path = io_bench.work / f"{case.name}-{backend_name}-{tag}.bin"
        fd = open_file(path, flags, case.direct)
        os.ftruncate(fd, count * BLOCK_SIZE)  # sparse, like a block file
        state.update(fd=fd, path=path)
        return fd

    def finish_file(check: dict | None) -> None:
        """Sync (timed, outside the benchmark), check two blocks, remove the file."""
        fd, path = state["fd"], state["path"]
        if fd is None:
            return
        state.update(fd=None, path=None)
        try:
            started = time.perf_counter()
            os.fdatasync(fd)  # type: ignore[arg-type]
            if check is not None:
                check["sync_s"] = time.perf_counter() - started
                written = check["ops"]
                with open(path, "rb") as f:  # type: ignore[arg-type]
                    for i in {0, max(written - 1, 0)}:
                        got = os.pread(f.fileno(), BLOCK_SIZE, offsets[i])
                        assert got == source[i % WRITE_DEPTH], f"{backend_name}: block {i} reads back wrong"
        finally:
            os.close(fd)  # type: ignore[arg-type]
            Path(path).unlink(missing_ok=True)  # type: ignore[arg-type]

    try:
        with pinned(SERVER_CPU):
            io = make_io(backend_name, case.direct)
            crc_pool = ThreadPoolExecutor(CRC_THREADS, thread_name_prefix="bench-crc") if case.crc else None
            loop = asyncio.new_event_loop()
            try:
                # A whole untimed round first: besides starting the threads, it makes the
                # page cache's memory warm (on a VM, the first touch of guest memory
                # costs a host page fault: the first buffered round would pay it).
                fd = new_file("warmup")
                loop.run_until_complete(fill_round(io, fd, offsets, blocks, crcs, WRITE_DEPTH,
                                                   time.perf_counter() + settings.round_cap_s, crc_pool))
                finish_file(None)

                def setup() -> None:
                    finish_file(rounds[-1] if rounds else None)
                    new_file(str(len(rounds)))

                def one_round() -> None:
                    deadline = time.perf_counter() + settings.round_cap_s
                    with Meter(io_bench.device_stat) as meter:
                        fd = state["fd"]
                        assert isinstance(fd, int)
                        report = loop.run_until_complete(
                            fill_round(io, fd, offsets, blocks, crcs, WRITE_DEPTH, deadline, crc_pool))
                    rounds.append({**report, **meter.report})

                benchmark.group = f"io {case.name}"
                benchmark.name = f"{case.name} {backend_name}"
                benchmark.pedantic(one_round, setup=setup, rounds=settings.rounds, iterations=1)
                finish_file(rounds[-1] if rounds else None)
            finally:
                loop.run_until_complete(io.close())
                loop.close()
                if crc_pool is not None:
                    crc_pool.shutdown(wait=True)
    finally:
        finish_file(None)

    for r in rounds:
        assert r["ops"] > 0
        r["mbps_with_sync"] = r["bytes"] / (r["seconds"] + r["sync_s"]) / 1e6
    row = summarize("fill", case.name, backend_name, rounds, {
        "mode": "direct" if case.direct else "buffered", "pattern": case.pattern, "crc": case.crc,
        "io_size": BLOCK_SIZE, "depth": WRITE_DEPTH, "file_bytes": count * BLOCK_SIZE,
        "ops_per_round": count, "round_cap_s": settings.round_cap_s,
    })
    record(benchmark, row)
