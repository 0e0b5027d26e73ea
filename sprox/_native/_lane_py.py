"""The HTTP/1.1 connection: one parser decides where every request ends; cache hits
are answered here, everything else is handed to aiohttp on the same connection.

    bytes -> llhttp (httptools) -> one _Message per request, in order
      -> a GET/HEAD the cache holds (FrontEnd.try_hit): status line and headers in
         one write, the body by sendfile(2) from the block file
      -> anything else: re-serialised as one well-formed request (the framing our
         parser decided, never the client's) and fed to an aiohttp RequestHandler
         whose transport writes to the same socket

Why a second lane at all: aiohttp's request and response objects cost ~40 us of CPU
per request, several times what sending a small cached range costs (see ARCHITECTURE.md).

Why aiohttp can never disagree with us about where a request ends: it only ever sees
bytes we serialised from what llhttp parsed: a request line, the headers, and a body
framed by one Content-Length or by chunks we wrote. Smuggling forms (Content-Length
with Transfer-Encoding, two Content-Lengths, bare LF) are refused by llhttp before
either lane sees them.

Responses leave in request order: while an answer is in flight in one lane (aiohttp
still handling requests it was given, or a sendfile waiting for the socket), later
requests wait in `_queue`, and reading pauses once it holds a few.

What a client can hold is bounded: a request head must be whole HEAD_SECONDS after its
first byte, a request body may not go quiet for BODY_SECONDS (while we are reading), an
idle connection closes after KEEPALIVE_SECONDS, and a connection beyond
`max_connections` is answered 503 SlowDown at once and closed (so clients back off and
retry) instead of taking a descriptor and memory like the others.

This file is also the source of the compiled module (`lane.pyx` includes it), so the
pure-Python twin and the extension cannot drift apart.
"""

# No `from __future__ import annotations`: Cython wants future imports first in the
# .pyx that includes this file. Forward references are therefore quoted.
import asyncio
import logging
import os
import time
from collections import deque
from email.utils import formatdate

import httptools
from aiohttp.web_protocol import RequestHandler
from multidict import CIMultiDict, CIMultiDictProxy

from sprox import kernel as kernel_codes
from sprox.s3 import errors
from sprox.s3.request import new_request_id, split_target
from sprox.sockets import SEND_TIMEOUT_SECONDS, sendfile_now, wait_writable

log = logging.getLogger("sprox.lane")

MAX_TARGET_BYTES = 16 * 1024  # the request target, like aiohttp's max_line_size here
MAX_HEAD_BYTES = 64 * 1024  # request line and headers together
MAX_FIELD_BYTES = 16 * 1024  # one header (aiohttp would refuse longer ones)
MAX_HEADERS = 128
MAX_QUEUED = 16  # parsed requests waiting for their turn before reading pauses
KEEPALIVE_SECONDS = 75.0  # an idle connection is closed after this
HEAD_SECONDS = 60.0  # a request's head must arrive within this
SEND_CHECK_SECONDS = 10.0  # how often a connection with an answer in progress is checked
# A request body may go this long without a byte while we are reading it (nginx's
# client_body_timeout); the time reading is paused (the upstream, or the queue, is
# slower than the client) is ours, not the client's, and does not count.
BODY_SECONDS = 60.0
# A connection over the limit gets its 503, then we read and drop whatever it sends
# until it closes, for up to this long: closing with its request unread would reset the
# connection, and a reset can destroy the 503 before the client reads it.
REFUSED_LINGER_SECONDS = 2.0
REFUSED_LINGER_MAX = 1024  # refused connections lingering at once; beyond, closed at once
# Answers up to this size are sent within the callback that parsed their request.
# Larger ones go through a task from the start: sending megabytes in one go from the
# parsing callback measured slower under sustained 1 MiB load.
SEND_NOW_MAX = 256 * 1024
_INNER_KEEPALIVE = 10.0 ** 7  # aiohttp must never close a connection on its own idea of idle

_REASONS = {200: b"OK", 206: b"Partial Content"}
_ERROR_REASONS = {400: b"Bad Request", 503: b"Slow Down"}
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"  # aiohttp's interim answer: not the start of an answer
_TIMED_OUT = ("RequestTimeout", ("Your socket connection to the server was not read from or written to "
                                  "within the timeout period. Idle connections will be closed."), 400)
_FRAMING = frozenset({b"content-length", b"transfer-encoding"})
# What HitKernel.serve() did: sprox/kernel.py names them (pure Python, so the twin
# imports it too; a test checks they agree with the extension's).
KERNEL_DECLINED, KERNEL_SENT, KERNEL_SENT_CLOSE, KERNEL_PARTIAL, KERNEL_FAILED, KERNEL_FAILED_FILE = (
    kernel_codes.DECLINED, kernel_codes.SENT, kernel_codes.SENT_CLOSE, kernel_codes.PARTIAL, kernel_codes.FAILED,
    kernel_codes.FAILED_FILE)
# How soon after a kernel hit its ring is drained into the metrics, the access log and
# the eviction policy, and how many records one step of a drain takes. A record costs
# ~0.7 us to drain under load (its columns, made in C; its blocks' counts given to the
# policy; the RecordBatch's share), so draining 25 ms of 70k hits/s at once stalled the
# loop ~1 ms, every 25 ms: that was a 4 KiB hit's p99. In steps of KERNEL_DRAIN_STEP
# records, with the loop's I/O between steps, a stall is ~0.2 ms.
KERNEL_DRAIN_SECONDS = 0.025
KERNEL_DRAIN_STEP = 256


class _Message:
    """One request as llhttp parsed it."""

    __slots__ = ("url", "headers", "method", "version", "keep_alive", "body_length", "chunked",
                 "complete", "fed", "buffered", "trailers", "head_bytes", "header_bytes", "begun")

    def __init__(self) -> None:
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.method = b""
        self.version = "1.1"
        self.keep_alive = True
        self.body_length = 0  # Content-Length, or -1 for chunked
        self.chunked = False
        self.complete = False
        self.fed = False  # handed to aiohttp: body bytes now go straight there
        self.buffered: list[bytes] | None = None  # body bytes that arrived before that
        self.trailers: list[tuple[bytes, bytes]] | None = None
        self.head_bytes = 0  # bytes received while in the head (bounds llhttp's buffering)
        self.header_bytes = 0  # of the parsed headers
        self.begun = 0.0  # loop time of its first byte: its head must be whole HEAD_SECONDS later

    @property
    def fast_candidate(self) -> bool:
        return (self.method == b"GET" or self.method == b"HEAD") and self.body_length == 0 and not self.chunked


class LaneServer:
    """The protocol factory given to `loop.create_server`, and the registry of live
    connections that a graceful shutdown walks."""

    def __init__(self, aiohttp_server, frontend, *, handler_kwargs: dict | None = None,
                 use_sendfile: bool = True, max_connections: int = 0) -> None:
        self.aiohttp_server = aiohttp_server
        self.frontend = frontend
        self.handler_kwargs = dict(handler_kwargs or {})
        self.handler_kwargs["keepalive_timeout"] = _INNER_KEEPALIVE
        self.use_sendfile = use_sendfile
        self.max_connections = max_connections  # 0: no limit
        self.connections: set = set()  # served connections (at most max_connections)
        self.refused: set = set()  # connections answered 503 SlowDown, lingering until closed
        self.refused_total = 0
        self._refused_logged = 0  # refused_total when last logged
        self._refused_log_at = 0.0
        self.closing = False
        self._all_gone: asyncio.Future | None = None  # set when shutting down
        self._date = b""
        self._date_second = -1
        self.kernel = getattr(frontend, "kernel", None)  # the hit kernel, if built
        self.drain_scheduled = False

    def __call__(self) -> "Connection":
        return Connection(self)

    def kernel_answered(self) -> None:
        """The kernel logged a hit into its ring: drain it soon (once per batch)."""
        if not self.drain_scheduled:
            self.drain_scheduled = True
            asyncio.get_running_loop().call_later(KERNEL_DRAIN_SECONDS, self._drain_kernel)

    def _drain_kernel(self) -> None:
        if self.frontend.drain_kernel(KERNEL_DRAIN_STEP):
            asyncio.get_running_loop().call_soon(self._drain_kernel)  # the next step, after the loop's I/O
        else:
            self.drain_scheduled = False

    def date_header(self) -> bytes:
        now = int(time.time())
        if now != self._date_second:
            self._date_second = now
            self._date = b"Date: " + formatdate(now, usegmt=True).encode() + b"\r\n"
        return self._date

    async def shutdown(self, timeout: float) -> None:
        """Stop taking requests; let answers in flight finish for up to `timeout`."""
        self.closing = True
        for conn in list(self.connections):
            conn.close_when_idle()
        if self.connections:
            self._all_gone = asyncio.get_running_loop().create_future()
            await asyncio.wait([self._all_gone], timeout=timeout)
        for conn in list(self.connections) + list(self.refused):
            conn.abort()

    def forget(self, conn: "Connection") -> None:
        if conn.refused:
            self.refused.discard(conn)
            return
        self.connections.discard(conn)
        if not self.connections and self._all_gone is not None and not self._all_gone.done():
            self._all_gone.set_result(None)

    def note_refused(self) -> None:
        """Count a refused connection; say so in the log at most once a minute."""
        self.refused_total += 1
        now = time.monotonic()
        if now - self._refused_log_at >= 60.0:
            log.warning("%d connection(s) over --max-connections %d answered 503 SlowDown%s",
                        self.refused_total - self._refused_logged, self.max_connections,
                        " since the last report" if self._refused_logged else "")
            self._refused_logged = self.refused_total
            self._refused_log_at = now


class Connection(asyncio.Protocol):
    def __init__(self, server: LaneServer) -> None:
        self.server = server
        self.frontend = server.frontend
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.sock_fd = -1
        self.kernel = None  # the hit kernel, while this connection has its own socket (sock_fd)
        self.use_sendfile = server.use_sendfile
        self.parser = httptools.HttpRequestParser(self)
        self.current: _Message | None = None
        self.last_parsed: _Message | None = None
        self.queue: deque[_Message] = deque()
        self.busy = False  # a fast-lane answer is waiting for the socket
        self.inner: _AiohttpLane | None = None
        self.inner_pending = 0  # requests given to aiohttp and not yet answered
        self.fatal: errors.S3Error | None = None  # answer this, then close
        self.no_more = False  # a request asked to close the connection
        self.closed = False
        self.paused_by: set[str] = set()
        self.waiter: asyncio.Future | None = None  # the fast lane waiting on the socket
        self.eof = False
        self.last_active = 0.0
        self.read_resumed = 0.0  # loop time reading last resumed (a body's quiet time starts there at the latest)
        self.inner_wrote = False  # aiohttp wrote (part of) an answer since its last complete one
        self.refused = False  # over the connection limit: answered 503, never served
        self.lingering = False  # answered an error; reading and dropping until closed
        # Bytes aiohttp wrote through us, and the last time the client was seen taking
        # some: aiohttp's drain() waits on a client that stops reading without a timeout.
        self.inner_written = 0
        self.last_drained = 0
        self.drained_at = 0.0
        self.timer: asyncio.TimerHandle | None = None

    # -- asyncio.Protocol ----------------------------------------------------------------------

    def connection_made(self, transport) -> None:
        self.transport = transport
        server = self.server
        if server.max_connections and len(server.connections) >= server.max_connections:
            self._refuse()
            return
        sock = transport.get_extra_info("socket")
        # The fast lane writes to its own duplicate of the socket, closed when the
        # connection is lost: never to the transport's descriptor, whose number the
        # system may give to another file once the transport closes it.
        self.sock_fd = os.dup(sock.fileno()) if sock is not None else -1
        if self.sock_fd >= 0:
            self.kernel = server.kernel
        server.connections.add(self)
        self.last_active = self.loop.time()
        self.timer = self.loop.call_later(HEAD_SECONDS, self._check_idle)
        if server.closing:
            self.close_when_idle()

    def _refuse(self) -> None:
        """Over the limit: answer S3's 503 SlowDown before reading anything, so the client
        backs off and retries, then close. The answer is sent before the request because
        reading it would mean keeping this connection like the ones we serve."""
        server = self.server
        self.refused = True
        self.fatal = errors.S3Error("SlowDown", "Please reduce your request rate.", 503)
        server.note_refused()
        transport = self.transport
        transport.write(self._error_bytes(self.fatal, b"Retry-After: 1\r\n"))
        if len(server.refused) >= REFUSED_LINGER_MAX or server.closing or not transport.can_write_eof():
            transport.close()
            return
        server.refused.add(self)
        transport.write_eof()  # the FIN follows the answer; what the client sends is read and dropped
        self.timer = self.loop.call_later(REFUSED_LINGER_SECONDS, transport.close)

    def connection_lost(self, exc) -> None:
        self.closed = True
        self.server.forget(self)
        if self.sock_fd >= 0:
            self.kernel = None
            os.close(self.sock_fd)
            self.sock_fd = -1
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(ConnectionResetError("client went away"))
            waiter.exception()  # marked retrieved: the sender sees it when it awaits
        if self.inner is not None:
            self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        if self.inner is not None:
            self.inner.pause_writing()

    def resume_writing(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)
        if self.inner is not None:
            self.inner.resume_writing()

    def eof_received(self):
        if self.refused or self.lingering:
            return False  # it has its error answer: close
        # A client that half-closes after its last request still gets its answers; a
        # request it left incomplete never will be, so the connection closes after them.
        self.eof = True
        current = self.current
        if current is not None and current.fed:
            self.transport.close()  # aiohttp is reading a body that cannot be completed
            return True
        self._pump()
        return True

    def data_received(self, data: bytes) -> None:
        kernel = self.kernel
        if kernel is not None and self.current is None and not self.queue and not self.busy \
                and not self.inner_pending and self.fatal is None and not self.no_more and not self.closed \
                and self.transport.get_write_buffer_size() == 0:
            # Between requests, with nothing in flight: the kernel answers a hit whole,
            # or declines having written nothing, and llhttp reads the same bytes.
            done = kernel.serve(self.sock_fd, data, self.use_sendfile)
            if done:
                self.last_active = self.loop.time()
                if done == KERNEL_SENT:  # the common case, kept short
                    server = self.server
                    if not server.drain_scheduled:
                        server.kernel_answered()
                    return
                self._kernel_done(done)
                return
        if self.closed or self.fatal is not None or (self.no_more and self.current is None):
            return
        self.last_active = self.loop.time()
        current = self.current
        if current is not None and not current.fed and current.buffered is None:
            current.head_bytes += len(data)  # still in its head: count it against the limit
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # llhttp stops at the upgrade request (CONNECT, or Upgrade: ...) after queuing
            # it: it gets a 400 instead, after the answers to the requests before it.
            if self.queue and self.queue[-1] is self.last_parsed:
                self.queue.pop()
            self.current = None
            self.fatal = errors.S3Error("InvalidRequest", "Sprox does not support protocol upgrades or CONNECT.",
                                        400)
        except httptools.HttpParserError as exc:
            if self.current is not None and self.current.fed:
                self.abort()  # a body aiohttp is reading can never be completed
                return
            if not self.no_more and self.fatal is None:
                self._bad_request(exc)
        current = self.current
        if current is not None and current.buffered is None and not current.fed \
                and current.head_bytes > MAX_HEAD_BYTES:
            self.fatal = errors.S3Error("RequestHeaderSectionTooLarge",
                                        "Your request header section exceeds the maximum allowed size.", 400)
        self._pump()

    def _kernel_done(self, done: int) -> None:
        self.server.kernel_answered()
        if done == KERNEL_SENT:
            return
        if done == KERNEL_SENT_CLOSE:
            self.no_more = True
            self.transport.close()
        elif done == KERNEL_PARTIAL:
            # The socket took part of it: the rest waits for it here, blocks pinned.
            rest = self.frontend.kernel_rest(self.server.kernel.take_pending())
            if rest.close:
                self.no_more = True  # (the connection closes once it is sent: _pump)
            self.busy = True
            task = self.loop.create_task(self._send_large(rest, rest.fd, rest.head, rest.offset, rest.remaining,
                                                          rest.already_sent))
            task.add_done_callback(self._large_sent)
        else:
            if done == KERNEL_FAILED_FILE:
                log.warning("cached answer cut short: a block file is shorter than its index says")
            self.abort()

    # -- llhttp callbacks ------------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self.current = _Message()
        self.current.begun = self.loop.time()

    def on_url(self, url: bytes) -> None:
        message = self.current
        message.url += url
        if len(message.url) > MAX_TARGET_BYTES:
            self._too_large()

    def on_header(self, name: bytes, value: bytes) -> None:
        message = self.current
        if message.buffered is not None or message.fed:  # after the body: a chunked trailer
            if message.trailers is None:
                message.trailers = []
            message.trailers.append((name, value))
            if len(message.trailers) > MAX_HEADERS:
                self._too_large()
            return
        message.headers.append((name, value))
        message.header_bytes += len(name) + len(value) + 4
        if len(message.headers) > MAX_HEADERS or len(value) > MAX_FIELD_BYTES \
                or message.header_bytes + len(message.url) > MAX_HEAD_BYTES:
            self._too_large()

    def on_headers_complete(self) -> None:
        message = self.current
        parser = self.parser
        if not message.url.startswith(b"/") and parser.get_method() != b"CONNECT":  # (refused as an upgrade)
            self._to_origin_form(message)
        message.method = parser.get_method()
        message.version = parser.get_http_version()
        message.keep_alive = parser.should_keep_alive()
        for name, value in message.headers:
            lower = name.lower()
            if lower == b"transfer-encoding":
                message.chunked = True  # llhttp accepted it, so chunked is the final coding
            elif lower == b"content-length":
                message.body_length = int(value)  # llhttp checked it is one valid number
        message.buffered = []
        self.last_parsed = message
        if not message.keep_alive:
            self.no_more = True
        self.queue.append(message)
        if message.body_length or message.chunked:
            self._check_within(BODY_SECONDS)  # a body is due: its quiet time is watched from now

    def _to_origin_form(self, message: "_Message") -> None:
        """An absolute-form target (`http://host/path?q`) keeps only its path and query,
        for both lanes: the host in it never decides anything. Any other form (`*`, a
        bare authority) is no S3 request: InvalidURI, after the answers before it."""
        try:
            path, query = split_target(message.url.decode("latin-1"))
        except errors.S3Error as exc:
            self.fatal = exc
            raise httptools.HttpParserError("request target not in origin form") from None
        message.url = (path + ("?" + query if query else "")).encode("latin-1")

    def on_body(self, body: bytes) -> None:
        message = self.current
        if message.fed:
            self._feed_body(message, body)
        else:
            message.buffered.append(body)

    def on_message_complete(self) -> None:
        message = self.current
        message.complete = True
        self.current = None
        if message.fed and message.chunked:
            self._end_chunked(message)

    # -- dispatch ---------------------------------------------------------------------------------

    def _pump(self) -> None:
        """Answer or hand on queued requests, in order, as far as order allows."""
        queue = self.queue
        while queue and not self.busy and not self.closed:
            message = queue[0]
            if message.fast_candidate and self.inner_pending == 0 and self._try_fast(message):
                queue.popleft()
                continue
            queue.popleft()
            self._feed(message)
        if self.closed:
            return
        if not queue and not self.busy and self.inner_pending == 0:
            if self.fatal is not None:
                self._send_error_and_close(self.fatal)
                return
            if self.eof or (self.no_more and self.current is None):
                self.transport.close()
                return
        current = self.current
        if len(queue) >= MAX_QUEUED or (current is not None and current.buffered):
            # Requests (or a body) wait behind an answer in flight: stop reading more.
            self._pause_reading("queue")
        else:
            self._resume_reading("queue")

    def _try_fast(self, message: _Message) -> bool:
        headers = CIMultiDictProxy(CIMultiDict(
            (name.decode("latin-1"), value.decode("latin-1")) for name, value in message.headers))
        try:
            target = message.url.decode("latin-1")
            hit = self.frontend.try_hit(message.method.decode(), target, headers)
        except Exception:  # the general path answers (and logs) whatever went wrong here
            log.debug("fast lane declined a request", exc_info=True)
            return False
        if hit is None:
            return False
        self._send_hit(hit, message)
        return True

    # -- the fast lane -------------------------------------------------------------------------------

    def _render_head(self, hit, message: _Message) -> bytes:
        plan = hit.plan
        version = b"HTTP/1.0 " if message.version == "1.0" else b"HTTP/1.1 "
        parts = [version, str(plan.status).encode(), b" ", _REASONS[plan.status], b"\r\n",
                 self.server.date_header(), b"Server: Sprox\r\n", hit.head]
        if plan.content_range is not None:
            parts += (b"Content-Range: ", plan.content_range.encode(), b"\r\n")
        parts += (b"X-Cache: HIT\r\nx-amz-request-id: ", hit.request.request_id.encode(), b"\r\n",
                  b"Content-Length: %d\r\n" % plan.length)
        if not message.keep_alive:
            parts.append(b"Connection: close\r\n")
        elif message.version == "1.0":
            parts.append(b"Connection: keep-alive\r\n")
        parts.append(b"\r\n")
        return b"".join(parts)

    def _send_hit(self, hit, message: _Message) -> None:
        head = self._render_head(hit, message)
        plan = hit.plan
        if plan.fd < 0 or message.method == b"HEAD":
            self.transport.write(head)
            hit.finished(0)
            return
        if hit.body is not None:
            self.transport.write(head + hit.body)  # the copy path (SPROX_NO_SENDFILE=1): one write
            hit.finished(len(hit.body))
            return
        offset, length, sent = plan.offset, plan.length, 0
        if plan.length <= SEND_NOW_MAX and self.server.use_sendfile and self.sock_fd >= 0 \
                and self.transport.get_write_buffer_size() == 0:
            # A small answer almost always fits in the socket's buffer: send it now,
            # without a task; only what the socket cannot take yet waits (_send_large).
            try:
                try:
                    sent_head = os.write(self.sock_fd, head)
                except BlockingIOError:  # the socket is full: all of it waits below
                    sent_head = 0
                if sent_head == len(head):
                    sent = sendfile_now(self.sock_fd, plan.fd, offset, length)
            except (OSError, EOFError) as exc:
                self._cut_short(hit, exc)
                hit.finished(0)
                return
            if sent == plan.length:
                hit.finished(sent)
                return
            head = head[sent_head:]
        self.busy = True
        task = self.loop.create_task(self._send_large(hit, plan.fd, head, offset + sent, length - sent, sent))
        task.add_done_callback(self._large_sent)

    async def _send_large(self, hit, fd: int, head: bytes, offset: int, length: int, sent: int) -> None:
        """Send what is left of an answer (`head`, then `length` bytes of the block file
        `fd` from `offset`; `sent` body bytes went already), waiting for the socket."""
        try:
            await self._drain()
            if self.server.use_sendfile and self.sock_fd >= 0:
                await self._send_head_direct(head)
                sent += await self._sendfile(fd, offset, length)
            else:
                self.transport.write(head)
                sent += await self._copy(fd, offset, length)
        except (OSError, EOFError) as exc:
            self._cut_short(hit, exc)
        finally:  # however it ended (even cancelled): the blocks are unpinned, the hit logged
            hit.finished(sent)

    def _cut_short(self, hit, exc: Exception) -> None:
        # The status line may be gone: cut the connection so a short body is an error.
        if not isinstance(exc, ConnectionError):
            log.warning("cached answer %s cut short: %s", hit.request_id, exc)
        if self.transport is not None:
            self.transport.abort()

    def _large_sent(self, task: asyncio.Task) -> None:
        self.busy = False
        if not task.cancelled() and task.exception() is not None:
            log.error("fast lane answer failed", exc_info=task.exception())
            self.abort()
            return
        self._pump()

    async def _drain(self) -> None:
        """Wait until the transport has nothing buffered: sendfile(2) writes to the
        socket directly and must not overtake bytes queued before it."""
        transport = self.transport
        if self.closed or transport is None:
            raise ConnectionResetError("client went away")
        if transport.get_write_buffer_size() == 0:
            return
        self.waiter = self.loop.create_future()
        high, low = 64 * 1024, 16 * 1024
        transport.set_write_buffer_limits(high=0, low=0)  # resume_writing() fires at empty
        try:
            await self.waiter
        finally:
            self.waiter = None
            if not self.closed:
                transport.set_write_buffer_limits(high=high, low=low)
        if self.closed:  # lost in the same turn: its descriptor number may be reused already
            raise ConnectionResetError("client went away")

    async def _wait_writable(self) -> None:
        if self.closed:
            raise ConnectionResetError("client went away")
        # connection_lost ends the wait early through self.waiter.
        self.waiter = self.loop.create_future()
        try:
            await wait_writable(self.sock_fd, self.waiter)
        finally:
            self.waiter = None
        if self.closed:  # lost in the same turn: its descriptor number may be reused already
            raise ConnectionResetError("client went away")

    async def _send_head_direct(self, head: bytes) -> None:
        view = memoryview(head)
        while view:
            try:
                n = os.write(self.sock_fd, view)
            except BlockingIOError:
                n = 0
            view = view[n:]
            if view:
                await self._wait_writable()

    async def _sendfile(self, fd: int, offset: int, count: int) -> int:
        sent = 0
        while True:
            if self.closed:
                raise ConnectionResetError("client went away")
            sent += sendfile_now(self.sock_fd, fd, offset + sent, count - sent)
            if sent == count:
                return sent
            await self._wait_writable()

    async def _copy(self, fd: int, offset: int, count: int) -> int:
        sent = 0
        while count > 0:
            size = min(count, 1024 * 1024)
            data = await self.loop.run_in_executor(None, os.pread, fd, size, offset)
            if not data:
                raise EOFError("block file shorter than its index says")
            self.transport.write(data)
            offset += len(data)
            count -= len(data)
            sent += len(data)
            await self._drain()
        return sent

    # -- the aiohttp lane -------------------------------------------------------------------------

    def _feed(self, message: _Message) -> None:
        inner = self.inner
        if inner is None:
            inner = self.inner = _AiohttpLane(self.server.aiohttp_server, loop=self.loop,
                                              **self.server.handler_kwargs)
            inner.lane = self
            inner.connection_made(_InnerTransport(self))
        head = [message.method, b" ", message.url, b" HTTP/", message.version.encode(), b"\r\n"]
        for name, value in message.headers:
            if name.lower() not in _FRAMING:
                head += (name, b": ", value, b"\r\n")
        if message.chunked:
            head.append(b"Transfer-Encoding: chunked\r\n")
        elif message.body_length:
            head.append(b"Content-Length: %d\r\n" % message.body_length)
        head.append(b"\r\n")
        self.inner_pending += 1
        message.fed = True
        inner.data_received(b"".join(head))
        for piece in message.buffered:
            self._feed_body(message, piece)
        message.buffered = None
        if message.complete and message.chunked:
            self._end_chunked(message)

    def _feed_body(self, message: _Message, piece: bytes) -> None:
        if not piece or self.inner is None:
            return
        if message.chunked:
            piece = b"%x\r\n%s\r\n" % (len(piece), piece)
        self.inner.data_received(piece)

    def _end_chunked(self, message: _Message) -> None:
        trailer = b"".join(name + b": " + value + b"\r\n" for name, value in message.trailers or ())
        self.inner.data_received(b"0\r\n" + trailer + b"\r\n")

    def inner_answered(self) -> None:
        self.inner_pending -= 1
        self.inner_wrote = False
        if self.inner_pending == 0:
            # After aiohttp's own bookkeeping for this answer, not in the middle of it.
            self.loop.call_soon(self._pump)

    # -- flow control and closing ---------------------------------------------------------------

    def _pause_reading(self, who: str) -> None:
        if not self.paused_by and self.transport is not None and not self.closed:
            self.transport.pause_reading()
        self.paused_by.add(who)

    def _resume_reading(self, who: str) -> None:
        if who not in self.paused_by:
            return
        self.paused_by.discard(who)
        if not self.paused_by and self.transport is not None and not self.closed:
            self.transport.resume_reading()
            self.read_resumed = self.loop.time()

    def _too_large(self) -> None:
        """Called from a parser callback: the error is decided here, the raise stops llhttp."""
        self.fatal = errors.S3Error("RequestHeaderSectionTooLarge",
                                    "Your request header section exceeds the maximum allowed size.", 400)
        raise httptools.HttpParserError("request head too large")

    def _bad_request(self, exc: Exception) -> None:
        detail = str(exc) or type(exc).__name__
        if isinstance(exc, httptools.HttpParserInvalidURLError):
            self.fatal = errors.S3Error("InvalidURI", "Couldn't parse the specified URI.", 400)
        else:
            self.fatal = errors.S3Error("BadRequest", f"An error occurred when parsing the HTTP request: {detail}",
                                        400)

    def _error_bytes(self, error: errors.S3Error, extra: bytes = b"") -> bytes:
        request_id = new_request_id()
        body = error.to_xml(request_id)
        reason = _ERROR_REASONS.get(error.status, b"Error")
        return (b"HTTP/1.1 %d %s\r\n" % (error.status, reason) + self.server.date_header()
                + b"Server: Sprox\r\nContent-Type: application/xml\r\nx-amz-request-id: "
                + request_id.encode() + b"\r\n" + extra
                + b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body)

    def _send_error_and_close(self, error: errors.S3Error) -> None:
        self.transport.write(self._error_bytes(error))
        self._linger_then_close()

    def _linger_then_close(self) -> None:
        """Close once the client has had its answer: half-close now (the FIN follows the
        answer), read and drop what it still sends, and close at its EOF or after
        REFUSED_LINGER_SECONDS. Closing with its bytes unread would reset the
        connection, and a reset can destroy the answer before the client reads it (an
        over-long request line does exactly that). With aiohttp still holding a request
        (its writes must fail at once), or when shutting down: closed at once."""
        transport = self.transport
        if self.lingering or self.closed:
            return
        if self.server.closing or self.inner_pending or not transport.can_write_eof():
            transport.close()
            return
        self.lingering = True
        transport.write_eof()
        if self.paused_by:  # what arrives must be read (and dropped), not left unread
            self.paused_by.clear()
            transport.resume_reading()
        if self.timer is not None:
            self.timer.cancel()
        self.timer = self.loop.call_later(REFUSED_LINGER_SECONDS, transport.close)

    def _check_within(self, delay: float) -> None:
        """Make sure _check_idle runs within `delay` seconds."""
        timer = self.timer
        if timer is None or timer.when() <= self.loop.time() + delay:
            return
        timer.cancel()
        self.timer = self.loop.call_later(delay, self._check_idle)

    def _check_idle(self) -> None:
        """Close connections that hold a request head open too long (a slow drip of
        header bytes counts from the first byte, not the last), go quiet in the middle
        of a request body, or sit idle too long."""
        self.timer = None
        if self.closed:
            return
        now = self.loop.time()
        current = self.current
        if current is not None and current.buffered is None and not current.fed:  # a request head is arriving
            waited = now - current.begun
            if waited >= HEAD_SECONDS:
                self.current = None
                self.fatal = errors.S3Error(*_TIMED_OUT)
                self._pump()  # answers due before it go first, then this error and the close
                return
            self.timer = self.loop.call_later(HEAD_SECONDS - waited, self._check_idle)
            return
        if current is not None:  # its head is parsed: a request body is arriving
            if self.paused_by:  # we are not reading: the wait is ours, not the client's
                self.timer = self.loop.call_later(BODY_SECONDS, self._check_idle)
                return
            quiet = now - max(self.last_active, self.read_resumed)
            if quiet >= BODY_SECONDS:
                self._body_timed_out(current)
                return
            self.timer = self.loop.call_later(BODY_SECONDS - quiet, self._check_idle)
            return
        idle = now - self.last_active
        in_progress = self.busy or self.inner_pending or self.queue or current is not None
        if not in_progress and idle >= KEEPALIVE_SECONDS:
            self.transport.close()
            return
        if in_progress and self._client_stopped_reading(now):
            log.info("closing a connection whose client took none of its answer for %.0f s", SEND_TIMEOUT_SECONDS)
            self.abort()
            return
        self.timer = self.loop.call_later(max(0.0, KEEPALIVE_SECONDS - idle) if not in_progress
                                          else SEND_CHECK_SECONDS, self._check_idle)

    def _client_stopped_reading(self, now: float) -> bool:
        """Whether answer bytes have waited in the transport for SEND_TIMEOUT_SECONDS
        without the client taking any (the fast lane's own sends time out in
        sprox.sockets; this covers what aiohttp writes)."""
        buffered = self.transport.get_write_buffer_size()
        drained = self.inner_written - buffered
        if buffered == 0 or drained != self.last_drained or self.drained_at == 0.0:
            self.last_drained = drained
            self.drained_at = now
            return False
        return now - self.drained_at >= SEND_TIMEOUT_SECONDS

    def _body_timed_out(self, message: _Message) -> None:
        """A request body went quiet: answer 400 RequestTimeout if nothing of its answer
        has been sent, else cut the connection; either way it is closed, and whoever was
        reading the body (aiohttp's handler) sees it end in an error, never complete."""
        self.current = None
        error = errors.S3Error(*_TIMED_OUT)
        if not message.fed:  # queued behind answers in flight: it is answered after them
            if self.queue and self.queue[-1] is message:
                self.queue.pop()
            self.fatal = error
            self._pump()
            return
        self.no_more = True  # the stream cannot be framed past this body: nothing after it is read
        if self.inner_pending == 1 and not self.inner_wrote and self.transport is not None:
            # Only this request is with aiohttp and no byte of its answer is out: the
            # error goes first, and aiohttp's writes fail from here on (the transport
            # is closing); the handler is cancelled when the connection is lost.
            self._send_error_and_close(error)
        else:
            self.abort()

    def close_when_idle(self) -> None:
        self.no_more = True
        if not self.busy and not self.inner_pending and not self.queue and self.transport is not None:
            if self.current is None or self.current.buffered is None:
                self.transport.close()

    def abort(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.abort()

    def inner_close(self) -> None:
        if self.transport is not None:
            self.transport.close()


class _AiohttpLane(RequestHandler):
    """aiohttp's own connection handler, fed the requests the fast lane does not answer;
    tells the lane when each answer has been written."""

    __slots__ = ("lane",)

    def log_access(self, request, response, time) -> None:
        super().log_access(request, response, time)
        self.lane.inner_answered()


class _InnerTransport(asyncio.Transport):
    """The transport aiohttp writes to: the connection's own, except that reading is
    paused and resumed together with the fast lane, and closing goes through it."""

    def __init__(self, lane: "Connection") -> None:
        super().__init__()
        self._lane = lane
        self._real = lane.transport

    def write(self, data) -> None:
        if data != _CONTINUE:
            self._lane.inner_wrote = True
        self._lane.inner_written += len(data)
        self._real.write(data)

    def writelines(self, list_of_data) -> None:
        self._lane.inner_wrote = True
        self._lane.inner_written += sum(len(data) for data in list_of_data)
        self._real.writelines(list_of_data)

    def is_closing(self) -> bool:
        return self._real.is_closing()

    def close(self) -> None:
        self._lane.inner_close()

    def abort(self) -> None:
        self._real.abort()

    def get_extra_info(self, name, default=None):
        return self._real.get_extra_info(name, default)

    def pause_reading(self) -> None:
        self._lane._pause_reading("aiohttp")

    def resume_reading(self) -> None:
        self._lane._resume_reading("aiohttp")

    def is_reading(self) -> bool:
        return self._real.is_reading()

    def get_write_buffer_size(self) -> int:
        return self._real.get_write_buffer_size()

    def get_write_buffer_limits(self):
        return self._real.get_write_buffer_limits()

    def set_write_buffer_limits(self, high=None, low=None) -> None:
        self._real.set_write_buffer_limits(high, low)

    def can_write_eof(self) -> bool:
        return self._real.can_write_eof()

    def write_eof(self) -> None:
        self._real.write_eof()
