"""Waiting on a condition in async tests: poll until it holds, within a bound."""

from __future__ import annotations

import asyncio
import inspect


async def until(condition, timeout: float = 5.0, what: str = "condition") -> None:
    """Poll `condition()` (a bool, or an awaitable of one) until true or the deadline."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        done = condition()
        if inspect.isawaitable(done):
            done = await done
        if done:
            return
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)
