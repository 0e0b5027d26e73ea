"""A tiny S3-shaped upstream that records every request it receives, for tests that
assert on what the upstream saw. It runs in a thread of the test process, on 127.0.0.1."""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field

from aiohttp import web


@dataclass
class Seen:
    method: str
    target: str  # raw request target
    headers: dict[str, str]
    body: bytes


@dataclass
class RecordingUpstream:
    """Answers every request with `status` and `body` (default: an empty 200) and
    records it. `redirect_to` makes it answer 307 with that Location instead."""

    status: int = 200
    body: bytes = b""
    redirect_to: str | None = None
    seen: list[Seen] = field(default_factory=list)
    port: int = 0

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.seen.append(Seen(request.method, request.raw_path, dict(request.headers), body))
        if self.redirect_to:
            return web.Response(status=307, headers={"Location": self.redirect_to})
        return web.Response(status=self.status, body=self.body, headers={"ETag": '"abc"'})

    def __enter__(self) -> RecordingUpstream:
        self._loop = asyncio.new_event_loop()
        ready = threading.Event()

        async def start():
            app = web.Application()
            app.router.add_route("*", "/{tail:.*}", self._handle)
            self._runner = web.AppRunner(app, access_log=None)
            await self._runner.setup()
            site = web.TCPSite(self._runner, "127.0.0.1", 0)
            await site.start()
            self.port = site._server.sockets[0].getsockname()[1]

        def run():
            asyncio.set_event_loop(self._loop)
            self._loop.run_until_complete(start())
            ready.set()
            self._loop.run_forever()
            self._loop.run_until_complete(self._runner.cleanup())
            self._loop.close()

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("recording upstream did not start")
        return self

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
