"""Which asyncio event loop Sprox runs on: uvloop when installed (a dependency on
CPython), else the standard loop; `--event-loop` chooses. Chosen once, here; the rest
of the code base works on either (tests run both)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

EVENT_LOOPS = ("auto", "uvloop", "asyncio")


def loop_factory(choice: str) -> tuple[Callable[[], asyncio.AbstractEventLoop], str]:
    """(a function making a new loop, the loop's name) for `--event-loop choice`.
    `auto` is uvloop when it imports, else the standard loop; an explicit `uvloop` that
    cannot be imported raises RuntimeError."""
    if choice in ("auto", "uvloop"):
        try:
            import uvloop
        except ImportError:
            if choice == "uvloop":
                raise RuntimeError("uvloop is not installed (pip install uvloop)") from None
        else:
            return uvloop.new_event_loop, "uvloop"
    return asyncio.new_event_loop, "asyncio"
