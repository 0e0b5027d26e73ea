"""The io_uring ring, its thread-pool twin, and the asyncio I/O backends of the cache.

Ring cases run on the pure-Python twin (id ``py``) and the compiled ring (id ``c``).
An unbuilt extension, or a kernel that refuses io_uring, fails the ``c`` cases rather
than skipping them, unless SPROX_NO_EXTENSIONS=1 or SPROX_NO_URING=1 says the run is
meant to be without it. Backend cases run on UringBackend over either ring and on
ThreadBackend.

Every operation's data is self-checking (random bytes from a seeded generator, kept
in a model of the file), every test checks it leaked no descriptor and no thread, and
no file-system call may run on the event loop's thread (tests.guards).
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import gc
import importlib
import logging
import os
import random
import select
import subprocess
import sys
import textwrap
import threading
import time
import weakref
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sprox.uring
from sprox._native import _uring_py
from sprox.cache import io as cache_io
from sprox.cache.io import (
    ALIGNMENT,
    BouncePool,
    ThreadBackend,
    UringBackend,
    aligned_buffer,
    make_backend,
)
from tests.guards import no_blocking_on_loop  # noqa: F401  (autouse: applies here)

NO_EXTENSIONS = os.environ.get("SPROX_NO_EXTENSIONS") == "1"
NO_URING = os.environ.get("SPROX_NO_URING") == "1"
REPO_ROOT = Path(__file__).resolve().parents[2]
API = ["capacity", "close", "eventfd", "pending", "reap", "submit", "submit_read", "submit_write"]


def ring_class(name: str) -> type:
    """The Ring called `name`; ImportError (a test failure) if the extension is not built."""
    if name == "py":
        return _uring_py.Ring
    if NO_EXTENSIONS or NO_URING:
        pytest.skip("SPROX_NO_EXTENSIONS=1 or SPROX_NO_URING=1: the compiled ring is not under test")
    return importlib.import_module("sprox._native.uring").Ring


@pytest.fixture(params=["py", "c"])
def ring_type(request: pytest.FixtureRequest) -> type:
    return ring_class(request.param)


@pytest.fixture
def ring(ring_type: type) -> Iterator[Any]:
    with ring_type(32) as r:
        yield r


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def _sprox_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name.startswith("sprox-")}


@pytest.fixture(autouse=True)
def no_leaks() -> Iterator[None]:
    """Every descriptor and worker thread a test opened is closed by its end."""
    fds, threads = _open_fds(), _sprox_threads()
    yield
    gc.collect()  # rings a test dropped without closing are closed by their finalizer
    assert _open_fds() - fds == set(), "descriptors leaked"
    assert _sprox_threads() - threads == set(), "threads leaked"


@pytest.fixture
def open_file(tmp_path: Path) -> Iterator[Callable[..., int]]:
    """`open_file(name, flags=O_RDWR|O_CREAT, content=None) -> fd`, closed after the test."""
    fds: list[int] = []

    def opener(name: str, flags: int = os.O_RDWR | os.O_CREAT, content: bytes | None = None) -> int:
        path = tmp_path / name
        if content is not None:
            path.write_bytes(content)
        fd = os.open(path, flags | os.O_CLOEXEC, 0o600)
        fds.append(fd)
        return fd

    yield opener
    for fd in fds:
        os.close(fd)


def data(seed: int, n: int) -> bytes:
    return random.Random(seed).randbytes(n)


def wait_for(ring: Any, tokens: list[int] | set[int], timeout: float = 10.0) -> dict[int, int]:
    """Results of `tokens`, waiting on the eventfd only: a completion the eventfd does
    not signal fails here, as it would hang an event loop."""
    wanted = set(tokens)
    results: dict[int, int] = {}
    deadline = time.monotonic() + timeout
    while wanted - results.keys():
        remaining = deadline - time.monotonic()
        readable, _, _ = select.select([ring.eventfd], [], [], max(remaining, 0))
        if not readable:
            raise AssertionError(f"no eventfd signal for {sorted(wanted - results.keys())}")
        results.update(ring.reap())
    return results


def is_readable(fd: int) -> bool:
    return bool(select.select([fd], [], [], 0)[0])


def run(coroutine: Coroutine[Any, Any, Any]) -> Any:
    """asyncio.run, failing when the coroutine left a task behind."""

    async def checked() -> Any:
        result = await coroutine
        leftover = asyncio.all_tasks() - {asyncio.current_task()}
        assert not leftover, f"tasks left running: {leftover}"
        return result

    return asyncio.run(checked())


# --- the Ring ------------------------------------------------------------------------


def test_both_implementations_have_the_same_api() -> None:
    ring_class("c")  # skips where the compiled ring is not under test
    native = importlib.import_module("sprox._native.uring")
    assert sorted(_uring_py.__all__) == sorted(native.__all__) == ["Ring", "read_buffer"]
    assert sorted(sprox.uring.__all__) == ["NATIVE", "Ring", "available", "read_buffer"]
    with _uring_py.Ring(2) as py_ring, native.Ring(2) as c_ring:
        for ring in (py_ring, c_ring):
            assert sorted(n for n in dir(ring) if not n.startswith("_")) == API


@pytest.mark.parametrize("name", ["py", "c"])
def test_read_buffer(name: str) -> None:
    ring_class(name)
    module = _uring_py if name == "py" else importlib.import_module("sprox._native.uring")
    for size in (0, 1, 4 << 20):
        buffer = module.read_buffer(size)
        assert type(buffer) is bytearray and len(buffer) == size
    assert outcome(module.read_buffer, -1) == (ValueError, "size must be >= 0, got -1")
    assert outcome(module.read_buffer, 1.0) == outcome(_uring_py.read_buffer, 1.0)
    assert outcome(module.read_buffer, 1.0)[0] is TypeError


@pytest.mark.parametrize(("entries", "capacity"), [(1, 2), (2, 4), (3, 8), (100, 256), (256, 512)])
def test_capacity_is_twice_the_rounded_up_queue(ring_type: type, entries: int, capacity: int) -> None:
    with ring_type(entries) as ring:
        assert ring.capacity == capacity
        assert ring.pending == 0
        assert ring.eventfd >= 0


@pytest.mark.parametrize(("entries", "error"), [(0, ValueError), (32769, ValueError), (-1, ValueError),
                                                ("8", TypeError), (8.0, TypeError)])
def test_bad_entries_are_refused(ring_type: type, entries: Any, error: type) -> None:
    with pytest.raises(error):
        ring_type(entries)


def test_read_write_round_trip(ring: Any, open_file: Callable[..., int]) -> None:
    fd = open_file("f")
    payload = data(1, 100_000)
    token = ring.submit_write(fd, 5000, payload)
    assert ring.pending == 1
    assert ring.submit() == 1
    assert wait_for(ring, [token]) == {token: len(payload)}
    assert ring.pending == 0
    buffer = bytearray(len(payload) + 5000)
    token = ring.submit_read(fd, 0, buffer)
    ring.submit()
    assert wait_for(ring, [token]) == {token: len(buffer)}
    assert buffer == bytes(5000) + payload


@st.composite
def file_operations(draw: st.DrawFn) -> list[tuple[int, bytes]]:
    return draw(st.lists(
        st.tuples(st.integers(0, 70_000), st.binary(min_size=0, max_size=5000)),
        min_size=1, max_size=12,
    ))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(operations=file_operations(), batched=st.booleans())
def test_random_writes_read_back(ring_type: type, tmp_path: Path, operations: list[tuple[int, bytes]],
                                 batched: bool) -> None:
    """Writes at random offsets, one at a time or all in flight together (then only
    non-overlapping ones, whose order cannot matter), match a bytearray model."""
    fd = os.open(tmp_path / "h", os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    model = bytearray()
    try:
        with ring_type(4) as ring:  # a small queue, so batches also fill it
            if batched:
                disjoint: list[tuple[int, bytes]] = []
                for offset, payload in operations:
                    if not any(offset < o + len(d) and o < offset + len(payload) for o, d in disjoint):
                        disjoint.append((offset, payload))
                operations = disjoint
                tokens: dict[int, int] = {}
                results: dict[int, int] = {}
                for offset, payload in operations:
                    while ring.pending >= ring.capacity:  # make room
                        ring.submit()
                        select.select([ring.eventfd], [], [], 10)
                        results.update(ring.reap())
                    tokens[ring.submit_write(fd, offset, payload)] = len(payload)
                ring.submit()
                results.update(wait_for(ring, tokens.keys() - results.keys()))
                assert results == tokens
            else:
                for offset, payload in operations:
                    token = ring.submit_write(fd, offset, payload)
                    ring.submit()
                    assert wait_for(ring, [token]) == {token: len(payload)}
            for offset, payload in operations:
                end = offset + len(payload)
                if payload and len(model) < end:
                    model.extend(bytes(end - len(model)))
                model[offset:end] = payload
            buffer = bytearray(len(model) + 100)
            token = ring.submit_read(fd, 0, buffer)
            ring.submit()
            assert wait_for(ring, [token]) == {token: len(model)}
            assert buffer[:len(model)] == model
    finally:
        os.close(fd)


def test_short_reads_at_end_of_file(ring: Any, open_file: Callable[..., int]) -> None:
    content = data(2, 1000)
    fd = open_file("f", os.O_RDONLY, content=content)
    buffers = {900: bytearray(4096), 1000: bytearray(10), 5000: bytearray(10), 0: bytearray(0)}
    tokens = {ring.submit_read(fd, offset, buffer): offset for offset, buffer in buffers.items()}
    ring.submit()
    results = {tokens[t]: r for t, r in wait_for(ring, tokens).items()}
    assert results == {900: 100, 1000: 0, 5000: 0, 0: 0}
    assert buffers[900][:100] == content[900:]
    assert buffers[900][100:] == bytes(3996)


def test_errors_are_negative_errno(ring: Any, open_file: Callable[..., int], tmp_path: Path) -> None:
    read_only = open_file("ro", os.O_RDONLY | os.O_CREAT)
    write_only = open_file("wo", os.O_WRONLY | os.O_CREAT)
    directory = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    full = os.open("/dev/full", os.O_WRONLY | os.O_CLOEXEC)
    closed = os.open(tmp_path / "ro", os.O_RDONLY | os.O_CLOEXEC)
    os.close(closed)  # nothing else in this test opens a descriptor that could reuse it
    try:
        expected = {
            ring.submit_read(-1, 0, bytearray(8)): -errno.EBADF,
            ring.submit_write(-1, 0, b"x"): -errno.EBADF,
            ring.submit_read(closed, 0, bytearray(8)): -errno.EBADF,
            ring.submit_write(read_only, 0, b"x"): -errno.EBADF,
            ring.submit_read(write_only, 0, bytearray(8)): -errno.EBADF,
            ring.submit_read(directory, 0, bytearray(8)): -errno.EISDIR,
            ring.submit_write(full, 0, b"x" * 100): -errno.ENOSPC,
        }
        ring.submit()
        assert wait_for(ring, expected) == expected
        assert ring.pending == 0
    finally:
        os.close(directory)
        os.close(full)


BAD_CALLS: list[tuple[str, tuple[Any, ...], type]] = [
    ("submit_read", (0, 0, b"read-only"), TypeError),
    ("submit_read", (0, 0, 42), TypeError),
    ("submit_write", (0, 0, "text"), TypeError),
    ("submit_write", (0, 0, None), TypeError),
    ("submit_read", (0, -1, bytearray(1)), ValueError),
    ("submit_write", (0, 2**63, b"x"), OverflowError),
    ("submit_write", (0, 2**70, b"x"), OverflowError),
    ("submit_read", (2**40, 0, bytearray(1)), OverflowError),
    ("submit_read", (-(2**31) - 1, 0, bytearray(1)), OverflowError),
    ("submit_read", (0.0, 0, bytearray(1)), TypeError),
    ("submit_write", (0, "0", b"x"), TypeError),
    ("submit_write", (0, 1.5, b"x"), TypeError),
    ("submit_write", (0, 0, memoryview(bytearray(8))[::2]), BufferError),
    ("submit_read", (0, 0, memoryview(bytearray(8))[::2]), BufferError),
]


def outcome(function: Callable[..., Any], *args: Any) -> tuple[Any, ...]:
    try:
        return ("returned", function(*args))
    except Exception as error:  # noqa: BLE001  (the outcome is what is compared)
        return (type(error), str(error))


@pytest.mark.parametrize(("method", "args", "error"), BAD_CALLS, ids=lambda v: repr(v)[:30])
def test_bad_arguments_fail_the_same_way(method: str, args: tuple[Any, ...], error: type) -> None:
    """Both rings refuse a bad call before queueing it, with the same error and message."""
    with _uring_py.Ring(2) as py_ring, ring_class("c")(2) as c_ring:
        py_outcome = outcome(getattr(py_ring, method), *args)
        assert py_outcome[0] is error, py_outcome
        assert outcome(getattr(c_ring, method), *args) == py_outcome
        assert py_ring.pending == c_ring.pending == 0


def test_accepted_buffer_types(ring: Any, open_file: Callable[..., int]) -> None:
    fd = open_file("f")
    numbers = memoryview(bytearray(16)).cast("I")  # 4 x uint32: counted in bytes
    aligned = aligned_buffer(8)
    tokens = [ring.submit_write(fd, 0, memoryview(b"abcdefgh")), ring.submit_write(fd, 8, bytearray(b"ijkl"))]
    ring.submit()
    wait_for(ring, tokens)
    tokens = {ring.submit_read(fd, 0, numbers): 12, ring.submit_read(fd, 4, aligned): 8}
    ring.submit()
    assert wait_for(ring, tokens) == tokens
    assert numbers.tobytes()[:12] == b"abcdefghijkl"
    assert aligned.tobytes() == b"efghijkl"


def test_nothing_runs_before_submit(ring: Any, open_file: Callable[..., int]) -> None:
    fd = open_file("f")
    token = ring.submit_write(fd, 0, b"queued")
    time.sleep(0.05)
    assert not is_readable(ring.eventfd)
    assert os.pread(fd, 10, 0) == b""
    ring.submit()
    assert wait_for(ring, [token]) == {token: 6}
    assert os.pread(fd, 10, 0) == b"queued"


def test_a_full_submission_queue_is_submitted(ring_type: type, open_file: Callable[..., int]) -> None:
    fd = open_file("f", content=data(3, 4096))
    with ring_type(4) as ring:
        tokens = [ring.submit_read(fd, 0, bytearray(16)) for _ in range(6)]
        # The fifth call found the queue full and submitted the first four: they
        # complete with no submit() from us.
        assert wait_for(ring, tokens[:4]).keys() == set(tokens[:4])
        assert ring.pending == 2
        ring.submit()
        assert wait_for(ring, tokens[4:]) == {t: 16 for t in tokens[4:]}


def test_capacity_limits_pending_operations(ring_type: type, open_file: Callable[..., int]) -> None:
    fd = open_file("f", content=b"x" * 10)
    with ring_type(2) as ring:
        tokens = [ring.submit_read(fd, 0, bytearray(1)) for _ in range(ring.capacity)]
        with pytest.raises(BlockingIOError):
            ring.submit_read(fd, 0, bytearray(1))
        ring.submit()
        # Completed is not enough: a slot frees when its completion is reaped.
        time.sleep(0.05)
        with pytest.raises(BlockingIOError):
            ring.submit_write(fd, 0, b"y")
        wait_for(ring, tokens)
        token = ring.submit_read(fd, 0, bytearray(1))
        ring.submit()
        assert wait_for(ring, [token]) == {token: 1}


def test_the_eventfd_signals_completions(ring: Any, open_file: Callable[..., int]) -> None:
    fd = open_file("f", content=b"abc")
    assert not is_readable(ring.eventfd)
    assert ring.reap() == []
    token = ring.submit_read(fd, 0, bytearray(3))
    ring.submit()
    assert select.select([ring.eventfd], [], [], 10)[0], "completion not signalled"
    assert ring.reap() == [(token, 3)]
    assert not is_readable(ring.eventfd), "reap() left the eventfd readable"
    assert ring.reap() == []


class Buffer(bytearray):
    """A bytearray that can be weakly referenced, to watch when it is freed."""


def test_buffers_are_held_until_reaped(ring: Any, open_file: Callable[..., int]) -> None:
    fd = open_file("f", content=data(4, 1 << 20))
    buffer = Buffer(1 << 20)
    alive = weakref.ref(buffer)
    token = ring.submit_read(fd, 0, buffer)
    with pytest.raises(BufferError):
        buffer.append(0)  # exported: the kernel's target cannot move
    del buffer
    gc.collect()
    assert alive() is not None, "the ring dropped a buffer the kernel will write to"
    ring.submit()
    assert wait_for(ring, [token]) == {token: 1 << 20}
    assert alive() is None, "the ring kept a buffer after its completion was reaped"


@pytest.mark.parametrize("queued_only", [False, True])
def test_close_with_operations_in_flight(ring_type: type, open_file: Callable[..., int],
                                         queued_only: bool) -> None:
    fd = open_file("f", content=data(5, 1 << 20))
    ring = ring_type(64)
    buffers = [Buffer(256 << 10) for _ in range(32)]
    writes = [data(6 + i, 256 << 10) for i in range(32)]
    for i, buffer in enumerate(buffers):
        ring.submit_read(fd, i * 4096, buffer)
        ring.submit_write(fd, (2 << 20) + i * (256 << 10), writes[i])
    if not queued_only:
        ring.submit()
    ring.close()
    assert ring.pending == 0
    assert ring.eventfd == -1
    assert ring.reap() == []
    for buffer in buffers:
        buffer.append(0)  # no export left: the ring let go of every buffer
    ring.close()  # idempotent
    with pytest.raises(ValueError, match="closed Ring"):
        ring.submit_read(fd, 0, bytearray(1))
    with pytest.raises(ValueError, match="closed Ring"):
        ring.submit()
    # Each write either ran completely or not at all (cancelled before it started).
    for i, payload in enumerate(writes):
        landed = os.pread(fd, len(payload), (2 << 20) + i * (256 << 10))
        assert landed in (payload, bytes(len(landed))), i


def test_a_dropped_ring_waits_for_its_operations(ring_type: type, open_file: Callable[..., int]) -> None:
    fd = open_file("f", content=data(7, 1 << 20))
    ring = ring_type(8)
    buffer = Buffer(1 << 20)
    alive = weakref.ref(buffer)
    ring.submit_read(fd, 0, buffer)
    ring.submit()
    del buffer, ring
    gc.collect()
    assert alive() is None


def test_normal_build_uses_the_extension() -> None:
    """Fails when a build silently fell back to Python (extension missing or broken)."""
    if NO_EXTENSIONS or NO_URING:
        assert sprox.uring.NATIVE is False
        assert sprox.uring.Ring is _uring_py.Ring
        assert sprox.uring.available()[0] is False
        return
    assert sprox.uring.NATIVE is True
    native = importlib.import_module("sprox._native.uring")
    assert sprox.uring.Ring is native.Ring
    assert sprox.uring.read_buffer is native.read_buffer
    assert sprox.uring.available() == (True, "io_uring works")


@pytest.mark.parametrize(("variable", "reason"), [
    ("SPROX_NO_URING", "SPROX_NO_URING=1 is set"),
    ("SPROX_NO_EXTENSIONS", "SPROX_NO_EXTENSIONS=1 is set"),
])
def test_env_switches_select_the_twin(variable: str, reason: str) -> None:
    program = (
        "import sprox.uring as u; r = u.Ring(4); "
        "print(u.NATIVE, type(r).__module__, u.available()[1], sep='|'); r.close()"
    )
    completed = python_subprocess(program, {variable: "1"})
    assert completed.stdout.strip().split("|") == ["False", "sprox._native._uring_py", reason]


# Installs a seccomp filter that fails io_uring_setup (syscall 425 on every
# architecture with the unified syscall table) with the errno in argv[1], as container
# runtimes' default profiles do, then reports what Sprox makes of it.
SECCOMP_PROGRAM = textwrap.dedent("""
    import ctypes, logging, struct, sys
    PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 38, 22, 2
    filter_code = [
        (0x20, 0, 0, 0),                          # load seccomp_data.nr
        (0x15, 0, 1, 425),                        # io_uring_setup?
        (0x06, 0, 0, 0x00050000 | int(sys.argv[1])),  # then fail with the errno
        (0x06, 0, 0, 0x7FFF0000),                 # else allow
    ]
    raw = ctypes.create_string_buffer(b"".join(struct.pack("HBBI", *i) for i in filter_code))

    class Program(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    libc = ctypes.CDLL(None, use_errno=True)
    program = Program(len(filter_code), ctypes.addressof(raw))
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) or libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER,
                                                                   ctypes.byref(program), 0, 0):
        sys.exit(f"cannot install the seccomp filter: errno {ctypes.get_errno()}")

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    import sprox.uring
    from sprox.cache.io import make_backend
    try:
        sprox.uring.Ring(8)
    except OSError as error:
        print(type(error).__name__, error.errno, error.strerror, sep="|")
    print(make_backend("auto").name)
    try:
        make_backend("uring")
    except RuntimeError as error:
        print(error)
""")


@pytest.mark.skipif(sys.platform != "linux" or os.uname().machine not in ("x86_64", "aarch64"),
                    reason="the filter names io_uring_setup by its x86_64/aarch64 number")
@pytest.mark.parametrize(("err", "exception", "message"), [
    (errno.EPERM, "PermissionError", ("io_uring is not permitted here (EPERM: a seccomp filter, as in "
                                      "many containers, or the kernel.io_uring_disabled sysctl)")),
    (errno.ENOSYS, "OSError", "io_uring is not supported by this kernel (ENOSYS)"),
])
def test_a_kernel_refusing_io_uring(err: int, exception: str, message: str) -> None:
    """Ring() raises OSError saying why, `auto` falls back to threads with that reason
    in its log line, and `uring` is an error naming the flag."""
    ring_class("c")
    completed = python_subprocess(SECCOMP_PROGRAM, {}, str(err))
    assert completed.stdout.splitlines() == [
        f"{exception}|{err}|{message}",
        "threads",
        (f"--io-backend uring: io_uring cannot be used here: {message}. "
         "Use --io-backend auto (falls back to threads) or --io-backend threads."),
    ]
    assert f"I/O backend: threads (16 workers): io_uring is not available: {message}" in completed.stderr


def python_subprocess(program: str, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SPROX_")}
    completed = subprocess.run(
        [sys.executable, "-c", program, *args], cwd=REPO_ROOT, env={**clean, **env},
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert completed.returncode == 0, completed.stderr
    return completed


# --- the asyncio backends -----------------------------------------------------------

BACKENDS = ["uring-py", "uring-c", "threads"]


def make_io(kind: str, *, entries: int = 64, direct_io: bool = False) -> Any:
    if kind == "threads":
        return ThreadBackend(8, direct_io=direct_io)
    return UringBackend(ring_class(kind.removeprefix("uring-"))(entries), direct_io=direct_io)


@pytest.fixture(params=BACKENDS)
def backend_kind(request: pytest.FixtureRequest) -> str:
    if request.param != "threads":
        ring_class(request.param.removeprefix("uring-"))  # skip uring-c where meant to
    return request.param


def test_backend_round_trip(backend_kind: str, open_file: Callable[..., int]) -> None:
    fd = open_file("f")
    io = make_io(backend_kind)
    assert io.name == ("threads" if backend_kind == "threads" else "uring")
    payload = data(8, 3 << 20)

    async def main() -> None:
        assert await io.pwrite(fd, 4096, payload) == len(payload)
        assert await io.pwrite(fd, 0, memoryview(b"head")) == 4
        assert await io.pwrite(fd, 10, b"") == 0
        assert await io.pread(fd, 4096, len(payload)) == payload
        assert await io.pread(fd, 0, 6) == b"head\0\0"
        assert await io.pread(fd, 0, 0) == b""
        await io.close()
        await io.close()  # idempotent
        with pytest.raises(RuntimeError, match="closed"):
            await io.pread(fd, 0, 1)

    run(main())


def test_backend_short_read_at_end_of_file(backend_kind: str, open_file: Callable[..., int]) -> None:
    content = data(9, 10_000)
    fd = open_file("f", os.O_RDONLY, content=content)
    io = make_io(backend_kind)

    async def main() -> None:
        assert await io.pread(fd, 9_000, 4096) == content[9_000:]
        assert await io.pread(fd, 10_000, 10) == b""
        assert await io.pread(fd, 20_000, 10) == b""
        assert await io.pread(fd, 0, 1 << 20) == content
        await io.close()

    run(main())


def test_backend_many_operations_in_flight(backend_kind: str, open_file: Callable[..., int]) -> None:
    """500 reads and 500 writes at once, through a ring of capacity 32: callers wait
    for room, the queue fills and is submitted, and every byte lands where it should."""
    block = 8192
    original = data(10, 500 * block)
    read_fd = open_file("r", os.O_RDONLY, content=original)
    write_fd = open_file("w")
    io = make_io(backend_kind, entries=16)
    writes = [data(1000 + i, block) for i in range(500)]

    async def main() -> None:
        reads = [io.pread(read_fd, i * block, block) for i in range(500)]
        stores = [io.pwrite(write_fd, i * block, writes[i]) for i in range(500)]
        results = await asyncio.gather(*reads, *stores)
        for i in range(500):
            assert results[i] == original[i * block:(i + 1) * block], i
        assert results[500:] == [block] * 500
        if isinstance(io, UringBackend):
            assert io.ring.pending == 0
        await io.close()

    run(main())
    assert os.pread(write_fd, 500 * block, 0) == b"".join(writes)


def test_backend_write_errors_raise_with_errno(backend_kind: str, open_file: Callable[..., int]) -> None:
    read_only = open_file("ro", os.O_RDONLY | os.O_CREAT)
    full = os.open("/dev/full", os.O_WRONLY | os.O_CLOEXEC)
    io = make_io(backend_kind)

    async def main() -> None:
        with pytest.raises(OSError) as raised:
            await io.pwrite(read_only, 0, b"x")
        assert raised.value.errno == errno.EBADF
        with pytest.raises(OSError) as raised:
            await io.pwrite(full, 0, b"x" * 10_000)
        assert raised.value.errno == errno.ENOSPC
        with pytest.raises(OSError) as raised:
            await io.pread(-1, 0, 10)
        assert raised.value.errno == errno.EBADF
        with pytest.raises(ValueError):
            await io.pread(read_only, -1, 10)
        with pytest.raises(ValueError):
            await io.pread(read_only, 0, -1)
        await io.close()

    try:
        run(main())
    finally:
        os.close(full)


EFBIG_PROGRAM = textwrap.dedent("""
    import asyncio, errno, os, resource, sys
    from sprox.cache.io import ThreadBackend, UringBackend
    kind, path = sys.argv[1:]
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    # Python ignores SIGXFSZ, so passing the limit is an EFBIG error, not death.
    resource.setrlimit(resource.RLIMIT_FSIZE, (65536, 65536))
    if kind == "threads":
        io = ThreadBackend(2)
    elif kind == "uring-py":
        from sprox._native._uring_py import Ring
        io = UringBackend(Ring(8))
    else:
        from sprox._native.uring import Ring
        io = UringBackend(Ring(8))

    async def main():
        try:
            await io.pwrite(fd, 0, b"x" * 200_000)
        except OSError as error:
            print(errno.errorcode[error.errno], end=" ")
        await io.close()

    asyncio.run(main())
    print(os.fstat(fd).st_size)
""")


def test_backend_file_size_limit_is_efbig(backend_kind: str, tmp_path: Path) -> None:
    """A write that passes RLIMIT_FSIZE: the prefix lands (a short write), and the
    continuation fails with EFBIG, which pwrite raises."""
    completed = python_subprocess(EFBIG_PROGRAM, {}, backend_kind, str(tmp_path / "big"))
    assert completed.stdout.split() == ["EFBIG", "65536"]


def test_backend_cancellation_is_safe(backend_kind: str, open_file: Callable[..., int]) -> None:
    """Cancel half the callers while their operations are in the kernel: nothing
    crashes, the others get the right bytes, cancelled writes land whole or in part
    (a prefix), and the backend keeps working."""
    block = 64 << 10
    original = data(11, 200 * block)
    read_fd = open_file("r", os.O_RDONLY, content=original)
    write_fd = open_file("w", content=bytes(200 * block))
    io = make_io(backend_kind, entries=16)
    writes = [data(2000 + i, block) for i in range(200)]
    cancelled = set(random.Random(12).sample(range(400), 200))

    async def main() -> None:
        reads = [asyncio.ensure_future(io.pread(read_fd, i * block, block)) for i in range(200)]
        stores = [asyncio.ensure_future(io.pwrite(write_fd, i * block, writes[i])) for i in range(200)]
        await asyncio.sleep(0)  # let them submit
        for i in cancelled:
            (reads + stores)[i].cancel()
        gc.collect()  # the cancelled callers' buffers have no owner left but the ring
        outcomes = await asyncio.gather(*reads, *stores, return_exceptions=True)
        assert sum(isinstance(o, asyncio.CancelledError) for o in outcomes) > 100
        for i, result in enumerate(outcomes):
            if i in cancelled:
                assert isinstance(result, asyncio.CancelledError) or result == (
                    original[i * block:(i + 1) * block] if i < 200 else block), i
            elif i < 200:
                assert result == original[i * block:(i + 1) * block], i
            else:
                assert result == block, i
        # Still working afterwards, and the ring is quiet once all completions are in.
        assert await io.pread(read_fd, 0, block) == original[:block]
        await io.close()
        if isinstance(io, UringBackend):
            assert io.ring.pending == 0

    run(main())
    for i, payload in enumerate(writes):
        landed = os.pread(write_fd, block, i * block)
        if 200 + i in cancelled:
            prefix = next((k for k in range(block) if landed[k] != payload[k]), block)
            assert landed[prefix:] == bytes(block - prefix), i
        else:
            assert landed == payload, i


def test_backend_close_waits_for_cancelled_operations(backend_kind: str, open_file: Callable[..., int]) -> None:
    fd = open_file("f", content=data(13, 4 << 20))
    io = make_io(backend_kind, entries=8)

    async def main() -> None:
        tasks = [asyncio.ensure_future(io.pread(fd, i << 16, 1 << 16)) for i in range(64)]
        await asyncio.sleep(0)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await io.close()  # must not return while the kernel still holds a buffer
        if isinstance(io, UringBackend):
            assert io.ring.pending == 0
            assert io.ring.eventfd == -1

    run(main())


@pytest.mark.parametrize("backend_kind", ["uring-py", "uring-c"])
def test_uring_completions_are_driven_by_the_eventfd(backend_kind: str, open_file: Callable[..., int]) -> None:
    """Every reap happens because the eventfd was readable, and an idle backend does
    not reap at all: no polling thread, no timer, no busy loop."""
    fd = open_file("f", content=data(14, 1 << 20))
    reaps: list[bool] = []
    io = UringBackend(RingSpy(make_io(backend_kind).ring, reaps))

    async def main() -> None:
        await asyncio.gather(*(io.pread(fd, i * 4096, 4096) for i in range(100)))
        # One more wake-up may follow: a completion's signal can land just after the
        # reap that collected it (the signal follows the result, and reap drains the
        # eventfd before the results). It finds nothing, harmlessly.
        await asyncio.sleep(0.05)
        busy = len(reaps)
        assert 1 <= busy <= 101
        assert all(reaps), "reaped without the eventfd being readable"
        assert not is_readable(io.ring.eventfd)
        await asyncio.sleep(0.2)
        assert len(reaps) == busy, "reaped while idle"
        await io.close()

    run(main())


class RingSpy:
    """Wraps a compiled Ring (whose methods cannot be replaced) to record reaps."""

    def __init__(self, ring: Any, reaps: list[bool]) -> None:
        self._ring = ring
        self._reaps = reaps

    def reap(self) -> list[tuple[int, int]]:
        self._reaps.append(is_readable(self._ring.eventfd))
        return self._ring.reap()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._ring, name)


# --- direct I/O ----------------------------------------------------------------------


def test_aligned_buffer() -> None:
    for size in (0, 1, 4095, 4096, 5000, 1 << 20):
        buffer = aligned_buffer(size)
        assert len(buffer) == size and not buffer.readonly
        assert buffer.tobytes() == bytes(size)
        if size:
            assert ctypes.addressof(ctypes.c_char.from_buffer(buffer)) % ALIGNMENT == 0
    with pytest.raises(ValueError):
        aligned_buffer(-1)


@pytest.fixture
def direct_fd(tmp_path: Path) -> Iterator[int]:
    try:
        fd = os.open(tmp_path / "direct", os.O_RDWR | os.O_CREAT | os.O_DIRECT | os.O_CLOEXEC, 0o600)
    except OSError as error:
        if error.errno != errno.EINVAL:
            raise
        pytest.skip(f"{tmp_path} does not support O_DIRECT")
    yield fd
    os.close(fd)


def test_backend_direct_io(backend_kind: str, direct_fd: int) -> None:
    io = make_io(backend_kind, direct_io=True)
    assert io.direct_io
    first = aligned_buffer(3 * ALIGNMENT)
    first[:] = data(15, 3 * ALIGNMENT)
    second = data(16, 2 * ALIGNMENT)  # bytes: copied into an aligned buffer first
    content = bytes(first) + second

    async def main() -> None:
        assert await io.pwrite(direct_fd, 0, first) == 3 * ALIGNMENT
        assert await io.pwrite(direct_fd, 3 * ALIGNMENT, second) == 2 * ALIGNMENT
        # Any offset and length: the enclosing aligned span is read.
        for offset, length in [(0, 5 * ALIGNMENT), (1, 10), (4000, 200), (ALIGNMENT, ALIGNMENT),
                               (5 * ALIGNMENT - 5, 100), (5 * ALIGNMENT, 10), (7 * ALIGNMENT + 3, 10),
                               (123, 0)]:
            assert await io.pread(direct_fd, offset, length) == content[offset:offset + length], (offset, length)
        for offset, length in [(1, ALIGNMENT), (0, 100)]:
            with pytest.raises(ValueError, match="multiples of 4096"):
                await io.pwrite(direct_fd, offset, bytes(length))
        await io.close()

    run(main())


def _address(view: memoryview) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(view))


def test_bounce_pool_reuses_buffers_within_its_bound() -> None:
    pool = BouncePool(keep_bytes=8 * ALIGNMENT)
    payload = data(17, 2 * ALIGNMENT)
    first = pool.copy(memoryview(payload))
    assert first.tobytes() == payload and _address(first) % ALIGNMENT == 0
    pool.give_back(first)
    assert pool.kept_bytes == 2 * ALIGNMENT
    again = pool.copy(memoryview(data(18, 2 * ALIGNMENT)))
    assert _address(again) == _address(first) and again.tobytes() == data(18, 2 * ALIGNMENT)
    assert pool.kept_bytes == 0
    # Taken twice at once: two buffers; both kept when given back.
    other = pool.copy(memoryview(payload))
    assert _address(other) != _address(again)
    pool.give_back(again)
    pool.give_back(other)
    assert pool.kept_bytes == 4 * ALIGNMENT
    # Odd sizes give way, least recently returned first; the bound always holds.
    for pages in (3, 1, 5):
        pool.give_back(pool.copy(memoryview(bytes(pages * ALIGNMENT))))
        assert pool.kept_bytes <= 8 * ALIGNMENT
    assert pool.kept_bytes == 6 * ALIGNMENT  # 5 pages, then 1: the older sizes went
    pool.give_back(pool.copy(memoryview(bytes(9 * ALIGNMENT))))  # larger than the bound: not kept
    assert pool.kept_bytes == 6 * ALIGNMENT


def test_backend_direct_io_bounce_buffers(backend_kind: str, direct_fd: int) -> None:
    """Unaligned data is copied into pooled buffers: a buffer goes back to the pool only
    once its write is complete, so writes issued at once never share one, every byte
    lands, and a cancelled write's buffer is never reused (the kernel may still be
    reading it)."""
    io = make_io(backend_kind, direct_io=True)
    block = 8 * ALIGNMENT
    payloads = [data(300 + i, block) for i in range(64)]

    async def main() -> None:
        await asyncio.gather(*(io.pwrite(direct_fd, i * block, payloads[i]) for i in range(64)))
        kept = io._bounce.kept_bytes
        assert 0 < kept <= io._bounce.keep_bytes
        for rounds in range(3):  # reused buffers, other bytes: each write is exact
            await asyncio.gather(*(io.pwrite(direct_fd, i * block, payloads[(i + rounds) % 64]) for i in range(64)))
            assert await io.pread(direct_fd, 0, 64 * block) == b"".join(
                payloads[(i + rounds) % 64] for i in range(64))
        # Cancelled while in flight: their buffers are not given back.
        writes = [asyncio.ensure_future(io.pwrite(direct_fd, i * block, payloads[i])) for i in range(16)]
        await asyncio.sleep(0)
        before = io._bounce.kept_bytes
        for write in writes:
            write.cancel()
        outcomes = await asyncio.gather(*writes, return_exceptions=True)
        finished = sum(o == block for o in outcomes)
        assert sum(isinstance(o, asyncio.CancelledError) for o in outcomes) > 0
        assert io._bounce.kept_bytes == before + finished * block  # (far below the bound)
        await io.close()

    run(main())


# --- choosing a backend ---------------------------------------------------------------


def test_make_backend_threads_and_bad_choice() -> None:
    io = make_backend("threads", io_threads=2)
    assert isinstance(io, ThreadBackend)
    run(io.close())
    with pytest.raises(ValueError, match="--io-backend must be one of auto, uring, threads"):
        make_backend("fast")


def test_make_backend_auto_takes_uring_when_it_works(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="sprox.cache")
    io = make_backend("auto")
    run(io.close())
    if NO_EXTENSIONS or NO_URING:
        assert io.name == "threads"
        assert "io_uring is not available: SPROX_NO_" in caplog.text
    else:
        assert io.name == "uring"
        assert isinstance(io.ring, importlib.import_module("sprox._native.uring").Ring)
        assert "I/O backend: uring" in caplog.text


def test_make_backend_auto_falls_back_with_a_log_line(monkeypatch: pytest.MonkeyPatch,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(cache_io.uring, "available", lambda: (False, "io_uring is not permitted here (EPERM)"))
    caplog.set_level(logging.INFO, logger="sprox.cache")
    io = make_backend("auto", io_threads=3)
    run(io.close())
    assert isinstance(io, ThreadBackend)
    [record] = [r for r in caplog.records if r.name == "sprox.cache"]
    assert record.levelno == logging.INFO
    assert record.getMessage() == (
        "I/O backend: threads (3 workers): io_uring is not available: io_uring is not permitted here (EPERM)"
    )
    with pytest.raises(RuntimeError, match=r"--io-backend uring: io_uring cannot be used here: "
                                           r"io_uring is not permitted here \(EPERM\)"):
        make_backend("uring")


def test_make_backend_uring_fails_under_no_uring() -> None:
    program = textwrap.dedent("""
        from sprox.cache.io import make_backend
        try:
            make_backend("uring")
        except RuntimeError as error:
            print(error)
    """)
    completed = python_subprocess(program, {"SPROX_NO_URING": "1"})
    assert completed.stdout.strip() == (
        "--io-backend uring: io_uring cannot be used here: SPROX_NO_URING=1 is set. "
        "Use --io-backend auto (falls back to threads) or --io-backend threads."
    )


def test_make_backend_auto_falls_back_under_no_uring() -> None:
    program = textwrap.dedent("""
        import asyncio, logging
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s %(message)s")
        from sprox.cache.io import make_backend
        io = make_backend("auto", io_threads=4)
        print(io.name)
        asyncio.run(io.close())
    """)
    completed = python_subprocess(program, {"SPROX_NO_URING": "1"})
    assert completed.stdout.strip() == "threads"
    assert ("INFO sprox.cache I/O backend: threads (4 workers): io_uring is not available: "
            "SPROX_NO_URING=1 is set") in completed.stderr
