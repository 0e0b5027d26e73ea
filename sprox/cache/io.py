"""Asynchronous positioned file I/O for the cache: io_uring, or a thread pool.

`make_backend("auto" | "uring" | "threads")` returns an `IOBackend`; the cache awaits
`pread` and `pwrite` on it and never learns which one it got. Both backends:

- ``await pread(fd, offset, length)`` returns the bytes at ``offset``: all `length`
  of them, or fewer only at end of file. The result is a bytes-like object the caller
  owns (``bytes`` from threads, a ``bytearray`` from io_uring, which spares a copy, a
  ``memoryview`` in direct-I/O mode); it compares equal to ``bytes``, slices, hashes
  through ``zlib.crc32`` and goes to a transport as it is.
- ``await pwrite(fd, offset, data)`` writes all of `data` and returns its length, or
  raises OSError with the errno of the failure (ENOSPC, EFBIG, EIO, EBADF, ...). A
  failed write may have written a prefix.
- Cancelling a caller never frees memory the kernel or a worker thread still uses:
  a buffer stays referenced until its operation has really finished. A cancelled
  write may still land.
- ``await close()`` waits for every operation still in flight (cancelled callers'
  included), then releases the ring or the threads; later calls raise RuntimeError.

Direct I/O (``direct_io=True``): the caller opens block files with ``O_DIRECT``, so
the kernel needs every transfer's file offset, length and memory address to be
multiples of `ALIGNMENT` (4096, which covers 512- and 4096-byte logical blocks), except
that a read may end short at end of file. The backends meet that themselves:

- `pread` accepts any offset and length: it reads the enclosing aligned span into an
  aligned buffer and returns a view of the part asked for. Aligned requests waste
  nothing.
- `pwrite` needs an aligned offset and a length that is a multiple of `ALIGNMENT`
  (ValueError otherwise; a file's partial last block is written padded, and the file
  truncated to size by the caller). Data in an `aligned_buffer` is written as it is;
  other data is copied into one first.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import logging
import mmap
import os
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Protocol

from sprox import uring

__all__ = [
    "ALIGNMENT",
    "BouncePool",
    "IOBackend",
    "ThreadBackend",
    "UringBackend",
    "aligned_buffer",
    "make_backend",
]

log = logging.getLogger("sprox.cache")

ALIGNMENT = 4096
BACKEND_CHOICES = ("auto", "uring", "threads")

BytesLike = bytes | bytearray | memoryview
# Submission errors that pass: the operations stay queued and are retried.
_TRANSIENT_SUBMIT_ERRORS = {errno.EAGAIN, errno.EBUSY, errno.EINTR, errno.ENOMEM}
_SUBMIT_RETRY_DELAY = 0.001


class IOBackend(Protocol):
    """What the cache needs from file I/O; see the module docstring for the contract."""

    name: str
    direct_io: bool

    async def pread(self, fd: int, offset: int, length: int) -> BytesLike: ...

    async def pwrite(self, fd: int, offset: int, data: BytesLike) -> int: ...

    async def close(self) -> None: ...


def aligned_buffer(size: int) -> memoryview:
    """A zero-filled, writable buffer of `size` bytes whose address is a multiple of
    `ALIGNMENT`, as O_DIRECT transfers need. Freed when the last view of it goes."""
    if size < 0:
        raise ValueError(f"size must be >= 0, got {size}")
    # An anonymous mapping starts on a page boundary, and pages are at least 4 KiB.
    # (malloc, behind bytearray, only promises 16-byte alignment.)
    mapping = mmap.mmap(-1, max(_round_up(size), ALIGNMENT),
                        flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return memoryview(mapping)[:size]


def _round_up(n: int) -> int:
    return -(-n // ALIGNMENT) * ALIGNMENT


def _aligned_span(offset: int, length: int) -> tuple[int, int, int]:
    """(start, span, skip): the aligned span holding bytes offset..offset+length, and
    where the requested bytes begin in it."""
    start = offset - offset % ALIGNMENT
    return start, _round_up(offset + length) - start, offset - start


def _is_aligned(view: memoryview) -> bool:
    if view.readonly or view.nbytes == 0:
        return False  # ctypes can only locate writable memory; such data is copied
    address = ctypes.addressof(ctypes.c_char.from_buffer(view))
    return address % ALIGNMENT == 0


def _check_args(offset: int, length: int) -> None:
    if offset < 0:
        raise ValueError(f"offset must be >= 0, got {offset}")
    if length < 0:
        raise ValueError(f"length must be >= 0, got {length}")


class BouncePool:
    """Aligned buffers that direct-I/O writes copy unaligned data into, kept for the
    next write. A fresh mapping per write costs an mmap, a page fault that zeroes each
    page (on a VM, the host backing it too), and an munmap that flushes other CPUs'
    TLBs: measured as most of a direct-I/O fill's CPU beyond the copy itself. Used from
    the event loop thread only; at most `keep_bytes` are kept."""

    def __init__(self, keep_bytes: int = 16 * 1024 * 1024) -> None:
        self.keep_bytes = keep_bytes
        self.kept_bytes = 0
        self._free: dict[int, list[memoryview]] = {}  # size -> whole aligned buffers

    def copy(self, view: memoryview) -> memoryview:
        """An aligned buffer of `view.nbytes` (a multiple of ALIGNMENT) holding a copy."""
        size = view.nbytes
        free = self._free.get(size)
        if free:
            bounce = free.pop()
            self.kept_bytes -= size
            if not free:
                del self._free[size]
        else:
            bounce = aligned_buffer(size)
        bounce[:] = view
        return bounce

    def give_back(self, bounce: memoryview) -> None:
        """`bounce` (from `copy`) is no longer used by any transfer."""
        size = bounce.nbytes
        if size > self.keep_bytes:
            return
        # Sizes are kept least recently returned first: the odd sizes of objects' last
        # blocks give way to the block size that nearly every write has.
        while self.kept_bytes + size > self.keep_bytes:
            oldest = next(iter(self._free))
            buffers = self._free[oldest]
            buffers.pop()
            self.kept_bytes -= oldest
            if not buffers:
                del self._free[oldest]
        buffers = self._free.pop(size, [])
        buffers.append(bounce)
        self._free[size] = buffers
        self.kept_bytes += size


def _direct_write_view(offset: int, view: memoryview, pool: BouncePool) -> memoryview:
    """`view` itself, or an aligned copy of it from `pool` (to give back once written);
    ValueError for an unaligned request."""
    if offset % ALIGNMENT or view.nbytes % ALIGNMENT:
        raise ValueError(
            f"direct I/O writes need an offset and a length that are multiples of "
            f"{ALIGNMENT}, got offset {offset} and length {view.nbytes}"
        )
    if _is_aligned(view):
        return view
    return pool.copy(view)


def _os_error(result: int) -> OSError:
    return OSError(-result, os.strerror(-result))


class UringBackend:
    """File I/O through a `sprox.uring.Ring`, completed by the asyncio event loop.

    The loop watches the ring's eventfd (`loop.add_reader`); each wake-up reaps every
    completion and resolves the futures waiting on them. No thread polls and nothing
    spins: an idle backend costs nothing. Operations queued during one loop iteration
    are submitted together by one `Ring.submit()` at the start of the next.

    At most `ring.capacity` operations are in flight (so the completion queue cannot
    overflow); further callers wait their turn. Short reads and writes are continued.
    The backend binds to the event loop it is first used in.
    """

    name = "uring"

    def __init__(self, ring: Any, *, direct_io: bool = False) -> None:
        self.ring = ring
        self.direct_io = direct_io
        self._bounce = BouncePool()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._slots = asyncio.Semaphore(ring.capacity)
        # token -> future of the caller; a cancelled caller's future stays here (done)
        # until the completion arrives, and only then is the slot given back.
        self._waiters: dict[int, asyncio.Future[int]] = {}
        self._flush_handle: asyncio.Handle | None = None
        self._active = 0  # pread/pwrite calls under way
        self._closing = False
        self._closed = False
        self._idle: asyncio.Future[None] | None = None

    # -- operations -------------------------------------------------------------------------

    async def pread(self, fd: int, offset: int, length: int) -> BytesLike:
        _check_args(offset, length)
        self._enter()
        try:
            if self.direct_io:
                return await self._pread_direct(fd, offset, length)
            # Not zeroed (see read_buffer): trimmed below to the bytes the reads wrote.
            buffer = uring.read_buffer(length)
            view = memoryview(buffer)
            done = 0
            while done < length:
                result = await self._transfer(True, fd, offset + done, view[done:])
                if result < 0:
                    raise _os_error(result)
                if result == 0:
                    break  # end of file
                done += result
            # Every slice handed to the ring has been released by now (their
            # completions were reaped), so the bytearray may shrink.
            view.release()
            if done < length:
                del buffer[done:]
            return buffer
        finally:
            self._leave()

    async def _pread_direct(self, fd: int, offset: int, length: int) -> BytesLike:
        start, span, skip = _aligned_span(offset, length)
        buffer = aligned_buffer(span)
        done = 0
        while done < span:
            result = await self._transfer(True, fd, start + done, buffer[done:])
            if result < 0:
                raise _os_error(result)
            done += result
            if result == 0 or result % ALIGNMENT:
                # O_DIRECT stops short of an aligned length only at end of file, and
                # an unaligned continuation would fail with EINVAL anyway.
                break
        return buffer[skip:max(skip, min(done, skip + length))]

    async def pwrite(self, fd: int, offset: int, data: BytesLike) -> int:
        _check_args(offset, 0)
        given = view = memoryview(data).cast("B")
        if self.direct_io:
            view = _direct_write_view(offset, view, self._bounce)
        total = view.nbytes
        self._enter()
        try:
            done = 0
            while done < total:
                result = await self._transfer(False, fd, offset + done, view[done:])
                if result < 0:
                    raise _os_error(result)
                if result == 0:
                    raise OSError(errno.EIO, f"write made no progress at offset {offset + done}")
                done += result
        finally:
            self._leave()
        # Only after every transfer completed: a cancelled caller's buffer may still be
        # the kernel's (and an error's leaves with the exception, to be freed).
        if view is not given:
            self._bounce.give_back(view)
        return total

    def _enter(self) -> None:
        if self._closing:
            raise RuntimeError("the I/O backend is closed")
        loop = asyncio.get_running_loop()
        if self._loop is None:
            loop.add_reader(self.ring.eventfd, self._on_completions)
            self._loop = loop
        elif loop is not self._loop:
            raise RuntimeError("this UringBackend belongs to another event loop")
        self._active += 1

    def _leave(self) -> None:
        self._active -= 1
        self._check_idle()

    async def _transfer(self, is_read: bool, fd: int, offset: int, view: memoryview) -> int:
        """One read or write through the ring: its result (bytes moved or -errno)."""
        await self._slots.acquire()
        try:
            if is_read:
                token = self.ring.submit_read(fd, offset, view)
            else:
                token = self.ring.submit_write(fd, offset, view)
        except BaseException:
            self._slots.release()
            raise
        assert self._loop is not None
        future = self._loop.create_future()
        self._waiters[token] = future
        if self._flush_handle is None:
            self._flush_handle = self._loop.call_soon(self._flush)
        # Cancelling this await cancels only the future: the ring keeps `view`, and so
        # the memory behind it, until the kernel has completed the operation.
        return await future

    # -- event-loop callbacks ---------------------------------------------------------------

    def _flush(self) -> None:
        self._flush_handle = None
        try:
            self.ring.submit()
        except OSError as error:
            assert self._loop is not None
            if error.errno in _TRANSIENT_SUBMIT_ERRORS:
                # The operations stay queued in the ring; try again shortly.
                self._flush_handle = self._loop.call_later(_SUBMIT_RETRY_DELAY, self._flush)
                return
            log.error("io_uring submission failed: %s", error)
            # The callers learn of it; the ring still holds their buffers, and a
            # completion that arrives later finds its future already done.
            for future in self._waiters.values():
                if not future.done():
                    future.set_exception(OSError(error.errno, f"io_uring submission failed: {error.strerror}"))

    def _on_completions(self) -> None:
        for token, result in self.ring.reap():
            future = self._waiters.pop(token, None)
            if future is None:
                continue  # an operation someone submitted on the ring directly
            self._slots.release()
            if not future.done():  # done: the caller was cancelled or failed already
                future.set_result(result)
        self._check_idle()

    def _check_idle(self) -> None:
        if (self._idle is not None and not self._idle.done()
                and self._active == 0 and self.ring.pending == 0):
            self._idle.set_result(None)

    # -- shutdown ---------------------------------------------------------------------------

    async def close(self) -> None:
        """Wait for every operation in flight, then close the ring. Idempotent."""
        if self._closed:
            return
        self._closing = True
        if self._loop is not None:
            try:
                while self._active or self.ring.pending:
                    self._idle = self._loop.create_future()
                    await self._idle
            finally:
                # Reached early only if this close() was cancelled: Ring.close() then
                # waits for the kernel synchronously, which is safe, if not prompt.
                self._loop.remove_reader(self.ring.eventfd)
                if self._flush_handle is not None:
                    self._flush_handle.cancel()
                    self._flush_handle = None
                self._close_ring()
        else:
            self._close_ring()

    def _close_ring(self) -> None:
        self._closed = True
        self.ring.close()
        for future in self._waiters.values():
            if not future.done():
                future.set_exception(RuntimeError("the I/O backend was closed"))
        self._waiters.clear()


class ThreadBackend:
    """File I/O with os.pread and os.pwrite on a thread pool of `max_workers`."""

    name = "threads"

    def __init__(self, max_workers: int = 16, *, direct_io: bool = False) -> None:
        self.direct_io = direct_io
        self._bounce = BouncePool()
        self._executor = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="sprox-io")
        self._jobs: set[Future[Any]] = set()
        self._closed = False

    async def pread(self, fd: int, offset: int, length: int) -> BytesLike:
        _check_args(offset, length)
        if self.direct_io:
            return await self._run(_read_direct, fd, offset, length)
        return await self._run(_read_all, fd, offset, length)

    async def pwrite(self, fd: int, offset: int, data: BytesLike) -> int:
        _check_args(offset, 0)
        given = view = memoryview(data).cast("B")
        if self.direct_io:
            view = _direct_write_view(offset, view, self._bounce)
        written = await self._run(_write_all, fd, offset, view)
        if view is not given:  # a bounce buffer; the worker is done with it (see UringBackend.pwrite)
            self._bounce.give_back(view)
        return written

    async def _run(self, function: Any, *args: Any) -> Any:
        if self._closed:
            raise RuntimeError("the I/O backend is closed")
        job = self._executor.submit(function, *args)
        self._jobs.add(job)
        # The callback may run on a worker thread; set.discard is atomic under the GIL.
        job.add_done_callback(self._jobs.discard)
        # Cancelling the caller cancels a job not yet started; a running one finishes,
        # holding its own references to the buffers.
        return await asyncio.wrap_future(job)

    async def close(self) -> None:
        """Wait for every job in flight, then stop the threads. Idempotent."""
        if self._closed:
            return
        self._closed = True
        jobs = [asyncio.wrap_future(job) for job in list(self._jobs)]
        if jobs:
            await asyncio.wait(jobs)
        # Every worker is idle now, so joining them does not hold up the loop.
        self._executor.shutdown(wait=True)


# -- blocking helpers for ThreadBackend (run on its workers) ----------------------------------


def _read_all(fd: int, offset: int, length: int) -> bytes:
    parts = []
    while length > 0:
        chunk = os.pread(fd, length, offset)
        if not chunk:
            break  # end of file
        parts.append(chunk)
        offset += len(chunk)
        length -= len(chunk)
    return parts[0] if len(parts) == 1 else b"".join(parts)


def _read_direct(fd: int, offset: int, length: int) -> memoryview:
    start, span, skip = _aligned_span(offset, length)
    buffer = aligned_buffer(span)
    done = 0
    while done < span:
        result = os.preadv(fd, [buffer[done:]], start + done)
        done += result
        if result == 0 or result % ALIGNMENT:
            break  # end of file; see UringBackend._pread_direct
    return buffer[skip:max(skip, min(done, skip + length))]


def _write_all(fd: int, offset: int, view: memoryview) -> int:
    done = 0
    while done < view.nbytes:
        written = os.pwrite(fd, view[done:], offset + done)
        if written == 0:
            raise OSError(errno.EIO, f"write made no progress at offset {offset + done}")
        done += written
    return done


# -- choosing ---------------------------------------------------------------------------------


def make_backend(choice: str, *, direct_io: bool = False, io_threads: int = 16,
                 ring_entries: int = 256) -> IOBackend:
    """The I/O backend for ``--io-backend`` `choice`: ``auto``, ``uring`` or ``threads``.

    ``auto`` takes io_uring when the compiled ring is loaded and works here
    (`sprox.uring.available()`), else threads, and logs the choice and the reason at
    INFO. ``uring`` raises RuntimeError when io_uring cannot work. Call it before the
    event loop serves: the io_uring probe may block for up to a second.
    """
    if choice not in BACKEND_CHOICES:
        raise ValueError(f"--io-backend must be one of {', '.join(BACKEND_CHOICES)}, not {choice!r}")
    if choice == "threads":
        log.info("I/O backend: threads (%d workers), as --io-backend threads asks", io_threads)
        return ThreadBackend(io_threads, direct_io=direct_io)
    usable, reason = uring.available()
    if usable:
        try:
            ring = uring.Ring(ring_entries)
        except OSError as error:
            usable, reason = False, error.strerror or str(error)
    if usable:
        log.info("I/O backend: uring (io_uring, %d entries%s)", ring_entries,
                 ", O_DIRECT" if direct_io else "")
        return UringBackend(ring, direct_io=direct_io)
    if choice == "uring":
        raise RuntimeError(
            f"--io-backend uring: io_uring cannot be used here: {reason}. "
            f"Use --io-backend auto (falls back to threads) or --io-backend threads."
        )
    log.info("I/O backend: threads (%d workers): io_uring is not available: %s", io_threads, reason)
    return ThreadBackend(io_threads, direct_io=direct_io)
