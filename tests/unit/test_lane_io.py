"""The fast lane's sending, on a real socket pair in-process: a socket that is full
exactly when an answer's headers are due must make the lane wait, not cut the
connection. (End to end, only the load test met this moment, and only sometimes.)
Runs on the compiled lane and on its twin."""

from __future__ import annotations

import asyncio
import importlib
import os
import socket
from types import SimpleNamespace

import pytest

from sprox.cache.service import HitPlan

LANES = ["sprox._native._lane_py"]
if os.environ.get("SPROX_NO_EXTENSIONS") != "1":
    LANES.append("sprox._native.lane")

BODY = bytes(range(256)) * 1024  # 256 KiB


class StubFrontEnd:
    """Answers every request with BODY from a file, as a fast-lane hit."""

    use_sendfile = True

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.finished: list[int] = []
        self.asked = asyncio.Event()

    def try_hit(self, method, target, headers):
        self.asked.set()  # the lane sends the answer right after this returns
        plan = HitPlan(200, b"Content-Type: binary/octet-stream\r\n", None, len(BODY), None, self.fd, 0, ())
        return SimpleNamespace(plan=plan, body=None, request=SimpleNamespace(request_id="0" * 16),
                               finished=self.finished.append)


@pytest.mark.parametrize("module", LANES)
def test_headers_due_on_a_full_socket_wait_for_it(tmp_path, module):
    lane = importlib.import_module(module)
    path = tmp_path / "body"
    path.write_bytes(BODY)
    fd = os.open(path, os.O_RDONLY)
    server_sock, client_sock = socket.socketpair()
    try:
        server_sock.setblocking(False)
        filler = 0
        for size in (65536, 4096, 256, 1):  # fill the server's side until the kernel takes nothing more
            while True:
                try:
                    filler += server_sock.send(b"f" * size)
                except BlockingIOError:
                    break
        frontend: StubFrontEnd | None = None

        async def run() -> bytes:
            nonlocal frontend
            frontend = StubFrontEnd(fd)
            loop = asyncio.get_running_loop()
            server = lane.LaneServer(None, frontend)
            await loop.connect_accepted_socket(server, sock=server_sock)
            client_sock.setblocking(False)
            await loop.sock_sendall(client_sock, b"GET /b/k HTTP/1.1\r\nHost: x\r\n\r\n")
            await frontend.asked.wait()  # read nothing before the lane met the full socket
            received = bytearray()
            expected_tail = len(BODY)
            while True:  # read the filler, then the answer, as the lane sends it
                piece = await asyncio.wait_for(loop.sock_recv(client_sock, 65536), 10)
                if not piece:
                    break  # closed by the lane: the checks below say what was missing
                received += piece
                head_end = received.find(b"\r\n\r\n", filler)
                if head_end >= 0 and len(received) >= head_end + 4 + expected_tail:
                    break
            await server.shutdown(1.0)
            return bytes(received[filler:])

        answer = asyncio.run(run())
    finally:
        client_sock.close()
        os.close(fd)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK\r\n") and b"Content-Length: %d" % len(BODY) in head
    assert body == BODY
    assert frontend.finished == [len(BODY)]


@pytest.mark.parametrize("module", LANES)
def test_a_request_head_dripping_in_is_timed_out_from_its_first_byte(module, monkeypatch):
    """A client sending a header byte now and then (slowloris) gets S3's RequestTimeout
    once its head has taken HEAD_SECONDS, however recently its last byte came."""
    lane = importlib.import_module(module)
    monkeypatch.setattr(lane, "HEAD_SECONDS", 0.3)
    server_sock, client_sock = socket.socketpair()

    async def run() -> tuple[bytes, float]:
        loop = asyncio.get_running_loop()
        server = lane.LaneServer(None, StubFrontEnd(-1))
        await loop.connect_accepted_socket(server, sock=server_sock)
        client_sock.setblocking(False)
        started = loop.time()
        await loop.sock_sendall(client_sock, b"GET /b/k HTTP/1.1\r\nHost: x\r\n")
        received = bytearray()
        for _ in range(100):  # one byte every 20 ms, for up to 2 s
            try:
                await loop.sock_sendall(client_sock, b"X")
            except (BrokenPipeError, ConnectionResetError):
                break
            try:
                piece = await asyncio.wait_for(loop.sock_recv(client_sock, 65536), 0.02)
            except TimeoutError:
                continue
            if not piece:
                break
            received += piece
        while piece := await asyncio.wait_for(loop.sock_recv(client_sock, 65536), 5):
            received += piece
        elapsed = loop.time() - started
        await server.shutdown(1.0)
        return bytes(received), elapsed

    try:
        answer, elapsed = asyncio.run(run())
    finally:
        client_sock.close()
    assert answer.startswith(b"HTTP/1.1 400 ") and b"<Code>RequestTimeout</Code>" in answer
    assert 0.3 <= elapsed < 1.5
