"""HTTP Range resolution and byte-range to block mapping.

The API is that of `sprox._native._ranges_py`, which documents it. This module picks
the compiled implementation unless ``SPROX_NO_EXTENSIONS=1`` is set, the interpreter
is not CPython, or the extension cannot be imported (not built); then it uses the
pure-Python twin, which behaves the same. `NATIVE` says which one was loaded; nothing
else should need to know.
"""

from __future__ import annotations

import os
import sys

__all__ = [
    "NATIVE",
    "RangeNotSatisfiable",
    "block_bounds",
    "block_count",
    "block_span",
    "content_range",
    "parse_range",
]

NATIVE: bool = False

if os.environ.get("SPROX_NO_EXTENSIONS") != "1" and sys.implementation.name == "cpython":
    try:
        from sprox._native.ranges import (
            RangeNotSatisfiable,
            block_bounds,
            block_count,
            block_span,
            content_range,
            parse_range,
        )
    except ImportError:
        pass  # not built: the twin below takes over
    else:
        NATIVE = True

if not NATIVE:
    from sprox._native._ranges_py import (
        RangeNotSatisfiable,
        block_bounds,
        block_count,
        block_span,
        content_range,
        parse_range,
    )
