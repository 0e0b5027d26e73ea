"""The HTTP connection: cache hits in the fast lane, everything else through aiohttp.

The API is that of `sprox._native._lane_py`, which documents it. The compiled module
(`sprox._native.lane`, built from the same source) is used unless
``SPROX_NO_EXTENSIONS=1`` is set, the interpreter is not CPython, or it was not built.
`NATIVE` says which one was loaded.
"""

from __future__ import annotations

import os
import sys

__all__ = ["NATIVE", "LaneServer"]

NATIVE: bool = False

if os.environ.get("SPROX_NO_EXTENSIONS") != "1" and sys.implementation.name == "cpython":
    try:
        from sprox._native.lane import LaneServer
    except ImportError:
        pass  # not built: the twin below takes over
    else:
        NATIVE = True

if not NATIVE:
    from sprox._native._lane_py import LaneServer
