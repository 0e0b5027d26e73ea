"""The lane in-process, on real sockets: a socket that is full exactly when an answer's
headers are due must make the lane wait, not cut the connection (end to end, only the
load test met this moment, and only sometimes); the timeouts on request heads and
bodies; and the connection limit. Runs on the compiled lane and on its twin, with the
timeouts shortened by patching the module's constants."""

from __future__ import annotations

import asyncio
import importlib
import os
import socket
from types import SimpleNamespace

import pytest
from aiohttp import web

from sprox.analytics.accesslog import kernel_batch
from sprox.cache.service import HitPlan
from sprox.server import HANDLER_ARGS

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
        plan = HitPlan(200, False, None, len(BODY), None, self.fd, 0, ())
        return SimpleNamespace(plan=plan, head=b"Content-Type: binary/octet-stream\r\n", body=None,
                               request=SimpleNamespace(request_id="0" * 16), request_id="0" * 16,
                               finished=self.finished.append)


def fill(server_sock: socket.socket) -> int:
    """Make `server_sock` non-blocking and fill it until the kernel takes nothing more;
    returns the bytes of filler the client will read first."""
    server_sock.setblocking(False)
    filler = 0
    for size in (65536, 4096, 256, 1):
        while True:
            try:
                filler += server_sock.send(b"f" * size)
            except BlockingIOError:
                break
    return filler


@pytest.mark.parametrize("module", LANES)
def test_headers_due_on_a_full_socket_wait_for_it(tmp_path, module):
    lane = importlib.import_module(module)
    path = tmp_path / "body"
    path.write_bytes(BODY)
    fd = os.open(path, os.O_RDONLY)
    server_sock, client_sock = socket.socketpair()
    try:
        filler = fill(server_sock)
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
    assert elapsed >= 0.3  # not before its timeout (how much later depends on the machine's load)


# -- request bodies that go quiet --------------------------------------------------------------


class NoHits:
    """A front end whose cache holds nothing: every request goes to aiohttp."""

    use_sendfile = True

    def try_hit(self, method, target, headers):
        return None


class BodyReader:
    """An aiohttp app reading request bodies: PUT reads the whole body and answers its
    length; POST answers 403 at once without reading it. Records how each read ended."""

    def __init__(self) -> None:
        self.outcomes: list[str] = []
        self.done = asyncio.Event()

    async def put(self, request: web.Request) -> web.Response:
        try:
            body = await request.read()
        except Exception as exc:  # what a handler streaming the body upstream would see
            self.outcomes.append(f"error {type(exc).__name__}")
            raise
        finally:
            self.done.set()
        self.outcomes.append(f"read {len(body)}")
        return web.Response(text=str(len(body)))

    async def post(self, request: web.Request) -> web.Response:
        return web.Response(status=403, text="no")


async def _serve(lane, frontend, aiohttp_server=None):
    """A LaneServer on 127.0.0.1 (a real TCP listener); returns (lanes, listener, port)."""
    lanes = lane.LaneServer(aiohttp_server, frontend, handler_kwargs=HANDLER_ARGS)
    listener = await asyncio.get_running_loop().create_server(lanes, "127.0.0.1", 0)
    return lanes, listener, listener.sockets[0].getsockname()[1]


async def _body_app(app_state: BodyReader) -> web.AppRunner:
    app = web.Application()
    app.router.add_put("/{tail:.*}", app_state.put)
    app.router.add_post("/{tail:.*}", app_state.post)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    return runner


async def _read_until_closed(reader: asyncio.StreamReader, seconds: float) -> bytes:
    received = b""
    async with asyncio.timeout(seconds):
        while True:
            try:
                piece = await reader.read(65536)
            except ConnectionResetError:
                return received + b"<reset>"
            if not piece:
                return received
            received += piece


@pytest.mark.parametrize("expect", [False, True], ids=["plain", "100-continue"])
@pytest.mark.parametrize("module", LANES)
def test_a_body_that_goes_quiet_gets_request_timeout_and_the_reader_an_error(module, expect, monkeypatch):
    """PUT with Content-Length 1000, 100 bytes, then nothing: after BODY_SECONDS of
    quiet the client gets S3's 400 RequestTimeout and the connection closes; the
    handler reading the body sees an error, never a short body. An interim
    `100 Continue` (what boto3 waits for before sending a PUT's body) is not the start
    of an answer: the 400 still follows it."""
    lane = importlib.import_module(module)
    monkeypatch.setattr(lane, "BODY_SECONDS", 0.3)
    state = BodyReader()

    async def run() -> tuple[bytes, float]:
        runner = await _body_app(state)
        lanes, listener, port = await _serve(lane, NoHits(), runner.server)
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            started = asyncio.get_running_loop().time()
            head = b"PUT /b/k HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n"
            if expect:
                writer.write(head + b"Expect: 100-continue\r\n\r\n")
                async with asyncio.timeout(5):
                    assert await reader.readuntil(b"\r\n\r\n") == b"HTTP/1.1 100 Continue\r\n\r\n"
                writer.write(b"x" * 100)
            else:
                writer.write(head + b"\r\n" + b"x" * 100)
            answer = await _read_until_closed(reader, 5)
            elapsed = asyncio.get_running_loop().time() - started
            writer.close()
            async with asyncio.timeout(5):
                await state.done.wait()
            return answer, elapsed
        finally:
            listener.close()
            await lanes.shutdown(1.0)
            await runner.cleanup()

    answer, elapsed = asyncio.run(run())
    assert answer.startswith(b"HTTP/1.1 400 Bad Request\r\n"), answer[:200]
    assert b"<Code>RequestTimeout</Code>" in answer and b"Connection: close\r\n" in answer
    assert answer.count(b"HTTP/1.1 ") == 1 and not answer.endswith(b"<reset>")  # nothing from aiohttp after it
    assert elapsed >= 0.3  # not before its timeout (how much later depends on the machine's load)
    assert state.outcomes and state.outcomes[0].startswith("error"), state.outcomes


@pytest.mark.parametrize("module", LANES)
def test_a_slow_steady_body_is_not_timed_out(module, monkeypatch):
    """A body arriving a piece every 0.1 s for 1.6 s: longer than both the head and
    the body timeouts (1 s each), never quiet for long, so it goes through whole. (The
    timeouts leave 0.9 s for a loaded machine to be late with a piece.)"""
    lane = importlib.import_module(module)
    monkeypatch.setattr(lane, "BODY_SECONDS", 1.0)
    monkeypatch.setattr(lane, "HEAD_SECONDS", 1.0)
    state = BodyReader()

    async def run() -> bytes:
        runner = await _body_app(state)
        lanes, listener, port = await _serve(lane, NoHits(), runner.server)
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"PUT /b/k HTTP/1.1\r\nHost: x\r\nContent-Length: 1600\r\nConnection: close\r\n\r\n")
            for _ in range(16):
                await asyncio.sleep(0.1)  # the pace of a slow client, not a wait for a condition
                writer.write(b"y" * 100)
            answer = await _read_until_closed(reader, 5)
            writer.close()
            return answer
        finally:
            listener.close()
            await lanes.shutdown(1.0)
            await runner.cleanup()

    answer = asyncio.run(run())
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n") and answer.endswith(b"\r\n\r\n1600"), answer[:300]
    assert state.outcomes == ["read 1600"]


@pytest.mark.parametrize("module", LANES)
def test_a_quiet_body_after_an_early_answer_cuts_the_connection(module, monkeypatch):
    """The handler answered (403) without reading the body; the body then goes quiet:
    the answer is whole, and the connection is closed (no second answer)."""
    lane = importlib.import_module(module)
    monkeypatch.setattr(lane, "BODY_SECONDS", 0.3)
    state = BodyReader()

    async def run() -> tuple[bytes, float]:
        runner = await _body_app(state)
        lanes, listener, port = await _serve(lane, NoHits(), runner.server)
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            started = asyncio.get_running_loop().time()
            writer.write(b"POST /b/k HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n" + b"x" * 100)
            answer = await _read_until_closed(reader, 5)
            writer.close()
            return answer, asyncio.get_running_loop().time() - started
        finally:
            listener.close()
            await lanes.shutdown(1.0)
            await runner.cleanup()

    answer, _ = asyncio.run(run())
    assert answer.startswith(b"HTTP/1.1 403 Forbidden\r\n") and answer.count(b"HTTP/1.1 ") == 1, answer[:300]
    assert answer.removesuffix(b"<reset>").endswith(b"\r\n\r\nno")


@pytest.mark.parametrize("module", LANES)
def test_a_body_quiet_behind_an_answer_in_flight_is_answered_after_it(module, tmp_path, monkeypatch):
    """A PUT whose head arrives while a hit is still being sent (the socket is full),
    then no body: it never reaches aiohttp; after BODY_SECONDS it is dropped, and the
    client gets the hit whole, then 400 RequestTimeout, then the close."""
    lane = importlib.import_module(module)
    monkeypatch.setattr(lane, "BODY_SECONDS", 0.3)
    path = tmp_path / "body"
    path.write_bytes(BODY)
    fd = os.open(path, os.O_RDONLY)
    server_sock, client_sock = socket.socketpair()

    class HitsForGet(StubFrontEnd):
        def try_hit(self, method, target, headers):
            return super().try_hit(method, target, headers) if method == "GET" else None

    try:
        filler = fill(server_sock)

        async def run() -> bytes:
            loop = asyncio.get_running_loop()
            frontend = HitsForGet(fd)
            server = lane.LaneServer(None, frontend)  # no aiohttp: the PUT must never be handed on
            await loop.connect_accepted_socket(server, sock=server_sock)
            client_sock.setblocking(False)
            await loop.sock_sendall(client_sock, b"GET /b/k HTTP/1.1\r\nHost: x\r\n\r\n"
                                                 b"PUT /b/k HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n")
            await frontend.asked.wait()
            conn = next(iter(server.connections))
            deadline = loop.time() + 5
            while conn.fatal is None:  # the PUT's body timed out while the hit waits for the socket
                assert loop.time() < deadline, "the quiet body was never timed out"
                await asyncio.sleep(0.02)
            received = bytearray()
            while piece := await asyncio.wait_for(loop.sock_recv(client_sock, 65536), 5):
                received += piece
            await server.shutdown(1.0)
            return bytes(received[filler:])

        answer = asyncio.run(run())
    finally:
        client_sock.close()
        os.close(fd)
    head, _, rest = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK\r\n") and rest[:len(BODY)] == BODY
    error = rest[len(BODY):]
    assert error.startswith(b"HTTP/1.1 400 Bad Request\r\n") and b"<Code>RequestTimeout</Code>" in error


# -- the connection limit ------------------------------------------------------------------------

async def _answer(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    async with asyncio.timeout(5):
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
        body = await reader.readexactly(int(headers.get("content-length", "0")))
    return int(lines[0].split()[1]), headers, body


@pytest.mark.parametrize("module", LANES)
def test_a_connection_over_the_limit_gets_slow_down_at_once(module, tmp_path):
    lane = importlib.import_module(module)
    path = tmp_path / "body"
    path.write_bytes(BODY)
    fd = os.open(path, os.O_RDONLY)
    request = b"GET /b/k HTTP/1.1\r\nHost: x\r\n\r\n"

    async def run() -> None:
        loop = asyncio.get_running_loop()
        lanes = lane.LaneServer(None, StubFrontEnd(fd), max_connections=2)
        listener = await loop.create_server(lanes, "127.0.0.1", 0)
        port = listener.sockets[0].getsockname()[1]
        try:
            served = [await asyncio.open_connection("127.0.0.1", port) for _ in range(2)]
            for reader, writer in served:
                writer.write(request)
                status, _, body = await _answer(reader)
                assert status == 200 and body == BODY
            # The third: the 503 comes before it sends anything.
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            status, headers, body = await _answer(reader)
            assert status == 503 and b"<Code>SlowDown</Code>" in body
            assert b"<Message>Please reduce your request rate.</Message>" in body and b"<RequestId>" in body
            assert headers["connection"] == "close" and headers["x-amz-request-id"]
            writer.write(request)  # a client that sends its request anyway still reads the 503, then EOF
            assert await _read_until_closed(reader, 5) == b""
            writer.close()
            # Those under the limit are unaffected: they keep being served.
            for reader, writer in served:
                writer.write(request)
                assert (await _answer(reader))[0] == 200
            # A slot freed is a slot for the next connection.
            served[0][1].close()
            deadline = loop.time() + 5
            while len(lanes.connections) > 1 or lanes.refused:
                assert loop.time() < deadline, (len(lanes.connections), len(lanes.refused))
                await asyncio.sleep(0.01)
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(request)
            assert (await _answer(reader))[0] == 200
            writer.close()
            served[1][1].close()
            assert lanes.refused_total == 1
        finally:
            listener.close()
            await lanes.shutdown(1.0)

    try:
        asyncio.run(run())
    finally:
        os.close(fd)


# -- a client that stops reading an answer aiohttp writes ---------------------------------------


@pytest.mark.parametrize("module", LANES)
def test_a_client_that_takes_none_of_an_aiohttp_answer_is_cut_off(module, monkeypatch):
    """aiohttp waits in drain() for a client that stops reading, without a timeout of
    its own: after SEND_TIMEOUT_SECONDS without the client taking a byte, the lane
    closes the connection, and the handler's write fails instead of waiting forever."""
    lane = importlib.import_module(module)
    monkeypatch.setattr(lane, "SEND_TIMEOUT_SECONDS", 0.5)
    monkeypatch.setattr(lane, "SEND_CHECK_SECONDS", 0.1)
    monkeypatch.setattr(lane, "HEAD_SECONDS", 0.1)  # the first check of a connection comes then
    outcome: list[str] = []

    async def big(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        response.content_length = 64 * 1024 * 1024
        await response.prepare(request)
        try:
            for _ in range(1024):
                await response.write(b"x" * 65536)
        except Exception as exc:  # what a handler streaming from the upstream would see
            outcome.append(type(exc).__name__)
            raise
        outcome.append("finished")
        return response

    async def run():
        app = web.Application()
        app.router.add_get("/{tail:.*}", big)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        lanes, listener, port = await _serve(lane, NoHits(), runner.server)
        client = socket.create_connection(("127.0.0.1", port))
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        try:
            client.sendall(b"GET /b/k HTTP/1.1\r\nHost: x\r\n\r\n")
            started = asyncio.get_running_loop().time()
            async with asyncio.timeout(10):
                while not outcome:  # the client reads nothing at all
                    await asyncio.sleep(0.05)
            elapsed = asyncio.get_running_loop().time() - started
        finally:
            client.close()
            listener.close()
            await lanes.shutdown(1.0)
            await runner.cleanup()
        return elapsed

    elapsed = asyncio.run(run())
    assert outcome != ["finished"] and outcome
    assert elapsed >= 0.5


class KernelFrontEnd:
    """A front end whose hit kernel (real, compiled) holds one object, BODY at /b/k;
    the Python lane's own try_hit answers nothing."""

    use_sendfile = True

    def __init__(self, fd: int) -> None:
        from sprox.kernel import HitKernel

        self.kernel = HitKernel(None, 900.0, None, "0123ABCD")
        record = SimpleNamespace(id=1, size=len(BODY), block_size=len(BODY), present=bytearray(b"\x01"),
                                 unverified=bytearray(1))
        self.kernel.install("b", "k", record, fd, 1e12, b"Content-Type: binary/octet-stream\r\n", None, -1)
        self.held: list[str] = []
        self.cache = SimpleNamespace(hold_blocks=lambda *span: (self.held.append("held") or record, fd),
                                     release_blocks=lambda *span: self.held.append("released"))

    def try_hit(self, method, target, headers):
        return None

    def kernel_rest(self, pending):
        from sprox.frontend import KernelHitRest

        return KernelHitRest(self, pending)

    def drain_kernel(self, limit: int = -1) -> int:
        return 0


@pytest.mark.skipif(os.environ.get("SPROX_NO_EXTENSIONS") == "1", reason="the kernel is not built")
@pytest.mark.parametrize("module", LANES)
def test_a_kernel_answer_the_socket_cannot_take_is_finished_then_the_connection_closed(tmp_path, module):
    """The kernel meets a full socket (PARTIAL): the lane sends the rest with the blocks
    held, logs it once, and honours the client's Connection: close after it."""
    lane = importlib.import_module(module)
    path = tmp_path / "body"
    path.write_bytes(BODY)
    fd = os.open(path, os.O_RDONLY)
    server_sock, client_sock = socket.socketpair()
    try:
        filler = fill(server_sock)
        frontend = KernelFrontEnd(fd)

        async def run() -> bytes:
            loop = asyncio.get_running_loop()
            server = lane.LaneServer(None, frontend)
            await loop.connect_accepted_socket(server, sock=server_sock)
            client_sock.setblocking(False)
            await loop.sock_sendall(client_sock, b"GET /b/k HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            received = bytearray()
            while True:  # the filler, the answer, then the close (a hang fails the wait)
                piece = await asyncio.wait_for(loop.sock_recv(client_sock, 65536), 10)
                if not piece:
                    return bytes(received[filler:])
                received += piece

        answer = asyncio.run(run())
    finally:
        client_sock.close()
        os.close(fd)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK\r\n") and b"\r\nConnection: close" in head
    assert body == BODY
    assert frontend.kernel.partials == 1 and frontend.held == ["held", "released"]
    log, _ = frontend.kernel.drain()
    assert kernel_batch(log).column("bytes_sent").to_pylist() == [len(BODY)]
