"""One io_uring for file reads and writes, with completions signalled on an eventfd.

The pure-Python twin `sprox._native._uring_py` (a thread pool behind the same API)
is the reference for the behaviour; callers import `Ring` from `sprox.uring`, which
picks one of the two. The asyncio adapter is `sprox.cache.io.UringBackend`.

Memory safety is the point of most of this file. The kernel writes into a read's
buffer and reads a write's data at some later time, from another context, with no
Python reference of its own. So every submitted operation holds a buffer export
(`Py_buffer`) on its object until its completion has been reaped, or until `close()`
(or deallocation) has waited for the kernel to finish with it. The export does two
things: it keeps the object alive, and it stops a bytearray from being resized (or an
mmap from being closed) under the kernel's feet.

A Ring is used by one thread at a time; it is not thread-safe (liburing's queues are
not). The GIL is released only around io_uring system calls, which touch nothing but
the C ring, and a flag makes re-entry from another thread meanwhile an error rather
than a corrupted queue.
"""

cimport cython
from cpython.buffer cimport (
    PyBUF_FULL_RO,
    PyBuffer_IsContiguous,
    PyBuffer_Release,
    PyObject_CheckBuffer,
    PyObject_GetBuffer,
)
from cpython.bytearray cimport PyByteArray_FromStringAndSize
from cpython.number cimport PyNumber_Index
from libc.errno cimport EAGAIN, EINTR, ENOMEM, ENOSYS, EPERM, errno
from libc.stdint cimport INT64_MAX, int32_t, int64_t, uint8_t, uint32_t, uint64_t
from libc.string cimport memset, strerror

import errno as _errno

__all__ = ["Ring", "read_buffer"]


cdef extern from "<sys/eventfd.h>" nogil:
    int eventfd(unsigned int initval, int flags)
    int EFD_CLOEXEC
    int EFD_NONBLOCK


cdef extern from "<unistd.h>" nogil:
    ssize_t read(int fd, void *buf, size_t count)
    int close(int fd)


cdef extern from "<liburing.h>" nogil:
    struct io_uring:
        pass

    struct io_uring_sqe:
        # Set directly rather than through io_uring_sqe_set_data64, which
        # liburing only has from 2.2 on; the field is in every version.
        uint64_t user_data
        uint8_t flags

    enum: IOSQE_ASYNC

    struct io_uring_cqe:
        uint64_t user_data
        int32_t res
        uint32_t flags

    struct io_uring_params:
        uint32_t sq_entries
        uint32_t cq_entries
        uint32_t flags
        uint32_t features

    int io_uring_queue_init_params(unsigned entries, io_uring *ring, io_uring_params *p)
    void io_uring_queue_exit(io_uring *ring)
    int io_uring_register_eventfd(io_uring *ring, int fd)
    io_uring_sqe *io_uring_get_sqe(io_uring *ring)
    int io_uring_submit(io_uring *ring)
    void io_uring_prep_read(io_uring_sqe *sqe, int fd, void *buf, unsigned nbytes, uint64_t offset)
    void io_uring_prep_write(io_uring_sqe *sqe, int fd, const void *buf, unsigned nbytes,
                             uint64_t offset)
    unsigned io_uring_peek_batch_cqe(io_uring *ring, io_uring_cqe **cqes, unsigned count)
    void io_uring_cq_advance(io_uring *ring, unsigned nr)
    int io_uring_wait_cqe(io_uring *ring, io_uring_cqe **cqe_ptr)
    void io_uring_cqe_seen(io_uring *ring, io_uring_cqe *cqe)


cdef extern from *:
    """
    /* Prepares a request to cancel every operation of the ring, where the headers
       know how (liburing >= 2.2); returns 0 when they do not, and the caller skips
       the cancellation. A kernel before 5.19 answers it with -EINVAL, harmlessly. */
    static int sprox_prep_cancel_all(struct io_uring_sqe *sqe) {
    #ifdef IORING_ASYNC_CANCEL_ANY
        io_uring_prep_cancel64(sqe, 0, IORING_ASYNC_CANCEL_ANY | IORING_ASYNC_CANCEL_ALL);
        return 1;
    #else
        (void)sqe;
        return 0;
    #endif
    }
    """
    int sprox_prep_cancel_all(io_uring_sqe *sqe) nogil


cdef enum:
    # user_data of the ring's own requests (cancellation): never a token.
    INTERNAL = 0
    # Tokens start here and only grow; at one per nanosecond they last 584 years.
    FIRST_TOKEN = 1
    # The kernel never moves more than MAX_RW_COUNT (INT_MAX rounded down to a page)
    # in one read or write; asking for more would also overflow the SQE's 32-bit
    # length. Larger buffers are transferred in part, a short transfer the caller
    # continues.
    MAX_TRANSFER = 0x7FFFF000
    # IORING_MAX_ENTRIES: the kernel refuses larger submission queues.
    MAX_ENTRIES = 32768
    REAP_BATCH = 64
    ASYNC_THRESHOLD = 65536

# Buffers whose operations could not be confirmed finished (a failed wait in
# close): kept referenced forever, because a leak is better than the kernel writing
# into freed memory. Empty in any run that has not hit a kernel error.
_abandoned = []


def read_buffer(size):
    """A bytearray of `size` bytes for a read to fill; its content is unspecified.

    Unlike ``bytearray(size)`` it is not zeroed: zeroing 4 MiB took as long as reading
    them from the page cache, on the event loop's thread. The bytes a read did not
    write hold whatever the memory held before, so hand on only the part a read
    filled (`sprox.cache.io` trims the buffer to the bytes read).
    """
    size = PyNumber_Index(size)
    if size < 0:
        raise ValueError(f"size must be >= 0, got {size}")
    return PyByteArray_FromStringAndSize(NULL, size)


@cython.final
@cython.freelist(64)
cdef class _Op:
    """The buffer export of one submitted operation, released on deallocation."""
    cdef Py_buffer view
    cdef bint held

    def __dealloc__(self):
        if self.held:
            self.held = False
            PyBuffer_Release(&self.view)


cdef _Op _export(object buffer, bint writable):
    # Messages and exception types match the twin's `_export`.
    if not PyObject_CheckBuffer(buffer):
        raise TypeError(f"a bytes-like object is required, not '{type(buffer).__name__}'")
    cdef _Op op = _Op.__new__(_Op)
    # FULL_RO accepts any layout, so the contiguity check below (not the exporter)
    # decides what is refused, with the same message in both implementations.
    PyObject_GetBuffer(buffer, &op.view, PyBUF_FULL_RO)
    op.held = True
    if not PyBuffer_IsContiguous(&op.view, b'C'):
        raise BufferError("buffer must be C-contiguous")
    if writable and op.view.readonly:
        raise TypeError("a read needs a writable buffer, not a read-only one")
    return op


cdef int _as_fd(object fd) except? -1:
    fd = PyNumber_Index(fd)
    if not -2147483648 <= fd <= 2147483647:
        raise OverflowError("value too large to convert to int")
    return fd


cdef int64_t _as_offset(object offset) except? -1:
    offset = PyNumber_Index(offset)
    if offset < 0:
        raise ValueError(f"offset must be >= 0, got {offset}")
    if offset > INT64_MAX:
        raise OverflowError("value too large to convert to int64_t")
    return offset


cdef str _setup_error(int err, unsigned entries):
    if err == ENOSYS:
        return "io_uring is not supported by this kernel (ENOSYS)"
    if err == EPERM:
        return ("io_uring is not permitted here (EPERM: a seccomp filter, as in many "
                "containers, or the kernel.io_uring_disabled sysctl)")
    if err == ENOMEM:
        return (f"cannot allocate an io_uring of {entries} entries (ENOMEM; kernels "
                f"before 5.12 count it against RLIMIT_MEMLOCK)")
    return f"io_uring setup failed: {strerror(err).decode()}"


@cython.final
@cython.no_gc_clear  # __dealloc__ must still see _inflight: it waits before buffers go
cdef class Ring:
    """An io_uring for positioned file reads and writes. See `sprox._native._uring_py.Ring`.

    ``Ring(entries=256)``: a submission queue of `entries` (rounded up to a power of
    two by the kernel) and an eventfd, `eventfd`, that becomes readable whenever
    completions are waiting. Raises OSError when the kernel refuses io_uring.
    """

    cdef io_uring ring
    cdef bint _ring_ready      # io_uring_queue_init succeeded: queue_exit is owed
    cdef bint _open
    cdef bint _busy            # inside a GIL-released system call
    cdef readonly int eventfd
    cdef readonly int capacity
    cdef uint64_t _next_token
    cdef Py_ssize_t _queued    # prepared SQEs not yet handed to the kernel
    cdef dict _inflight        # token -> _Op, until its completion is reaped

    def __cinit__(self, entries=256):
        cdef io_uring_params params
        cdef int ret
        cdef unsigned n
        self.eventfd = -1
        self._inflight = {}
        self._next_token = FIRST_TOKEN
        entries = PyNumber_Index(entries)
        if not 1 <= entries <= MAX_ENTRIES:
            raise ValueError(f"entries must be between 1 and {MAX_ENTRIES}, got {entries}")
        n = entries
        # No setup flags. COOP_TASKRUN and DEFER_TASKRUN would let completions wait
        # until this task next enters the kernel, and an event loop asleep in
        # epoll_wait on the eventfd might then never see them. SQPOLL spends a core.
        memset(&params, 0, sizeof(params))
        ret = io_uring_queue_init_params(n, &self.ring, &params)
        if ret < 0:
            raise OSError(-ret, _setup_error(-ret, n))
        self._ring_ready = True
        # Each operation yields one completion; at most cq_entries in flight means the
        # completion queue can never overflow, so no completion is ever dropped and
        # io_uring_submit never answers -EBUSY for an overflow backlog.
        self.capacity = params.cq_entries
        self.eventfd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK)
        if self.eventfd < 0:
            ret = errno
            self._release_ring()
            raise OSError(ret, f"eventfd for the io_uring: {strerror(ret).decode()}")
        ret = io_uring_register_eventfd(&self.ring, self.eventfd)
        if ret < 0:
            self._release_ring()
            raise OSError(-ret, f"registering the io_uring eventfd failed: {strerror(-ret).decode()}")
        self._open = True

    def __dealloc__(self):
        # Reached with operations in flight only when the owner forgot close(): wait
        # for the kernel anyway, before the exports in _inflight are released.
        if self._open:
            self._shutdown()
        else:
            self._release_ring()

    cdef void _release_ring(self) noexcept:
        if self._ring_ready:
            self._ring_ready = False
            io_uring_queue_exit(&self.ring)
        if self.eventfd >= 0:
            close(self.eventfd)
            self.eventfd = -1

    cdef int _check_usable(self) except -1:
        if self._busy:
            raise RuntimeError("Ring used from two threads at once")
        if not self._open:
            raise ValueError("I/O operation on a closed Ring")
        return 0

    @property
    def pending(self):
        """Operations submitted with submit_read/submit_write and not yet reaped."""
        return len(self._inflight)

    def submit_read(self, fd, offset, buffer):
        """Queue a read of up to len(buffer) bytes at `offset` into `buffer`; its token.

        `buffer` must be writable and C-contiguous; it is kept (and cannot be resized)
        until the completion has been reaped. Nothing reaches the kernel before
        `submit()`, unless the submission queue is full, when the queued operations
        are submitted first. Raises BlockingIOError when `capacity` operations are
        already pending.
        """
        return self._queue(fd, offset, buffer, True)

    def submit_write(self, fd, offset, data):
        """Queue a write of `data` (bytes-like, C-contiguous) at `offset`; its token."""
        return self._queue(fd, offset, data, False)

    cdef object _queue(self, object fd, object offset, object buffer, bint is_read):
        cdef io_uring_sqe *sqe
        cdef uint64_t token
        cdef size_t nbytes
        cdef int c_fd
        cdef int64_t c_offset
        cdef _Op op
        # Checked in the twin's order, so both raise the same error for a bad call.
        self._check_usable()
        c_fd = _as_fd(fd)
        c_offset = _as_offset(offset)
        op = _export(buffer, is_read)
        if len(self._inflight) >= self.capacity:
            raise BlockingIOError(_errno.EAGAIN, f"{self.capacity} operations already pending")
        sqe = io_uring_get_sqe(&self.ring)
        if sqe == NULL:
            # Submission queue full: hand what is queued to the kernel, then retry.
            self._submit_queued()
            sqe = io_uring_get_sqe(&self.ring)
            if sqe == NULL:
                raise BlockingIOError(_errno.EAGAIN, "io_uring submission queue is full")
        token = self._next_token
        # The export goes into _inflight before the SQE can be submitted; preparing an
        # SQE cannot fail, and an SQE is never taken back, so once prepared it must be
        # filled in and its buffer kept.
        self._inflight[token] = op
        self._next_token += 1
        nbytes = <size_t>op.view.len
        if nbytes > MAX_TRANSFER:
            nbytes = MAX_TRANSFER
        if is_read:
            io_uring_prep_read(sqe, c_fd, op.view.buf, <unsigned>nbytes, <uint64_t>c_offset)
        else:
            io_uring_prep_write(sqe, c_fd, op.view.buf, <unsigned>nbytes, <uint64_t>c_offset)
        sqe.user_data = token
        if nbytes >= ASYNC_THRESHOLD:
            # A buffered transfer that hits the page cache is otherwise copied inline,
            # during io_uring_submit, on the event loop's thread; from this size on
            # that copy costs more than handing it to an io-wq worker (measured: 64 KiB
            # reads kept the loop thread 98% busy inline, 70% with IOSQE_ASYNC, at the
            # same throughput; 4 MiB reads ran 1.5x faster). Smaller ones stay inline,
            # where they are cheapest (4 KiB: 73k/s inline, 45k/s punted).
            sqe.flags |= IOSQE_ASYNC
        self._queued += 1
        return token

    def submit(self):
        """Hand every queued operation to the kernel; how many it took.

        Raises OSError when io_uring_enter fails (EAGAIN or EBUSY under memory
        pressure: the operations stay queued and a later call retries them).
        """
        self._check_usable()
        return self._submit_queued()

    cdef int _submit_queued(self) except -1:
        cdef int ret
        cdef int total = 0
        while self._queued > 0:
            self._busy = True
            # A buffered read that hits the page cache is copied during the call:
            # worth letting other threads run. Only the C ring is touched.
            with nogil:
                ret = io_uring_submit(&self.ring)
            self._busy = False
            if ret == -EINTR:
                continue
            if ret < 0:
                raise OSError(-ret, f"io_uring_submit failed: {strerror(-ret).decode()}")
            if ret == 0:
                break  # nothing taken and no error: leave the rest queued, do not spin
            self._queued -= ret
            total += ret
        return total

    def reap(self):
        """Collect finished operations without blocking: a list of (token, result).

        `result` is the number of bytes transferred (short at end of file, or when
        the buffer exceeds 0x7FFFF000 bytes) or a negative errno. Reaping drains the
        eventfd first, so a completion posted while this runs signals it again.
        """
        cdef io_uring_cqe *cqes[REAP_BATCH]
        cdef unsigned n, i
        cdef uint64_t counter
        cdef ssize_t ignored
        cdef list done = []
        if self._busy:
            raise RuntimeError("Ring used from two threads at once")
        if not self._open:
            return done
        # Non-blocking: EAGAIN when the counter is already zero, which is fine.
        ignored = read(self.eventfd, &counter, sizeof(counter))
        while True:
            n = io_uring_peek_batch_cqe(&self.ring, cqes, REAP_BATCH)
            if n == 0:
                break
            for i in range(n):
                if cqes[i].user_data != INTERNAL:
                    done.append((cqes[i].user_data, cqes[i].res))
            # Advance only once the batch is copied: if append raised (MemoryError)
            # the completions stay in the queue for the next call.
            io_uring_cq_advance(&self.ring, n)
        for token, _ in done:
            # The kernel is done with this buffer: release the export.
            del self._inflight[token]
        return done

    def close(self):
        """Stop the ring. Idempotent.

        Submits what is still queued, asks the kernel to cancel everything not yet
        started (an operation already running finishes), waits until every submitted
        operation has completed, then frees the ring and the eventfd. Results not yet
        reaped are discarded. The wait is what makes this safe: only after it may a
        buffer be released. It blocks, without the GIL, for as long as the slowest
        operation in flight takes; drain first to avoid that (the asyncio adapter does).
        """
        if self._busy:
            raise RuntimeError("Ring used from two threads at once")
        if self._open:
            self._shutdown()

    cdef void _shutdown(self) noexcept:
        cdef io_uring_sqe *sqe
        cdef io_uring_cqe *cqe
        cdef int ret
        cdef Py_ssize_t outstanding
        cdef bint cancel_queued = False
        cdef bint waited_all = True
        self._open = False
        try:
            self._submit_queued()
        except OSError:
            pass  # retried with the cancellation below
        if len(self._inflight) > 0:
            sqe = io_uring_get_sqe(&self.ring)
            if sqe != NULL and sprox_prep_cancel_all(sqe):
                sqe.user_data = INTERNAL
                self._queued += 1
                cancel_queued = True
        try:
            self._submit_queued()
        except OSError:
            # What the kernel did not take stays in the SQ ring and is never executed
            # (the ring is freed below without another submit).
            pass
        # The kernel takes SQEs in order and the cancellation is the last one, so the
        # operations it has not taken are the queued SQEs but the cancellation. Every
        # other pending operation is in the kernel and must complete before its
        # buffer may be released.
        outstanding = len(self._inflight) - max(self._queued - cancel_queued, 0)
        self._busy = True
        with nogil:
            while outstanding > 0:
                ret = io_uring_wait_cqe(&self.ring, &cqe)
                if ret == -EINTR or ret == -EAGAIN:
                    continue
                if ret < 0:
                    waited_all = False
                    break
                if cqe.user_data != INTERNAL:
                    outstanding -= 1
                io_uring_cqe_seen(&self.ring, cqe)
        self._busy = False
        if not waited_all:
            # Unreachable short of a kernel bug; see _abandoned.
            _abandoned.append(self._inflight)
            self._inflight = {}
        self._release_ring()
        self._inflight.clear()
        self._queued = 0

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

