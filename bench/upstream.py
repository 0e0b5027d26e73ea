"""A small S3-like upstream for benchmarks: a directory served as buckets, with an
injected first-byte latency, a per-request bandwidth cap, and request counters.

    python -m bench.upstream --root DIR [--port 0] [--latency-ms 20] [--bandwidth-mbps 80]

prints ``listening on http://127.0.0.1:PORT`` once it accepts connections. Layout:
``DIR/<bucket>/<key>``, every regular file an object. It binds 127.0.0.1 only.

What it implements (enough for DuckDB httpfs, DataFusion/object_store, boto3 and a
proxy in front of them):

- GET and HEAD of an object: ``Range`` in all three forms (``a-b``, ``a-``, ``-n``;
  206 with ``Content-Range``; 416 ``InvalidRange`` when unsatisfiable; a suffix longer
  than the object gives the whole object as 206), ``If-Match``, ``If-None-Match``,
  ``If-Modified-Since``, ``If-Unmodified-Since``; ``ETag``, ``Last-Modified``,
  ``Content-Length``, ``Accept-Ranges``. Bodies go out with ``loop.sendfile``.
- ListObjectsV2 on ``/bucket`` and ``/bucket/`` (``prefix``, ``delimiter``,
  ``max-keys``, ``continuation-token``, ``start-after``, ``encoding-type=url``),
  ListObjects v1 (``marker``) and ListBuckets.
- Any ``Authorization`` is accepted and never verified (SigV4 or none).
- Every S3 request waits ``--latency-ms`` before its response headers, like S3's time
  to first byte, and every GET's body is paced at ``--bandwidth-mbps`` megabytes (10^6
  bytes) per second, like what one S3 GET streams (about 80 MB/s; 0: unpaced). Many
  GETs in parallel each get the full rate, as on S3. ``GET /_stats`` (no latency) returns the request counters as JSON;
  ``POST /_stats/reset`` zeroes them.

ETags are not MD5s of the content: they are derived from (size, mtime, inode) and
written in the multipart form (``"<hex>-1"``), which S3 clients do not check against
the bytes. Writes answer 501: benchmark data is put in the directory directly.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import stat
import sys
from dataclasses import dataclass, field
from datetime import UTC
from email.utils import formatdate, parsedate_to_datetime
from pathlib import Path
from urllib.parse import parse_qsl, quote, unquote
from xml.sax.saxutils import escape

from aiohttp import web

HOST = "127.0.0.1"
MAX_KEYS = 1000
PACE_CHUNK = 256 * 1024  # a paced body goes out in sendfile()s of this much, each on time
XMLNS = "http://s3.amazonaws.com/doc/2006-03-01/"


@dataclass
class Stats:
    """Requests seen, by kind. `get` counts object GETs only (listings are `list`)."""

    get: int = 0
    head: int = 0
    list: int = 0
    other: int = 0
    get_body_bytes: int = 0
    ranged_gets: int = 0
    status: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"GET": self.get, "HEAD": self.head, "LIST": self.list, "OTHER": self.other,
                "get_body_bytes": self.get_body_bytes, "ranged_gets": self.ranged_gets,
                "status": dict(self.status)}


@dataclass(frozen=True)
class ObjectInfo:
    path: str
    size: int
    mtime_ns: int
    etag: str

    @property
    def last_modified(self) -> str:
        return formatdate(self.mtime_ns / 1e9, usegmt=True)

    @property
    def iso_modified(self) -> str:
        from datetime import datetime

        t = datetime.fromtimestamp(self.mtime_ns / 1e9, tz=UTC)
        return t.strftime("%Y-%m-%dT%H:%M:%S.") + f"{t.microsecond // 1000:03d}Z"


def object_info(path: str, st: os.stat_result) -> ObjectInfo:
    digest = hashlib.md5(f"{st.st_size}:{st.st_mtime_ns}:{st.st_ino}".encode(), usedforsecurity=False)
    return ObjectInfo(path, st.st_size, st.st_mtime_ns, f'"{digest.hexdigest()}-1"')


def error_xml(code: str, message: str, resource: str = "") -> bytes:
    return (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
            f"<Message>{escape(message)}</Message><Resource>{escape(resource)}</Resource>"
            "<RequestId>bench</RequestId></Error>").encode()


class S3Error(Exception):
    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.headers = headers or {}


def parse_range(header: str, size: int) -> tuple[int, int] | None:
    """(first, last) inclusive for a single-range header, None to serve the whole
    object (absent, malformed or multi-range headers are ignored, as S3 does)."""
    header = header.strip()
    if not header.lower().startswith("bytes=") or "," in header:
        return None
    spec = header[6:].strip()
    first_text, sep, last_text = spec.partition("-")
    if not sep:
        return None
    try:
        if first_text == "":
            suffix = int(last_text)
            if suffix <= 0:
                raise S3Error(416, "InvalidRange", "The requested range is not satisfiable")
            if size == 0:
                raise S3Error(416, "InvalidRange", "The requested range is not satisfiable")
            return max(0, size - suffix), size - 1
        first = int(first_text)
        last = int(last_text) if last_text else size - 1
    except ValueError:
        return None
    if last_text and last < first:
        return None  # syntactically invalid: ignored, as S3 does
    if first >= size:
        raise S3Error(416, "InvalidRange", "The requested range is not satisfiable",
                      {"Content-Range": f"bytes */{size}"})
    return first, min(last, size - 1)


def _http_time(value: str) -> float | None:
    try:
        return parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError, IndexError):
        return None


def check_conditions(request: web.Request, info: ObjectInfo) -> None:
    """Raise S3Error for a failed precondition (412) or a not-modified (304)."""
    headers = request.headers
    modified = info.mtime_ns // 1_000_000_000
    if "If-Match" in headers:
        tags = [t.strip() for t in headers["If-Match"].split(",")]
        if "*" not in tags and info.etag not in tags:
            raise S3Error(412, "PreconditionFailed", "At least one of the pre-conditions you specified did not hold")
    elif "If-Unmodified-Since" in headers:
        since = _http_time(headers["If-Unmodified-Since"])
        if since is not None and modified > since:
            raise S3Error(412, "PreconditionFailed", "At least one of the pre-conditions you specified did not hold")
    if "If-None-Match" in headers:
        tags = [t.strip() for t in headers["If-None-Match"].split(",")]
        if "*" in tags or info.etag in tags:
            raise S3Error(304, "NotModified", "Not Modified", {"ETag": info.etag})
    elif "If-Modified-Since" in headers:
        since = _http_time(headers["If-Modified-Since"])
        if since is not None and modified <= since:
            raise S3Error(304, "NotModified", "Not Modified", {"ETag": info.etag})


class Upstream:
    """The aiohttp application and its state."""

    def __init__(self, root: Path, latency: float, bandwidth: float = 0.0) -> None:
        self.root = Path(root).resolve()
        self.latency = latency
        self.bandwidth = bandwidth  # bytes per second per GET body; 0: unpaced
        self.stats = Stats()

    def app(self) -> web.Application:
        app = web.Application(handler_args={"max_field_size": 16384, "max_line_size": 16384})
        app.router.add_get("/_stats", self.get_stats)
        app.router.add_post("/_stats/reset", self.reset_stats)
        app.router.add_route("*", "/{tail:.*}", self.handle)
        return app

    async def get_stats(self, request: web.Request) -> web.Response:
        return web.json_response(self.stats.to_json())

    async def reset_stats(self, request: web.Request) -> web.Response:
        self.stats = Stats()
        return web.json_response(self.stats.to_json())

    # -- dispatch -----------------------------------------------------------------

    async def handle(self, request: web.Request) -> web.StreamResponse:
        raw_path, _, raw_query = request.raw_path.partition("?")
        query = dict(parse_qsl(raw_query, keep_blank_values=True))
        parts = raw_path.lstrip("/").split("/", 1)
        bucket = unquote(parts[0])
        key = unquote(parts[1]) if len(parts) > 1 else ""
        method = request.method
        try:
            if method in ("GET", "HEAD") and not bucket:
                self.stats.list += 1
                await self._first_byte()
                return self.list_buckets()
            if method == "GET" and not key:
                self.stats.list += 1
                await self._first_byte()
                return await self.list_objects(bucket, query)
            if method in ("GET", "HEAD") and key:
                if method == "GET":
                    self.stats.get += 1
                else:
                    self.stats.head += 1
                return await self.get_object(request, bucket, key, head=method == "HEAD")
            self.stats.other += 1
            await self._first_byte()
            raise S3Error(501, "NotImplemented", f"{method} is not implemented by the bench upstream")
        except S3Error as exc:
            self._count_status(exc.status)
            body = b"" if method == "HEAD" or exc.status == 304 else error_xml(exc.code, exc.message, raw_path)
            return web.Response(status=exc.status, body=body or None, headers=exc.headers,
                                content_type="application/xml" if body else None)

    def _count_status(self, status: int) -> None:
        self.stats.status[str(status)] = self.stats.status.get(str(status), 0) + 1

    async def _first_byte(self) -> None:
        if self.latency > 0:
            await asyncio.sleep(self.latency)

    # -- paths --------------------------------------------------------------------

    def bucket_dir(self, bucket: str) -> Path:
        if not bucket or bucket.startswith(".") or "/" in bucket or bucket in ("..",):
            raise S3Error(404, "NoSuchBucket", "The specified bucket does not exist")
        path = self.root / bucket
        if not path.is_dir():
            raise S3Error(404, "NoSuchBucket", "The specified bucket does not exist")
        return path

    def object_path(self, bucket: str, key: str) -> str:
        base = self.bucket_dir(bucket)
        segments = key.split("/")
        if any(s in ("", ".", "..") for s in segments) or "\x00" in key:
            raise S3Error(404, "NoSuchKey", "The specified key does not exist.")
        return os.path.join(base, *segments)

    # -- objects ------------------------------------------------------------------

    async def get_object(self, request: web.Request, bucket: str, key: str, *, head: bool) -> web.StreamResponse:
        await self._first_byte()
        path = self.object_path(bucket, key)
        try:
            fobj = await asyncio.to_thread(open, path, "rb")
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            raise S3Error(404, "NoSuchKey", "The specified key does not exist.") from None
        try:
            st = os.fstat(fobj.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise S3Error(404, "NoSuchKey", "The specified key does not exist.")
            info = object_info(path, st)
            check_conditions(request, info)
            span = parse_range(request.headers.get("Range", ""), info.size)
            response = web.StreamResponse(status=206 if span else 200)
            response.headers["ETag"] = info.etag
            response.headers["Last-Modified"] = info.last_modified
            response.headers["Accept-Ranges"] = "bytes"
            response.headers["Content-Type"] = "application/octet-stream"
            response.headers["x-amz-request-id"] = "bench"
            first, last = span if span else (0, info.size - 1)
            length = last - first + 1 if info.size else 0
            if span:
                response.headers["Content-Range"] = f"bytes {first}-{last}/{info.size}"
                self.stats.ranged_gets += 0 if head else 1
            response.content_length = length
            self._count_status(response.status)
            await response.prepare(request)
            if head or length == 0:
                await response.write_eof()
                return response
            self.stats.get_body_bytes += length
            await self._send_span(request, response, fobj, first, length)
            return response
        finally:
            fobj.close()

    async def _send_span(self, request: web.Request, response: web.StreamResponse, fobj, offset: int,
                         count: int) -> None:
        loop = asyncio.get_running_loop()
        transport = request.transport
        if transport is None:
            raise ConnectionResetError("client went away")
        if self.bandwidth > 0:
            # Paced: each chunk leaves no earlier than its share of the rate allows,
            # counted from the first byte (so a slow reader is not made up for later).
            started = loop.time()
            for at, size, due in pace(count, self.bandwidth, PACE_CHUNK):
                delay = started + due - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                await loop.sendfile(transport, fobj, offset + at, size)
            return
        try:
            # StreamResponse sends its headers at prepare(), so the file follows them.
            await loop.sendfile(transport, fobj, offset, count)
        except NotImplementedError:
            fd = fobj.fileno()
            while count:
                chunk = await loop.run_in_executor(None, os.pread, fd, min(count, 1 << 20), offset)
                if not chunk:
                    raise ConnectionResetError("file shrank while being sent")
                await response.write(chunk)
                offset += len(chunk)
                count -= len(chunk)
        await response.write_eof()

    # -- listings -----------------------------------------------------------------

    def list_buckets(self) -> web.Response:
        names = sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))
        buckets = "".join(f"<Bucket><Name>{escape(n)}</Name><CreationDate>2024-01-01T00:00:00.000Z</CreationDate></Bucket>"
                          for n in names)
        body = (f'<?xml version="1.0" encoding="UTF-8"?>\n<ListAllMyBucketsResult xmlns="{XMLNS}">'
                f"<Owner><ID>bench</ID><DisplayName>bench</DisplayName></Owner><Buckets>{buckets}</Buckets>"
                "</ListAllMyBucketsResult>").encode()
        self._count_status(200)
        return web.Response(body=body, content_type="application/xml")

    def _walk(self, base: Path, prefix: str) -> list[str]:
        """Every key in the bucket that starts with `prefix`, sorted."""
        keys = []
        # Start from the deepest directory the prefix names, not the bucket root.
        start_dir = prefix.rpartition("/")[0]
        top = base / start_dir if start_dir else base
        if not top.is_dir():
            return []
        for directory, dirs, files in os.walk(top):
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            rel_dir = os.path.relpath(directory, base)
            rel_dir = "" if rel_dir == "." else rel_dir.replace(os.sep, "/") + "/"
            for name in files:
                key = rel_dir + name
                if key.startswith(prefix):
                    keys.append(key)
        keys.sort()
        return keys

    async def list_objects(self, bucket: str, query: dict[str, str]) -> web.Response:
        base = self.bucket_dir(bucket)
        v2 = query.get("list-type") == "2"
        prefix = query.get("prefix", "")
        delimiter = query.get("delimiter", "")
        url_encode = query.get("encoding-type") == "url"
        try:
            max_keys = min(MAX_KEYS, int(query.get("max-keys", MAX_KEYS)))
        except ValueError:
            raise S3Error(400, "InvalidArgument", "max-keys must be an integer") from None
        if v2:
            start = query.get("continuation-token") or query.get("start-after", "")
        else:
            start = query.get("marker", "")
        keys = await asyncio.get_running_loop().run_in_executor(None, self._walk, base, prefix)
        entries: list[tuple[str, str | None]] = []  # (key or common prefix, kind)
        seen_prefixes: set[str] = set()
        truncated = False
        last = ""
        for key in keys:
            if start and key <= start:
                continue
            item, kind = key, "key"
            if delimiter:
                rest = key[len(prefix):]
                cut = rest.find(delimiter)
                if cut >= 0:
                    item, kind = prefix + rest[:cut + len(delimiter)], "prefix"
                    if item in seen_prefixes:
                        continue
                    if start and item <= start:
                        continue
                    seen_prefixes.add(item)
            if len(entries) == max_keys:
                truncated = True
                break
            entries.append((item, kind))
            last = item if kind == "key" else max(last, key)
            if kind == "prefix":
                # Continue after every key under this prefix.
                last = item + "\U0010ffff"

        def enc(text: str) -> str:
            return escape(quote(text, safe="/") if url_encode else text)

        out = [f'<?xml version="1.0" encoding="UTF-8"?>\n<ListBucketResult xmlns="{XMLNS}">',
               f"<Name>{escape(bucket)}</Name><Prefix>{enc(prefix)}</Prefix>",
               f"<MaxKeys>{max_keys}</MaxKeys><IsTruncated>{'true' if truncated else 'false'}</IsTruncated>"]
        if delimiter:
            out.append(f"<Delimiter>{enc(delimiter)}</Delimiter>")
        if url_encode:
            out.append("<EncodingType>url</EncodingType>")
        if v2:
            out.append(f"<KeyCount>{len(entries)}</KeyCount>")
            if "continuation-token" in query:
                out.append(f"<ContinuationToken>{escape(query['continuation-token'])}</ContinuationToken>")
            if "start-after" in query:
                out.append(f"<StartAfter>{enc(query['start-after'])}</StartAfter>")
            if truncated:
                out.append(f"<NextContinuationToken>{escape(last)}</NextContinuationToken>")
        else:
            out.append(f"<Marker>{enc(start)}</Marker>")
            if truncated:
                out.append(f"<NextMarker>{enc(last)}</NextMarker>")
        for item, kind in entries:
            if kind == "prefix":
                out.append(f"<CommonPrefixes><Prefix>{enc(item)}</Prefix></CommonPrefixes>")
                continue
            path = os.path.join(base, *item.split("/"))
            try:
                info = object_info(path, os.stat(path))
            except OSError:
                continue
            out.append(f"<Contents><Key>{enc(item)}</Key><LastModified>{info.iso_modified}</LastModified>"
                       f"<ETag>{escape(info.etag)}</ETag><Size>{info.size}</Size>"
                       "<StorageClass>STANDARD</StorageClass></Contents>")
        out.append("</ListBucketResult>")
        self._count_status(200)
        return web.Response(body="".join(out).encode(), content_type="application/xml")


def pace(count: int, bandwidth: float, chunk: int) -> list[tuple[int, int, float]]:
    """How a body of `count` bytes is paced at `bandwidth` bytes per second: (offset,
    size, seconds after the first byte when it may leave) for each chunk. The first
    chunk leaves at once; chunk k when the k chunks before it have had their time."""
    out = []
    at = 0
    while at < count:
        size = min(chunk, count - at)
        out.append((at, size, at / bandwidth))
        at += size
    return out


async def serve(root: Path, port: int, latency: float, bandwidth: float = 0.0) -> None:
    upstream = Upstream(root, latency, bandwidth)
    runner = web.AppRunner(upstream.app(), access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, HOST, port, reuse_address=True)
    await site.start()
    sockets = site._server.sockets if site._server else ()  # aiohttp has no public accessor
    bound = sockets[0].getsockname()[1] if sockets else port
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    import signal

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    paced = f"{bandwidth / 1e6:g} MB/s per GET" if bandwidth > 0 else "unpaced"
    print(f"bench upstream listening on http://{HOST}:{bound} (root {upstream.root}, "
          f"first-byte latency {latency * 1000:.0f} ms, {paced})", flush=True)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.upstream", description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", required=True, type=Path, help="directory served as buckets")
    parser.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (0: a free one)")
    parser.add_argument("--latency-ms", type=float, default=20.0,
                        help="first-byte latency added to every S3 request (default 20)")
    parser.add_argument("--bandwidth-mbps", type=float, default=80.0,
                        help="each GET body's pace, in MB/s (10^6 bytes); 0: unpaced (default 80)")
    args = parser.parse_args(argv)
    if not args.root.is_dir():
        parser.error(f"--root: {args.root} is not a directory")
    if args.latency_ms < 0:
        parser.error("--latency-ms: must be 0 or more")
    if args.bandwidth_mbps < 0:
        parser.error("--bandwidth-mbps: must be 0 (unpaced) or more")
    asyncio.run(serve(args.root, args.port, args.latency_ms / 1000, args.bandwidth_mbps * 1e6))
    return 0


if __name__ == "__main__":
    sys.exit(main())
