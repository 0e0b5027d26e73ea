"""A tiny S3-shaped upstream that records every request it receives, for tests that
assert on what the upstream saw. It runs in a thread of the test process, on 127.0.0.1."""

from __future__ import annotations

from dataclasses import dataclass, field

from aiohttp import web

from tests.threaded_server import ThreadedServer


@dataclass
class Seen:
    method: str
    target: str  # raw request target
    headers: dict[str, str]
    body: bytes


@dataclass
class RecordingUpstream(ThreadedServer):
    """Answers every request with `status` and `body` (default: an empty 200) and
    records it. `redirect_to` makes it answer 307 with that Location instead."""

    status: int = 200
    body: bytes = b""
    redirect_to: str | None = None
    seen: list[Seen] = field(default_factory=list)
    port: int = 0

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.seen.append(Seen(request.method, request.raw_path, dict(request.headers), body))
        if self.redirect_to:
            return web.Response(status=307, headers={"Location": self.redirect_to})
        return web.Response(status=self.status, body=self.body, headers={"ETag": '"abc"'})
