"""A small S3-shaped upstream of our own, for tests that count what the upstream saw.

Objects live in memory; GET and HEAD honour Range (`a-b`, `a-`, `-n`), If-Match and
If-None-Match like S3; PUT, DELETE and DeleteObjects change them (so a write through
Sprox is visible here); tests can also change objects directly, "behind Sprox's back".
An optional first-byte latency makes concurrent requests overlap. Every request is
recorded. It runs on 127.0.0.1 in a thread of the test process."""

from __future__ import annotations

import asyncio
import hashlib
import re
import threading
import time
from dataclasses import dataclass, field
from email.utils import formatdate

from aiohttp import web

from tests.threaded_server import ThreadedServer

_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")
GATE_SECONDS = 10.0


@dataclass
class Seen:
    method: str
    path: str
    range: str | None
    if_match: str | None


@dataclass
class StoredObject:
    data: bytes
    etag: str
    last_modified: float
    content_type: str = "application/octet-stream"
    metadata: dict[str, str] = field(default_factory=dict)
    # x-amz-checksum-* headers, sent (as S3 does) only on a full GET or HEAD that asks
    checksums: dict[str, str] = field(default_factory=dict)


class CountingUpstream(ThreadedServer):
    def __init__(self, first_byte_delay: float = 0.0) -> None:
        self.objects: dict[str, StoredObject] = {}  # "bucket/key" -> object
        self.seen: list[Seen] = []
        self.first_byte_delay = first_byte_delay
        self.failing: dict[str, int] = {}  # method -> the 5xx status every such request gets
        # GETs being answered now, and the most at once since reset_counts(). With
        # `gate` set, each GET waits (up to GATE_SECONDS) until that many are in flight:
        # a test sees parallel GETs without relying on timing.
        self.in_flight = 0
        self.max_in_flight = 0
        self.gate = 0
        # GETs whose range starts at or past this offset answer 500 (None: none do): a
        # test fails Sprox's reads of part of an object and not the rest.
        self.fail_from: int | None = None
        # GETs whose range starts at or past `slow_from` wait `slow_seconds` more.
        self.slow_from: int | None = None
        self.slow_seconds = 0.0
        self.port = 0
        self._lock = threading.Lock()

    # -- test-side API -----------------------------------------------------------------

    def put(self, bucket: str, key: str, data: bytes, **kw) -> str:
        etag = '"' + hashlib.md5(data).hexdigest() + '"'
        with self._lock:
            self.objects[f"{bucket}/{key}"] = StoredObject(data, etag, time.time(), **kw)
        return etag

    def count(self, method: str | None = None, key: str | None = None) -> int:
        with self._lock:
            return sum(1 for s in self.seen if (method is None or s.method == method)
                       and (key is None or s.path.endswith("/" + key)))

    def reset_counts(self) -> None:
        with self._lock:
            self.seen.clear()
            self.max_in_flight = self.in_flight

    # -- the server ------------------------------------------------------------------------

    async def handle(self, request: web.Request) -> web.StreamResponse:
        path = request.path
        with self._lock:
            self.seen.append(Seen(request.method, path, request.headers.get("Range"),
                                  request.headers.get("If-Match")))
        if request.method == "GET":
            with self._lock:
                self.in_flight += 1
                self.max_in_flight = max(self.max_in_flight, self.in_flight)
            try:
                return await self._answer(request, path)
            finally:
                with self._lock:
                    self.in_flight -= 1
        return await self._answer(request, path)

    async def _answer(self, request: web.Request, path: str) -> web.StreamResponse:
        if self.gate:
            deadline = time.monotonic() + GATE_SECONDS
            while self.in_flight < self.gate and time.monotonic() < deadline:
                await asyncio.sleep(0.01)  # polls a condition, bounded by the deadline
        if self.first_byte_delay:
            await asyncio.sleep(self.first_byte_delay)
        if request.method in self.failing:
            return web.Response(status=self.failing[request.method])
        if request.method == "GET" and (self.fail_from is not None or self.slow_from is not None):
            match = _RANGE.match(request.headers.get("Range", ""))
            start = int(match.group(1)) if match and match.group(1) else None
            if start is not None and self.fail_from is not None and start >= self.fail_from:
                return web.Response(status=500)
            if start is not None and self.slow_from is not None and start >= self.slow_from:
                await asyncio.sleep(self.slow_seconds)
        name = path.lstrip("/")
        if request.method == "PUT":
            self.put(*name.split("/", 1), await request.read(),
                     content_type=request.headers.get("Content-Type", "application/octet-stream"))
            return web.Response(status=200, headers={"ETag": self.objects[name].etag})
        if request.method == "DELETE":
            with self._lock:
                self.objects.pop(name, None)
            return web.Response(status=204)
        if request.method == "POST" and "delete" in request.query:
            body = (await request.read()).decode()
            bucket = name.rstrip("/")
            with self._lock:
                for key in re.findall(r"<Key>(.*?)</Key>", body):
                    self.objects.pop(f"{bucket}/{key}", None)
            return web.Response(status=200, content_type="application/xml",
                                text='<?xml version="1.0"?><DeleteResult/>')
        with self._lock:
            obj = self.objects.get(name)
        if obj is None:
            body = b"<Error><Code>NoSuchKey</Code><Message>The specified key does not exist.</Message></Error>"
            return web.Response(status=404, body=None if request.method == "HEAD" else body,
                                content_type="application/xml")
        headers = {"ETag": obj.etag, "Last-Modified": formatdate(obj.last_modified, usegmt=True),
                   "Content-Type": obj.content_type, "Accept-Ranges": "bytes",
                   **{f"x-amz-meta-{k}": v for k, v in obj.metadata.items()}}
        if_match = request.headers.get("If-Match")
        if if_match is not None and if_match != obj.etag:
            return web.Response(status=412, headers={"ETag": obj.etag})
        if request.headers.get("If-None-Match") == obj.etag:
            return web.Response(status=304, headers={"ETag": obj.etag})
        size = len(obj.data)
        status, first, last = 200, 0, size - 1
        match = _RANGE.match(request.headers.get("Range", ""))
        if match:
            a, b = match.groups()
            if a == "":
                first, last = max(0, size - int(b)), size - 1
            else:
                first, last = int(a), min(int(b), size - 1) if b else size - 1
            if first >= size:
                return web.Response(status=416, headers={"Content-Range": f"bytes */{size}"})
            status = 206
            headers["Content-Range"] = f"bytes {first}-{last}/{size}"
        headers["Content-Length"] = str(last - first + 1)
        if status == 200 and request.headers.get("x-amz-checksum-mode", "").upper() == "ENABLED":
            headers.update(obj.checksums)
        response = web.StreamResponse(status=status, headers=headers)
        await response.prepare(request)
        if request.method == "GET":
            view = memoryview(obj.data)[first:last + 1]
            for i in range(0, len(view), 256 * 1024):
                await response.write(view[i:i + 256 * 1024])
        await response.write_eof()
        return response
