"""The Sprox server: builds the origin and the aiohttp app, starts, stops gracefully.

`Sprox` is the public embedding API (an async context manager), and `run_in_thread`
runs one on a background thread for synchronous programs and test suites; the CLI is a
thin layer over the same class.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import resource
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any

from aiohttp import web
from multidict import MultiDict, MultiDictProxy

from . import metrics
from .config import Config, ConfigError, http_url
from .eventloop import loop_factory
from .frontend import FrontEnd, error_response
from .s3 import errors
from .s3.request import S3Request, new_request_id
from .lane import LaneServer
from .upstream.base import Origin

log = logging.getLogger("sprox")

ADMIN_PREFIX = "/_sprox/"
PEER_INVALIDATE = ADMIN_PREFIX + "peer/invalidate"  # (sprox/peers.py INVALIDATE_PATH)
# aiohttp's per-connection settings (no access log of its own: FrontEnd keeps one).
HANDLER_ARGS = {"max_field_size": 16384, "max_line_size": 16384, "access_log": None}
SHUTDOWN_SECONDS = 10.0
# Descriptors besides those of client connections: upstream connections and idle block
# files (each pool bounded at 256), the hit kernel's mirror (sprox.cache.mirror, at most
# 1024 block files), the index, the log, the ring, lingering refusals.
FD_RESERVE = 3072
# Connections the kernel may hold completed but not yet accepted (listen(2)'s backlog;
# the kernel caps it at net.core.somaxconn). asyncio's default of 100 overflowed when
# hundreds of clients connected at once: the kernel then answered with SYN cookies, and
# some of those connections were reset (sprox/eventloop.py tells the story). nginx and
# Go listen with the same order of magnitude.
LISTEN_BACKLOG = 4096


def raise_open_file_limit(max_connections: int) -> int:
    """Raise the soft RLIMIT_NOFILE towards the hard limit when it is below what
    `max_connections` needs (a socket each and the fast lane's duplicate of it, and up to
    as many block files and upstream sockets while answering, plus FD_RESERVE); never
    lowers it. Returns the soft limit."""
    needed = 3 * max_connections + FD_RESERVE
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return soft
    target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    if target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:
            log.warning("could not raise the open-file limit from %d to %d: %s", soft, target, exc)
            target = soft
        else:
            log.info("raised the open-file limit (RLIMIT_NOFILE) from %d to %d for --max-connections %d",
                     soft, target, max_connections)
    if target < needed:
        log.warning("the open-file limit (%d, hard limit %s) is below the %d descriptors --max-connections %d "
                    "may need: past it, new connections wait in the listen queue", target,
                    "unlimited" if hard == resource.RLIM_INFINITY else hard, needed, max_connections)
    return target


def _from_this_machine(request: web.Request) -> bool:
    """A loopback peer, or one whose address is the one it reached us on (a client on
    this machine connecting to its own non-loopback address, as `sprox cache purge`
    does with --admin-host 10.0.0.5)."""
    remote = request.remote
    if not remote:
        return False
    if remote.startswith("127.") or remote in ("::1", "::ffff:127.0.0.1"):
        return True
    sockname = request.transport.get_extra_info("sockname") if request.transport is not None else None
    return bool(sockname) and remote == sockname[0]


def make_origin(config: Config) -> Origin:
    if config.upstream:
        from .upstream.s3 import S3Upstream

        return S3Upstream(config.upstream, region=config.upstream_region,
                          addressing=config.upstream_addressing, timeout=config.upstream_timeout)
    from .upstream.local import LocalOrigin

    assert config.local_origin_dir is not None
    return LocalOrigin(config.local_origin_dir)


class Sprox:
    """A running Sprox. Use as `async with Sprox(config) as sprox: sprox.endpoint`.

    Keyword arguments are Config fields: `Sprox(origin_dir="/data", port=0)`."""

    def __init__(self, config: Config | None = None, **settings: Any) -> None:
        if config is not None and settings:
            raise TypeError("pass a Config or keyword settings, not both")
        self.config = config if config is not None else Config(**settings)
        self.origin: Origin = make_origin(self.config)
        verifier = None
        if self.config.auth_mode == "sigv4":
            from .s3.sigv4 import SignatureVerifier

            verifier = SignatureVerifier(self.config.access_keys)
        self.cache = None
        cache_dir = self.config.cache_path
        if cache_dir is not None:
            from .cache.service import ObjectCache

            self.cache = ObjectCache(self.origin, cache_dir, capacity=self.config.cache_size,
                                     block_size=self.config.block_size, ttl=self.config.ttl,
                                     io_backend=self.config.cache_io, direct_io=self.config.direct_io,
                                     prefetch=self.config.prefetch, revalidate_at_start=bool(self.config.peers))
        listings = None
        if self.config.list_ttl > 0:
            from .cache.listings import ListingCache

            listings = ListingCache(self.config.list_ttl)
        from .analytics.accesslog import AccessLog

        self.access_log = AccessLog(self.config.logs_path)
        self.peers = None
        if self.config.peers:
            from .peers import Peers
            from .warm import RequestSigner

            key = self.config.admin_key  # (config.py refuses --peers with keys but none of these)
            signer = RequestSigner(key=(key.access_key, key.secret_key)) if key is not None else None
            self.peers = Peers(self.config.peers,
                               signer.headers if signer is not None else (lambda method, url, body: {}))
        self.frontend = FrontEnd(self.origin, verifier=verifier, domain=self.config.domain, cache=self.cache,
                                 listings=listings, access_log=self.access_log,
                                 key_rights=self.config.key_rights, peers=self.peers)
        # For /_sprox/ready: true from the end of start() until stop() begins.
        self.ready = False
        self.invalidations_received = 0  # from other nodes of a tier (/_sprox/metrics)
        if self.cache is not None and self.cache.prefetch is not None:
            self.cache.prefetch.record_access = self.access_log.record  # its GETs, and their use
        self._runner: web.AppRunner | None = None
        self._lanes: LaneServer | None = None
        self._listener: asyncio.Server | None = None
        self._lock_fd: int | None = None
        self.port: int | None = None
        self.admin_port: int | None = None  # with --admin-port, once listening
        self._admin_runner: web.AppRunner | None = None

    @property
    def endpoint(self) -> str:
        """The URL clients use, e.g. http://127.0.0.1:9000."""
        if self.port is None:
            raise RuntimeError("Sprox is not started")
        return self.config.with_port(self.port).endpoint

    @property
    def admin_endpoint(self) -> str:
        """Where the admin routes (/_sprox/...) are: the data endpoint, or --admin-port's."""
        if self.admin_port is None:
            return self.endpoint
        return http_url(self.config.admin_host, self.admin_port)

    def build_app(self) -> web.Application:
        """The data port's application: every S3 request, and the admin routes unless
        --admin-port moved them off it (then /_sprox/... is just an S3 request).
        With keys configured, the data port answers admin routes only to requests
        signed by a key that may use every bucket (purge: and write)."""
        app = web.Application(handler_args=HANDLER_ARGS)
        if self.config.admin_port is None:
            self._add_admin_routes(app, signed=self.frontend.verifier is not None)
        # (?s): a key may hold a newline (%0A), and every key is an S3 request.
        app.router.add_route("*", "/{tail:(?s:.*)}", self.frontend.handle)
        return app

    def _add_admin_routes(self, app: web.Application, *, signed: bool = False) -> None:
        def route(handler, *, write: bool = False):
            async def admin_handler(request: web.Request) -> web.StreamResponse:
                if signed:
                    refused = self._admin_refusal(request, write=write)
                    if refused is not None:
                        return refused
                # The kernel's hits waiting in its ring are counted before any answer.
                self.frontend.drain_kernel()
                return await handler(request)

            return admin_handler

        # A balancer's and Kubernetes' probes: never signed (they cannot sign), and they
        # tell nothing but whether this node is up and taking requests.
        app.router.add_get(ADMIN_PREFIX + "live", self._live)
        app.router.add_get(ADMIN_PREFIX + "ready", self._ready)
        app.router.add_get(ADMIN_PREFIX + "health", route(self._health))
        app.router.add_post(PEER_INVALIDATE, route(partial(self._peer_invalidate, signed=signed), write=True))
        app.router.add_post(ADMIN_PREFIX + "cache/purge", route(self._purge, write=True))
        app.router.add_get(ADMIN_PREFIX + "cache/stats", route(self._cache_stats))
        app.router.add_get(ADMIN_PREFIX + "metrics", route(self._metrics))

    def _admin_refusal(self, http: web.Request, *, write: bool) -> web.Response | None:
        """None when `http` is signed (SigV4 or SigV2, header or presigned) by a key
        that may use every bucket (and write, for `write`); else S3's error answer.
        The cache's figures span every bucket, like ListBuckets."""
        request_id = new_request_id()
        raw_path, _, raw_query = http.raw_path.partition("?")
        # Not parse_request: "_sprox" is no valid bucket name, and this is no S3 operation.
        request = S3Request(request_id=request_id, method=http.method, operation="Admin", bucket=None, key=None,
                            query=MultiDictProxy(MultiDict()), headers=http.headers, raw_path=raw_path,
                            raw_query=raw_query)
        try:
            verified = self.frontend.verifier.authenticate(request)
            rights = self.frontend.key_rights[verified.access_key]
            if rights.buckets is not None or (write and not rights.write):
                raise errors.access_denied("Access Denied: the admin routes need a key that may use every "
                                           "bucket" + (" and write." if write else "."))
        except errors.S3Error as exc:
            return error_response(exc, request_id, resource=raw_path, head=http.method == "HEAD")
        return None

    async def _start_admin(self) -> None:
        app = web.Application()
        self._add_admin_routes(app)
        self._admin_runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._admin_runner.setup()
        site = web.TCPSite(self._admin_runner, self.config.admin_host, self.config.admin_port,
                           reuse_address=True)
        try:
            await site.start()
        except OSError as exc:
            raise ConfigError("--admin-port", f"cannot listen on {self.config.admin_host}:{self.config.admin_port}: "
                              f"{exc.strerror or exc}") from None
        self.admin_port = site._server.sockets[0].getsockname()[1]

    async def _metrics(self, request: web.Request) -> web.Response:
        """Prometheus text format (sprox/metrics.py)."""
        lanes = self._lanes
        kernel = self.frontend.kernel
        text = metrics.render(self.frontend.metrics, self.cache, self.frontend.fast_hits,
                              kernel_hits=kernel.hits if kernel is not None else 0,
                              kernel_ring_full=kernel.ring_full if kernel is not None else 0,
                              kernel_partials=kernel.partials if kernel is not None else 0,
                              connections=len(lanes.connections) if lanes is not None else 0,
                              refused_connections=lanes.refused_total if lanes is not None else 0,
                              peers=self.peers, invalidations_received=self.invalidations_received)
        return web.Response(text=text, content_type="text/plain", headers={"X-Content-Type-Options": "nosniff"},
                            charset="utf-8")

    async def _live(self, request: web.Request) -> web.Response:
        """Liveness: the event loop answers."""
        return web.json_response({"status": "alive"})

    async def _ready(self, request: web.Request) -> web.Response:
        """Readiness: started (cache index loaded, listening) and not stopping."""
        if not self.ready:
            return web.json_response({"status": "not ready"}, status=503)
        return web.json_response({"status": "ready"})

    async def _peer_invalidate(self, request: web.Request, *, signed: bool) -> web.Response:
        """Another node of the tier forwarded a write: forget what it changed
        (sprox/peers.py). The signature, checked before, covers the body's SHA-256."""
        from .peers import NODE_HEADER, MAX_KEYS, MAX_RECEIVED_BODY_BYTES, body_digest, parse_invalidation

        request_id = new_request_id()
        if request.content_length is None:
            return error_response(errors.S3Error("MissingContentLength", "You must provide the Content-Length "
                                                 "HTTP header.", 411), request_id)
        if request.content_length > MAX_RECEIVED_BODY_BYTES:
            return error_response(errors.S3Error("EntityTooLarge", "An invalidation is at most "
                                                 f"{MAX_RECEIVED_BODY_BYTES} bytes and names at most "
                                                 f"{MAX_KEYS} keys.", 400), request_id)
        body = await request.read()
        if signed and request.headers.get("x-amz-content-sha256", "").lower() != body_digest(body):
            return error_response(errors.S3Error("XAmzContentSHA256Mismatch", "The body of an invalidation must "
                                                 "be signed (x-amz-content-sha256 is its SHA-256).", 400),
                                  request_id)
        try:
            bucket, keys, node = parse_invalidation(body)
        except ValueError as exc:
            return error_response(errors.S3Error("MalformedPOSTRequest", f"Not an invalidation: {exc}.", 400),
                                  request_id)
        if self.peers is not None and node == self.peers.node_id:
            return web.json_response({"self": True})  # our own call, through a name that resolves to us too
        self.frontend.invalidate(bucket, keys)
        self.invalidations_received += 1
        log.debug("invalidated %s in bucket %s for node %s", "every key" if keys is None else f"{len(keys)} key(s)",
                 bucket, request.headers.get(NODE_HEADER, node) or "?")
        return web.json_response({"invalidated": "bucket" if keys is None else len(keys)})

    async def _health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "origin": self.origin.description})

    def _lock_cache_dir(self) -> None:
        """One Sprox per cache directory: two writers would corrupt each other's index."""
        cache_dir = self.config.cache_path
        assert cache_dir is not None
        cache_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(cache_dir / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ConfigError("--cache-dir", f"{str(cache_dir)!r} is in use by another Sprox process") from None
        self._lock_fd = fd

    async def _cache_stats(self, request: web.Request) -> web.Response:
        """Live counters since this process started (used by `sprox cache stats`)."""
        if self.cache is None:
            return web.json_response({"cache": "off"})
        stats = self.cache.stats
        return web.json_response({"hits": stats.hits, "misses": stats.misses, "partial": stats.partial,
                                  "bypass": stats.bypass, "fills": stats.fills,
                                  "evicted_blocks": stats.evicted_blocks, "used_bytes": self.cache.used_bytes,
                                  "fast_lane_hits": self.frontend.fast_hits})

    async def _purge(self, request: web.Request) -> web.Response:
        """Purge cached objects of a running Sprox (used by `sprox cache purge`)."""
        if self.cache is None:
            return web.json_response({"purged": 0})
        if not _from_this_machine(request):
            return web.json_response({"error": "purge is only accepted from this machine"}, status=403)
        bucket = request.query.get("bucket") or None
        prefix = request.query.get("prefix", "")
        return web.json_response({"purged": self.cache.purge(bucket, prefix)})

    async def start(self) -> None:
        try:
            if self.cache is not None:
                self._lock_cache_dir()
                try:
                    await self.cache.start()
                except RuntimeError as exc:  # --io-backend uring or --direct-io that cannot work here
                    flag, _, reason = str(exc).partition(": ")
                    if flag == "--io-backend uring":
                        flag = "--io-backend"
                    raise ConfigError(flag, reason) from None
            await self.origin.start()
            await self.access_log.start()
            if self.peers is not None:
                await self.peers.start()
        except BaseException:
            await self.stop()
            raise
        try:
            raise_open_file_limit(self.config.max_connections)
            self._runner = web.AppRunner(self.build_app(), access_log=None, handle_signals=False,
                                         shutdown_timeout=SHUTDOWN_SECONDS)
            await self._runner.setup()
            # Connections are ours (the lane answers cache hits itself); aiohttp's
            # server handles the other requests on them.
            self._lanes = LaneServer(self._runner.server, self.frontend, handler_kwargs=HANDLER_ARGS,
                                     use_sendfile=self.frontend.use_sendfile,
                                     max_connections=self.config.max_connections)
            self._listener = await asyncio.get_running_loop().create_server(
                self._lanes, self.config.host, self.config.port, reuse_address=True,
                backlog=max(LISTEN_BACKLOG, self.config.max_connections))
        except BaseException:
            await self.stop()
            raise
        sockets = self._listener.sockets
        self.port = sockets[0].getsockname()[1] if sockets else self.config.port
        if self.config.admin_port is not None:
            try:
                await self._start_admin()
            except BaseException:
                await self.stop()
                raise
        if self.config.cache_path is not None:
            # Lets `sprox cache purge|stats` (admin routes) and `sprox cache warm` (S3
            # reads) reach this process while it holds the cache lock.
            (self.config.cache_path / "endpoint").write_text(self.endpoint + "\n")
            (self.config.cache_path / "admin-endpoint").write_text(self.admin_endpoint + "\n")
        self.ready = True

    async def stop(self) -> None:
        """Stop accepting, let in-flight responses finish, flush the cache index,
        release the origin."""
        self.ready = False
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        if self._lanes is not None:
            await self._lanes.shutdown(SHUTDOWN_SECONDS)
            self._lanes = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._admin_runner is not None:
            await self._admin_runner.cleanup()
            self._admin_runner = None
        self.frontend.drain_kernel()  # the last hits the kernel logged
        self.frontend.close_kernel()
        if self.cache is not None and self._lock_fd is not None:
            await self.cache.close()
        await self.access_log.close()
        if self.peers is not None:
            await self.peers.close()
        await self.origin.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    async def __aenter__(self) -> Sprox:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()


@contextmanager
def run_in_thread(config: Config | None = None, **settings: Any) -> Iterator[Sprox]:
    """Run Sprox on a background thread with its own event loop; yields the running
    `Sprox` (use `.endpoint`). Defaults to an ephemeral port when none is given."""
    if config is None:
        settings.setdefault("port", 0)
    sprox = Sprox(config, **settings)
    make_loop, _ = loop_factory(sprox.config.event_loop)
    loop = make_loop()
    started = threading.Event()
    failure: list[BaseException] = []

    def run() -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(sprox.start())
        except BaseException as exc:  # reported to the caller below
            failure.append(exc)
            started.set()
            return
        started.set()
        loop.run_forever()
        loop.run_until_complete(sprox.stop())
        loop.close()

    thread = threading.Thread(target=run, name="sprox", daemon=True)
    thread.start()
    started.wait()
    if failure:
        thread.join()
        loop.close()
        raise failure[0]
    try:
        yield sprox
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
