"""The hit kernel (`sprox._native.kernel`), when it is built and wanted.

There is no pure-Python twin of the kernel itself: without it (SPROX_NO_EXTENSIONS=1,
a build without a compiler or OpenSSL's libcrypto, an interpreter other than CPython)
the Python lane answers every hit (`FrontEnd.try_hit`), with the same bytes. `NATIVE`
says whether it was loaded.
"""

from __future__ import annotations

import os
import secrets
import sys

__all__ = ["NATIVE", "make_kernel"]

NATIVE: bool = False
HitKernel = None
# What HitKernel.serve() returns (sprox/_native/kernel.pyx says what each means).
DECLINED, SENT, SENT_CLOSE, PARTIAL, FAILED, FAILED_FILE = range(6)

if os.environ.get("SPROX_NO_EXTENSIONS") != "1" and sys.implementation.name == "cpython":
    try:
        from sprox._native.kernel import HitKernel
    except ImportError:
        pass  # not built: the Python lane answers every hit
    else:
        NATIVE = True


def make_kernel(verifier, domain: str | None):
    """A HitKernel for this configuration, or None: not built, or a verifier whose
    clock is not the wall clock (only tests make one)."""
    if HitKernel is None:
        return None
    keys, max_skew = None, 0.0
    if verifier is not None:
        checked = verifier.kernel_keys()
        if checked is None:
            return None
        keys, max_skew = checked
    from .metrics import LATENCY_BUCKETS

    # Its own request id prefix: ids from the two lanes never collide.
    return HitKernel(keys, max_skew, domain, secrets.token_hex(4).upper(), LATENCY_BUCKETS)
