"""Writing to a socket that an asyncio transport owns, behind the transport's back.

Both lanes send cached bytes with sendfile(2) straight to the client's socket (the
transport's buffer is empty first, so nothing is overtaken). When the socket's send
buffer is full, they must wait for it to drain. Neither event loop (asyncio's selector
loop, uvloop) lets a second watcher register a descriptor a transport owns, so the
wait watches a duplicate of it: the duplicate names the same socket, and epoll reports
its writability (or its error, if the peer went away) independently of the
transport's own registration.
"""

from __future__ import annotations

import asyncio
import os

# A client that takes nothing for this long is given up on (nginx's send_timeout).
SEND_TIMEOUT_SECONDS = 60.0


async def wait_writable(fd: int, waiter: asyncio.Future | None = None,
                        timeout: float = SEND_TIMEOUT_SECONDS) -> None:
    """Return once socket `fd` can take more bytes or has failed (the next send then
    says how). `waiter`, when given, is the future to wait on, so the caller can also
    end the wait itself (say, with an exception when the connection is lost).
    TimeoutError after `timeout` seconds without either."""
    loop = asyncio.get_running_loop()
    if waiter is None:
        waiter = loop.create_future()
    watched = os.dup(fd)
    try:
        loop.add_writer(watched, _set_once, waiter)
        try:
            async with asyncio.timeout(timeout):
                await waiter
        finally:
            loop.remove_writer(watched)
    finally:
        os.close(watched)


def _set_once(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)
