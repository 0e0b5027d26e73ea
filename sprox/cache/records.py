"""What Sprox knows about one version of one object: its identity (bucket, key, ETag),
its size, the headers to replay, and which blocks are on disk."""

from __future__ import annotations

import hashlib
import time
from array import array
from dataclasses import dataclass, field

from multidict import CIMultiDict

from ..s3.numbers import decimal, parse_content_range

# Upstream response headers that describe one response or one hop, not the object:
# never replayed from the cache. (x-amz-checksum-* describe a full-object response
# that asked for them; replaying them on a range would be wrong.)
_NOT_REPLAYED = frozenset({
    "date", "server", "connection", "keep-alive", "transfer-encoding", "content-length",
    "content-range", "accept-ranges", "etag", "last-modified", "x-amz-request-id", "x-amz-id-2",
    "x-amzn-requestid",  # (moto's and other AWS services' request id)
    "x-sprox-request-id", "x-amz-mp-parts-count", "x-cache", "x-amz-checksum-type", "vary",
    "access-control-allow-origin", "access-control-allow-methods", "access-control-allow-headers",
    "access-control-expose-headers", "access-control-max-age", "access-control-allow-credentials",
})


def replayable(name: str) -> bool:
    lower = name.lower()
    return lower not in _NOT_REPLAYED and not lower.startswith("x-amz-checksum-")


def checksum_headers(status: int, headers, asked: bool) -> tuple[tuple[str, str], ...] | None:
    """The object's `x-amz-checksum-*` headers (its type among them) from an origin
    answer that asked for them (`asked`: sent with x-amz-checksum-mode: ENABLED); None
    when the answer cannot tell: not asked, or a range, which S3 answers without them."""
    if not asked or status != 200:
        return None
    return tuple((k.lower(), v) for k, v in headers.items() if k.lower().startswith("x-amz-checksum-"))


def wants_checksums(headers) -> bool:
    """Whether a GET or HEAD asks for the object's checksums (S3 sends them only then)."""
    mode = headers.get("x-amz-checksum-mode")
    return mode is not None and mode.upper() == "ENABLED"


def object_size(status: int, headers) -> int | None:
    """The full object size from a 200 (Content-Length) or 206 (Content-Range total)."""
    if status == 206:
        span = parse_content_range(headers.get("Content-Range"))
        return span[2] if span is not None else None
    if status == 200:
        return decimal(headers.get("Content-Length"))
    return None


@dataclass(slots=True, eq=False)
class ObjectRecord:
    """One object version. `present` is a bitmap of blocks on disk, `crcs` their CRC32s.

    Blocks belong to this ETag only: a new ETag is a new record, so bytes of two
    versions can never be stitched together."""

    id: int
    bucket: str
    key: str
    etag: str  # as the upstream sent it, quotes included
    size: int
    last_modified: str
    headers: tuple[tuple[str, str], ...]
    validated_at: float
    block_size: int
    present: bytearray = field(default_factory=bytearray)
    crcs: array = field(default_factory=lambda: array("I"))
    # Blocks loaded from the index after a restart: their bytes are checked against
    # the CRC on first use, so a block lost in a power failure is a miss, never bad bytes.
    unverified: bytearray = field(default_factory=bytearray)
    # The object's x-amz-checksum-* headers, answered only to a full read that asks for
    # them (x-amz-checksum-mode: ENABLED), as S3 does; None until the origin told them.
    checksums: tuple[tuple[str, str], ...] | None = None
    # Its response headers rendered for the fast lane and the hit kernel (made on the
    # first hit by sprox/hithead.py), and with the checksum headers too.
    rendered: bytes | None = field(default=None, repr=False)
    rendered_with_checksums: bytes | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        blocks = self.block_count
        if not self.present:
            self.present = bytearray((blocks + 7) // 8)
            self.unverified = bytearray((blocks + 7) // 8)
        if not self.crcs:
            self.crcs = array("I", bytes(4 * blocks))

    @classmethod
    def from_response(cls, object_id: int, bucket: str, key: str, status: int, headers,
                      block_size: int, *, asked_checksums: bool = False) -> ObjectRecord | None:
        """`asked_checksums`: the request that got this answer asked for checksums."""
        etag = headers.get("ETag")
        size = object_size(status, headers)
        if not etag or size is None:
            return None
        replay = tuple((k, v) for k, v in headers.items() if replayable(k))
        return cls(object_id, bucket, key, etag, size, headers.get("Last-Modified", ""), replay,
                   time.time(), block_size, checksums=checksum_headers(status, headers, asked_checksums))

    def learned_checksums(self, checksums: tuple[tuple[str, str], ...]) -> None:
        self.checksums = checksums
        self.rendered_with_checksums = None

    @property
    def block_count(self) -> int:
        return (self.size + self.block_size - 1) // self.block_size

    def block_range(self, index: int) -> tuple[int, int]:
        """(start, end exclusive) of block `index`."""
        start = index * self.block_size
        return start, min(start + self.block_size, self.size)

    def has(self, index: int) -> bool:
        return bool(self.present[index >> 3] & (1 << (index & 7)))

    def set_present(self, index: int, crc: int, verified: bool = True) -> None:
        self.present[index >> 3] |= 1 << (index & 7)
        self.crcs[index] = crc
        if verified:
            self.unverified[index >> 3] &= ~(1 << (index & 7)) & 0xFF
        else:
            self.unverified[index >> 3] |= 1 << (index & 7)

    def clear(self, index: int) -> None:
        self.present[index >> 3] &= ~(1 << (index & 7)) & 0xFF
        self.unverified[index >> 3] &= ~(1 << (index & 7)) & 0xFF

    def is_unverified(self, index: int) -> bool:
        return bool(self.unverified[index >> 3] & (1 << (index & 7)))

    def present_blocks(self) -> list[int]:
        return [i for i in range(self.block_count) if self.has(i)]

    def block_bytes(self, index: int) -> int:
        start, end = self.block_range(index)
        return end - start

    @property
    def file_name(self) -> str:
        """Named by a hash of (bucket, key, ETag) and the record id, never by the key."""
        digest = hashlib.sha256(f"{self.bucket}\0{self.key}\0{self.etag}".encode()).hexdigest()[:32]
        return f"{digest[:2]}/{digest}-{self.id}.blk"


def response_headers(record: ObjectRecord) -> CIMultiDict:
    """The headers every answer from `record` carries (before Range and overrides)."""
    headers = CIMultiDict(record.headers)
    headers["ETag"] = record.etag
    if record.last_modified:
        headers["Last-Modified"] = record.last_modified
    headers["Accept-Ranges"] = "bytes"
    if "Content-Type" not in headers:
        headers["Content-Type"] = "binary/octet-stream"  # S3's default
    return headers
