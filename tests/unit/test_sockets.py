"""Sending a file span on a socket whose reader stalls or goes away: the sender waits
without blocking the loop, ends (with an error, never a hang) when the peer leaves, the
transport closes, or nothing is taken for the send timeout, and never writes to a
descriptor number the transport gave up. On real sockets, on asyncio's loop."""

from __future__ import annotations

import asyncio
import os
import socket

import pytest

from sprox.sockets import sendfile_all, wait_writable

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
        sending = asyncio.ensure_future(sendfile_all(sender.fileno(), span_file, 0, SPAN, lambda: False))
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
        sending = asyncio.ensure_future(sendfile_all(sender.fileno(), span_file, 0, SPAN, lambda: False))
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


def test_a_closed_transport_ends_the_send_and_its_reused_number_gets_nothing(span_file, tmp_path):
    """The transport closes its socket while the span waits for room, and the kernel
    hands the same descriptor number to a new file: the send must end, and not one byte
    may land in that file."""
    sender, reader = stalled_pair()
    number = sender.fileno()
    closing = False

    async def main():
        nonlocal closing
        sending = asyncio.ensure_future(sendfile_all(number, span_file, 0, SPAN, lambda: closing))
        await asyncio.sleep(0)
        while not reader.recv(1, socket.MSG_PEEK):
            await asyncio.sleep(0)
        assert not sending.done()
        closing = True
        sender.close()  # what the transport does; the number is free again
        reused = os.open(tmp_path / "innocent", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            assert reused == number  # the lowest free number: the one just released
            reader.setblocking(False)
            while not sending.done():  # the client reads again: the socket has room
                try:
                    reader.recv(1 << 20)
                except BlockingIOError:
                    pass
                await asyncio.sleep(0.01)
            with pytest.raises(ConnectionResetError):
                await sending
        finally:
            os.close(reused)
        assert (tmp_path / "innocent").stat().st_size == 0

    try:
        asyncio.run(asyncio.wait_for(main(), 10))
    finally:
        reader.close()
