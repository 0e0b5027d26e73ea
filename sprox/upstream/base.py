"""The one small interface every origin implements.

An origin answers S3 requests: `S3Upstream` forwards them to an S3 endpoint, and
`LocalOrigin` serves a local directory with S3's semantics. The front end (and,
later, the cache) only ever talks to an `Origin`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol

from multidict import CIMultiDict

from ..s3.request import S3Request


class OriginResponse:
    """A response from an origin. `body` yields the payload in chunks; `close()`
    must be called (it is idempotent) once the caller is done, read or not."""

    def __init__(self, status: int, headers: CIMultiDict[str],
                 body: AsyncIterator[bytes] | None = None, *, on_close=None) -> None:
        self.status = status
        self.headers = headers
        self._body = body
        self._on_close = on_close

    async def iter_body(self) -> AsyncIterator[bytes]:
        if self._body is None:
            return
        async for chunk in self._body:
            yield chunk

    async def read(self) -> bytes:
        return b"".join([c async for c in self.iter_body()])

    async def close(self) -> None:
        body, self._body = self._body, None
        if body is not None and hasattr(body, "aclose"):
            await body.aclose()
        on_close, self._on_close = self._on_close, None
        if on_close is not None:
            result = on_close()
            if hasattr(result, "__await__"):
                await result


class Origin(Protocol):
    """Where objects come from."""

    description: str

    async def start(self) -> None:
        """Prepare resources (connection pools, directories). Called once."""

    async def send(self, request: S3Request) -> OriginResponse:
        """Answer one S3 request. S3 errors may be raised as `S3Error` or returned as
        a response carrying the origin's own error XML."""

    async def close(self) -> None:
        """Release everything `start` acquired."""


class UpstreamBodyError(Exception):
    """The origin failed after its response headers were sent: the only honest signal
    left for the client is a response cut short."""
