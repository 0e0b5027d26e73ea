"""`sprox cache warm s3://bucket[/prefix]`: read every object under a prefix through a
running Sprox, so that Sprox caches it.

This is an S3 client of Sprox like any other: it lists the prefix with ListObjectsV2
(every page) and GETs each object whole, at most `concurrency` at a time, discarding
the bytes as they stream (memory stays bounded whatever the object sizes). Requests are
signed with botocore's SigV4 and the standard AWS credential chain (unsigned when the
chain has no credentials, which a Sprox with `--auth none` accepts); the region comes
from the AWS config, else us-east-1. Sprox's `X-Cache` answer tells which objects were
already cached (HIT) and which were fetched.

Stopping early (Ctrl-C) cancels the reads in flight: Sprox then stops sending, and the
blocks it was filling are either published whole or not at all (a block counts as
present only after all its bytes are written), so nothing half-written is left."""

from __future__ import annotations

import asyncio
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
from yarl import URL

from .progress import format_bytes
from .s3 import xml

_CHUNK = 1 << 20
_TICK = 0.25  # seconds between redraws of a progress display while reads stall
_ERROR_TEXT = 300  # characters of an error body kept in a failure message


class WarmError(Exception):
    """The warm cannot go on (the listing failed); per-object failures are not this."""


@dataclass(slots=True)
class ListedObject:
    key: str
    size: int


@dataclass
class WarmResult:
    """What a warm did. `objects` and `bytes` count objects read whole and every byte
    read (objects cut short by an interruption included)."""

    bucket: str
    prefix: str
    total_objects: int = 0
    total_bytes: int = 0
    objects: int = 0
    bytes: int = 0
    hits: int = 0  # already cached (X-Cache: HIT)
    fetched: int = 0  # read through to the upstream (MISS, PARTIAL, or no X-Cache)
    failed: int = 0
    cancelled: int = 0  # reads in flight when interrupted
    listed: bool = False  # the listing completed
    interrupted: bool = False
    seconds: float = 0.0
    failures: list[tuple[str, str]] = field(default_factory=list)  # (key, reason)


def encode_key(key: str) -> str:
    """A key as a URL path, encoded as botocore encodes it (and as SigV4 signs it)."""
    return urllib.parse.quote(key, safe="/~")


def _query(params: dict[str, str]) -> str:
    # SigV4's canonical query is this very string (sorted by botocore): every value
    # encoded with the unreserved characters left alone.
    return "&".join(f"{urllib.parse.quote(k, safe='-_.~')}={urllib.parse.quote(v, safe='-_.~')}"
                    for k, v in sorted(params.items()))


class RequestSigner:
    """SigV4 headers for requests to an S3 endpoint (or a Sprox's admin routes): with
    `key` (access key, secret), else from botocore's credential chain."""

    def __init__(self, region: str | None = None, key: tuple[str, str] | None = None) -> None:
        import botocore.session

        session = botocore.session.get_session()
        if key is not None:
            from botocore.credentials import Credentials

            self.credentials = Credentials(*key)
        else:
            self.credentials = session.get_credentials()
        self.region = region or session.get_config_variable("region") or "us-east-1"

    def headers(self, method: str, url: str, body: bytes = b"") -> dict[str, str]:
        """Signature headers; over plain http botocore signs the body's SHA-256 too."""
        if self.credentials is None:
            return {}  # unsigned: what a Sprox with --auth none takes
        from botocore.auth import S3SigV4Auth
        from botocore.awsrequest import AWSRequest

        request = AWSRequest(method=method, url=url, headers={}, data=body)
        S3SigV4Auth(self.credentials.get_frozen_credentials(), "s3", self.region).add_auth(request)
        return dict(request.headers.items())


class Warmer:
    """Lists s3://bucket/prefix at `endpoint` and reads every object through it."""

    def __init__(self, endpoint: str, bucket: str, prefix: str, *, concurrency: int = 8,
                 signer: RequestSigner | None = None, progress=None,
                 report: Callable[[str], None] | None = None, read_timeout: float = 120.0,
                 page_size: int | None = None) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        self.endpoint = endpoint.rstrip("/")
        self.bucket = bucket
        self.prefix = prefix
        self.concurrency = concurrency
        self.signer = signer if signer is not None else RequestSigner()
        self.progress = progress
        self.report = report or (lambda text: None)
        self.timeout = aiohttp.ClientTimeout(total=None, connect=10, sock_connect=10, sock_read=read_timeout)
        self.page_size = page_size
        self.result = WarmResult(bucket, prefix)

    # -- requests ----------------------------------------------------------------------

    def _url(self, path: str, query: str = "") -> tuple[URL, dict[str, str]]:
        text = f"{self.endpoint}{path}" + (f"?{query}" if query else "")
        # encoded=True: the path goes out exactly as signed (no dot-segment folding).
        return URL(text, encoded=True), self.signer.headers("GET", text)

    async def list_objects(self, session: aiohttp.ClientSession) -> list[ListedObject]:
        """Every object under the prefix, all pages, in listing order."""
        listed: list[ListedObject] = []
        token: str | None = None
        while True:
            params = {"list-type": "2", "prefix": self.prefix, "encoding-type": "url"}
            if token is not None:
                params["continuation-token"] = token
            if self.page_size is not None:
                params["max-keys"] = str(self.page_size)
            url, headers = self._url(f"/{encode_key(self.bucket)}", _query(params))
            async with session.get(url, headers=headers) as response:
                body = await response.read()
                if response.status != 200:
                    raise WarmError(f"listing s3://{self.bucket}/{self.prefix} failed: {_describe(response.status, body)}")
            try:
                root = xml.parse(body)
            except Exception:  # noqa: BLE001 - any parse failure means the same to the user
                raise WarmError(f"listing s3://{self.bucket}/{self.prefix}: not a ListObjectsV2 answer") from None
            url_encoded = (xml.child_text(root, "EncodingType") or "").lower() == "url"
            for contents in xml.children(root, "Contents"):
                key = xml.child_text(contents, "Key") or ""
                if url_encoded:  # form-style, as S3 does it: a space is "+"
                    key = urllib.parse.unquote_plus(key)
                listed.append(ListedObject(key, int(xml.child_text(contents, "Size") or 0)))
            if self.progress is not None:
                self.progress.update(note=f"listed {len(listed)} objects")
            truncated = (xml.child_text(root, "IsTruncated") or "").lower() == "true"
            token = xml.child_text(root, "NextContinuationToken")
            if not truncated:
                return listed
            if not token:
                raise WarmError(f"listing s3://{self.bucket}/{self.prefix}: truncated page without a "
                                "NextContinuationToken")

    async def read_object(self, session: aiohttp.ClientSession, obj: ListedObject) -> None:
        """GET one object whole, counting its bytes as they stream; failures are counted."""
        result = self.result
        read = 0
        try:
            url, headers = self._url(f"/{encode_key(self.bucket)}/{encode_key(obj.key)}")
            headers["Accept-Encoding"] = "identity"
            async with session.get(url, headers=headers) as response:
                if response.status != 200:
                    raise _ObjectFailed(_describe(response.status, await response.content.read(4096)))
                async for chunk in response.content.iter_chunked(_CHUNK):
                    read += len(chunk)
                    result.bytes += len(chunk)
                    self._show()
                expected = response.content_length
                if expected is not None and read != expected:
                    raise _ObjectFailed(f"{read} bytes of {expected}")
                cache = response.headers.get("X-Cache", "").upper()
            result.objects += 1
            if cache == "HIT":
                result.hits += 1
            else:
                result.fetched += 1
        except asyncio.CancelledError:
            result.cancelled += 1
            raise
        except (_ObjectFailed, aiohttp.ClientError, TimeoutError, OSError) as exc:
            reason = str(exc) if isinstance(exc, _ObjectFailed) else f"{type(exc).__name__}: {exc}".rstrip(": ")
            result.failed += 1
            result.failures.append((obj.key, reason))
            self.report(f"sprox: warm: s3://{self.bucket}/{obj.key}: {reason}")
        finally:
            self._show()

    # -- the whole run -----------------------------------------------------------------

    async def run(self) -> WarmResult:
        """List, then read everything; on cancellation the result so far is in
        `self.result` (the caller marks it interrupted)."""
        started = time.monotonic()
        if self.progress is not None:
            self.progress.start(note="listing")
        ticker = asyncio.create_task(self._tick()) if self.progress is not None else None
        connector = aiohttp.TCPConnector(limit=self.concurrency + 1, force_close=False)
        try:
            async with aiohttp.ClientSession(connector=connector, timeout=self.timeout,
                                             auto_decompress=False) as session:
                listed = await self.list_objects(session)
                self.result.listed = True
                self.result.total_objects = len(listed)
                self.result.total_bytes = sum(o.size for o in listed)
                if self.progress is not None:
                    self.progress.set_total(self.result.total_objects, self.result.total_bytes)
                    self.progress.update(note="")
                pending = iter(listed)

                async def worker() -> None:
                    for obj in pending:  # one iterator shared: each object is read once
                        await self.read_object(session, obj)

                async with asyncio.TaskGroup() as group:
                    for _ in range(min(self.concurrency, len(listed))):
                        group.create_task(worker())
        finally:
            self.result.seconds = time.monotonic() - started
            if ticker is not None:
                ticker.cancel()
                try:
                    await ticker
                except asyncio.CancelledError:
                    pass
        return self.result

    def _show(self) -> None:
        if self.progress is not None:
            self.progress.update(done=self.result.objects + self.result.failed, done_bytes=self.result.bytes,
                                 note=f"{self.result.failed} failed" if self.result.failed else "")

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(_TICK)
            self.progress.tick()


class _ObjectFailed(Exception):
    pass


def _describe(status: int, body: bytes) -> str:
    """'404 NoSuchKey: The specified key does not exist.' from an S3 error answer."""
    code = message = None
    try:
        root = xml.parse(body)
        code, message = xml.child_text(root, "Code"), xml.child_text(root, "Message")
    except Exception:  # noqa: BLE001 - not XML: show the start of the body instead
        message = body[:_ERROR_TEXT].decode("utf-8", "replace").strip() or None
    text = f"HTTP {status}" + (f" {code}" if code else "")
    return text + (f": {message}" if message else "")


async def warm(endpoint: str, bucket: str, prefix: str, *, concurrency: int = 8, progress=None,
               report: Callable[[str], None] | None = None, interrupt_signal: int | None = None,
               **options) -> WarmResult:
    """Run a warm to the end, or until `interrupt_signal` (e.g. SIGINT) arrives: then
    stop starting reads, cancel those in flight and return what was done, marked
    `interrupted`. WarmError when the listing fails."""
    warmer = Warmer(endpoint, bucket, prefix, concurrency=concurrency, progress=progress, report=report,
                    **options)
    loop = asyncio.get_running_loop()
    task = asyncio.ensure_future(warmer.run())

    def interrupt() -> None:
        warmer.result.interrupted = True
        task.cancel()

    if interrupt_signal is not None:
        loop.add_signal_handler(interrupt_signal, interrupt)
    try:
        return await task
    except asyncio.CancelledError:
        if not warmer.result.interrupted:
            raise
        return warmer.result
    finally:
        if interrupt_signal is not None:
            loop.remove_signal_handler(interrupt_signal)


def running_endpoint(cache_dir: Path) -> str | None:
    """The S3 endpoint of the Sprox running on `cache_dir`, None when none runs there."""
    from .cache import admin

    try:
        if not admin.running(cache_dir):
            return None
        return admin.data_endpoint(cache_dir) or None
    except OSError:  # no such directory, no endpoint file
        return None


def summary(result: WarmResult) -> str:
    """One line saying what a warm did."""
    where = f"s3://{result.bucket}/{result.prefix}"
    rate = f" ({format_bytes(result.bytes / result.seconds)}/s)" if result.seconds > 0 and result.bytes else ""
    counts = (f"{result.hits} already cached, {result.fetched} fetched, {result.failed} failed")
    if not result.interrupted:
        return (f"warmed {where}: {result.objects} objects, {format_bytes(result.bytes)} in "
                f"{result.seconds:.1f} s{rate}; {counts}")
    if not result.listed:
        return f"interrupted while listing {where} after {result.seconds:.1f} s: nothing read"
    return (f"interrupted: warmed {where}: {result.objects} of {result.total_objects} objects, "
            f"{format_bytes(result.bytes)} of {format_bytes(result.total_bytes)} in {result.seconds:.1f} s; "
            f"{counts}, {result.cancelled} reads cancelled (Sprox publishes only whole blocks: "
            "nothing half-written)")
