"""SigV4 header signatures of the common request, checked without the full verifier.

The API is that of `sprox._native._fastsig_py`, which documents it. This module picks
the compiled implementation (OpenSSL's libcrypto) unless ``SPROX_NO_EXTENSIONS=1`` is
set, the interpreter is not CPython, or it was not built (no libcrypto headers at
build time); then the pure-Python twin, which answers the same. `NATIVE` says which.
"""

from __future__ import annotations

import os
import sys

__all__ = ["NATIVE", "FastSigV4"]

NATIVE: bool = False

if os.environ.get("SPROX_NO_EXTENSIONS") != "1" and sys.implementation.name == "cpython":
    try:
        from sprox._native.fastsig import FastSigV4
    except ImportError:
        pass  # not built: the twin below takes over
    else:
        NATIVE = True

if not NATIVE:
    from sprox._native._fastsig_py import FastSigV4
