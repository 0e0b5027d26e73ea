"""Which asyncio event loop Sprox runs on: the standard loop by default, uvloop (a
dependency on CPython) with `--event-loop uvloop`. Chosen once, here; the rest of the
code base works on either, and the lane's tests run on both.

Why the standard loop is the default: under 1,000 connections over
`--max-connections` (tests/functional/test_connections.py), uvloop resets some
connections, refused ones before their 503 SlowDown is read and, rarely, served ones
before their first answer (ConnectionResetError on the client; reproduced outside
Sprox). Re-measured on 2026-12-02 with the hit kernel: 1 run in 10 failed that way (32
connections reset), where the standard loop never has. What uvloop saves: with the hit kernel answering hits, the loop is a
good part of what is left of a hit's CPU, and uvloop took a 4 KiB hit from 19-20 us to
16-17.6 us (measured back to back, 16 connections; README "Benchmarks"). Before the
kernel, the hit path's own Python work dominated and uvloop saved nothing."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

EVENT_LOOPS = ("asyncio", "uvloop")


def loop_factory(choice: str) -> tuple[Callable[[], asyncio.AbstractEventLoop], str]:
    """(a function making a new loop, the loop's name) for `--event-loop choice`;
    RuntimeError for `uvloop` when it cannot be imported."""
    if choice == "uvloop":
        try:
            import uvloop
        except ImportError:
            raise RuntimeError("uvloop is not installed (pip install uvloop)") from None
        return uvloop.new_event_loop, "uvloop"
    return asyncio.new_event_loop, "asyncio"
