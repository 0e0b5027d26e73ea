"""The io_uring ring used for cache file I/O: `Ring`, and `read_buffer` for its reads.

The API is that of `sprox._native._uring_py`, which documents it. This module
picks the compiled ring (liburing) unless ``SPROX_NO_EXTENSIONS=1`` or
``SPROX_NO_URING=1`` is set, the interpreter is not CPython, or the extension cannot
be imported (built without liburing, or liburing missing at run time); then it uses
the pure-Python twin, which does the same operations on a thread pool. `NATIVE` says
which one was loaded; `available()` whether the kernel lets the compiled one work.
"""

from __future__ import annotations

import os
import select
import sys

__all__ = ["NATIVE", "Ring", "available", "read_buffer"]

NATIVE: bool = False
# Why the compiled ring is not in use; empty when it is.
_NOT_NATIVE_REASON = ""

if os.environ.get("SPROX_NO_EXTENSIONS") == "1":
    _NOT_NATIVE_REASON = "SPROX_NO_EXTENSIONS=1 is set"
elif os.environ.get("SPROX_NO_URING") == "1":
    _NOT_NATIVE_REASON = "SPROX_NO_URING=1 is set"
elif sys.implementation.name != "cpython":
    _NOT_NATIVE_REASON = f"the io_uring extension needs CPython, not {sys.implementation.name}"
else:
    try:
        from sprox._native.uring import Ring, read_buffer
    except ImportError as error:
        _NOT_NATIVE_REASON = f"the io_uring extension is not available ({error})"
    else:
        NATIVE = True

if not NATIVE:
    from sprox._native._uring_py import Ring, read_buffer


def available() -> tuple[bool, str]:
    """Whether the compiled io_uring ring works here, and if not, why not.

    Builds a two-entry ring and reads one byte from a pipe through it, so a kernel
    that sets io_uring up but lacks IORING_OP_READ (before 5.6) or refuses it (EPERM
    under seccomp, the io_uring_disabled sysctl) is caught here rather than on the
    first cache read. Blocks for at most a second; call it at start-up.
    """
    if not NATIVE:
        return False, _NOT_NATIVE_REASON
    try:
        ring = Ring(2)
    except OSError as error:
        return False, error.strerror or str(error)
    read_end, write_end = os.pipe()
    try:
        os.write(write_end, b"x")
        buffer = bytearray(1)
        token = ring.submit_read(read_end, 0, buffer)
        ring.submit()
        # The eventfd must signal the completion: that is how the event loop learns.
        if not select.select([ring.eventfd], [], [], 1.0)[0]:
            return False, "io_uring completed no read within a second (no eventfd signal)"
        result = dict(ring.reap()).get(token)
        if result != 1 or buffer != b"x":
            reason = os.strerror(-result) if result is not None and result < 0 else f"result {result}"
            return False, f"a test read through io_uring failed: {reason}"
        return True, "io_uring works"
    finally:
        ring.close()  # waits for the test read, so the pipe may be closed after it
        os.close(read_end)
        os.close(write_end)
