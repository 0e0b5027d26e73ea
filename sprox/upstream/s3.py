"""An S3 endpoint as the origin: requests are re-addressed, re-signed and streamed.

The upstream is fixed by configuration. A request can choose the bucket, key, query
and end-to-end headers, never the host Sprox connects to. The client's own
Authorization, date and token headers are for Sprox, not the upstream: they are
dropped, and Sprox signs afresh with credentials from botocore's standard chain.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import AsyncIterator
from urllib.parse import quote, urlsplit

import aiohttp
import botocore.session
from botocore.auth import EMPTY_SHA256_HASH, UNSIGNED_PAYLOAD, S3SigV4Auth
from botocore.awsrequest import AWSRequest
from multidict import CIMultiDict
from yarl import URL

from .._version import __version__
from ..s3 import checksums, errors
from ..s3.body import STREAMING_UNSIGNED_TRAILER, RequestBody
from ..s3.numbers import decimal, parse_content_range
from ..s3.request import S3Request
from .base import OriginResponse, UpstreamBodyError

log = logging.getLogger("sprox.upstream")

READ_SIZE = 256 * 1024

# Headers that describe one hop of a connection, or that authenticate the client to
# Sprox: none of them may be forwarded in either direction.
HOP_BY_HOP = frozenset(
    {
        "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection",
        "te", "trailer", "transfer-encoding", "upgrade", "expect", "host", "content-length",
    }
)
CLIENT_AUTH = frozenset({"authorization", "x-amz-date", "date", "x-amz-security-token", "x-amz-content-sha256"})
# Response headers Sprox recomputes or that only made sense on the upstream's hop.
RESPONSE_DROP = frozenset({"connection", "keep-alive", "transfer-encoding", "content-length", "server", "date"})

RETRYABLE_STATUS = frozenset({500, 502, 503, 504})
MAX_ATTEMPTS = 3


class SproxSigner(S3SigV4Auth):
    """botocore's S3 SigV4 signer, with the payload hash chosen by Sprox (the body is
    a stream botocore cannot hash) and only the headers S3 needs signed, so nothing a
    connection library adds or reorders can break the signature."""

    def payload(self, request):  # noqa: D102 - botocore hook
        return request.context["sprox_payload_hash"]

    def headers_to_sign(self, request):  # noqa: D102 - botocore hook
        headers = super().headers_to_sign(request)
        for name in list(headers.keys()):
            if not (name in ("host", "content-md5", "content-type") or name.startswith("x-amz-")):
                del headers[name]
        return headers


class S3Upstream:
    """Forwards S3 requests to one S3 endpoint."""

    def __init__(self, endpoint: str, *, region: str | None = None, addressing: str = "auto",
                 timeout: float = 60.0, max_connections: int = 256) -> None:
        parts = urlsplit(endpoint)
        self._scheme = parts.scheme
        self._netloc = parts.netloc
        self._host = parts.hostname or ""
        self._region_setting = region
        self.region = region or "us-east-1"
        if addressing == "auto":
            addressing = "virtual" if self._host.endswith(".amazonaws.com") else "path"
        self._addressing = addressing
        self._timeout = timeout
        self._max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None  # requests without a body
        self._upload_session: aiohttp.ClientSession | None = None  # with one
        self._credentials = None
        self.description = f"S3 endpoint {self._scheme}://{self._netloc} ({self.region}, {addressing}-style)"

    async def start(self) -> None:
        # Resolving the credential chain may touch files or the instance metadata
        # service: do it once, off the event loop.
        def resolve():
            session = botocore.session.Session()
            region = self._region_setting or session.get_config_variable("region") or "us-east-1"
            return session.get_credentials(), region

        self._credentials, self.region = await asyncio.to_thread(resolve)
        self.description = (f"S3 endpoint {self._scheme}://{self._netloc} "
                            f"({self.region}, {self._addressing}-style)")
        if self._credentials is None:
            log.warning("no AWS credentials found: upstream requests will be sent unsigned")
        connector = aiohttp.TCPConnector(limit=self._max_connections, ttl_dns_cache=300)
        settings = {
            "connector": connector,
            "auto_decompress": False,  # bytes pass through exactly as stored
            "timeout": aiohttp.ClientTimeout(total=None, sock_connect=self._timeout, sock_read=self._timeout),
            "skip_auto_headers": ("Accept-Encoding", "Content-Type"),
            "headers": {"User-Agent": f"sprox/{__version__}"},
        }
        # Requests with a body go through aiohttp's own resend, once, at once, when a
        # connection fails before the body was read (a pooled connection the upstream
        # closed while idle): send() cannot replay a body itself.
        self._upload_session = aiohttp.ClientSession(**settings)
        # Requests without one are retried by send() alone, with back-off: aiohttp's
        # resend on top of that doubled what a failing upstream was sent. (A private
        # switch, the one aiohttp's own test client uses; skipped if it ever goes away.)
        self._session = aiohttp.ClientSession(**settings, connector_owner=False)
        if "_retry_connection" in getattr(aiohttp.ClientSession, "ATTRS", ()):
            self._session._retry_connection = False

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()  # shares the connector, which the other one owns
            self._session = None
        if self._upload_session is not None:
            await self._upload_session.close()
            self._upload_session = None

    # -- addressing --------------------------------------------------------------------

    def url_for(self, request: S3Request) -> str:
        """The upstream URL (already percent-encoded) for a request."""
        path = ""
        netloc = self._netloc
        if request.bucket is not None:
            if self._addressing == "virtual" and _dns_compatible(request.bucket):
                netloc = f"{request.bucket}.{self._netloc}"
            else:
                path = "/" + quote(request.bucket, safe="")
        path += "/"
        if request.key is not None:
            path += encode_key(request.key)
        query = "&".join(f"{quote(k, safe='-_.~')}={quote(v, safe='-_.~')}" for k, v in request.query.items())
        return f"{self._scheme}://{netloc}{path}" + (f"?{query}" if query else "")

    # -- forwarding ----------------------------------------------------------------------

    async def send(self, request: S3Request) -> OriginResponse:
        assert self._session is not None and self._upload_session is not None, "start() was not called"
        url = self.url_for(request)
        headers = forwarded_headers(request.headers)
        body = request.body
        data: _BodyStream | None = None
        payload_hash = EMPTY_SHA256_HASH
        if body is not None and (body.raw_length is None or body.raw_length or body.aws_chunked):
            stream, payload_hash = _prepare_body(body, request.headers, headers)
            data = _BodyStream(stream)
        elif request.method in ("PUT", "POST"):
            headers["Content-Length"] = "0"

        # Only requests without a body can be replayed: a streamed body is gone once sent.
        attempts = MAX_ATTEMPTS if data is None else 1
        loop = asyncio.get_running_loop()
        # --upstream-timeout bounds the wait for an answer to begin, retries included:
        # a stall is not retried (it would spend the timeout again, and the client,
        # whose own timeout is typically no longer, would have given up by then), and
        # a back-off that would end past the deadline is not slept. A request with a
        # body is not bounded here: its answer comes only once the body is uploaded,
        # which may rightly take longer (aiohttp's sock_read still bounds each wait).
        deadline = loop.time() + self._timeout if data is None else None
        for attempt in range(1, attempts + 1):
            signed = await self._sign(request.method, url, headers, payload_hash)
            try:
                session = self._session if data is None else self._upload_session
                pending = session.request(
                    request.method, URL(url, encoded=True), headers=signed, data=data,
                    allow_redirects=False,
                )
                if deadline is None:
                    response = await pending
                else:
                    response = await asyncio.wait_for(pending, max(deadline - loop.time(), 0.001))
            except asyncio.TimeoutError:
                raise errors.gateway_timeout(f"The upstream did not answer within {self._timeout:g} s.") from None
            except aiohttp.ClientError as exc:
                if data is not None and data.error is not None:
                    # The client's body was at fault (bad checksum, short body): that is
                    # the answer, not the aborted upstream request it caused.
                    raise data.error from None
                if attempt < attempts and await _backoff(attempt, deadline, loop):
                    continue
                log.warning("upstream request failed: %s %s: %s", request.method, url, exc)
                raise errors.bad_gateway(f"The upstream could not be reached: {type(exc).__name__}.") from None
            if response.status == 206 and not _length_matches_range(response.headers):
                # The body's framing (Content-Length) and what it claims to hold
                # (Content-Range) disagree: either would put wrong bytes at some offset
                # or leave the answer short, so it is refused before a byte of it is
                # used, and the connection, whose framing is not to be trusted, closed.
                response.close()
                log.warning("upstream answer refused: %s %s: Content-Length %s for Content-Range %s",
                            request.method, url, response.headers.get("Content-Length"),
                            response.headers.get("Content-Range"))
                if attempt < attempts and await _backoff(attempt, deadline, loop):
                    continue
                raise errors.bad_gateway("The upstream's Content-Length disagrees with its Content-Range.")
            if response.status in RETRYABLE_STATUS and attempt < attempts and \
                    await _backoff(attempt, deadline, loop, before=response.release):
                continue
            return OriginResponse(
                response.status,
                response_headers(response.headers),
                _iter_response(response, self._timeout),
                on_close=response.release,
            )
        raise AssertionError("unreachable")

    async def _sign(self, method: str, url: str, headers: CIMultiDict[str], payload_hash: str) -> dict[str, str]:
        creds = self._credentials
        out = dict(headers)
        if creds is None:
            return out
        if getattr(creds, "refresh_needed", None) and creds.refresh_needed():
            # Refreshing may call STS or the metadata service: keep it off the loop.
            frozen = await asyncio.to_thread(creds.get_frozen_credentials)
        else:
            frozen = creds.get_frozen_credentials()
        aws_request = AWSRequest(method=method, url=url, headers=out)
        aws_request.context["sprox_payload_hash"] = payload_hash
        SproxSigner(frozen, "s3", self.region).add_auth(aws_request)
        return dict(aws_request.headers.items())


def encode_key(key: str) -> str:
    """Percent-encode a key for a URL path, keeping `/`. Dot segments are encoded
    too, so no HTTP library or server on the way can collapse `a/../b` into `b`."""
    segments = quote(key, safe="/~").split("/")
    return "/".join("%2E" * len(s) if s in (".", "..") else s for s in segments)


def _dns_compatible(bucket: str) -> bool:
    return bucket == bucket.lower() and "." not in bucket and "_" not in bucket


def forwarded_headers(client_headers) -> CIMultiDict[str]:
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in client_headers.items():
        lname = name.lower()
        if lname in HOP_BY_HOP or lname in CLIENT_AUTH or lname == "user-agent":
            continue
        out.add(name, value)
    return out


def response_headers(upstream_headers) -> CIMultiDict[str]:
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in upstream_headers.items():
        if name.lower() not in RESPONSE_DROP:
            out.add(name, value)
    if "Content-Length" in upstream_headers:
        out["Content-Length"] = upstream_headers["Content-Length"]
    return out


def _prepare_body(body: RequestBody, client_headers, headers: CIMultiDict[str]) -> tuple[AsyncIterator[bytes], str]:
    """Choose how the body travels upstream; returns (byte stream, payload hash)."""
    if not body.aws_chunked:
        if body.raw_length is not None:
            headers["Content-Length"] = str(body.raw_length)
        # else: no length up front, so aiohttp frames it with Transfer-Encoding: chunked,
        # as the client did; the upstream decides whether it takes that.
        # The same bytes go upstream, so a real payload hash stays valid and lets the
        # upstream check integrity end to end. decoded() of a plain body is its bytes as
        # sent, with the declared SHA-256 and x-amz-checksum-* checked on the way (the
        # last piece held back until they match): whatever the upstream checks, a
        # corrupt upload does not complete.
        return body.decoded(), body.payload_sha256 or UNSIGNED_PAYLOAD
    # aws-chunked: signed chunks are bound to the client's key for Sprox, so Sprox
    # unwraps the framing and verifies any declared checksum itself while streaming
    # (decoded() holds the last bytes back until it matches). A checksum in a header
    # travels on as that header, with the payload sent plainly; one that comes in the
    # trailer is known only at the end, so the payload goes on re-framed as unsigned
    # aws-chunked with the same trailer, and the upstream stores the checksum too.
    encodings = [e for e in body.content_encoding.split(",") if e and e != "aws-chunked"]
    headers.popall("Content-Encoding", None)
    headers.popall("x-amz-decoded-content-length", None)
    headers.popall("x-amz-trailer", None)
    algorithm = body.checksum_algorithm
    if body.has_trailer and body.verifies_checksum and algorithm is not None \
            and checksums.header_name(algorithm) not in client_headers:
        trailer = checksums.header_name(algorithm)
        # No "aws-chunked" in Content-Encoding: S3 (and MinIO, Ceph) know the framing
        # from x-amz-content-sha256, and SeaweedFS would store it as the object's
        # encoding. Any encoding of the client's own goes on as it came.
        if encodings:
            headers["Content-Encoding"] = ",".join(encodings)
        headers["x-amz-decoded-content-length"] = str(body.decoded_length)
        headers["x-amz-trailer"] = trailer
        headers["Content-Length"] = str(reframed_length(body.decoded_length, algorithm))
        return reframe_with_trailer(body, trailer), STREAMING_UNSIGNED_TRAILER
    if encodings:
        headers["Content-Encoding"] = ",".join(encodings)
    headers["Content-Length"] = str(body.decoded_length)
    return body.decoded(), UNSIGNED_PAYLOAD


# The chunk size of re-framed aws-chunked bodies (S3 takes chunks of 8 KiB and more).
REFRAME_CHUNK = 256 * 1024


def reframed_length(payload_length: int, algorithm: str) -> int:
    """The exact wire length of `reframe_with_trailer`'s output, for Content-Length
    (S3 wants one for aws-chunked uploads): full chunks, a last short one, the final
    empty chunk and the one trailer, whose base64 value has a fixed size."""
    full, rest = divmod(payload_length, REFRAME_CHUNK)
    length = full * (len(f"{REFRAME_CHUNK:x}") + 2 + REFRAME_CHUNK + 2)
    if rest:
        length += len(f"{rest:x}") + 2 + rest + 2
    value_length = 4 * ((checksums.DIGEST_SIZES[algorithm] + 2) // 3)
    return length + len(b"0\r\n") + len(checksums.header_name(algorithm)) + 1 + value_length + 2 + 2


async def reframe_with_trailer(body: RequestBody, trailer: str) -> AsyncIterator[bytes]:
    """`body`'s payload as unsigned aws-chunked (chunks of REFRAME_CHUNK) ending with
    the trailer the client sent. The payload's last bytes come only once decoded() has
    verified the checksum, so a bad one never completes the upload upstream."""
    pending = bytearray()
    async for piece in body.decoded():
        pending += piece
        while len(pending) >= REFRAME_CHUNK:
            yield b"%x\r\n%s\r\n" % (REFRAME_CHUNK, pending[:REFRAME_CHUNK])
            del pending[:REFRAME_CHUNK]
    if pending:
        yield b"%x\r\n%s\r\n" % (len(pending), pending)
    value = body.declared_checksum()
    yield f"0\r\n{trailer}:{value}\r\n\r\n".encode()


async def _iter_response(response: aiohttp.ClientResponse, timeout: float) -> AsyncIterator[bytes]:
    try:
        while True:
            chunk = await response.content.read(READ_SIZE)
            if not chunk:
                break
            yield chunk
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        # Headers are already on their way to the client: the only honest signal left
        # is to cut the response short, which the server does on this exception.
        log.warning("upstream body failed mid-stream: %s", exc)
        raise UpstreamBodyError(str(exc)) from exc


class _BodyStream:
    """A request body on its way upstream that remembers the S3Error it raised, since
    aiohttp reports a failing body only as a broken connection."""

    def __init__(self, chunks: AsyncIterator[bytes]) -> None:
        self._chunks = chunks
        self.error: errors.S3Error | None = None

    async def __aiter__(self):
        try:
            async for chunk in self._chunks:
                yield chunk
        except errors.S3Error as exc:
            self.error = exc
            raise


async def _backoff(attempt: int, deadline: float | None, loop: asyncio.AbstractEventLoop,
                   before=None) -> bool:
    """Sleep before retry number `attempt`; False (and no sleep) when the retry could
    not start before `deadline`. `before` runs first when there is a retry (it frees
    the failed answer's connection)."""
    # Full jitter: spreads retries from many requests that failed together.
    delay = random.uniform(0, 0.1 * (2 ** attempt))
    if deadline is not None and loop.time() + delay >= deadline:
        return False
    if before is not None:
        before()
    await asyncio.sleep(delay)
    return True


def _length_matches_range(headers) -> bool:
    """Whether a 206's Content-Length is the length its Content-Range announces (True
    when either is missing or not of the single-range form: nothing to compare)."""
    length = decimal(headers.get("Content-Length"))
    span = parse_content_range(headers.get("Content-Range"))
    if length is None or span is None:
        return True
    return length == span[1] - span[0] + 1
