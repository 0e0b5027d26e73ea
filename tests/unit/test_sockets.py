"""Sending a file span on a socket whose reader stalls or goes away: the sender waits
without blocking the loop, and ends (with an error, never a hang) when the peer leaves
or takes nothing for the send timeout. On real sockets, on asyncio's loop."""

from __future__ import annotations

import asyncio
import os
import socket

import pytest

from sprox.frontend import sendfile_to_socket
from sprox.sockets import wait_writable

SPAN = 8 * 1024 * 1024  # far more than a socket pair's buffers hold


@pytest.fixture
def span_file(tmp_path):
    path = tmp_path / "block"
    path.write_bytes(os.urandom(1024 * 1024) * (SPAN // (1024 * 1024)))
    fd = os.open(path, os.O_RDONLY)
    yield fd
    os.close(fd)


def stalled_pair() -> tuple[socket.socket, socket.socket]:
    sender, reader = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    sender.setblocking(False)
    return sender, reader


def test_sender_ends_when_the_reader_goes_away(span_file):
    sender, reader = stalled_pair()

    async def main():
        loop = asyncio.get_running_loop()
        sending = asyncio.ensure_future(sendfile_to_socket(sender.fileno(), span_file, 0, SPAN))
        await asyncio.sleep(0)  # the span fills the socket and waits for room
        while not reader.recv(1, socket.MSG_PEEK):
            await asyncio.sleep(0)
        assert not sending.done()
        loop.call_soon(reader.close)
        with pytest.raises(OSError):  # EPIPE or ECONNRESET, as the kernel says
            await asyncio.wait_for(sending, 10)

    try:
        asyncio.run(main())
    finally:
        sender.close()


def test_sender_delivers_every_byte_to_a_slow_reader(span_file):
    sender, reader = stalled_pair()
    received = bytearray()

    async def main():
        loop = asyncio.get_running_loop()
        sending = asyncio.ensure_future(sendfile_to_socket(sender.fileno(), span_file, 0, SPAN))
        reader.setblocking(False)
        while len(received) < SPAN:
            try:
                received.extend(reader.recv(64 * 1024))
            except BlockingIOError:
                await asyncio.sleep(0.001)
        await asyncio.wait_for(sending, 10)
        assert loop.is_running()

    try:
        asyncio.run(main())
    finally:
        sender.close()
        reader.close()
    assert bytes(received) == os.pread(span_file, SPAN, 0)


def test_wait_writable_gives_up_after_its_timeout():
    sender, reader = stalled_pair()
    try:
        while True:  # fill the socket: nothing more fits until the reader reads
            try:
                sender.send(b"x" * 65536)
            except BlockingIOError:
                break

        async def main():
            with pytest.raises(TimeoutError):
                await wait_writable(sender.fileno(), timeout=0.05)

        asyncio.run(main())
    finally:
        sender.close()
        reader.close()


def test_wait_writable_ends_when_its_waiter_is_failed():
    sender, reader = stalled_pair()
    try:
        while True:
            try:
                sender.send(b"x" * 65536)
            except BlockingIOError:
                break

        async def main():
            loop = asyncio.get_running_loop()
            fds_before = len(os.listdir("/proc/self/fd"))
            waiter = loop.create_future()
            loop.call_soon(waiter.set_exception, ConnectionResetError("client went away"))
            with pytest.raises(ConnectionResetError):
                await wait_writable(sender.fileno(), waiter)
            # The watch on the duplicate descriptor is gone with the wait.
            assert len(os.listdir("/proc/self/fd")) == fds_before

        asyncio.run(main())
    finally:
        sender.close()
        reader.close()
