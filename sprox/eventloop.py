"""Which asyncio event loop Sprox runs on: uvloop when it can be imported (a dependency
of the package on CPython), the standard loop otherwise (`--event-loop auto`, the
default); `--event-loop asyncio` or `uvloop` forces one. Chosen once, here; the rest of
the code base works on either, and the lane's tests run on both.

Why uvloop by default: with the hit kernel answering hits, the loop is a good part of
what is left of a hit's CPU, and uvloop takes a 4 KiB hit from 19-20 us to 16-17.6 us
(measured back to back, 16 connections; README "Benchmarks").

It was not the default until the listen backlog was raised (sprox/server.py,
LISTEN_BACKLOG): with asyncio's default backlog of 100, 1,000 connections arriving at
once overflowed the listen queue, the kernel answered with SYN cookies, and some of
those connections were later reset by the kernel (nstat: TcpExtListenOverflows,
TcpExtSyncookiesFailed = TcpOutRsts). Both loops overflowed; uvloop, accepting in a
different order, lost some of those connections to resets (1 run in 10 of
tests/functional/test_connections.py). With a backlog that holds them, neither does."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

EVENT_LOOPS = ("auto", "asyncio", "uvloop")


def loop_factory(choice: str) -> tuple[Callable[[], asyncio.AbstractEventLoop], str]:
    """(a function making a new loop, the loop's name) for `--event-loop choice`;
    RuntimeError for `uvloop` when it cannot be imported. `auto` is uvloop when it can
    be imported, else the standard loop."""
    if choice in ("auto", "uvloop"):
        try:
            import uvloop
        except ImportError:
            if choice == "uvloop":
                raise RuntimeError("uvloop is not installed (pip install uvloop)") from None
        else:
            return uvloop.new_event_loop, "uvloop"
    return asyncio.new_event_loop, "asyncio"
