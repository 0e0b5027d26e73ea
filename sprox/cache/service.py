"""ObjectCache: GET and HEAD of objects answered from cached blocks, misses filled
from the origin; writes through Sprox invalidate what they change.

One request's path through the cache:

    serve(request)
      bypass?  (versionId, partNumber, SSE-C, checksum mode, --no-cache) -> None: forward
      record   = index.get(bucket, key), revalidated with a HEAD after --ttl
      no record: HEAD -> record (HEAD, suffix ranges); GET -> one block-aligned GET whose
                 response creates the record and becomes the first fill
      conditions (If-Match ...) and Range evaluated against the record
      plan     : present blocks -> file spans; in-flight blocks -> their fills; missing
                 runs of adjacent blocks -> one new FillRun each (single flight)
      answer   : status and headers now; the body is an async iterator of pieces,
                 bytes or FileSpan (sent with sendfile by the front end)
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
import zlib
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from multidict import CIMultiDict, CIMultiDictProxy, MultiDict, MultiDictProxy

from ..config import PREFETCH_MODES
from ..metrics import FILL_BUCKETS, Histogram
from ..ranges import RangeNotSatisfiable, block_span, content_range, parse_range
from ..s3 import conditions, errors
from ..s3.numbers import decimal
from ..s3.request import S3Request
from ..upstream.base import Origin, OriginResponse, UpstreamBodyError
from .blockfiles import BlockFiles, punch_hole
from .fill import (
    FAILED,
    PART_BYTES,
    PARTS_PER_PROCESS,
    PARTS_PER_REQUEST,
    PERSISTED,
    BlockFill,
    block_parts,
    block_runs,
    FillRun,
    NotCached,
    ObjectChanged,
    upstream_failure,
)
from .invalidations import Invalidations
from .io import ALIGNMENT, IOBackend, make_backend
from .index import CacheIndex
from .policy import S3FIFO
from .prefetch import Prefetcher
from .records import ObjectRecord, checksum_headers, response_headers, wants_checksums

log = logging.getLogger("sprox.cache")

# Query parameters that change what a GET returns in ways the cache does not model.
_BYPASS_PARAMS = frozenset({"versionId", "partNumber"})
# SSE-C: the key is in the request, and the bytes must not outlive it in our cache.
# (x-amz-checksum-mode is not here: boto3 sends it on every GET. The record keeps the
# object's checksums, and a full read that asks for them gets them, as from S3.)
_BYPASS_HEADERS = ("x-amz-server-side-encryption-customer-algorithm",)
# Writes that change an object (and so must drop its cached record before returning).
OBJECT_WRITES = frozenset({
    "PutObject", "CopyObject", "DeleteObject", "CompleteMultipartUpload", "PostObject",
    "RestoreObject", "PutObjectAcl", "PutObjectTagging", "DeleteObjectTagging",
    "PutObjectRetention", "PutObjectLegalHold",
})
MAX_ATTEMPTS = 3
CHECKSUM_MODE = "x-amz-checksum-mode"


@dataclass(slots=True)
class FileSpan:
    """Bytes [offset, offset + length) of a block file, for sendfile."""

    fd: int
    offset: int
    length: int


@dataclass
class CachedAnswer:
    status: int
    headers: CIMultiDict
    length: int
    outcome: str  # HIT, MISS or PARTIAL
    body: AsyncIterator | None = None  # pieces: bytes or FileSpan
    passthrough: OriginResponse | None = None  # an origin answer sent as it is


@dataclass(slots=True)
class HitPlan:
    """A hit answered at once: `length` bytes of the record's file from `offset`
    (`fd` is -1 when there is no body to send: HEAD, or an empty object), with the
    record's response headers, and its checksum headers when `with_checksums` (a full
    read that asked for them). The front end renders them (sprox/hithead.py)."""

    status: int
    with_checksums: bool
    content_range: str | None
    length: int
    record: ObjectRecord
    fd: int
    offset: int
    blocks: tuple[tuple[int, int], ...]  # (record id, block index) of every block sent


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    partial: int = 0
    bypass: int = 0
    fills: int = 0
    evicted_blocks: int = 0
    not_cached: int = 0


class ObjectCache:
    def __init__(self, origin: Origin, directory: Path, *, capacity: int, block_size: int, ttl: float,
                 io_backend: str = "auto", io_threads: int = 16, direct_io: bool = False,
                 prefetch: str = "parquet", revalidate_at_start: bool = False) -> None:
        self.origin = origin
        self.io_choice = io_backend
        # O_DIRECT fills and cold reads (--direct-io): the page cache keeps what clients
        # read (hits go out by sendfile from it), not every byte a fill writes.
        self.direct_io = direct_io
        self.io: IOBackend | None = None  # made in start(): probing io_uring may block
        self.fill_seconds = Histogram(FILL_BUCKETS)  # /_sprox/metrics
        self.directory = directory
        self.block_size = block_size
        self.ttl = ttl
        self.executor = ThreadPoolExecutor(max_workers=io_threads, thread_name_prefix="sprox-io")
        self.index = CacheIndex(directory / "index.sqlite")
        self.files = BlockFiles(directory / "blocks", self.executor)
        self.policy = S3FIFO(capacity, expected_blocks=capacity // block_size)
        self.stats = CacheStats()
        self._inflight: dict[tuple[int, int], BlockFill] = {}
        self._runs: set[asyncio.Task] = set()
        self._fetching = asyncio.Semaphore(PARTS_PER_PROCESS)  # fills fetching at once, in all
        self._pins: dict[tuple[int, int], int] = {}
        self._revalidations: dict[tuple[str, str], asyncio.Future] = {}
        # Requests for a key Sprox has no record of wait for the first one to learn it.
        self._learning: dict[tuple[str, str], asyncio.Future] = {}
        # Marked on every invalidation of a key, so a fill that started before a write
        # cannot install the old version's record after the write returned.
        self._invalidations = Invalidations()
        # In a tier (--peers), a node that was down missed its peers' invalidations: what
        # it cached before is revalidated once before it is served again.
        self.revalidate_at_start = revalidate_at_start
        if prefetch not in PREFETCH_MODES:
            raise ValueError(f"prefetch: {prefetch!r} is not one of {PREFETCH_MODES}")
        self.prefetch = Prefetcher(self) if prefetch == "parquet" else None

    # -- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        """Open the index and the I/O backend. Raises RuntimeError when an explicit
        `--io-backend uring` cannot work here."""
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self.executor, self.files.prepare)
        if self.direct_io:
            refused = await loop.run_in_executor(self.executor, self.files.supports_direct_io)
            if refused is not None:
                raise RuntimeError(f"--direct-io: {refused}")
        self.io = await loop.run_in_executor(
            self.executor, functools.partial(make_backend, self.io_choice, direct_io=self.direct_io))
        await loop.run_in_executor(self.executor, self._open)
        for key in self.policy.evict(self._pinned):  # --cache-size shrank since the last run
            self._drop_block(key)

    def _open(self) -> None:
        self.files.prepare()
        self.index.open()
        if any(r.block_size != self.block_size for r in self.index.records()):
            log.warning("block size changed to %d: dropping blocks cached with another size", self.block_size)
            for record in self.index.records():
                if record.block_size != self.block_size:
                    self.index.drop(record)
                    self.files.remove(record)
        for record in self.index.records():
            if self.revalidate_at_start:
                record.validated_at = 0.0  # (in memory: the index keeps it until revalidated)
            for i in record.present_blocks():
                self.policy.insert((record.id, i), record.block_bytes(i))

    async def close(self, grace: float = 10.0) -> None:
        """Let fills in flight finish (their bytes were probably just served), for up
        to `grace` seconds; then cancel the rest and flush the index."""
        if self.prefetch is not None:
            await self.prefetch.close()
        if self._runs:
            await asyncio.wait(list(self._runs), timeout=grace)
        for task in list(self._runs):
            task.cancel()
        if self._runs:
            await asyncio.gather(*self._runs, return_exceptions=True)
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self.executor, self.index.close)
        if self.io is not None:
            await self.io.close()
        self.files.close_all()
        self.executor.shutdown(wait=True)

    # -- the entry points ------------------------------------------------------------------------

    @staticmethod
    def bypass_reason(request: S3Request) -> str | None:
        if any(p in request.query for p in _BYPASS_PARAMS):
            return "versioned or part request"
        for name in _BYPASS_HEADERS:
            if name in request.headers:
                return name
        return None

    async def serve(self, request: S3Request) -> CachedAnswer:
        """Answer a GetObject or HeadObject. Raises S3Error for errors Sprox decides
        (412, 304, 416); an origin's own error comes back as `passthrough`."""
        for attempt in range(MAX_ATTEMPTS):
            try:
                return await self._serve_once(request)
            except ObjectChanged:
                # The object changed under us: forget the record and start again.
                record = self.index.get(request.bucket, request.key)
                if record is not None:
                    self._drop_record(record)
        raise errors.S3Error("SlowDown", "The object kept changing while Sprox read it; retry.", 503)

    async def _serve_once(self, request: S3Request) -> CachedAnswer:
        bucket, key = request.bucket, request.key
        assert bucket is not None and key is not None
        record = self.index.get(bucket, key)
        stale = record is not None and self._stale(request, record)
        if stale or (record is not None and record.checksums is None and _asks_full_checksums(request)):
            # (A record made from a ranged GET does not know the object's checksums: the
            # HEAD that revalidates it asks for them.)
            try:
                record, answer = await self._revalidate(request, record)
            except errors.S3Error as exc:
                if stale or exc.status < 500:
                    raise
                # Fresh, and only its checksums unknown: the origin failing is no reason
                # to refuse cached bytes; they go without checksums, as a range would.
                log.info("%s/%s: checksums not learned (origin answered %d); served without",
                         bucket, key, exc.status)
                answer = None
            if answer is not None:
                return answer
        head = request.method == "HEAD"
        range_header = request.headers.get("Range")
        learned = False
        while record is None and (bucket, key) in self._learning:
            # Another request is fetching this object's first bytes: wait for its
            # record, then join its fill instead of sending a GET of our own. If it
            # ends without a record, the first waiter to resume becomes the learner
            # (it registers before its first await) and the others wait for it.
            await asyncio.wait([self._learning[(bucket, key)]])
            record = self.index.get(bucket, key)
        if record is None:
            if head or (range_header or "").strip().lower().replace(" ", "").startswith("bytes=-"):
                # A suffix range needs the size to be block-aligned: learn it first.
                record, answer = await self._learn_by_head(request)
                if answer is not None:
                    return answer
                learned = True
            else:
                return await self._serve_cold_get(request)
        assert record is not None
        return await self._serve_known(request, record, range_header, fills={}, outcome_miss=learned)

    # -- cold paths --------------------------------------------------------------------------------

    def _origin_request(self, request: S3Request, method: str, headers: dict[str, str], *,
                        ask_checksums: bool = False) -> S3Request:
        """A HEAD or GET of the object; `ask_checksums` (a HEAD, or a GET of the whole
        object: S3 answers a range without them) asks for its checksums, for the record."""
        if ask_checksums:
            headers = {**headers, CHECKSUM_MODE: "ENABLED"}
        return S3Request(
            request_id=request.request_id, method=method, operation="HeadObject" if method == "HEAD" else "GetObject",
            bucket=request.bucket, key=request.key, query=MultiDictProxy(MultiDict()),
            headers=CIMultiDictProxy(CIMultiDict(headers)), raw_path=request.raw_path, raw_query="",
            stats=request.stats,
        )

    def _begin_learning(self, request: S3Request) -> asyncio.Future:
        key = (request.bucket, request.key)
        done = asyncio.get_running_loop().create_future()
        self._learning[key] = done

        def finished(_f: asyncio.Future) -> None:
            if self._learning.get(key) is done:
                del self._learning[key]

        done.add_done_callback(finished)
        return done

    async def _learn_by_head(self, request: S3Request) -> tuple[ObjectRecord | None, CachedAnswer | None]:
        done = self._begin_learning(request)
        try:
            return await self._learn_by_head_once(request)
        finally:
            done.set_result(None)

    async def _learn_by_head_once(self, request: S3Request) -> tuple[ObjectRecord | None, CachedAnswer | None]:
        generation = self._invalidations.now()
        request.stats.upstream_requests += 1
        response = await self.origin.send(self._origin_request(request, "HEAD", {}, ask_checksums=True))
        if response.status >= 500 and request.method == "HEAD":
            # The origin is failing and send() has already retried: for a HEAD this is
            # the answer. Asking again would double what a failing origin is sent.
            return None, self._as_passthrough(response)
        if response.status != 200:
            await response.close()
            # Errors are never cached: ask again with the client's own request so the
            # client gets the origin's answer (with its body, for a GET).
            return None, await self._passthrough(request)
        await response.close()
        record = self._install(request, 200, response.headers, generation, asked_checksums=True)
        if record is None:
            return None, await self._passthrough(request)
        return record, None

    async def _serve_cold_get(self, request: S3Request) -> CachedAnswer:
        done = self._begin_learning(request)
        try:
            return await self._serve_cold_get_once(request, done)
        finally:
            if not done.done():
                done.set_result(None)

    async def _serve_cold_get_once(self, request: S3Request, learned: asyncio.Future) -> CachedAnswer:
        generation = self._invalidations.now()
        bs = self.block_size
        headers: dict[str, str] = {}
        client_range = request.headers.get("Range")
        first_block = 0
        if client_range is not None:
            try:
                probe = parse_range(client_range, 1 << 62)  # an a-b or a- form: no size needed
            except RangeNotSatisfiable:
                probe = None
            if probe is not None:
                first, last = probe
                first_block = first // bs
                open_ended = last >= (1 << 62) - 1
                end = "" if open_ended else str((last // bs + 1) * bs - 1)
                headers["Range"] = f"bytes={first_block * bs}-{end}"
        request.stats.upstream_requests += 1
        whole = "Range" not in headers  # a GET of the whole object asks for its checksums
        response = await self.origin.send(self._origin_request(request, "GET", headers, ask_checksums=whole))
        if response.status not in (200, 206):
            return self._as_passthrough(response)
        record = self._install(request, response.status, response.headers, generation, asked_checksums=whole)
        if record is None:
            await response.close()
            return await self._passthrough(request)
        end_offset = record.size
        if response.status == 206:
            end_offset = int(response.headers["Content-Range"].split("-", 1)[1].split("/", 1)[0]) + 1
        fills: dict[int, BlockFill] = {}
        if record.size > 0 and end_offset > first_block * bs:
            last_block = (end_offset - 1) // bs
            if response.status == 200:
                first_block = 0
            # This answer feeds the first part only, and is then closed (unread bytes
            # are not drained): the rest of a large read is planned by _serve_known,
            # in parallel parts, now that the object's size is known.
            last_block = min(last_block, first_block + max(1, PART_BYTES // bs) - 1)
            run = self._start_run(record, first_block, last_block, request.stats, response)
            fills = {b.index: b for b in run.blocks}
        else:
            await response.close()
        learned.set_result(None)  # the record and its fill exist: waiters can join
        return await self._serve_known(request, record, client_range, fills=fills, outcome_miss=True)

    def _install(self, request: S3Request, status: int, headers, generation: int, *,
                 asked_checksums: bool) -> ObjectRecord | None:
        if self._invalidations.changed_since(generation, request.bucket, request.key):
            return None  # a write went through meanwhile: do not cache the old version
        record = ObjectRecord.from_response(self.index.new_id(), request.bucket, request.key, status, headers,
                                            self.block_size, asked_checksums=asked_checksums)
        if record is None:
            return None
        old = self.index.get(request.bucket, request.key)
        if old is not None:
            self._drop_record(old)
        self.index.put(record)
        return record

    async def _revalidate(self, request: S3Request, record: ObjectRecord) -> tuple[ObjectRecord | None, CachedAnswer | None]:
        """Check a stale record with the origin (once, however many requests ask)."""
        key = (record.bucket, record.key)
        pending = self._revalidations.get(key)
        if pending is None:
            pending = asyncio.get_running_loop().create_future()
            self._revalidations[key] = pending
            try:
                request.stats.upstream_requests += 1
                response = await self.origin.send(self._origin_request(request, "HEAD", {}, ask_checksums=True))
                await response.close()
                length = response.headers.get("Content-Length")
                # The size is checked as well as the ETag: a record sized by an answer
                # whose Content-Length lied would otherwise be confirmed forever.
                if response.status == 200 and response.headers.get("ETag") == record.etag and \
                        (length is None or length == str(record.size)):
                    self.index.validated(record, time.time())
                    learned = checksum_headers(200, response.headers, asked=True)
                    if learned != record.checksums:
                        self.index.learned_checksums(record, learned)
                    pending.set_result(record)
                elif response.status >= 500:
                    # The origin is failing, not the object changing: the client gets the
                    # error (never possibly stale bytes), and the record stays for when
                    # the origin is back.
                    raise upstream_failure(response.status)
                else:
                    self._drop_record(record)
                    pending.set_result(None)
            except BaseException as exc:
                pending.set_exception(exc)
                pending.exception()
                raise
            finally:
                del self._revalidations[key]
        fresh = await asyncio.shield(pending)
        if fresh is None:
            current = self.index.get(record.bucket, record.key)
            return current, None
        return fresh, None

    def _as_passthrough(self, response: OriginResponse) -> CachedAnswer:
        length = decimal(response.headers.get("Content-Length"))
        return CachedAnswer(response.status, CIMultiDict(response.headers),
                            -1 if length is None else length, "MISS", passthrough=response)

    async def _passthrough(self, request: S3Request) -> CachedAnswer:
        request.stats.upstream_requests += 1
        return self._as_passthrough(await self.origin.send(self._origin_request(request, request.method,
                                                                                  dict(request.headers))))

    # -- the known-record path -----------------------------------------------------------------

    @staticmethod
    def _span(request: S3Request, record: ObjectRecord, range_header: str | None
              ) -> tuple[int, int, int, str | None]:
        """(status, first byte, last byte, Content-Range or None) of an answer from
        `record`; raises S3Error for a failed condition (304, 412) or an unsatisfiable
        range (416)."""
        conditions.check_conditions(request.headers, record.etag, _modified_seconds(record.last_modified))
        try:
            span = parse_range(range_header, record.size)
        except RangeNotSatisfiable:
            raise errors.invalid_range(record.size, range_header or "") from None
        if span is None:
            return 200, 0, record.size - 1, None
        first, last = span
        return 206, first, last, content_range(first, last, record.size)

    @classmethod
    def _answer_head(cls, request: S3Request, record: ObjectRecord, range_header: str | None
                     ) -> tuple[int, int, int, CIMultiDict]:
        """(status, first byte, last byte, headers) of an answer from `record`; raises
        like `_span`."""
        status, first, last, ranged = cls._span(request, record, range_header)
        headers = response_headers(record)
        if status == 200 and record.checksums and wants_checksums(request.headers):
            headers.extend(record.checksums)
        conditions.apply_response_overrides(request.query, headers)
        if ranged is not None:
            headers["Content-Range"] = ranged
        return status, first, last, headers

    def _stale(self, request: S3Request, record: ObjectRecord) -> bool:
        """Whether `record` must be revalidated before it answers `request`: older than
        --ttl, not checked since a restart in a tier, or the client asked for it
        (Cache-Control: no-cache)."""
        cache_control = request.headers.get("Cache-Control")
        forced = cache_control is not None and "no-cache" in cache_control.lower()
        # validated_at 0: not checked since this node started in a tier (start()); a
        # deadline would not do, as --ttl may be infinite.
        return forced or record.validated_at <= 0.0 or time.time() - record.validated_at > self.ttl

    # -- hits without waiting (the fast lane) ----------------------------------------------------

    def plan_hit(self, request: S3Request) -> HitPlan | None:
        """The answer to a GetObject/HeadObject that needs nothing but bytes already on
        disk: a fresh record, every block present and verified, no fill to join, no
        condition failing, no response-* override. None when anything would need the
        origin or a wait; the caller then takes the general path, which decides
        everything again.

        Nothing is counted until `commit_hit`: a plan may still be abandoned."""
        assert request.bucket is not None and request.key is not None
        record = self.index.get(request.bucket, request.key)
        if record is None or self._stale(request, record):
            return None
        if request.query and any(name.startswith("response-") for name in request.query):
            return None
        try:
            status, first, last, ranged = self._span(request, record, request.headers.get("Range"))
        except errors.S3Error:
            return None
        with_checksums = status == 200 and wants_checksums(request.headers)
        if with_checksums and record.checksums is None:
            return None  # the general path asks the origin for them
        length = last - first + 1
        if request.method == "HEAD" or length == 0:
            return HitPlan(status, with_checksums, ranged, length, record, -1, first, ())
        first_block, last_block = block_span(first, last, record.block_size)
        inflight = self._inflight
        for i in range(first_block, last_block + 1):
            if not record.has(i) or record.is_unverified(i) or (record.id, i) in inflight:
                return None
        blocks = tuple((record.id, i) for i in range(first_block, last_block + 1))
        return HitPlan(status, with_checksums, ranged, length, record, self.files.acquire(record), first, blocks)

    def note_kernel_hits(self, hits: int, blocks: list[tuple[int, int, int]]) -> None:
        """Hits the kernel answered (drained from its ring): count them, and tell the
        eviction policy which blocks were read ((record id, block, times read) each)."""
        self.stats.hits += hits
        policy_hit = self.policy.hit
        for record_id, block, times in blocks:
            policy_hit((record_id, block), times)
        if self.prefetch is not None and self.prefetch.has_unread:
            for record_id, block, _times in blocks:
                self.prefetch.blocks_read(record_id, block)

    def hold_blocks(self, record_id: int, first_block: int, last_block: int) -> tuple[ObjectRecord, int] | None:
        """Keep a record's blocks from eviction, and its file open, while an answer the
        kernel began is finished by the Python lane: (record, descriptor), or None if
        the record is gone. Give them back with `release_blocks`."""
        record = self.index.by_id.get(record_id)
        if record is None:
            return None
        self._pin([(record_id, i) for i in range(first_block, last_block + 1)])
        return record, self.files.acquire(record)

    def release_blocks(self, record: ObjectRecord, first_block: int, last_block: int) -> None:
        self._unpin([(record.id, i) for i in range(first_block, last_block + 1)])
        self.files.release(record)

    def commit_hit(self, plan: HitPlan, request: S3Request) -> None:
        """The plan is being sent: count it, and keep its blocks from eviction."""
        for key in plan.blocks:
            self.policy.hit(key)
        if self.prefetch is not None and self.prefetch.has_unread:
            for record_id, block in plan.blocks:
                self.prefetch.blocks_read(record_id, block)
        self._pin(list(plan.blocks))
        self._count("HIT")
        request.stats.cache = "HIT"

    def release_hit(self, plan: HitPlan, committed: bool) -> None:
        if committed:
            self._unpin(list(plan.blocks))
        if plan.fd >= 0:
            self.files.release(plan.record)
            plan.fd = -1

    async def _serve_known(self, request: S3Request, record: ObjectRecord, range_header: str | None, *,
                           fills: dict[int, BlockFill], outcome_miss: bool) -> CachedAnswer:
        status, first, last, headers = self._answer_head(request, record, range_header)
        length = last - first + 1
        if request.method == "HEAD" or length == 0:
            outcome = "MISS" if outcome_miss else "HIT"
            self._count(outcome)
            request.stats.cache = outcome
            return CachedAnswer(status, headers, length, outcome)

        first_block, last_block = block_span(first, last, record.block_size)
        await self._verify_after_restart(record, first_block, last_block)
        new_runs: list[FillRun] = []
        missing: list[int] = []
        prefetch = self.prefetch
        for i in range(first_block, last_block + 1):
            if i in fills:
                continue
            inflight = self._inflight.get((record.id, i))
            if inflight is not None:
                fills[i] = inflight
            elif record.has(i):
                self.policy.hit((record.id, i))
            else:
                missing.append(i)
                continue
            if prefetch is not None:
                prefetch.blocks_read(record.id, i)
        parts = block_parts(block_runs(missing), max(1, PART_BYTES // record.block_size))
        # Parts beyond PARTS_PER_REQUEST wait for one of this request's to finish (and
        # every fill for a process-wide slot), in order: readers want the first first.
        slots = (asyncio.Semaphore(PARTS_PER_REQUEST), self._fetching) if len(parts) > 1 else (self._fetching,)
        for run_first, run_last in parts:
            run = self._start_run(record, run_first, run_last, request.stats, slots=slots)
            new_runs.append(run)
            fills.update((b.index, b) for b in run.blocks)
        # Learn whether the origin still has this version before sending any header
        # (the first part's answer says; a later part that finds it changed cuts the
        # answer short, as any failure once the header is out does).
        if new_runs:
            await asyncio.shield(new_runs[0].ready)
        # MISS: this request fetched every block it needed from the origin; PARTIAL:
        # some; HIT: none (blocks on disk, or joined a fill another request started).
        fetched = sum(len(run.blocks) for run in new_runs)
        total_blocks = last_block - first_block + 1
        if outcome_miss or fetched == total_blocks:
            outcome = "MISS"
        elif fetched == 0:
            outcome = "HIT"
        else:
            outcome = "PARTIAL"
        self._count(outcome)
        request.stats.cache = outcome
        if prefetch is not None:
            if missing:
                prefetch.client_missed(record, missing[0], missing[-1])
            prefetch.client_read(record, first, last)
        body = self._body(request.stats, record, first, last, fills)
        return CachedAnswer(status, headers, length, outcome, body=body)

    async def _body(self, stats, record: ObjectRecord, first: int, last: int,
                    fills: dict[int, BlockFill]) -> AsyncIterator:
        fd = self.files.acquire(record)
        pins: list[tuple[int, int]] = []
        pos = first
        try:
            while pos <= last:
                index = pos // record.block_size
                fill = fills.get(index)
                if fill is None or fill.state == PERSISTED:
                    if not record.has(index):
                        # Evicted or dropped while we were reading: fetch the rest directly.
                        async for chunk in self._fetch_direct(record, pos, last, stats):
                            yield chunk
                        return
                    # One span over every consecutive block on disk: one sendfile.
                    end = min(last + 1, record.block_range(index)[1])
                    nxt = index + 1
                    while end <= last and record.has(nxt) and (nxt not in fills or fills[nxt].state == PERSISTED):
                        end = min(last + 1, record.block_range(nxt)[1])
                        nxt += 1
                    # Pinned blocks are passed over by eviction while they are being sent.
                    pins = [(record.id, i) for i in range(index, nxt)]
                    self._pin(pins)
                    yield FileSpan(fd, pos, end - pos)
                    self._unpin(pins)
                    pins = []
                    pos = end
                    continue
                if fill.state == FAILED:
                    async for chunk in self._fetch_direct(record, pos, last, stats):
                        yield chunk
                    return
                available = fill.filled_to
                if available > pos and fill.data is not None:
                    until = min(available, last + 1)
                    yield bytes(fill.data[pos - fill.start:until - fill.start])
                    pos = until
                else:
                    await fill.changed()
        finally:
            self._unpin(pins)
            self.files.release(record)

    def _pin(self, keys: list[tuple[int, int]]) -> None:
        for key in keys:
            self._pins[key] = self._pins.get(key, 0) + 1

    def _unpin(self, keys: list[tuple[int, int]]) -> None:
        for key in keys:
            left = self._pins[key] - 1
            if left:
                self._pins[key] = left
            else:
                del self._pins[key]

    async def _fetch_direct(self, record: ObjectRecord, first: int, last: int, stats) -> AsyncIterator[bytes]:
        """Bytes straight from the origin, for a request whose blocks cannot be cached
        (full disk, a dropped record): the request degrades to pass-through."""
        self.stats.not_cached += 1
        response = await self.fetch(record, first, last, stats)
        try:
            if response.status != 206 or response.headers.get("ETag", record.etag) != record.etag:
                raise UpstreamBodyError(f"origin answered {response.status} while serving uncached bytes")
            # The headers already sent promise exactly bytes first..last: another range
            # (say, the object is shorter than the record believes) must not be sent as
            # if it were them, nor may the answer end early as if complete, which would
            # leave the client waiting for bytes that never come. Either is a cut.
            if response.headers.get("Content-Range", "") != f"bytes {first}-{last}/{record.size}":
                raise UpstreamBodyError(f"origin answered {response.headers.get('Content-Range')!r} "
                                        f"to bytes {first}-{last}/{record.size}")
            remaining = last - first + 1
            async for chunk in response.iter_body():
                stats.upstream_bytes += len(chunk)
                chunk = chunk[:remaining]
                remaining -= len(chunk)
                yield chunk
                if remaining == 0:
                    break
            if remaining:
                raise UpstreamBodyError("the origin sent fewer bytes than the range it announced")
        finally:
            await response.close()

    async def fetch(self, record: ObjectRecord, first: int, last: int, stats) -> OriginResponse:
        """A ranged GET of one version of an object from the origin."""
        stats.upstream_requests += 1
        request = S3Request(
            request_id="fill", method="GET", operation="GetObject", bucket=record.bucket, key=record.key,
            query=MultiDictProxy(MultiDict()),
            headers=CIMultiDictProxy(CIMultiDict({"Range": f"bytes={first}-{last}", "If-Match": record.etag})),
            raw_path="", raw_query="", stats=stats,
        )
        return await self.origin.send(request)

    # -- fills ----------------------------------------------------------------------------------------

    def _start_run(self, record: ObjectRecord, first: int, last: int, stats,
                   response: OriginResponse | None = None, slots: tuple[asyncio.Semaphore, ...] = ()) -> FillRun:
        run = FillRun(self, record, first, last, stats, response, slots)
        for block in run.blocks:
            self._inflight[(record.id, block.index)] = block
        task = asyncio.get_running_loop().create_task(run.run(), name=f"fill {record.key}")
        self._runs.add(task)
        task.add_done_callback(self._runs.discard)
        started = time.monotonic()
        task.add_done_callback(lambda _: self.fill_seconds.observe(time.monotonic() - started))
        self.stats.fills += 1
        return run

    def fill_finished(self, run: FillRun) -> None:
        for block in run.blocks:
            if self._inflight.get((run.record.id, block.index)) is block:
                del self._inflight[(run.record.id, block.index)]

    def in_flight(self, record: ObjectRecord, index: int) -> bool:
        return (record.id, index) in self._inflight

    def start_prefetch(self, record: ObjectRecord, first: int, last: int, stats) -> FillRun:
        """Fetch blocks first..last (missing, none in flight) in the background. A
        prefetch takes no fetching slot: the prefetcher bounds its own."""
        return self._start_run(record, first, last, stats)

    def admit_metadata(self, record: ObjectRecord, start: int) -> None:
        """Bytes from `start` to the end of `record` are read by every query of it (a
        Parquet footer and page indexes): their blocks go to the main queue."""
        for i in range(start // record.block_size, record.block_count):
            if record.has(i):
                self.policy.promote((record.id, i))

    async def read_bytes(self, record: ObjectRecord, first: int, last: int, stats) -> bytes:
        """Bytes first..last of `record`, through the cache: blocks on disk are read,
        missing ones fetched (or joined) and cached. For Sprox's own reads (a Parquet
        footer); raises what a fill raises (ObjectChanged, S3Error, NotCached ...)."""
        first_block, last_block = block_span(first, last, record.block_size)
        await self._verify_after_restart(record, first_block, last_block)
        fills: dict[int, BlockFill] = {}
        missing: list[int] = []
        for i in range(first_block, last_block + 1):
            inflight = self._inflight.get((record.id, i))
            if inflight is not None:
                fills[i] = inflight
            elif not record.has(i):
                missing.append(i)
        for run_first, run_last in block_runs(missing):
            run = self._start_run(record, run_first, run_last, stats, slots=(self._fetching,))
            fills.update((b.index, b) for b in run.blocks)
        loop = asyncio.get_running_loop()
        pieces: list[bytes] = []
        async for piece in self._body(stats, record, first, last, fills):
            if isinstance(piece, FileSpan):
                # (The span's descriptor is not O_DIRECT: a plain pread on a worker.)
                data = await loop.run_in_executor(self.executor, BlockFiles.read_block, piece.fd, piece.offset,
                                                  piece.length)
                if len(data) != piece.length:
                    raise NotCached("a block file is shorter than its blocks")
                pieces.append(bytes(data))
            else:
                pieces.append(piece)
        return b"".join(pieces)

    async def persist(self, block: BlockFill) -> None:
        """Write a complete block, then mark it present. Raises NotCached (after failing
        the block) when it cannot be stored."""
        record = block.record
        if self.index.by_id.get(record.id) is not record:
            block.fail(NotCached("record dropped"))
            raise NotCached("record dropped")
        data = block.data
        assert data is not None
        size = len(data)
        victims = self.policy.evict(self._pinned, need=size)
        for victim in victims:
            self._drop_block(victim)
        assert self.io is not None
        loop = asyncio.get_running_loop()
        try:
            fd = self.files.acquire(record, direct=self.direct_io)
        except OSError as exc:
            block.fail(NotCached(exc.strerror))
            raise NotCached(exc.strerror) from None
        try:
            # The CRC is computed on a worker thread while the I/O backend writes.
            crc_done = loop.run_in_executor(self.executor, zlib.crc32, data)
            payload = data
            if self.direct_io and size % ALIGNMENT:
                # O_DIRECT writes whole sectors: the object's last block is padded with
                # zeros past its end (never read: spans stop at the object's size).
                payload = bytes(data) + bytes(ALIGNMENT - size % ALIGNMENT)
            await self.io.pwrite(fd, block.start, payload)
            crc = await crc_done
        except OSError as exc:
            log.warning("cannot store a block of %s/%s (%s): serving it uncached", record.bucket, record.key,
                        exc.strerror)
            block.fail(NotCached(exc.strerror))
            raise NotCached(exc.strerror) from None
        finally:
            self.files.release(record)
        if self.index.add_block(record, block.index, crc):
            self.policy.insert((record.id, block.index), size)
        block.state = PERSISTED
        block.data = None
        block.notify()

    async def _verify_after_restart(self, record: ObjectRecord, first: int, last: int) -> None:
        for i in range(first, last + 1):
            if record.has(i) and record.is_unverified(i):
                start, end = record.block_range(i)
                assert self.io is not None
                try:
                    fd = self.files.acquire(record, direct=self.direct_io)
                except OSError:
                    self._drop_block((record.id, i))
                    continue
                try:
                    data = await self.io.pread(fd, start, end - start)
                    ok = len(data) == end - start and await asyncio.get_running_loop().run_in_executor(
                        self.executor, zlib.crc32, data) == record.crcs[i]
                except OSError:
                    ok = False
                finally:
                    self.files.release(record)
                if ok:
                    record.set_present(i, record.crcs[i])
                else:
                    log.warning("block %d of %s/%s failed its checksum: dropped", i, record.bucket, record.key)
                    self._drop_block((record.id, i))

    # -- dropping -------------------------------------------------------------------------------------

    def _pinned(self, key) -> bool:
        return key in self._pins

    def _drop_block(self, key: tuple[int, int]) -> None:
        record = self.index.by_id.get(key[0])
        self.policy.remove(key)
        if self.prefetch is not None:
            self.prefetch.block_dropped(key)
        if record is None or not record.has(key[1]):
            return
        self.index.drop_block(record, key[1])
        self.stats.evicted_blocks += 1
        start, end = record.block_range(key[1])
        fd = self.files.acquire(record)  # held until the hole is punched
        done = asyncio.get_running_loop().run_in_executor(self.executor, punch_hole, fd, start, end - start)
        done.add_done_callback(lambda _f, r=record: self.files.release(r))

    def _drop_record(self, record: ObjectRecord) -> None:
        for i in record.present_blocks():
            self.policy.remove((record.id, i))
            if self.prefetch is not None:
                self.prefetch.block_dropped((record.id, i))
        if self.prefetch is not None:
            self.prefetch.record_dropped(record.id)
        for (record_id, index), block in list(self._inflight.items()):
            if record_id == record.id:
                block.fail(NotCached("record dropped"))
        if self.index.drop(record):
            self.files.remove(record)

    def invalidate(self, bucket: str, key: str) -> None:
        """Forget a key now (a write through Sprox changed it)."""
        self._invalidations.key(bucket, key)
        record = self.index.get(bucket, key)
        if record is not None:
            self._drop_record(record)

    def purge(self, bucket: str | None, prefix: str = "") -> int:
        """Forget every cached object (of `bucket`, under `prefix`); returns how many."""
        doomed = [r for r in self.index.records()
                  if (bucket is None or r.bucket == bucket) and r.key.startswith(prefix)]
        for record in doomed:
            self.invalidate(record.bucket, record.key)
        return len(doomed)

    def invalidate_bucket(self, bucket: str) -> None:
        """Forget every key of `bucket` now, those being fetched included."""
        self._invalidations.bucket(bucket)
        for record in [r for r in self.index.records() if r.bucket == bucket]:
            self._drop_record(record)

    def _count(self, outcome: str) -> None:
        if outcome == "HIT":
            self.stats.hits += 1
        elif outcome == "MISS":
            self.stats.misses += 1
        else:
            self.stats.partial += 1

    @property
    def used_bytes(self) -> int:
        return self.policy.used


def _asks_full_checksums(request: S3Request) -> bool:
    """A read whose answer (a 200, with no Range) carries the checksums it asks for."""
    return "Range" not in request.headers and wants_checksums(request.headers)


@functools.lru_cache(maxsize=65536)
def _modified_seconds(http_date: str) -> float:
    # Parsing an HTTP date costs ~8 us with email.utils: once per record is enough.
    return conditions.parse_http_date(http_date) or 0.0
