"""Listings served from memory for `--list-ttl` seconds.

OLAP engines list a prefix before every glob query, and each remote LIST is a round
trip. S3 listings are strongly consistent, so this is off by default; when on, any
write through Sprox to a bucket drops that bucket's cached listings at once, and a
listing that was being fetched meanwhile is sent but not kept."""

from __future__ import annotations

import time
from collections import OrderedDict

from multidict import CIMultiDict

from ..s3.request import S3Request
from ..upstream.base import OriginResponse
from .invalidations import Invalidations

MAX_BODY = 8 * 1024 * 1024
MAX_ENTRIES = 4096


class ListingCache:
    def __init__(self, ttl: float) -> None:
        self.ttl = ttl
        self._entries: OrderedDict[tuple, tuple[float, CIMultiDict, bytes]] = OrderedDict()
        self._invalidations = Invalidations()
        self.hits = 0

    def now(self) -> int:
        """The moment before a listing is fetched, for `put`."""
        return self._invalidations.now()

    @staticmethod
    def _key(request: S3Request) -> tuple:
        # Keyed by who asks too: a later per-key rights check must not be bypassed
        # by another key's cached answer.
        who = request.headers.get("Authorization", "").partition("Credential=")[2].partition("/")[0]
        return (request.bucket, request.operation, tuple(sorted(request.query.items())), who)

    def get(self, request: S3Request) -> OriginResponse | None:
        key = self._key(request)
        entry = self._entries.get(key)
        if entry is None:
            return None
        expires, headers, body = entry
        if time.monotonic() > expires:
            del self._entries[key]
            return None
        self.hits += 1
        request.stats.cache = "HIT"
        return OriginResponse(200, CIMultiDict(headers), _once(body))

    async def put(self, request: S3Request, response: OriginResponse, fetched_since: int) -> OriginResponse:
        """Keep a 200 listing (read whole: listings are small), unless the bucket was
        written after `fetched_since` (a `now()`), and return it to send."""
        parts, size = [], 0
        async for chunk in response.iter_body():
            size += len(chunk)
            if size > MAX_BODY:  # unusually large: send what we have and the rest, uncached
                parts.append(chunk)
                return OriginResponse(response.status, response.headers, _chain(parts, response),
                                      on_close=response.close)
            parts.append(chunk)
        await response.close()
        body = b"".join(parts)
        if self._invalidations.changed_since(fetched_since, request.bucket):
            return OriginResponse(response.status, response.headers, _once(body))  # may predate a write
        self._entries[self._key(request)] = (time.monotonic() + self.ttl, CIMultiDict(response.headers), body)
        while len(self._entries) > MAX_ENTRIES:
            self._entries.popitem(last=False)
        return OriginResponse(response.status, response.headers, _once(body))

    def drop_bucket(self, bucket: str) -> None:
        self._invalidations.bucket(bucket)
        for key in [k for k in self._entries if k[0] == bucket]:
            del self._entries[key]


async def _once(body: bytes):
    yield body


async def _chain(parts: list[bytes], response: OriginResponse):
    for part in parts:
        yield part
    async for chunk in response.iter_body():
        yield chunk
