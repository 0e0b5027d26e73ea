"""What the local origin stores beside the bytes, and the JSON it is stored as.

- `ObjectRecord`: an object's S3 attributes (ETag, content type, metadata, ...), kept in
  its sidecar ``.sprox/meta/<bucket>/<hh>/<sha256>.json``.
- `Representation`: what a write asks to store with the bytes (from its headers).
- `UploadRecord`, `PartRecord`: a multipart upload in progress and its parts
  (``.sprox/uploads/<id>/upload.json`` and ``<nnnnn>.json``).

Plain data: nothing here touches the disk.
"""

from __future__ import annotations

import mimetypes
import os
from dataclasses import dataclass, field
from typing import Any

from ...s3 import errors

# Representation headers S3 stores with an object and returns on GET/HEAD.
STORED_HEADERS = ("Content-Disposition", "Content-Language", "Cache-Control", "Expires")
MAX_USER_METADATA = 2 * 1024
DEFAULT_CONTENT_TYPE = "binary/octet-stream"  # what S3 stores for a PUT without one
UNKNOWN_FILE_TYPE = "application/octet-stream"

StoredChecksum = tuple[str, str]  # (algorithm, base64 value), e.g. ("crc32", "NSRBwg==")


def _checksum_to_json(checksum: StoredChecksum | None) -> list[str] | None:
    return list(checksum) if checksum else None


def _checksum_from_json(data: Any) -> StoredChecksum | None:
    return (str(data[0]), str(data[1])) if data else None


def guess_content_type(key: str) -> str:
    """Content type for a file that appeared without metadata."""
    content_type, encoding = mimetypes.guess_type(key, strict=False)
    if encoding is not None:
        # "x.csv.gz" is gzip data, not CSV: without a Content-Encoding header a
        # client must not be told it is text.
        return {"gzip": "application/gzip", "bzip2": "application/x-bzip2",
                "xz": "application/x-xz"}.get(encoding, UNKNOWN_FILE_TYPE)
    return content_type or UNKNOWN_FILE_TYPE


@dataclass(slots=True)
class Representation:
    """What a write stores besides the bytes: content type and headers, user metadata."""

    content_type: str
    headers: dict[str, str]
    metadata: dict[str, str]

    @classmethod
    def from_request(cls, headers) -> Representation:
        stored: dict[str, str] = {}
        # aws-chunked describes the request's framing, not the object (S3 drops it).
        encodings = [token.strip() for token in headers.get("Content-Encoding", "").split(",")]
        encodings = [token for token in encodings if token and token.lower() != "aws-chunked"]
        if encodings:
            stored["Content-Encoding"] = ",".join(encodings)
        for name in STORED_HEADERS:
            value = headers.get(name)
            if value is not None:
                stored[name] = value
        metadata: dict[str, str] = {}
        for name in {n.lower() for n in headers if n.lower().startswith("x-amz-meta-")}:
            # Repeated headers are one value joined by commas, as S3 stores them.
            metadata[name] = ",".join(headers.getall(name))
        if sum(len(n) - len("x-amz-meta-") + len(v) for n, v in metadata.items()) > MAX_USER_METADATA:
            raise errors.S3Error("MetadataTooLarge",
                                 "Your metadata headers exceed the maximum allowed metadata size.", 400)
        return cls(headers.get("Content-Type") or DEFAULT_CONTENT_TYPE, stored, metadata)

    @classmethod
    def of(cls, record: ObjectRecord) -> Representation:
        return cls(record.content_type, dict(record.headers), dict(record.metadata))

    def to_json(self) -> dict[str, Any]:
        return {"content_type": self.content_type, "headers": self.headers, "metadata": self.metadata}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Representation:
        return cls(str(data["content_type"]), dict(data["headers"]), dict(data["metadata"]))


@dataclass(slots=True)
class ObjectRecord:
    """An object's S3 attributes besides its bytes, as kept in its sidecar.

    Valid for the file only while its size and mtime_ns are those recorded."""

    size: int
    mtime_ns: int
    etag: str  # without quotes: MD5 hex, or "<hex>-<parts>" for multipart objects
    content_type: str
    headers: dict[str, str] = field(default_factory=dict)  # STORED_HEADERS, Content-Encoding
    metadata: dict[str, str] = field(default_factory=dict)  # x-amz-meta-*, lower-case names
    part_sizes: list[int] | None = None  # multipart objects: size of each part, in order
    checksum: StoredChecksum | None = None  # of the whole object

    @classmethod
    def written(cls, st: os.stat_result, etag: str, representation: Representation, *,
                part_sizes: list[int] | None = None, checksum: StoredChecksum | None = None) -> ObjectRecord:
        """The record of a file Sprox has just written (`st` is its final stat)."""
        return cls(st.st_size, st.st_mtime_ns, etag, representation.content_type, representation.headers,
                   representation.metadata, part_sizes, checksum)

    @classmethod
    def guessed(cls, key: str, st: os.stat_result, etag: str) -> ObjectRecord:
        """The record of a file that appeared (or changed) without Sprox."""
        return cls(st.st_size, st.st_mtime_ns, etag, guess_content_type(key))

    @property
    def quoted_etag(self) -> str:
        return f'"{self.etag}"'

    @property
    def last_modified(self) -> float:
        return self.mtime_ns / 1e9

    def describes(self, st: os.stat_result) -> bool:
        return self.size == st.st_size and self.mtime_ns == st.st_mtime_ns

    def part_range(self, number: int) -> tuple[int, int]:
        """(offset, length) of part `number`; an object not uploaded in parts has one."""
        sizes = self.part_sizes or [self.size]
        if number > len(sizes):
            raise errors.S3Error("InvalidPartNumber", "The requested partnumber is not satisfiable", 416,
                                 extra={"PartNumberRequested": str(number), "ActualPartCount": str(len(sizes))})
        return sum(sizes[: number - 1]), sizes[number - 1]

    def to_json(self, key: str) -> dict[str, Any]:
        return {
            "key": key,  # for people reading the sidecar; never trusted
            "size": self.size,
            "mtime_ns": self.mtime_ns,
            "etag": self.etag,
            "content_type": self.content_type,
            "headers": self.headers,
            "metadata": self.metadata,
            "part_sizes": self.part_sizes,
            "checksum": _checksum_to_json(self.checksum),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ObjectRecord:
        return cls(
            size=int(data["size"]),
            mtime_ns=int(data["mtime_ns"]),
            etag=str(data["etag"]),
            content_type=str(data["content_type"]),
            headers=dict(data.get("headers") or {}),
            metadata=dict(data.get("metadata") or {}),
            part_sizes=list(data["part_sizes"]) if data.get("part_sizes") else None,
            checksum=_checksum_from_json(data.get("checksum")),
        )


@dataclass(slots=True)
class UploadRecord:
    """A multipart upload in progress (``uploads/<id>/upload.json``)."""

    upload_id: str
    bucket: str
    key: str
    initiated_ns: int
    representation: Representation
    checksum_algorithm: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"bucket": self.bucket, "key": self.key, "initiated_ns": self.initiated_ns,
                "representation": self.representation.to_json(),
                "checksum_algorithm": self.checksum_algorithm}

    @classmethod
    def from_json(cls, upload_id: str, data: dict[str, Any]) -> UploadRecord:
        return cls(upload_id, str(data["bucket"]), str(data["key"]), int(data["initiated_ns"]),
                   Representation.from_json(data["representation"]), data.get("checksum_algorithm"))


@dataclass(slots=True)
class PartRecord:
    """One uploaded part (``uploads/<id>/<nnnnn>.json``, beside ``<nnnnn>.part``)."""

    number: int
    etag: str  # MD5 hex, no quotes
    size: int
    mtime_ns: int
    checksum: StoredChecksum | None = None

    @property
    def quoted_etag(self) -> str:
        return f'"{self.etag}"'

    def to_json(self) -> dict[str, Any]:
        # The number is the file's name, not part of its content.
        return {"etag": self.etag, "size": self.size, "mtime_ns": self.mtime_ns,
                "checksum": _checksum_to_json(self.checksum)}

    @classmethod
    def from_json(cls, number: int, data: dict[str, Any]) -> PartRecord:
        return cls(number, str(data["etag"]), int(data["size"]), int(data["mtime_ns"]),
                   _checksum_from_json(data.get("checksum")))
