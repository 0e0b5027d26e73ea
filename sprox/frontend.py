"""Where every S3 request goes: parse, authenticate, hand to the origin, stream back.

    client -> handle() -> parse_request -> SigV4Verifier.verify -> origin.send -> stream

Errors anywhere below become S3's XML error body here, with a request id.
"""

from __future__ import annotations

import logging

from aiohttp import web

from .s3 import errors
from .s3.body import RequestBody
from .s3.request import S3Request, new_request_id, parse_request
from .upstream.base import Origin, OriginResponse
from .upstream.s3 import UpstreamBodyError

log = logging.getLogger("sprox.frontend")

# Statuses that never carry a body (RFC 9110), whatever the origin sent.
NO_BODY_STATUS = frozenset({204, 304})


class FrontEnd:
    """The aiohttp handler for the S3 API."""

    def __init__(self, origin: Origin, *, verifier=None, domain: str | None = None) -> None:
        self.origin = origin
        self.verifier = verifier
        self.domain = domain

    async def handle(self, http: web.Request) -> web.StreamResponse:
        request_id = new_request_id()
        response = await self._handle(http, request_id)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s %s %s -> %d [%s]", http.remote, http.method, http.raw_path, response.status, request_id)
        return response

    async def _handle(self, http: web.Request, request_id: str) -> web.StreamResponse:
        try:
            request = self.parse(http, request_id)
            if self.verifier is not None:
                self.verifier.verify(request)
            response = await self.origin.send(request)
        except errors.S3Error as exc:
            return error_response(exc, request_id, resource=_resource(http), head=http.method == "HEAD")
        except Exception:
            log.exception("request %s failed", request_id)
            return error_response(errors.internal_error(), request_id, head=http.method == "HEAD")
        return await stream_response(http, response, request_id)

    def parse(self, http: web.Request, request_id: str) -> S3Request:
        request = parse_request(http.method, http.raw_path, http.headers, domain=self.domain,
                                request_id=request_id)
        if http.body_exists or "x-amz-decoded-content-length" in http.headers:
            if http.headers.get("Transfer-Encoding", "").lower() == "chunked" and \
                    "Content-Length" not in http.headers and \
                    "x-amz-decoded-content-length" not in http.headers:
                # S3 needs the length up front to store an object.
                raise errors.S3Error("MissingContentLength",
                                     "You must provide the Content-Length HTTP header.", 411)
            request.body = RequestBody.from_headers(
                http.content, http.headers,
                verify_checksum=request.operation != "CompleteMultipartUpload")
        return request


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


async def stream_response(http: web.Request, origin: OriginResponse, request_id: str) -> web.StreamResponse:
    """Send an origin's response, streaming the body without holding it in memory."""
    response = web.StreamResponse(status=origin.status)
    for name, value in origin.headers.items():
        response.headers.add(name, value)
    response.headers.setdefault("x-amz-request-id", request_id)
    response.headers["x-sprox-request-id"] = request_id
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
        await response.write_eof()
        return response
    except UpstreamBodyError:
        # The status line is already sent: cut the connection so the client sees a
        # short body as an error, never as a complete object.
        if http.transport is not None:
            http.transport.abort()
        return response
    finally:
        await origin.close()
