"""Filling missing blocks from the origin, once per block however many readers wait.

A `FillRun` fetches a run of adjacent missing blocks with one ranged GET (carrying
`If-Match: <etag>`, so bytes of another version can never arrive). Its bytes go into
per-block `BlockFill` buffers that every waiting reader streams from as they arrive;
each complete block is written to its block file and only then marked present, after
which its buffer is dropped and readers continue from the file.

A large miss is cut into parts of at most PART_BYTES, each its own FillRun, fetched in
parallel (S3 paces each GET, so parallel GETs are how a large read goes fast), at most
PARTS_PER_REQUEST at a time for one client request and PARTS_PER_PROCESS in all;
readers still take the bytes in order. A fill whose body breaks midway (a reset, a short
body) is fetched again alone, from the first byte it is missing, up to PART_RETRIES
times; one that stalls is not (that would spend --upstream-timeout again)."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from ..s3 import errors
from ..upstream.base import OriginResponse, UpstreamBodyError
from .records import ObjectRecord, object_size

if TYPE_CHECKING:
    from .service import ObjectCache

log = logging.getLogger("sprox.cache")

FILLING, PERSISTED, FAILED = "filling", "persisted", "failed"
PART_BYTES = 8 * 2**20  # a large miss is fetched in ranged GETs of at most this much
PARTS_PER_REQUEST = 8  # parts of one client request fetched at the same time
PARTS_PER_PROCESS = 64  # fills (parts or not) fetching at the same time, in all
PART_RETRIES = 2  # times a fill whose body broke midway is fetched again, from where it stopped


class ObjectChanged(Exception):
    """The origin no longer has this version (412 on If-Match, or another ETag)."""


class NotCached(Exception):
    """The block could not be stored (e.g. disk full, or the record was dropped); its
    readers fetch their bytes straight from the origin instead."""


class BlockFill:
    """One block in flight. Readers poll `state` and `data`, and await `changed()`."""

    __slots__ = ("record", "index", "start", "end", "data", "state", "error", "_changed")

    def __init__(self, record: ObjectRecord, index: int) -> None:
        self.record = record
        self.index = index
        self.start, self.end = record.block_range(index)
        self.data: bytearray | None = bytearray()
        self.state = FILLING
        self.error: BaseException | None = None
        self._changed: asyncio.Future | None = None

    @property
    def filled_to(self) -> int:
        """Object offset up to which bytes are available in `data`."""
        return self.start + (len(self.data) if self.data is not None else 0)

    def notify(self) -> None:
        waiter, self._changed = self._changed, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def changed(self) -> None:
        if self._changed is None:
            self._changed = asyncio.get_running_loop().create_future()
        # shield: one reader giving up must not cancel the others' wait.
        await asyncio.shield(self._changed)

    def fail(self, error: BaseException) -> None:
        if self.state == FILLING:
            self.state = FAILED
            self.error = error
            self.data = None
            self.notify()


class FillRun:
    """Fetches blocks [first, last] of `record` and persists each as it completes."""

    def __init__(self, cache: ObjectCache, record: ObjectRecord, first: int, last: int, stats,
                 response: OriginResponse | None = None, slots: tuple[asyncio.Semaphore, ...] = ()) -> None:
        self.cache = cache
        self.record = record
        self.blocks = [BlockFill(record, i) for i in range(first, last + 1)]
        self.stats = stats
        self.response = response
        self.slots = slots  # held while fetching: the bounds on parallel fills
        self.done = 0  # blocks persisted
        self.ready: asyncio.Future = asyncio.get_running_loop().create_future()
        # Done when the run has ended, however it ended (its blocks say how).
        self.finished: asyncio.Future = asyncio.get_running_loop().create_future()

    @property
    def start(self) -> int:
        return self.blocks[0].start

    @property
    def end(self) -> int:
        return self.blocks[-1].end

    async def run(self) -> None:
        response = self.response
        self.response = None
        held: list[asyncio.Semaphore] = []
        try:
            for slot in self.slots:
                await slot.acquire()
                held.append(slot)
            retries = PART_RETRIES
            while True:
                offset = self.blocks[self.done].filled_to
                if response is None:
                    response = await self.cache.fetch(self.record, offset, self.end - 1, self.stats)
                skip = self._check(response, offset)
                if not self.ready.done():
                    self.ready.set_result(None)
                try:
                    await self._take(response, skip)
                    break
                except UpstreamBodyError as exc:
                    # A stall is not retried: it would spend --upstream-timeout again
                    # (readers resume from the origin themselves once the fill fails).
                    if retries == 0 or isinstance(exc.__cause__, asyncio.TimeoutError):
                        raise
                    retries -= 1
                    log.info("fill of %s/%s: the body failed at byte %d (%s): fetching the rest again",
                             self.record.bucket, self.record.key, self.blocks[self.done].filled_to, exc)
                    await response.close()
                    response = None
        except BaseException as exc:
            if not self.ready.done():
                self.ready.set_exception(exc if not isinstance(exc, asyncio.CancelledError) else NotCached())
                self.ready.exception()  # retrieved: waiters that gave up must not warn
            failure = exc if isinstance(exc, (NotCached, ObjectChanged, UpstreamBodyError)) else NotCached(str(exc))
            for block in self.blocks[self.done:]:
                block.fail(failure)
            if isinstance(exc, asyncio.CancelledError):
                raise
            if not isinstance(exc, (NotCached, ObjectChanged, UpstreamBodyError, errors.S3Error)):
                log.exception("fill of %s/%s failed", self.record.bucket, self.record.key)
        finally:
            for slot in held:
                slot.release()
            try:
                if response is not None:
                    await response.close()
            finally:
                for block in self.blocks:
                    # However the run ended (even by an error in the handling above), no
                    # reader may be left waiting on a block that will never fill.
                    block.fail(NotCached("the fill ended"))  # (a no-op unless still filling)
                self.cache.fill_finished(self)
                if not self.finished.done():
                    self.finished.set_result(None)

    async def _take(self, response: OriginResponse, skip: int) -> None:
        """Stream `response` into the blocks from the first one not done (which may hold
        some bytes already), persisting each as it completes and counting it in
        `done`. UpstreamBodyError if the body ends or fails early."""
        current = self.done
        block = self.blocks[current]
        async for chunk in response.iter_body():
            self.stats.upstream_bytes += len(chunk)
            view = memoryview(chunk)
            if skip:
                # The origin ignored Range and sent the object from byte 0.
                dropped = min(skip, len(view))
                view, skip = view[dropped:], skip - dropped
            while view and current < len(self.blocks):
                if block.data is None:  # failed meanwhile: the record was dropped
                    raise NotCached("record dropped while filling")
                want = block.end - block.start - len(block.data)
                block.data += view[:want]
                view = view[want:]
                block.notify()
                if len(block.data) == block.end - block.start:
                    await self.cache.persist(block)
                    current = self.done = current + 1
                    if current < len(self.blocks):
                        block = self.blocks[current]
            if current == len(self.blocks):
                return
        if current < len(self.blocks):
            raise UpstreamBodyError("the origin sent fewer bytes than the range it announced")

    def _check(self, response: OriginResponse, offset: int) -> int:
        """Validate the origin's answer to a GET from object offset `offset`; returns
        how many leading bytes to skip."""
        if response.status in (404, 412):
            # 412: If-Match failed; 404: the object is gone. Either way this version is.
            raise ObjectChanged()
        if response.status >= 500:
            raise upstream_failure(response.status)
        if response.status not in (200, 206):
            raise errors.S3Error("BadGateway", f"The origin answered {response.status} to a block fill.", 502)
        etag = response.headers.get("ETag")
        if etag is not None and etag != self.record.etag:
            raise ObjectChanged()
        # The record's size came from one earlier answer's Content-Length (a 200) or
        # Content-Range total. If this answer gives another size for the same ETag, one
        # of them lied: the record cannot be trusted to say where blocks end (a record
        # too large would have fills fail, and answers end short, until it expired), so
        # it is dropped and the object learned afresh.
        if object_size(response.status, response.headers) not in (None, self.record.size):
            raise ObjectChanged()
        if response.status == 200:
            return offset  # whole object: skip to the first byte wanted
        content_range = response.headers.get("Content-Range", "")
        if not content_range.startswith(f"bytes {offset}-"):
            raise errors.S3Error("BadGateway", "The origin answered another range than asked.", 502)
        return 0


def upstream_failure(status: int) -> errors.S3Error:
    """The error a client gets when the origin still fails (5xx) after Sprox's retries:
    SlowDown stays SlowDown, so clients back off as the origin asked; a timeout stays a
    timeout; anything else is the origin's fault, a 502."""
    if status == 503:
        return errors.S3Error("SlowDown", "Please reduce your request rate.", 503)
    if status == 504:
        return errors.gateway_timeout("The upstream timed out.")
    if status == 500:
        return errors.S3Error("InternalError", "The upstream encountered an internal error. Please try again.", 500)
    return errors.bad_gateway(f"The upstream answered {status}.")


def block_parts(runs: list[tuple[int, int]], blocks_per_part: int) -> list[tuple[int, int]]:
    """Runs cut into parts of at most `blocks_per_part` blocks, in order: [(0, 9)] with
    4 per part -> [(0, 3), (4, 7), (8, 9)]."""
    parts: list[tuple[int, int]] = []
    for first, last in runs:
        for start in range(first, last + 1, blocks_per_part):
            parts.append((start, min(start + blocks_per_part - 1, last)))
    return parts


def block_runs(indexes: list[int]) -> list[tuple[int, int]]:
    """[1, 2, 3, 7, 8] -> [(1, 3), (7, 8)]: adjacent missing blocks share one GET."""
    runs: list[tuple[int, int]] = []
    for i in indexes:
        if runs and runs[-1][1] == i - 1:
            runs[-1] = (runs[-1][0], i)
        else:
            runs.append((i, i))
    return runs
