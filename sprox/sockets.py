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
from collections.abc import Callable

# A client that takes nothing for this long is given up on (nginx's send_timeout).
SEND_TIMEOUT_SECONDS = 60.0
CLOSING_CHECK_SECONDS = 1.0


async def wait_writable(fd: int, waiter: asyncio.Future | None = None,
                        timeout: float = SEND_TIMEOUT_SECONDS) -> None:
    """Return once socket `fd` can take more bytes or has failed (the next send then
    says how). `waiter`, when given, is the future to wait on, so the caller can also
    end the wait itself (say, with an exception when the connection is lost).
    TimeoutError after `timeout` seconds without either."""
    watched = os.dup(fd)
    try:
        await _watch_writable(watched, waiter, timeout)
    finally:
        os.close(watched)


async def _watch_writable(fd: int, waiter: asyncio.Future | None, timeout: float) -> None:
    """wait_writable on a descriptor no transport owns (so the loop lets us watch it)."""
    loop = asyncio.get_running_loop()
    if waiter is None:
        waiter = loop.create_future()
    loop.add_writer(fd, _set_once, waiter)
    try:
        async with asyncio.timeout(timeout):
            await waiter
    finally:
        loop.remove_writer(fd)


def _set_once(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)


def sendfile_now(sock_fd: int, file_fd: int, offset: int, count: int) -> int:
    """sendfile(2) until `count` bytes are sent or the socket is full; returns the bytes
    sent. `sock_fd` must be Sprox's own duplicate of the socket (see sendfile_all).
    EOFError when the file ends first."""
    sent = 0
    while sent < count:
        try:
            n = os.sendfile(sock_fd, file_fd, offset + sent, count - sent)
        except BlockingIOError:
            break
        if n == 0:
            raise EOFError("file shorter than the span to send")
        sent += n
    return sent


async def sendfile_all(sock_fd: int, file_fd: int, offset: int, count: int,
                       closing: Callable[[], bool]) -> None:
    """sendfile(2) `count` bytes of `file_fd` from `offset` to a socket a transport
    owns, waiting for room as needed. `closing()` says whether the transport is going
    away; the send stops (ConnectionResetError) once it does.

    The transport may close its socket while we wait, and the kernel may then hand
    its descriptor number to any new file or socket: so from the start only our own
    duplicate is used, which can only ever be this connection. A client that takes
    nothing for SEND_TIMEOUT_SECONDS is given up on (TimeoutError)."""
    loop = asyncio.get_running_loop()
    own = os.dup(sock_fd)
    try:
        quiet_since = loop.time()
        while count > 0:
            if closing():
                raise ConnectionResetError("client went away")
            sent = sendfile_now(own, file_fd, offset, count)
            offset += sent
            count -= sent
            if sent:
                quiet_since = loop.time()
            elif count > 0:  # the socket is full
                if loop.time() - quiet_since >= SEND_TIMEOUT_SECONDS:
                    raise TimeoutError("the client took no bytes for too long")
                try:  # wake at least every second to notice the transport closing
                    await _watch_writable(own, None, CLOSING_CHECK_SECONDS)
                except TimeoutError:
                    pass
    finally:
        os.close(own)
