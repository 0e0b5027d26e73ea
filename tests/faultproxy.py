"""A fault-injecting HTTP/1.1 proxy between Sprox and a real upstream, for tests.

    Sprox --upstream http://127.0.0.1:<proxy.port>  ->  FaultProxy  ->  CountingUpstream / moto

It runs on 127.0.0.1 (a port the kernel picks) in its own thread and event loop, and
speaks plain HTTP/1.1 on real sockets: requests from Sprox are read one after another
on each keep-alive connection and forwarded, each on a fresh upstream connection.
By default a request passes through untouched; a test arms rules with `inject()`,
each naming a fault and which requests it hits (method, key, ranged or not, with
If-Match or not, how many matching requests to let through first, and how many to
fault). Every request is recorded with the fault it got, so tests can count retries.

Faults (the `Fault` names):

    RESET           TCP reset before any response byte
    RESET_MID_BODY  status line, headers and `after` body bytes, then a TCP reset
    STALL           not one byte for `seconds` (or until Sprox hangs up), then close
    STALL_MID_BODY  headers and `after` body bytes, then silence as for STALL
    ERROR_500       500 InternalError, S3's XML body with a RequestId
    ERROR_503       503 SlowDown, likewise
    LANDED          once the test sets `release` (a threading.Event), the request goes
                    to the upstream (a write lands), whose answer is dropped: then
                    `then` (RESET or ERROR_500) as if it were the fault
    TRUNCATE        the true Content-Length, `after` body bytes, then a clean close (FIN)
    LONG_LENGTH     Content-Length `extra` bytes more than the body; the body, then close
    SHORT_LENGTH    Content-Length `short` bytes less than the body; the whole body is
                    sent anyway and the connection kept, so the excess bytes sit in
                    front of the next response on it
    ETAG            the answer as it is, but with ETag `etag`
    OTHER_VERSION   the answer for key `serve_key` (another object), If-Match dropped: an
                    upstream that ignores If-Match while the object changed under it
"""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Self
from urllib.parse import unquote

HOST = "127.0.0.1"
_HEAD_LIMIT = 1 << 20
_CHUNK = 64 * 1024
_NO_BODY_STATUS = frozenset({204, 304})


class Fault:
    RESET = "reset"
    RESET_MID_BODY = "reset-mid-body"
    STALL = "stall"
    STALL_MID_BODY = "stall-mid-body"
    ERROR_500 = "500"
    ERROR_503 = "503"
    LANDED = "landed"
    TRUNCATE = "truncate"
    LONG_LENGTH = "long-content-length"
    SHORT_LENGTH = "short-content-length"
    ETAG = "etag"
    OTHER_VERSION = "other-version"


_S3_ERRORS = {
    Fault.ERROR_500: (500, "Internal Server Error", "InternalError",
                      "We encountered an internal error. Please try again."),
    Fault.ERROR_503: (503, "Slow Down", "SlowDown", "Please reduce your request rate."),
}


@dataclass
class Seen:
    """One request as the proxy received it, and the fault it got (None: passed)."""

    method: str
    path: str  # percent-decoded, without the query
    range: str | None
    if_match: str | None
    fault: str | None
    at: float  # time.monotonic() when its head was read


@dataclass
class Rule:
    """Fault the matching requests after the first `skip`, `times` of them (None: all)."""

    fault: str
    method: str | None = "GET"
    key: str | None = None
    ranged: bool | None = None
    if_match: bool | None = None
    skip: int = 0
    times: int | None = 1
    params: dict = field(default_factory=dict)
    matched: int = 0  # matching requests so far
    applied: int = 0  # of which faulted

    def matches(self, method: str, path: str, headers: dict[str, str]) -> bool:
        return ((self.method is None or method == self.method)
                and (self.key is None or path.endswith("/" + self.key))
                and (self.ranged is None or ("range" in headers) == self.ranged)
                and (self.if_match is None or ("if-match" in headers) == self.if_match))

    def take(self) -> bool:
        """Count one matching request; whether this one is to be faulted."""
        self.matched += 1
        if self.matched <= self.skip or (self.times is not None and self.applied >= self.times):
            return False
        self.applied += 1
        return True


class _Request:
    def __init__(self, method: str, target: str, version: str, headers: list[tuple[str, str]], body: bytes):
        self.method, self.target, self.version = method, target, version
        self.headers, self.body = headers, body
        self.lower = {name.lower(): value for name, value in headers}

    @property
    def path(self) -> str:
        return unquote(self.target.partition("?")[0])


class FaultProxy:
    """Use as a context manager; `endpoint` is what Sprox's --upstream points at."""

    def __init__(self, upstream_endpoint: str) -> None:
        hostport = upstream_endpoint.removeprefix("http://").rstrip("/")
        host, port = hostport.rsplit(":", 1)
        self.upstream = (host, int(port))
        self.port = 0
        self.seen: list[Seen] = []
        self.errors: list[BaseException] = []  # raised by __exit__: the proxy itself failed
        self._rules: list[Rule] = []
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.base_events.Server | None = None
        self._handlers: set[asyncio.Task] = set()
        self._stopped: asyncio.Event | None = None

    @property
    def endpoint(self) -> str:
        return f"http://{HOST}:{self.port}"

    # -- test-side API -------------------------------------------------------------------

    def inject(self, fault: str, *, method: str | None = "GET", key: str | None = None,
               ranged: bool | None = None, if_match: bool | None = None, skip: int = 0,
               times: int | None = 1, **params) -> Rule:
        """Arm a fault; rules are tried in the order they were armed."""
        rule = Rule(fault, method, key, ranged, if_match, skip, times, params)
        with self._lock:
            self._rules.append(rule)
        return rule

    def clear(self) -> None:
        """Disarm every fault (requests already being faulted carry on)."""
        with self._lock:
            self._rules.clear()

    def count(self, method: str | None = None, key: str | None = None, *, fault: str | None = None,
              faulted: bool | None = None) -> int:
        with self._lock:
            return sum(1 for s in self.seen
                       if (method is None or s.method == method)
                       and (key is None or s.path.endswith("/" + key))
                       and (fault is None or s.fault == fault)
                       and (faulted is None or (s.fault is not None) == faulted))

    def requests(self, method: str | None = None, key: str | None = None) -> list[Seen]:
        with self._lock:
            return [s for s in self.seen if (method is None or s.method == method)
                    and (key is None or s.path.endswith("/" + key))]

    def reset_counts(self) -> None:
        with self._lock:
            self.seen.clear()

    # -- lifecycle -----------------------------------------------------------------------

    def __enter__(self) -> Self:
        self._loop = asyncio.new_event_loop()
        ready = threading.Event()
        failure: list[BaseException] = []

        async def start() -> None:
            self._stopped = asyncio.Event()
            self._server = await asyncio.start_server(self._serve_connection, HOST, 0, limit=_HEAD_LIMIT)
            self.port = self._server.sockets[0].getsockname()[1]

        async def main() -> None:
            try:
                await start()
            except BaseException as exc:  # noqa: BLE001 - reported to the starting thread
                failure.append(exc)
                ready.set()
                return
            ready.set()
            assert self._stopped is not None and self._server is not None
            await self._stopped.wait()
            self._server.close()
            for task in list(self._handlers):
                task.cancel()
            if self._handlers:
                await asyncio.gather(*self._handlers, return_exceptions=True)
            await self._server.wait_closed()

        def run() -> None:
            asyncio.set_event_loop(self._loop)
            try:
                self._loop.run_until_complete(main())
            finally:
                self._loop.close()

        self._thread = threading.Thread(target=run, daemon=True, name="FaultProxy")
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("FaultProxy did not start within 10 s")
        if failure:
            raise RuntimeError("FaultProxy did not start") from failure[0]
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._loop is not None and self._thread is not None and self._stopped is not None
        self._loop.call_soon_threadsafe(self._stopped.set)
        self._thread.join(10)
        if self._thread.is_alive():
            raise RuntimeError("FaultProxy did not stop within 10 s")
        if self.errors and exc[0] is None:
            raise RuntimeError(f"FaultProxy failed while serving: {self.errors!r}") from self.errors[0]

    # -- serving -------------------------------------------------------------------------

    async def _serve_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        # drain() returns only once every byte is in the kernel: a reset right after a
        # partial body then cannot discard bytes still queued in the transport.
        writer.transport.set_write_buffer_limits(high=0)
        try:
            while True:  # one request after another on a keep-alive connection
                request = await _read_request(reader)
                if request is None:
                    break
                if not await self._answer(request, reader, writer):
                    break
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass  # either side hung up (or the proxy is stopping): nothing to answer
        except Exception as exc:  # noqa: BLE001 - a broken test double must fail the test
            self.errors.append(exc)
        finally:
            self._handlers.discard(task)
            if not writer.transport.is_closing():
                writer.transport.abort()

    def _choose(self, request: _Request) -> Rule | None:
        with self._lock:
            chosen = None
            for rule in self._rules:  # the first rule that matches and fires; later ones never see it
                if rule.matches(request.method, request.path, request.lower) and rule.take():
                    chosen = rule
                    break
            self.seen.append(Seen(request.method, request.path, request.lower.get("range"),
                                  request.lower.get("if-match"), chosen.fault if chosen else None,
                                  time.monotonic()))
            return chosen

    async def _answer(self, request: _Request, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Answer one request; False when the connection is to be closed."""
        rule = self._choose(request)
        fault = rule.fault if rule is not None else None
        params = rule.params if rule is not None else {}
        if fault == Fault.LANDED:
            released = await asyncio.get_running_loop().run_in_executor(None, params["release"].wait, 60.0)
            assert released, "LANDED: the test never released the request"
            _status, _reason, _headers, body_reader, upstream_writer = await self._forward(request)
            try:
                await body_reader.read()  # the upstream's whole answer: the write is done
            finally:
                upstream_writer.transport.abort()
            fault = params["then"]
        if fault == Fault.RESET:
            _reset(writer)
            return False
        if fault == Fault.STALL:
            await _stall(reader, params.get("seconds", 30.0))
            return False
        if fault in _S3_ERRORS:
            status, reason, code, message = _S3_ERRORS[fault]
            body = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
                    f"<Message>{message}</Message><RequestId>FAULTPROXY{len(self.seen)}</RequestId>"
                    f"<HostId>faultproxy</HostId></Error>").encode()
            head = [("Content-Type", "application/xml"), ("x-amz-request-id", f"FAULTPROXY{len(self.seen)}"),
                    ("Content-Length", str(len(body)))]
            writer.write(_head(status, reason, head) + (b"" if request.method == "HEAD" else body))
            await writer.drain()
            return True
        if fault == Fault.OTHER_VERSION:
            bucket = request.path.lstrip("/").split("/", 1)[0]
            request.target = f"/{bucket}/{params['serve_key']}"
            request.headers = [(n, v) for n, v in request.headers if n.lower() != "if-match"]

        status, reason, headers, body_reader, upstream_writer = await self._forward(request)
        try:
            return await self._relay(request, fault, params, status, reason, headers, body_reader, reader, writer)
        finally:
            upstream_writer.transport.abort()

    async def _forward(self, request: _Request):
        up_reader, up_writer = await asyncio.open_connection(*self.upstream, limit=_HEAD_LIMIT)
        lines = [f"{request.method} {request.target} {request.version}"]
        for name, value in request.headers:
            if name.lower() not in ("connection", "keep-alive"):
                lines.append(f"{name}: {value}")
        lines.append("Connection: close")
        up_writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + request.body)
        await up_writer.drain()
        head = await up_reader.readuntil(b"\r\n\r\n")
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        _version, status, reason = (status_line.split(" ", 2) + [""])[:3]
        headers = []
        for line in header_lines:
            if line:
                name, _, value = line.partition(":")
                headers.append((name.strip(), value.strip()))
        return int(status), reason, headers, up_reader, up_writer

    async def _relay(self, request: _Request, fault: str | None, params: dict, status: int, reason: str,
                     headers: list[tuple[str, str]], body_reader: asyncio.StreamReader,
                     reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        lower = {n.lower(): v for n, v in headers}
        headers = [(n, v) for n, v in headers if n.lower() not in ("connection", "keep-alive")]
        no_body = request.method == "HEAD" or status in _NO_BODY_STATUS or status < 200
        length = int(lower["content-length"]) if "content-length" in lower else None
        chunked = "chunked" in lower.get("transfer-encoding", "").lower()
        keep_alive = no_body or length is not None or chunked
        if not keep_alive:
            headers.append(("Connection", "close"))  # the body ends when the connection does

        body_faults = (Fault.RESET_MID_BODY, Fault.STALL_MID_BODY, Fault.TRUNCATE, Fault.LONG_LENGTH,
                       Fault.SHORT_LENGTH)
        if fault in body_faults and (no_body or length is None):
            raise AssertionError(f"fault {fault} needs a response with a Content-Length body")
        if fault == Fault.ETAG:
            headers = [(n, params["etag"] if n.lower() == "etag" else v) for n, v in headers]
        if fault in (Fault.LONG_LENGTH, Fault.SHORT_LENGTH):
            assert length is not None
            declared = length + params.get("extra", 0) if fault == Fault.LONG_LENGTH else length - params["short"]
            headers = [(n, str(declared) if n.lower() == "content-length" else v) for n, v in headers]

        writer.write(_head(status, reason, headers))
        if no_body:
            await writer.drain()
            return True
        if chunked or length is None:
            # Relayed as they come until the upstream closes (it was asked to): the
            # chunked framing, if any, travels unchanged.
            while chunk := await body_reader.read(_CHUNK):
                writer.write(chunk)
                await writer.drain()
            return keep_alive

        cut = params.get("after", 0) if fault in (Fault.RESET_MID_BODY, Fault.STALL_MID_BODY, Fault.TRUNCATE) \
            else length
        sent = 0
        while sent < min(cut, length):
            chunk = await body_reader.read(min(_CHUNK, min(cut, length) - sent))
            if not chunk:
                raise ConnectionError("the upstream closed before its Content-Length")
            writer.write(chunk)
            sent += len(chunk)
            await writer.drain()
        if fault == Fault.RESET_MID_BODY:
            _reset(writer)
            return False
        if fault == Fault.STALL_MID_BODY:
            await _stall(reader, params.get("seconds", 30.0))
            return False
        if fault in (Fault.TRUNCATE, Fault.LONG_LENGTH):
            writer.close()  # a clean FIN, short of the declared length
            return False
        return True


async def _read_request(reader: asyncio.StreamReader) -> _Request | None:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        if exc.partial.strip():
            raise
        return None  # the client closed between requests
    request_line, *lines = head.decode("latin-1").split("\r\n")
    method, target, version = request_line.split(" ", 2)
    headers = []
    for line in lines:
        if line:
            name, _, value = line.partition(":")
            headers.append((name.strip(), value.strip()))
    lower = {n.lower(): v for n, v in headers}
    if "chunked" in lower.get("transfer-encoding", "").lower():
        raise ValueError("chunked request bodies are not supported by the fault proxy")
    body = await reader.readexactly(int(lower.get("content-length", "0")))
    return _Request(method, target, version, headers, body)


def _head(status: int, reason: str, headers: list[tuple[str, str]]) -> bytes:
    lines = [f"HTTP/1.1 {status} {reason}"] + [f"{n}: {v}" for n, v in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP RST (SO_LINGER 0) instead of a FIN."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


async def _stall(reader: asyncio.StreamReader, seconds: float) -> None:
    """Send nothing until `seconds` pass or the peer hangs up (a read returns EOF)."""
    try:
        await asyncio.wait_for(reader.read(1), seconds)
    except (TimeoutError, ConnectionError):
        pass
