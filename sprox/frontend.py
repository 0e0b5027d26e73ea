"""Where every S3 request goes: parse, authenticate, then the cache or the origin.

    client -> handle() -> parse_request -> SignatureVerifier.verify
                -> GetObject/HeadObject: ObjectCache.serve   (X-Cache: HIT|MISS|PARTIAL)
                                         or the origin         (X-Cache: BYPASS)
                -> listings: ListingCache (with --list-ttl), else the origin
                -> everything else: the origin; writes invalidate what they change

Errors anywhere below become S3's XML error body here, with a request id.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass

import aiohttp
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy, MultiDict, MultiDictProxy

from .analytics.accesslog import AccessRecord, kernel_batch
from .cache.mirror import HitMirror
from .cache.service import OBJECT_WRITES, FileSpan, HitPlan
from .hithead import record_head
from .kernel import make_kernel
from .metrics import RequestMetrics
from .s3 import errors, rights, xml
from .s3.body import RequestBody
from .s3.numbers import decimal, parse_content_range
from .s3.request import S3Request, new_request_id, parse_request
from .sockets import sendfile_all
from .upstream.base import Origin, OriginResponse, UpstreamBodyError

log = logging.getLogger("sprox.frontend")

# Statuses that never carry a body (RFC 9110), whatever the origin sent.
NO_BODY_STATUS = frozenset({204, 304})
OBJECT_READS = frozenset({"GetObject", "HeadObject"})
LISTINGS = frozenset({"ListObjects", "ListObjectsV2"})
# Bodies Sprox reads to check (and, for DeleteObjects, to learn the keys it deletes).
# operation -> (root element, the item it must hold, the children it may hold)
XML_BODIES = {"DeleteObjects": ("Delete", "Object", {"Object", "Quiet"}),
              "CompleteMultipartUpload": ("CompleteMultipartUpload", "Part", {"Part"})}
MAX_XML_BODY = 4 * 1024 * 1024
XML_PARSE_ON_LOOP_MAX = 64 * 1024
COPY_CHUNK = 1024 * 1024


class FrontEnd:
    """The aiohttp handler for the S3 API."""

    def __init__(self, origin: Origin, *, verifier=None, domain: str | None = None, cache=None,
                 listings=None, access_log=None, key_rights: Mapping[str, rights.KeyRights] | None = None,
                 peers=None) -> None:
        self.origin = origin
        # The other nodes of a tier (sprox/peers.py), told about writes; None alone.
        self.peers = peers
        self.verifier = verifier
        # The fast lane's signature check for the common request (sprox/fastsig.py).
        self.fast_signatures = verifier.fast_check() if verifier is not None else None
        # What each key the verifier knows may do (config.Config.key_rights). Every key
        # the verifier accepts must be here: a key missing is an error, never a pass.
        self.key_rights = key_rights or {}
        self.domain = domain
        self.cache = cache
        self.listings = listings
        self.access_log = access_log
        # SPROX_NO_SENDFILE=1 sends cached bytes by reading and writing (the copy path).
        self.use_sendfile = os.environ.get("SPROX_NO_SENDFILE") != "1"
        self.fast_hits = 0  # answered by the fast lane (sprox/_native/_lane_py.py)
        self.metrics = RequestMetrics()  # /_sprox/metrics
        # The hit kernel (sprox/_native/kernel.pyx) answers hits the Python lane has
        # mirrored for it (sprox/cache/mirror.py); None without the extension.
        self.kernel = make_kernel(verifier, domain) if cache is not None else None
        self.mirror = HitMirror(self.kernel, cache) if self.kernel is not None else None

    async def handle(self, http: web.Request) -> web.StreamResponse:
        started_at, started = time.time(), time.monotonic()
        request_id = new_request_id()
        state = _Served()
        response = await self._handle(http, request_id, state)
        first_byte = object_size = None
        if state.request is not None and state.request.operation in OBJECT_READS:
            first_byte, object_size = object_span(
                http.method, response.status, response.headers.get("Content-Range"),
                response.content_length)  # (a web.Response not yet sent has no header yet)
        self._record_access(http.headers, request_id, state.request, state.bytes_sent, response.status,
                            started_at, time.monotonic() - started, first_byte, object_size)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s %s %s -> %d [%s]", http.remote, http.method, http.raw_path, response.status, request_id)
        return response

    async def _handle(self, http: web.Request, request_id: str, state: _Served) -> web.StreamResponse:
        try:
            request = self.parse(http, request_id)
            state.request = request
            if self.verifier is not None:
                verified = self.verifier.authenticate(request)
                request.access_key = verified.access_key
                if verified.query_headers:
                    apply_query_headers(request, verified.query_headers)
                rights.check(self.key_rights[verified.access_key], request)
                if request.body is not None:
                    request.body.expect_signatures(verified)
            if request.body is not None:
                request.body.check_declared_size()
            if request.operation in OBJECT_READS and self.cache is None:
                request.stats.cache = "BYPASS"
            elif request.operation in OBJECT_READS and self.cache is not None:
                if self.cache.bypass_reason(request) is None:
                    answer = await self.cache.serve(request)
                    if answer.passthrough is None:
                        return await self.send_answer(http, answer, request_id, state)
                    request.stats.cache = answer.outcome
                    return await stream_response(http, answer.passthrough, request_id, state,
                                                 x_cache=answer.outcome)
                request.stats.cache = "BYPASS"
                self.cache.stats.bypass += 1
            if request.operation in LISTINGS and self.listings is not None:
                cached = self.listings.get(request)
                if cached is not None:
                    return await stream_response(http, cached, request_id, state)
                listed_since = self.listings.now()
            deleted_keys = await self._read_xml_body(request)
            self._before_write(request, deleted_keys)
            request.stats.upstream_requests += 1
            try:
                response = await self.origin.send(request)
            except errors.S3Error as exc:
                if exc.status >= 500:  # the write may have been done all the same
                    self._after_write(request, deleted_keys)
                    await self._tell_peers(request, deleted_keys, exc.status)
                raise
            self._after_write(request, deleted_keys)
            await self._tell_peers(request, deleted_keys, response.status)
            if request.operation in LISTINGS and self.listings is not None and response.status == 200:
                response = await self.listings.put(request, response, listed_since)
        except errors.S3Error as exc:
            return error_response(exc, request_id, resource=_resource(http), head=http.method == "HEAD")
        except (ConnectionError, aiohttp.ClientConnectionError) as exc:
            # The client went away (mid-body, say): its own doing, and a hostile client
            # could fill the log with tracebacks. No one reads this answer.
            log.info("request %s: client connection lost (%s)", request_id, exc)
            return error_response(errors.S3Error("IncompleteBody", "The connection was lost.", 400),
                                  request_id, head=http.method == "HEAD")
        except Exception:
            log.exception("request %s failed", request_id)
            return error_response(errors.internal_error(), request_id, head=http.method == "HEAD")
        x_cache = request.stats.cache if request.operation in OBJECT_READS else None
        return await stream_response(http, response, request_id, state, x_cache=x_cache)

    def _record_access(self, headers, request_id: str, request: S3Request | None, bytes_sent: int, status: int,
                       started_at: float, seconds: float, first_byte: int | None = None,
                       object_size: int | None = None) -> None:
        operation = request.operation if request is not None else "Invalid"
        cache = request.stats.cache if request is not None else None
        upstream_requests = request.stats.upstream_requests if request is not None else 0
        upstream_bytes = request.stats.upstream_bytes if request is not None else 0
        self.metrics.observe(operation, status, cache, bytes_sent, upstream_requests, upstream_bytes, seconds)
        if self.access_log is None:
            return
        self.access_log.record(AccessRecord(
            time=started_at, request_id=request_id,
            operation=operation,
            bucket=request.bucket if request is not None else None,
            key=request.key if request is not None else None,
            range=headers.get("Range"), status=status, bytes_sent=bytes_sent, cache=cache,
            upstream_requests=upstream_requests, upstream_bytes=upstream_bytes,
            latency_ms=seconds * 1000.0, user_agent=headers.get("User-Agent"),
            access_key=request.access_key if request is not None else None,
            first_byte=first_byte, object_size=object_size,
        ))

    # -- the fast lane: hits answered without aiohttp ----------------------------------------

    def try_hit(self, method: str, target: str, headers: CIMultiDictProxy) -> FastHit | None:
        """A GetObject/HeadObject that the cache can answer at once, signature verified,
        with the small bodies already read; None sends the request down the general path
        (which decides everything again, errors included), and has changed nothing."""
        cache = self.cache
        if cache is None or method not in ("GET", "HEAD"):
            return None
        started_at, started = time.time(), time.monotonic()
        request_id = new_request_id()
        try:
            request = parse_request(method, target, headers, domain=self.domain, request_id=request_id)
            if request.operation not in OBJECT_READS or cache.bypass_reason(request) is not None:
                return None
            if self.verifier is not None:
                # The common request (SigV4 in the header, no query) is checked in C;
                # anything else, and any signature that fails there, by the full verifier.
                access_key = self.fast_signatures.verify(request.method, request.raw_path, request.raw_query,
                                                         headers)
                if access_key is None:
                    verified = self.verifier.authenticate(request)
                    if verified.query_headers:
                        return None  # the general path applies them (SSE-C, say, changes everything)
                    access_key = verified.access_key
                request.access_key = access_key
                rights.check(self.key_rights[access_key], request)
        except errors.S3Error:
            return None
        plan = cache.plan_hit(request)
        if plan is None:
            return None
        body = None
        # With sendfile, the lane sends every body from the file: measured faster than a
        # copy even at 4 KiB. Without, small bodies are read here (page cache only).
        if plan.fd >= 0 and not self.use_sendfile and plan.length <= SMALL_SPAN:
            body = read_if_cached(plan.fd, plan.length, plan.offset)
            if body is None or len(body) != plan.length:
                cache.release_hit(plan, committed=False)  # the disk is needed: not for the fast lane
                return None
        cache.commit_hit(plan, request)
        self.fast_hits += 1
        if self.mirror is not None:
            self.mirror.offer(plan, request.access_key)
        return FastHit(self, request, plan, record_head(plan.record, plan.with_checksums), headers, body, started_at,
                       started)

    def drain_kernel(self, limit: int = -1) -> int:
        """Count and log the hits the kernel answered since the last drain (its ring of
        fixed-size records, its counters), at most `limit` of them (all if negative):
        called by the lane in steps shortly after kernel hits, and whole before any
        admin answer and at shutdown. Returns how many are still waiting."""
        kernel = self.kernel
        if kernel is None:
            return 0
        hits = kernel.ring_waiting
        if 0 <= limit < hits:
            hits = limit
        if hits:
            log, blocks = kernel.drain(hits)
            if self.access_log is not None:
                self.access_log.record_batch(kernel_batch(log))
            self.fast_hits += hits
            self.cache.note_kernel_hits(hits, blocks)
        gets, heads, bytes_sent, latency_counts, latency_sum = kernel.take_counters()
        if gets or heads:
            self.metrics.add_kernel_hits(gets, heads, bytes_sent, latency_counts, latency_sum)
        return kernel.ring_waiting

    def kernel_rest(self, pending: tuple) -> KernelHitRest:
        """What is left of a kernel answer the socket could not take at once."""
        return KernelHitRest(self, pending)

    def close_kernel(self) -> None:
        """Give back what the kernel's mirror holds (block file descriptors)."""
        if self.mirror is not None:
            self.mirror.clear()

    def hit_sent(self, hit: FastHit, bytes_sent: int) -> None:
        """A fast-lane answer is finished (or its connection was lost)."""
        self.cache.release_hit(hit.plan, committed=True)
        plan = hit.plan
        # The plan's offset is the object offset of its first byte (block files hold
        # objects at their own offsets); a HEAD reads none.
        request = hit.request
        self._record_access(hit.request_headers, request.request_id, request, bytes_sent, plan.status,
                            hit.started_at, time.monotonic() - hit.started,
                            plan.offset if request.method == "GET" else None, plan.record.size)

    def parse(self, http: web.Request, request_id: str) -> S3Request:
        request = parse_request(http.method, http.raw_path, http.headers, domain=self.domain,
                                request_id=request_id)
        if http.body_exists or "x-amz-decoded-content-length" in http.headers:
            # A body without Content-Length (Transfer-Encoding: chunked) streams on as
            # one: whether to accept it is the origin's decision, as it would be direct.
            request.body = RequestBody.from_headers(
                http.content, http.headers,
                verify_checksum=request.operation != "CompleteMultipartUpload")
        return request

    # -- invalidation: a write through Sprox is seen at once --------------------------------

    async def _read_xml_body(self, request: S3Request) -> list[str]:
        """Read and check the XML body of DeleteObjects and CompleteMultipartUpload
        (small), so a malformed one is S3's MalformedXML from Sprox whatever the origin
        would say; returns the keys a DeleteObjects names (its writes to invalidate)."""
        shape = XML_BODIES.get(request.operation)
        if shape is None or (request.body is not None and request.body.aws_chunked):
            return []
        data = await request.body.read_all(MAX_XML_BODY) if request.body is not None else b""
        # MalformedXML (DOCTYPEs and entities refused). A large body takes a parser
        # tenths of a second: on a thread, so the loop keeps serving meanwhile.
        if len(data) > XML_PARSE_ON_LOOP_MAX:
            root = await asyncio.get_running_loop().run_in_executor(None, xml.parse, data)
        else:
            root = xml.parse(data)
        root_name, item, allowed = shape
        names = [xml.local_name(child.tag) for child in root]
        # The shape S3's schema gives these bodies: the right root, and at least one item.
        if xml.local_name(root.tag) != root_name or item not in names or not set(names) <= allowed:
            raise errors.malformed_xml()
        request.body = RequestBody.from_bytes(data, request.headers)
        if request.operation != "DeleteObjects":
            return []
        return [key for obj in xml.children(root, "Object") if (key := xml.child_text(obj, "Key")) is not None]

    def _before_write(self, request: S3Request, keys: list[str]) -> None:
        """Invalidate what a write will change (`keys`: those a DeleteObjects names)."""
        if request.method in ("GET", "HEAD") or (self.cache is None and self.listings is None):
            return
        # Invalidate before the write as well as after it, so a fill that started
        # before the write cannot install the old version once the write returned.
        self._invalidate(request, keys)

    def _after_write(self, request: S3Request, keys: list[str]) -> None:
        if request.method in ("GET", "HEAD") or (self.cache is None and self.listings is None):
            return
        self._invalidate(request, keys)

    def _invalidate(self, request: S3Request, keys: list[str]) -> None:
        if request.bucket is None:
            return
        changed = written_keys(request, keys)
        if changed is None:
            self.invalidate(request.bucket, None)
        else:
            self.invalidate(request.bucket, changed)

    def invalidate(self, bucket: str, keys: list[str] | None) -> None:
        """Forget `keys` of `bucket` (None: every key of it) and the bucket's listings:
        a write through this node, or through a peer (sprox/peers.py), changed them."""
        if self.listings is not None:
            self.listings.drop_bucket(bucket)
        if self.cache is None:
            return
        if keys is None:
            self.cache.invalidate_bucket(bucket)
            return
        for key in keys:
            self.cache.invalidate(bucket, key)

    async def _tell_peers(self, request: S3Request, keys: list[str], status: int) -> None:
        """Before a write is answered, the other nodes of the tier forget what it changed
        (unless S3 refused it: a 4xx changed nothing)."""
        if self.peers is None or request.bucket is None or 400 <= status < 500:
            return
        changed = written_keys(request, keys)
        if changed is None or changed:
            try:
                await self.peers.invalidate(request.bucket, changed)
            except Exception:  # noqa: BLE001 - S3 took the write: its answer must reach the client
                log.exception("telling the peers about a write to %s failed", request.bucket)

    # -- sending -------------------------------------------------------------------------------

    async def send_answer(self, http: web.Request, answer, request_id: str, state: _Served) -> web.StreamResponse:
        """Send a cache answer: headers, then pieces (bytes, or file spans by sendfile)."""
        if answer.body is not None and http.method != "HEAD" and answer.length <= SMALL_SPAN:
            return await self._send_small_answer(http, answer, request_id, state)
        response = web.StreamResponse(status=answer.status)
        response.headers.extend(answer.headers)
        response.headers["X-Cache"] = answer.outcome
        response.headers["x-amz-request-id"] = request_id
        response.content_length = answer.length
        body = answer.body
        try:
            await response.prepare(http)
            if body is not None and http.method != "HEAD":
                async for piece in body:
                    if isinstance(piece, FileSpan):
                        await self._send_span(http, response, piece)
                        state.bytes_sent += piece.length
                    else:
                        await response.write(piece)
                        state.bytes_sent += len(piece)
            await response.write_eof()
        except Exception as exc:
            # Headers are gone: a short body must look like an error to the client,
            # so the connection is cut rather than left waiting.
            if isinstance(exc, (UpstreamBodyError, asyncio.TimeoutError)):
                log.warning("cached response %s cut short: %s", request_id, exc)
            elif not isinstance(exc, ConnectionError):
                log.exception("cached response %s failed", request_id)
            if http.transport is not None:
                http.transport.abort()
        finally:
            if body is not None:
                await body.aclose()
        return response

    async def _send_small_answer(self, http: web.Request, answer, request_id: str, state: _Served) -> web.StreamResponse:
        """A small answer is gathered first and sent with its headers in one write:
        one syscall instead of two is most of what a small hit costs."""
        parts: list[bytes] = []
        loop = asyncio.get_running_loop()
        try:
            async for piece in answer.body:
                if isinstance(piece, FileSpan):
                    data = read_if_cached(piece.fd, piece.length, piece.offset)
                    if data is None:
                        data = await loop.run_in_executor(None, os.pread, piece.fd, piece.length, piece.offset)
                    if len(data) != piece.length:
                        raise UpstreamBodyError("block file shorter than its index says")
                    parts.append(data)
                else:
                    parts.append(piece)
        except UpstreamBodyError as exc:
            log.warning("cached response %s failed: %s", request_id, exc)
            return error_response(errors.S3Error("InternalError", "A cached block could not be read.", 500),
                                  request_id)
        finally:
            await answer.body.aclose()
        body = b"".join(parts)
        headers = CIMultiDict(answer.headers)
        headers["X-Cache"] = answer.outcome
        headers["x-amz-request-id"] = request_id
        headers.setdefault("Content-Type", "binary/octet-stream")  # S3's default; never aiohttp's
        response = web.Response(status=answer.status, body=body, headers=headers)
        state.bytes_sent += len(body)
        return response

    async def _send_span(self, http: web.Request, response: web.StreamResponse, span) -> None:
        transport = http.transport
        if transport is None:
            raise ConnectionResetError("client went away")
        # sendfile(2) writes to the socket directly, so it may only start when nothing
        # is queued in the transport (the headers, or a previous pipelined answer),
        # or it would overtake those bytes. Otherwise the bytes go through the transport.
        if span.length <= SMALL_SPAN or not self.use_sendfile or transport.get_write_buffer_size():
            await self._copy_span(response, span)
            return
        sock = transport.get_extra_info("socket")
        try:
            await sendfile_all(sock.fileno(), span.fd, span.offset, span.length, transport.is_closing)
        except EOFError:
            raise UpstreamBodyError("block file shorter than its index says") from None

    async def _copy_span(self, response: web.StreamResponse, span) -> None:
        offset, remaining = span.offset, span.length
        loop = asyncio.get_running_loop()
        while remaining > 0:
            size = min(COPY_CHUNK, remaining)
            chunk = read_if_cached(span.fd, size, offset)
            if chunk is None:  # not in the page cache: read on a thread, off the loop
                chunk = await loop.run_in_executor(None, os.pread, span.fd, size, offset)
            if not chunk:
                raise UpstreamBodyError("block file shorter than its index says")
            await response.write(chunk)
            offset += len(chunk)
            remaining -= len(chunk)


def apply_query_headers(request: S3Request, names_values: tuple[tuple[str, str], ...]) -> None:
    """A SigV2 presigned URL carries its signed x-amz-* headers (SSE-C keys, an ACL,
    metadata) as query parameters: from here on they are headers, as S3 treats them,
    and no longer part of the query forwarded upstream."""
    headers = CIMultiDict(request.headers)
    for name, value in names_values:
        headers.add(name, value)
    request.headers = CIMultiDictProxy(headers)
    query = MultiDict((k, v) for k, v in request.query.items() if not k.lower().startswith("x-amz-"))
    request.query = MultiDictProxy(query)


def object_span(method: str, status: int, content_range: str | None,
                content_length: str | int | None) -> tuple[int | None, int | None]:
    """(first byte, object size) of an object read's answer, for the access log: from
    `Content-Range: bytes a-b/size` on a 206, else the whole object on a 200."""
    if status == 206:
        span = parse_content_range(content_range)
        if span is not None:
            return span[0], span[2]
        # A total that is no number still says where the bytes started.
        return decimal((content_range or "").removeprefix("bytes ").partition("-")[0]), None
    length = content_length if isinstance(content_length, int) else decimal(content_length)
    if status == 200 and length is not None:
        return (0 if method == "GET" else None), length
    return None, None


# Spans up to this size are read and written in one go: copying 64 KiB costs less
# than the extra syscalls sendfile needs after the headers were written.
SMALL_SPAN = 64 * 1024


def read_if_cached(fd: int, size: int, offset: int) -> bytes | None:
    """Read from the page cache without ever blocking on the disk (RWF_NOWAIT);
    None when the bytes are not cached and a blocking read would be needed."""
    buffer = bytearray(size)
    try:
        got = os.preadv(fd, [buffer], offset, os.RWF_NOWAIT)
    except BlockingIOError:
        return None
    except OSError as exc:
        if exc.errno in (errno.EOPNOTSUPP, errno.EINVAL):  # file system without RWF_NOWAIT
            return None
        raise
    if got < size:
        return None if got == 0 else bytes(buffer[:got])
    return bytes(buffer)


@dataclass(slots=True)
class FastHit:
    """A cache hit the fast lane sends: status and headers, then `body` (small answers,
    already read) or `plan.length` bytes of `plan.fd` from `plan.offset` by sendfile."""

    frontend: FrontEnd
    request: S3Request
    plan: HitPlan
    head: bytes  # the record's response headers, rendered (sprox/hithead.py)
    request_headers: CIMultiDictProxy
    body: bytes | None
    started_at: float  # epoch seconds, for the access log
    started: float  # monotonic, for the latency

    @property
    def request_id(self) -> str:
        return self.request.request_id

    def finished(self, bytes_sent: int) -> None:
        self.frontend.hit_sent(self, bytes_sent)


class KernelHitRest:
    """The rest of an answer the hit kernel began and the socket could not take at
    once (kernel.PARTIAL): its blocks are pinned and its file held until it is sent."""

    def __init__(self, frontend: FrontEnd, pending: tuple) -> None:
        (self.head, record_id, self.offset, self.remaining, self.first_block, self.last_block,
         self._token, self.length, self.close) = pending
        self.frontend = frontend
        self.request_id = "(kernel)"
        try:
            held = frontend.cache.hold_blocks(record_id, self.first_block, self.last_block)
        except BaseException:
            frontend.kernel.drop_pending(self._token)
            raise
        # (The record cannot be gone: this runs in the callback that planned the hit.)
        self.record, self.fd = held if held is not None else (None, -1)
        self.already_sent = self.length - self.remaining

    def finished(self, bytes_sent: int) -> None:
        if self.record is not None:
            self.frontend.cache.release_blocks(self.record, self.first_block, self.last_block)
            self.record = None
        self.frontend.kernel.log_pending(self._token, bytes_sent)  # (a token is logged once)


class _Served:
    """What the access log needs to know about one request once it is answered."""

    __slots__ = ("request", "bytes_sent")

    def __init__(self) -> None:
        self.request: S3Request | None = None
        self.bytes_sent = 0


def _resource(http: web.Request) -> str:
    return http.raw_path.partition("?")[0]


def error_response(exc: errors.S3Error, request_id: str, *, resource: str | None = None,
                   head: bool = False) -> web.Response:
    headers = {"x-amz-request-id": request_id, **exc.headers}
    if exc.status in NO_BODY_STATUS or head:
        # HEAD and 304 answers have no body; S3 still sends the status.
        return web.Response(status=exc.status, headers=headers)
    if exc.resource is None and resource is not None:
        exc.resource = resource
    return web.Response(status=exc.status, body=exc.to_xml(request_id), headers=headers,
                        content_type="application/xml")


def written_keys(request: S3Request, keys: list[str]) -> list[str] | None:
    """The keys a write changes: [] for none (it may still change listings), None for
    any key of the bucket (a DeleteBucket, or a DeleteObjects whose keys are unknown).
    `keys`: those a DeleteObjects body names."""
    if request.method in ("GET", "HEAD"):
        return []
    if request.operation in OBJECT_WRITES and request.key is not None:
        return [request.key]
    if request.operation == "DeleteObjects":
        if keys or (request.body is not None and not request.body.aws_chunked):
            return list(keys)
        return None
    if request.operation == "DeleteBucket":
        return None
    return []


async def stream_response(http: web.Request, origin: OriginResponse, request_id: str, state: _Served | None = None,
                          *, x_cache: str | None = None) -> web.StreamResponse:
    """Send an origin's response, streaming the body without holding it in memory."""
    response = web.StreamResponse(status=origin.status)
    for name, value in origin.headers.items():
        response.headers.add(name, value)
    response.headers.setdefault("x-amz-request-id", request_id)
    response.headers["x-sprox-request-id"] = request_id
    if x_cache is not None:
        response.headers["X-Cache"] = x_cache
    no_body = http.method == "HEAD" or origin.status in NO_BODY_STATUS
    try:
        if no_body:
            if origin.status in NO_BODY_STATUS:
                response.headers.popall("Content-Length", None)
            await response.prepare(http)
            await response.write_eof()
            return response
        if "Content-Length" not in response.headers:
            response.enable_chunked_encoding()
        await response.prepare(http)
        async for chunk in origin.iter_body():
            await response.write(chunk)
            if state is not None:
                state.bytes_sent += len(chunk)
                if state.request is not None:
                    state.request.stats.upstream_bytes += len(chunk)
        await response.write_eof()
        return response
    except Exception as exc:
        # The status line is already sent: cut the connection so the client sees a
        # short body as an error, never as a complete object.
        if not isinstance(exc, (UpstreamBodyError, ConnectionError)):
            log.exception("response %s failed", request_id)
        if http.transport is not None:
            http.transport.abort()
        return response
    finally:
        await origin.close()
