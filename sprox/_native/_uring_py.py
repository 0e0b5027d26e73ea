"""The io_uring ring's API over a thread pool, in plain Python.

This is the readable reference for the compiled `sprox._native.uring`: both have the
same `Ring` API and semantics, down to exception types and messages, and the tests
run every case against both. It is what runs with SPROX_NO_EXTENSIONS=1 or
SPROX_NO_URING=1, on a build without liburing, or on a kernel that forbids io_uring.
Callers import `Ring` from `sprox.uring`, which picks one.

The model is io_uring's:

- ``submit_read``/``submit_write`` *queue* an operation and return its token; nothing
  runs before ``submit()``, except that a full submission queue (``entries`` queued
  operations) is submitted to make room.
- At most ``capacity`` operations (twice the submission queue, as the kernel sizes
  its completion queue) may be pending, from queueing until their completion has been
  reaped; one more raises BlockingIOError.
- Each operation completes with the number of bytes moved, which may be short (end of
  file; at most 0x7FFFF000 bytes, the kernel's limit per call) or ``-errno``. Errors
  are results, not exceptions: a bad descriptor is ``-EBADF``.
- A completion makes ``eventfd`` readable; ``reap()`` drains it without blocking.
- A buffer is held, exported (so a bytearray cannot be resized), until its
  operation's completion is reaped or ``close()`` has waited for it.

Here a pool thread does each operation with os.preadv or os.pwrite, queues the result
and writes to the eventfd. The ring is used from one thread (the event loop's); the
worker threads only touch the completion deque, under a lock, and the eventfd.
"""

from __future__ import annotations

import collections
import errno
import operator
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor, wait
from types import TracebackType
from typing import Self

# Any object with the buffer protocol (collections.abc.Buffer from Python 3.12 on).
BytesLike = bytes | bytearray | memoryview

__all__ = ["Ring", "read_buffer"]

MAX_ENTRIES = 32768  # IORING_MAX_ENTRIES
MAX_TRANSFER = 0x7FFFF000  # Linux MAX_RW_COUNT: the most one read or write moves
WORKERS = 8

_INT_MIN, _INT_MAX = -(2**31), 2**31 - 1
_INT64_MAX = 2**63 - 1


def read_buffer(size: int) -> bytearray:
    """A bytearray of `size` bytes for a read to fill; its content is unspecified.

    The compiled module's is not zeroed (zeroing costs as much as a page-cache read);
    this one is, which meets the same promise. Hand on only the part a read filled.
    """
    size = operator.index(size)
    if size < 0:
        raise ValueError(f"size must be >= 0, got {size}")
    return bytearray(size)


def _export(buffer: object, writable: bool) -> memoryview:
    """A flat byte view of `buffer`, checked as the compiled module checks it."""
    try:
        view = memoryview(buffer)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(f"a bytes-like object is required, not '{type(buffer).__name__}'") from None
    if not view.c_contiguous:
        view.release()
        raise BufferError("buffer must be C-contiguous")
    if writable and view.readonly:
        view.release()
        raise TypeError("a read needs a writable buffer, not a read-only one")
    # Holding this view keeps the export (and so the object, unresizable) alive.
    flat = view.cast("B") if view.ndim != 1 or view.format != "B" else view
    if flat.nbytes > MAX_TRANSFER:
        flat = flat[:MAX_TRANSFER]
    return flat


def _as_fd(fd: object) -> int:
    fd = operator.index(fd)  # type: ignore[arg-type]
    if not _INT_MIN <= fd <= _INT_MAX:
        raise OverflowError("value too large to convert to int")
    return fd


def _as_offset(offset: object) -> int:
    offset = operator.index(offset)  # type: ignore[arg-type]
    if offset < 0:
        raise ValueError(f"offset must be >= 0, got {offset}")
    if offset > _INT64_MAX:
        raise OverflowError("value too large to convert to int64_t")
    return offset


def _power_of_two_at_least(n: int) -> int:
    return 1 << (n - 1).bit_length()


class _Completions:
    """Where workers put results: a locked deque and the eventfd that announces it.

    Workers hold this, never the Ring, so a Ring dropped with operations in flight is
    finalized at once on its owner's thread (and waits there), not later on a worker
    that would have to join itself.
    """

    __slots__ = ("eventfd", "lock", "results")

    def __init__(self, eventfd: int) -> None:
        self.lock = threading.Lock()
        self.results: collections.deque[tuple[int, int]] = collections.deque()
        self.eventfd = eventfd


def _run(completions: _Completions, token: int, is_read: bool, fd: int, offset: int,
         view: memoryview) -> None:
    # Runs on a worker thread. Errors become -errno results, as io_uring reports them.
    # Anything else that escaped (a bug) still completes the operation, with -EIO, so
    # that no waiter hangs; the exception stays on the job's future.
    result = -errno.EIO
    try:
        if is_read:
            result = os.preadv(fd, [view], offset)
        else:
            result = os.pwrite(fd, view, offset)
    except OSError as error:
        result = -(error.errno or errno.EIO)
    finally:
        with completions.lock:
            completions.results.append((token, result))
        # After the append: reap() drains the eventfd before the deque, so this signal
        # is seen either by the reap that takes the result or by a later wake-up.
        os.eventfd_write(completions.eventfd, 1)


class Ring:
    """Positioned file reads and writes with completions signalled on an eventfd.

    ``Ring(entries=256)``: a submission queue of `entries` (rounded up to a power of
    two), ``capacity = 2 * that`` pending operations at most, and `eventfd`, readable
    whenever completions wait to be reaped. The compiled Ring raises OSError where the
    kernel refuses io_uring; this one raises OSError only if no eventfd can be made.
    """

    def __init__(self, entries: int = 256) -> None:
        entries = operator.index(entries)
        if not 1 <= entries <= MAX_ENTRIES:
            raise ValueError(f"entries must be between 1 and {MAX_ENTRIES}, got {entries}")
        self._sq_entries = _power_of_two_at_least(entries)
        self.capacity: int = 2 * self._sq_entries
        self._next_token = 1
        # Operations queued by submit_* and not yet handed to the pool.
        self._queued: list[tuple[int, bool, int, int, memoryview]] = []
        self._inflight: dict[int, memoryview] = {}  # token -> held buffer, until reaped
        self._futures: dict[int, Future[None]] = {}  # token -> pool job, until it ran
        self._pool: ThreadPoolExecutor | None = None  # threads start on first submit
        self._open = False
        self.eventfd: int = -1
        self.eventfd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._completions = _Completions(self.eventfd)
        self._open = True

    @property
    def pending(self) -> int:
        """Operations submitted with submit_read/submit_write and not yet reaped."""
        return len(self._inflight)

    def _check_usable(self) -> None:
        if not self._open:
            raise ValueError("I/O operation on a closed Ring")

    def submit_read(self, fd: int, offset: int, buffer: bytearray | memoryview) -> int:
        """Queue a read of up to len(buffer) bytes at `offset` into `buffer`; its token.

        `buffer` must be writable and C-contiguous; it is kept (and cannot be resized)
        until the completion has been reaped. Raises BlockingIOError when `capacity`
        operations are already pending.
        """
        return self._queue(fd, offset, buffer, True)

    def submit_write(self, fd: int, offset: int, data: BytesLike) -> int:
        """Queue a write of `data` (bytes-like, C-contiguous) at `offset`; its token."""
        return self._queue(fd, offset, data, False)

    def _queue(self, fd: object, offset: object, buffer: object, is_read: bool) -> int:
        self._check_usable()
        fd = _as_fd(fd)
        offset = _as_offset(offset)
        view = _export(buffer, is_read)
        if len(self._inflight) >= self.capacity:
            raise BlockingIOError(errno.EAGAIN, f"{self.capacity} operations already pending")
        if len(self._queued) >= self._sq_entries:
            self._submit_queued()  # submission queue full: submit, then queue
        token = self._next_token
        self._next_token += 1
        self._inflight[token] = view
        self._queued.append((token, is_read, fd, offset, view))
        return token

    def submit(self) -> int:
        """Hand every queued operation to the workers; how many were handed over."""
        self._check_usable()
        return self._submit_queued()

    def _submit_queued(self) -> int:
        if self._pool is None and self._queued:
            self._pool = ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="sprox-uring-py")
        queued, self._queued = self._queued, []
        for token, is_read, fd, offset, view in queued:
            self._futures[token] = self._pool.submit(
                _run, self._completions, token, is_read, fd, offset, view)
        return len(queued)

    def reap(self) -> list[tuple[int, int]]:
        """Collect finished operations without blocking: a list of (token, result).

        `result` is the number of bytes transferred (short at end of file) or a
        negative errno.
        """
        if not self._open:
            return []
        try:
            os.eventfd_read(self.eventfd)
        except BlockingIOError:
            pass  # counter already zero
        completions = self._completions
        with completions.lock:
            done = list(completions.results)
            completions.results.clear()
        for token, _ in done:
            # The worker has finished with the buffer: release the export.
            self._futures.pop(token, None)
            self._inflight.pop(token).release()
        return done

    def close(self) -> None:
        """Stop the ring. Idempotent.

        Submits what is still queued, cancels every operation not yet started (one
        already running finishes), waits until every operation has completed, then
        stops the workers and closes the eventfd. Results not yet reaped are
        discarded. Blocks for as long as the slowest operation in flight takes.
        """
        if not self._open:
            return
        self._open = False
        self._submit_queued()
        for future in self._futures.values():
            future.cancel()  # only succeeds for jobs no worker has started
        wait(list(self._futures.values()))
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        self._futures.clear()
        for view in self._inflight.values():
            view.release()
        self._inflight.clear()
        self._completions.results.clear()
        os.close(self.eventfd)
        self.eventfd = -1

    def __del__(self) -> None:
        # As the compiled Ring does when deallocated: wait before releasing buffers.
        if getattr(self, "_open", False):
            self.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()
