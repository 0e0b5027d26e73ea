"""A local directory served as S3: the embedded default origin of `sprox serve`.

Every subdirectory of the root whose name is a valid bucket name is a bucket, and
every regular file below it is an object, so files a user drops into
``<root>/<bucket>/`` are served as they are. Sprox's own state lives in
``<root>/.sprox/`` (no bucket name starts with a dot)::

    <root>/<bucket>/<encoded key>                 the object's bytes, a plain file
    <root>/.sprox/meta/<bucket>/bucket.json       bucket creation time
    <root>/.sprox/meta/<bucket>/<hh>/<sha256>.json  object sidecar (see ObjectRecord)
    <root>/.sprox/tmp/                            files being written
    <root>/.sprox/uploads/<upload id>/            multipart uploads in progress

Keys map to paths segment by segment (split on "/"), see `encode_segment`: a
segment is kept as it is except that "%" is escaped where it could be read as an
escape, control characters are percent-encoded, and the segments "", "." and ".."
become "%", "%2E" and "%2E%2E". The mapping is injective and every encoded segment
is a plain file name, so no key (``../x``, ``a//b``, ``/x``, ``x/``, NUL, ...) can
reach outside its bucket directory. Names on disk that no key encodes to (invalid
UTF-8, ``a%2Fb``, ``%2e``) are neither listed nor served.

Sidecars are keyed by a hash of the key rather than mirroring the object tree: a
mirrored sidecar ``x.json`` would need to be a file for object ``x`` and a directory
for object ``x.json/y``, and the suffix would shorten the longest storable name. A
sidecar is valid only for the (size, mtime_ns) it records; a file changed or added by
hand gets its ETag recomputed (the MD5 of its bytes) and its content type guessed
from its name, and the result is cached in a new sidecar. Sprox keeps each key's
mtimes strictly increasing across its own writes, so two versions never share a
sidecar even when written within one tick of the file-system clock.

Every write goes to a temporary file in ``.sprox/tmp/`` and is renamed into place
(`os.replace`), so readers see the old object or the new one, never a mix. Deleting
an object removes the directories it leaves empty, as S3 has no empty folders.

Limitations of this layout, and where it differs from S3:

- An object and a "folder" of the same name cannot coexist: objects ``a`` and
  ``a/b`` would need ``a`` to be a file and a directory at once. Writing the second
  one fails with 409 ``ObjectConflict`` (a Sprox code, not an S3 one). ``a/`` (a
  folder marker) and ``a/b`` coexist fine.
- A key segment whose encoded form exceeds 255 bytes (the file-name limit of
  common file systems) fails with 400 ``KeyTooLongError``.
- Buckets that are symlinks to another file system cannot be written to (the
  atomic rename would cross file systems).
- No versioning, ACLs, tagging, object lock or bucket configuration: those
  operations answer 501 NotImplemented.
- `x-amz-checksum-*` values are verified when `sprox.s3.checksums` can compute the
  algorithm (CRC64NVME needs awscrt, CRC32C the crc32c package or awscrt);
  otherwise they are stored and returned unverified. Multipart uploads keep no
  composite checksum.
"""

from __future__ import annotations

import asyncio
import base64
import errno
import functools
import hashlib
import json
import logging
import mimetypes
import os
import re
import secrets
import shutil
import stat
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import quote, quote_plus, unquote

from multidict import CIMultiDict

from ..ranges import RangeNotSatisfiable, content_range, parse_range
from ..s3 import checksums, errors
from ..s3 import xml as s3xml
from ..s3.conditions import (
    apply_response_overrides,
    bare_etag,
    check_conditions,
    check_copy_source_conditions,
    etag_matches,
    http_date,
)
from ..s3.request import S3Request, valid_bucket_name
from .base import OriginResponse
from .s3 import UpstreamBodyError

log = logging.getLogger("sprox.local")

CHUNK_SIZE = 256 * 1024
MIN_PART_SIZE = 5 * 1024 * 1024
MAX_PART_NUMBER = 10_000
MAX_DELETE_KEYS = 1000
MAX_LIST_KEYS = 1000
# CompleteMultipartUpload lists up to 10,000 parts of ~100 bytes of XML each.
MAX_XML_BODY = 4 * 1024 * 1024
MAX_USER_METADATA = 2 * 1024
MAX_NAME_BYTES = 255
DEFAULT_CONTENT_TYPE = "binary/octet-stream"  # what S3 stores for a PUT without one
UNKNOWN_FILE_TYPE = "application/octet-stream"
REGION = "us-east-1"
OWNER_ID = "75aa57f09aa0c8caeab4f8c24e99d10f8e7faeebf76c078efc7c6caea54ba06a"
OWNER_NAME = "sprox"
STATE_DIR = ".sprox"
# Temporary files older than this at start-up were left by a crash.
STALE_TEMP_SECONDS = 3600

# Representation headers S3 stores with an object and returns on GET/HEAD.
STORED_HEADERS = ("Content-Disposition", "Content-Language", "Cache-Control", "Expires")
CHECKSUM_ALGORITHMS = checksums.ALGORITHMS
_CHECKSUM_SIZES = {"crc32": 4, "crc32c": 4, "crc64nvme": 8, "sha1": 20, "sha256": 32}
_UPLOAD_ID = re.compile(r"[A-Za-z0-9_-]{16,128}")


def object_conflict(key: str) -> errors.S3Error:
    return errors.S3Error(
        "ObjectConflict",
        f"The local-directory origin stores each object as a file, so an object cannot "
        f"share its name with a folder of other objects (as 'a' and 'a/b' would): "
        f"{key!r} conflicts with an existing object or folder.",
        409,
        extra={"Key": key},
    )


def key_too_long() -> errors.S3Error:
    return errors.S3Error("KeyTooLongError", "Your key is too long", 400)


# --- keys <-> file names -------------------------------------------------------------

_SPECIAL_SEGMENTS = {"": "%", ".": "%2E", "..": "%2E%2E"}
_SPECIAL_NAMES = {name: segment for segment, name in _SPECIAL_SEGMENTS.items()}
_NEEDS_ENCODING = re.compile(r"[%\x00-\x1f\x7f-\x9f]")
_TWO_HEX = re.compile(r"[0-9A-Fa-f]{2}")
_ESCAPE_RUN = re.compile(r"(?:%[0-9A-Fa-f]{2})+")


def _percent(char: str) -> str:
    return "".join(f"%{byte:02X}" for byte in char.encode())


def encode_segment(segment: str) -> str:
    """The file name for one "/"-separated segment of a key.

    Injective, and never "", ".", ".." or anything containing "/" or NUL. A "%" is
    escaped ("%25") only where it could be read back as an escape (before two hex
    digits, or as the whole name), so that names a user drops in, such as
    ``100%.csv``, are served under the key they look like."""
    special = _SPECIAL_SEGMENTS.get(segment)
    if special is not None:
        return special
    if segment == "%":
        return "%25"
    if not _NEEDS_ENCODING.search(segment):
        return segment
    out = []
    for index, char in enumerate(segment):
        if char == "%":
            out.append("%25" if _TWO_HEX.match(segment, index + 1) else "%")
        elif char < "\x20" or "\x7f" <= char <= "\x9f":
            out.append(_percent(char))
        else:
            out.append(char)
    return "".join(out)


def _unescape(match: re.Match[str]) -> str:
    return bytes.fromhex(match.group().replace("%", "")).decode("utf-8")


def decode_segment(name: str) -> str | None:
    """The key segment a file name stands for, or None if no key encodes to it."""
    special = _SPECIAL_NAMES.get(name)
    if special is not None:
        return special
    try:
        segment = _ESCAPE_RUN.sub(_unescape, name) if "%" in name else name
        # os.listdir gives undecodable bytes as lone surrogates: not a key.
        segment.encode("utf-8")
    except UnicodeError:
        return None
    return segment if encode_segment(segment) == name else None


def key_to_names(key: str) -> list[str]:
    """The path components, below the bucket directory, of the file holding `key`."""
    names = [encode_segment(segment) for segment in key.split("/")]
    if any(len(name.encode("utf-8", "surrogateescape")) > MAX_NAME_BYTES for name in names):
        raise key_too_long()
    return names


# --- formatting ----------------------------------------------------------------------


def iso8601(mtime_ns: int) -> str:
    """S3's timestamp in XML: ``2009-10-12T17:50:30.123Z``."""
    seconds, rest = divmod(mtime_ns, 1_000_000_000)
    moment = datetime.fromtimestamp(seconds, tz=timezone.utc)
    return f"{moment:%Y-%m-%dT%H:%M:%S}.{rest // 1_000_000:03d}Z"


def s3_url_encode(value: str) -> str:
    """S3's `encoding-type=url` form: query escaping (space as "+"), keeping "/" and
    "*" and escaping "~"; botocore undoes it with `unquote_plus`."""
    return quote_plus(value, safe="/*").replace("~", "%7E")


def _owner() -> list[s3xml.Node]:
    return [("ID", OWNER_ID), ("DisplayName", OWNER_NAME)]


# --- what is stored beside an object -------------------------------------------------


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
    checksum: tuple[str, str] | None = None  # (algorithm, base64 value) of the whole object

    @property
    def quoted_etag(self) -> str:
        return f'"{self.etag}"'

    @property
    def last_modified(self) -> float:
        return self.mtime_ns / 1e9

    def describes(self, st: os.stat_result) -> bool:
        return self.size == st.st_size and self.mtime_ns == st.st_mtime_ns

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
            "checksum": list(self.checksum) if self.checksum else None,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ObjectRecord:
        checksum = data.get("checksum")
        return cls(
            size=int(data["size"]),
            mtime_ns=int(data["mtime_ns"]),
            etag=str(data["etag"]),
            content_type=str(data["content_type"]),
            headers=dict(data.get("headers") or {}),
            metadata=dict(data.get("metadata") or {}),
            part_sizes=list(data["part_sizes"]) if data.get("part_sizes") else None,
            checksum=(str(checksum[0]), str(checksum[1])) if checksum else None,
        )


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


def guess_content_type(key: str) -> str:
    """Content type for a file that appeared without metadata."""
    content_type, encoding = mimetypes.guess_type(key, strict=False)
    if encoding is not None:
        # "x.csv.gz" is gzip data, not CSV: without a Content-Encoding header a
        # client must not be told it is text.
        return {"gzip": "application/gzip", "bzip2": "application/x-bzip2",
                "xz": "application/x-xz"}.get(encoding, UNKNOWN_FILE_TYPE)
    return content_type or UNKNOWN_FILE_TYPE


# --- checksums -----------------------------------------------------------------------


def _decode_checksum(algorithm: str, value: str) -> bytes:
    try:
        raw = base64.b64decode(value, validate=True)
    except ValueError:
        raw = b""
    if len(raw) != _CHECKSUM_SIZES[algorithm]:
        raise errors.invalid_request(f"Value for x-amz-checksum-{algorithm} header is invalid.")
    return raw


@dataclass(slots=True)
class ChecksumPlan:
    """Which integrity checks a write's headers ask for, decided before the body."""

    content_md5: bytes | None = None
    algorithm: str | None = None
    expected: str | None = None  # base64; for trailers known only after the body
    from_trailer: bool = False

    @classmethod
    def from_request(cls, headers) -> ChecksumPlan:
        plan = cls()
        md5 = headers.get("Content-MD5")
        if md5 is not None:
            try:
                plan.content_md5 = base64.b64decode(md5, validate=True)
            except ValueError:
                plan.content_md5 = b""
            if len(plan.content_md5) != 16:
                raise errors.S3Error("InvalidDigest", "The Content-MD5 you specified was invalid.", 400)

        present = [alg for alg in CHECKSUM_ALGORITHMS if f"x-amz-checksum-{alg}" in headers]
        trailer = headers.get("x-amz-trailer", "").strip().lower()
        if trailer:
            algorithm = trailer.removeprefix("x-amz-checksum-")
            if not trailer.startswith("x-amz-checksum-") or algorithm not in CHECKSUM_ALGORITHMS:
                raise errors.invalid_request("The value specified in the x-amz-trailer header is not supported")
            present.append(algorithm)
            plan.from_trailer = True
        if len(present) > 1:
            raise errors.invalid_request(
                "Expecting a single x-amz-checksum- header. Multiple checksum Types are not allowed.")
        if present:
            plan.algorithm = present[0]
            if not plan.from_trailer:
                plan.expected = headers[f"x-amz-checksum-{plan.algorithm}"]
                _decode_checksum(plan.algorithm, plan.expected)
            return plan
        declared = headers.get("x-amz-sdk-checksum-algorithm") or headers.get("x-amz-checksum-algorithm")
        if declared:
            if declared.lower() not in CHECKSUM_ALGORITHMS:
                raise errors.invalid_request("Checksum algorithm provided is unsupported. Please try again "
                                             "with any of the valid types: [CRC32, CRC32C, CRC64NVME, SHA1, SHA256]")
            plan.algorithm = declared.lower()  # computed and returned, nothing to verify
        return plan

    def hasher(self) -> checksums.Checksum | None:
        """A running checksum for the body, None if there is nothing Sprox can compute."""
        if self.algorithm and checksums.supported(self.algorithm):
            return checksums.Checksum(self.algorithm)
        return None

    def verify(self, md5: bytes, computed: str | None, trailers: dict[str, str]) -> tuple[str, str] | None:
        """Check the body's digests; the object's (algorithm, value) checksum if any."""
        if self.content_md5 is not None and self.content_md5 != md5:
            raise errors.S3Error("BadDigest", "The Content-MD5 you specified did not match what we received.", 400)
        if self.algorithm is None:
            return None
        expected = self.expected
        if self.from_trailer:
            name = f"x-amz-checksum-{self.algorithm}"
            expected = next((v for k, v in trailers.items() if k.lower() == name), None)
            if expected is not None:
                _decode_checksum(self.algorithm, expected)
        if computed is None:  # an algorithm Sprox cannot compute: keep the client's word
            return (self.algorithm, expected) if expected else None
        if expected is not None and base64.b64decode(expected) != base64.b64decode(computed):
            raise errors.S3Error(
                "BadDigest",
                f"The {self.algorithm.upper()} you specified did not match the calculated checksum.", 400)
        return self.algorithm, computed


# --- blocking file-system work (always called from worker threads) -------------------


class TempFile:
    """A file being written in the state directory's tmp/, hashed as it is written.

    Blocking; owned by one request. `commit` hands the path over (to a rename);
    `discard` removes whatever is left and is safe to call at any time."""

    def __init__(self, tmp_dir: str, *, checksum=None, md5: bool = True) -> None:
        self.fd, self.path = tempfile.mkstemp(dir=tmp_dir, prefix="w-")
        self.md5 = hashlib.md5(usedforsecurity=False) if md5 else None
        self.checksum = checksum
        self.size = 0
        self._owned = True

    def write(self, chunks: list[bytes]) -> None:
        for chunk in chunks:
            if self.md5 is not None:
                self.md5.update(chunk)
            if self.checksum is not None:
                self.checksum.update(chunk)
            view = memoryview(chunk)
            while view:
                written = os.write(self.fd, view)
                view = view[written:]
            self.size += len(chunk)

    def copy_from(self, src_fd: int, offset: int, length: int) -> None:
        """Append `length` bytes of `src_fd` from `offset`; the kernel copies them
        when nothing needs hashing."""
        end = offset + length
        while offset < end:
            count = min(CHUNK_SIZE * 16, end - offset)
            if self.md5 is None and self.checksum is None:
                try:
                    copied = os.copy_file_range(src_fd, self.fd, count, offset)
                except OSError as exc:
                    if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
                        raise
                    copied = self._copy_by_reading(src_fd, offset, min(count, CHUNK_SIZE))
            else:
                copied = self._copy_by_reading(src_fd, offset, min(count, CHUNK_SIZE))
            if copied == 0:
                raise OSError(errno.EIO, "source file shrank while being copied")
            offset += copied

    def _copy_by_reading(self, src_fd: int, offset: int, count: int) -> int:
        data = os.pread(src_fd, count, offset)
        if data:
            self.write([data])
        return len(data)

    def finish(self) -> os.stat_result:
        """Close the file; its final size and mtime (which a rename keeps)."""
        st = os.fstat(self.fd)
        os.close(self.fd)
        self.fd = -1
        return st

    def commit(self) -> str:
        self._owned = False
        return self.path

    def discard(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self._owned:
            self._owned = False
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass


@dataclass(slots=True)
class OpenObject:
    """An object opened for reading: the descriptor pins the bytes `record` describes."""

    fd: int
    record: ObjectRecord

    def close(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)


@dataclass(slots=True)
class ListedObject:
    key: str
    record: ObjectRecord


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
    number: int
    etag: str  # MD5 hex, no quotes
    size: int
    mtime_ns: int
    checksum: tuple[str, str] | None = None


class _KeyWalk:
    """Keys of one bucket in UTF-8 binary order, walking only the directories that can
    hold keys under `prefix` and after `start`.

    The consumer may set `skip` to a string: every key starting with it is then
    skipped without being visited (a common prefix already reported)."""

    def __init__(self, prefix: str, start: str) -> None:
        self.prefix = prefix
        self.start = start
        self.skip: str | None = None

    def keys(self, directory: str, key_prefix: str = "",
             ancestors: frozenset[tuple[int, int]] = frozenset()) -> Iterator[tuple[str, str]]:
        for name, is_dir, path, identity in self._entries(directory, key_prefix):
            if self.skip is not None and name.startswith(self.skip):
                continue
            if is_dir:
                # `name` ends with "/": every key below starts with it.
                if not (name.startswith(self.prefix) or self.prefix.startswith(name)):
                    continue
                if not (name > self.start or self.start.startswith(name)):
                    continue
                if identity in ancestors:  # a symlink loop
                    continue
                yield from self.keys(path, name, ancestors | {identity})
            elif name and name.startswith(self.prefix) and name > self.start:
                yield name, path

    @staticmethod
    def _entries(directory: str, key_prefix: str) -> list[tuple[str, bool, str, tuple[int, int]]]:
        entries = []
        try:
            with os.scandir(directory) as scan:
                for entry in scan:
                    segment = decode_segment(entry.name)
                    if segment is None:
                        continue
                    try:
                        if entry.is_dir():
                            st = entry.stat()
                            entries.append((key_prefix + segment + "/", True, entry.path, (st.st_dev, st.st_ino)))
                        elif entry.is_file():
                            entries.append((key_prefix + segment, False, entry.path, (0, 0)))
                    except OSError:
                        continue  # vanished or unreadable: not an object
        except (FileNotFoundError, NotADirectoryError, PermissionError):
            return []
        # Sorting a directory "d" as "d/" puts all its keys exactly where they belong
        # among its siblings; str order is code point order, which is UTF-8 byte order.
        entries.sort()
        return entries


class DirectoryStore:
    """The blocking half of the local origin: files, sidecars, locks.

    Every method may block on the file system and must run in a worker thread.
    Methods raise `S3Error` for conditions S3 reports."""

    def __init__(self, root: Path) -> None:
        self.root = str(root)
        self.state = os.path.join(self.root, STATE_DIR)
        self.tmp = os.path.join(self.state, "tmp")
        self.meta = os.path.join(self.state, "meta")
        self.uploads = os.path.join(self.state, "uploads")
        # Striped locks serialise "sidecar + rename" against sidecar refreshes of the
        # same key (and part writes against completion of the same upload). Sprox is
        # the only writer it coordinates with; files edited by hand are caught by the
        # (size, mtime_ns) check instead.
        self._locks = [threading.Lock() for _ in range(64)]

    def _lock(self, *identity: str) -> threading.Lock:
        return self._locks[hash(identity) % len(self._locks)]

    # -- start-up ---------------------------------------------------------------------

    def prepare(self) -> None:
        for directory in (self.root, self.tmp, self.meta, self.uploads):
            os.makedirs(directory, exist_ok=True)
        cutoff = time.time() - STALE_TEMP_SECONDS
        with os.scandir(self.tmp) as scan:
            for entry in scan:
                try:
                    if entry.is_file(follow_symlinks=False) and entry.stat().st_mtime < cutoff:
                        os.unlink(entry.path)
                except OSError:
                    pass

    def new_temp(self, *, checksum=None, md5: bool = True) -> TempFile:
        return TempFile(self.tmp, checksum=checksum, md5=md5)

    def _write_json(self, path: str, data: dict[str, Any]) -> None:
        """Atomically replace `path` with `data` as JSON."""
        fd, tmp_path = tempfile.mkstemp(dir=self.tmp, prefix="j-")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as out:
                json.dump(data, out)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            os.replace(tmp_path, path)
        except BaseException:
            try:
                os.unlink(tmp_path)
            except FileNotFoundError:
                pass
            raise

    @staticmethod
    def _read_json(path: str) -> dict[str, Any] | None:
        try:
            with open(path, encoding="utf-8") as source:
                data = json.load(source)
        except (FileNotFoundError, NotADirectoryError):
            return None
        except (OSError, ValueError) as exc:
            log.warning("ignoring unreadable state file %s: %s", path, exc)
            return None
        return data if isinstance(data, dict) else None

    # -- buckets ----------------------------------------------------------------------

    def bucket_dir(self, bucket: str) -> str:
        """The directory of an existing bucket; NoSuchBucket otherwise."""
        if not valid_bucket_name(bucket):  # parse_request checks too; never trust a path
            raise errors.no_such_bucket(bucket)
        path = os.path.join(self.root, bucket)
        if not os.path.isdir(path):
            raise errors.no_such_bucket(bucket)
        return path

    def _bucket_meta(self, bucket: str) -> str:
        return os.path.join(self.meta, bucket)

    def list_buckets(self) -> list[tuple[str, int]]:
        """(name, creation time in ns) of every bucket, by name."""
        buckets = []
        with os.scandir(self.root) as scan:
            for entry in scan:
                if not valid_bucket_name(entry.name):
                    continue  # ".sprox", "lost+found", ...: never buckets
                try:
                    if not entry.is_dir():
                        continue
                    created = entry.stat().st_mtime_ns
                except OSError:
                    continue
                info = self._read_json(os.path.join(self._bucket_meta(entry.name), "bucket.json"))
                if info and isinstance(info.get("created_ns"), int):
                    created = info["created_ns"]
                buckets.append((entry.name, created))
        buckets.sort()
        return buckets

    def create_bucket(self, bucket: str) -> None:
        path = os.path.join(self.root, bucket)
        try:
            os.mkdir(path)
        except FileExistsError:
            raise errors.bucket_already_owned(bucket) from None
        # A bucket deleted by hand may have left sidecars behind: they must not
        # describe the new bucket's objects.
        shutil.rmtree(self._bucket_meta(bucket), ignore_errors=True)
        self._write_json(os.path.join(self._bucket_meta(bucket), "bucket.json"), {"created_ns": time.time_ns()})

    def delete_bucket(self, bucket: str) -> None:
        path = self.bucket_dir(bucket)
        for directory, dirs, files in os.walk(path):
            # Anything but a real directory counts, listed as an object or not.
            if files or any(os.path.islink(os.path.join(directory, d)) for d in dirs):
                raise errors.bucket_not_empty(bucket)
        # Only empty directories are left: remove them deepest first.
        for directory, _dirs, _files in os.walk(path, topdown=False):
            try:
                os.rmdir(directory)
            except OSError as exc:
                if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
                    raise errors.bucket_not_empty(bucket) from None  # written meanwhile
                raise
        shutil.rmtree(self._bucket_meta(bucket), ignore_errors=True)
        for upload in self._uploads(bucket):
            shutil.rmtree(os.path.join(self.uploads, upload.upload_id), ignore_errors=True)

    # -- objects: paths and sidecars --------------------------------------------------

    def object_path(self, bucket_dir: str, key: str) -> str:
        return os.path.join(bucket_dir, *key_to_names(key))

    def _sidecar_path(self, bucket: str, key: str) -> str:
        digest = hashlib.sha256(key.encode()).hexdigest()
        return os.path.join(self._bucket_meta(bucket), digest[:2], digest + ".json")

    def _read_sidecar(self, bucket: str, key: str) -> ObjectRecord | None:
        data = self._read_json(self._sidecar_path(bucket, key))
        if data is None:
            return None
        try:
            return ObjectRecord.from_json(data)
        except (KeyError, TypeError, ValueError):
            return None

    def _record_for(self, bucket: str, key: str, path: str, st: os.stat_result, fd: int | None = None) -> ObjectRecord:
        """The record describing the file `st` describes, computing (and caching) it
        when the file was added or changed outside Sprox."""
        stored = self._read_sidecar(bucket, key)
        if stored is not None and stored.describes(st):
            return stored
        etag = self._md5_of(path, st.st_size, fd)
        if stored is not None and stored.part_sizes is None and stored.etag == etag:
            # Same bytes, new mtime (touched, copied with a new date): keep its metadata.
            record = replace(stored, size=st.st_size, mtime_ns=st.st_mtime_ns)
        else:
            record = ObjectRecord(st.st_size, st.st_mtime_ns, etag, guess_content_type(key))
        with self._lock(bucket, key):
            try:
                current = os.stat(path)
            except OSError:
                return record
            if not record.describes(current):
                return record  # replaced meanwhile: describe what we read, cache nothing
            # A PUT may have committed this very file (and its sidecar) while we
            # hashed it: its sidecar knows more than a guess.
            stored = self._read_sidecar(bucket, key)
            if stored is not None and stored.describes(current):
                return stored
            self._write_json(self._sidecar_path(bucket, key), record.to_json(key))
        return record

    @staticmethod
    def _md5_of(path: str, size: int, fd: int | None) -> str:
        digest = hashlib.md5(usedforsecurity=False)
        own_fd = fd is None
        if own_fd:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        try:
            offset = 0
            while offset < size:
                data = os.pread(fd, min(CHUNK_SIZE * 4, size - offset), offset)
                if not data:
                    break
                digest.update(data)
                offset += len(data)
        finally:
            if own_fd:
                os.close(fd)
        return digest.hexdigest()

    # -- objects: reading -------------------------------------------------------------

    def open_object(self, bucket: str, key: str) -> OpenObject:
        """Open an object for reading; NoSuchBucket / NoSuchKey if absent."""
        bucket_dir = self.bucket_dir(bucket)
        try:
            path = self.object_path(bucket_dir, key)
        except errors.S3Error:
            raise errors.no_such_key(key) from None  # too long to exist
        try:
            # O_NONBLOCK: a FIFO dropped into the bucket must not hang a worker.
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            raise errors.no_such_key(key) from None
        except PermissionError:
            raise errors.access_denied() from None
        except OSError as exc:
            if exc.errno in (errno.ENAMETOOLONG, errno.ELOOP):
                raise errors.no_such_key(key) from None
            raise
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise errors.no_such_key(key)
            return OpenObject(fd, self._record_for(bucket, key, path, st, fd))
        except BaseException:
            os.close(fd)
            raise

    def head_object(self, bucket: str, key: str) -> ObjectRecord | None:
        """The record of an existing object, None if there is none."""
        try:
            opened = self.open_object(bucket, key)
        except errors.S3Error as exc:
            if exc.code == "NoSuchKey":
                return None
            raise
        opened.close()
        return opened.record

    # -- objects: writing -------------------------------------------------------------

    def commit_object(self, bucket: str, key: str, temp: TempFile,
                      make_record: Callable[[os.stat_result], ObjectRecord],
                      precondition: Callable[[ObjectRecord | None], None] | None = None) -> ObjectRecord:
        """Move a finished temp file into place as `key`, with its sidecar.

        `precondition`, if given, sees the current object (or None) under the key's
        lock and may raise to refuse the write (conditional PUT)."""
        bucket_dir = self.bucket_dir(bucket)
        names = key_to_names(key)
        path = os.path.join(bucket_dir, *names)
        st = temp.finish()
        with self._lock(bucket, key):
            if precondition is not None:
                precondition(self._current_record(bucket, key, path))
            st = self._later_than_current(temp.path, st, path)
            record = make_record(st)
            for _attempt in range(5):
                try:
                    self._make_parents(bucket_dir, names, key)
                    os.replace(temp.path, path)
                except FileNotFoundError:
                    # A delete pruned an empty parent directory meanwhile: redo it.
                    if not os.path.isdir(bucket_dir):
                        raise errors.no_such_bucket(bucket) from None
                    continue
                except IsADirectoryError:
                    # An empty directory (left by hand) is not an object: replace it.
                    try:
                        os.rmdir(path)
                    except OSError:
                        raise object_conflict(key) from None
                    continue
                except NotADirectoryError:
                    raise object_conflict(key) from None
                except OSError as exc:
                    if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
                        raise object_conflict(key) from None
                    if exc.errno == errno.ENAMETOOLONG:
                        raise key_too_long() from None
                    raise
                temp.commit()
                # Under the lock, so no reader caches a guess for the new file first.
                self._write_json(self._sidecar_path(bucket, key), record.to_json(key))
                return record
        raise errors.internal_error()

    @staticmethod
    def _later_than_current(temp_path: str, st: os.stat_result, path: str) -> os.stat_result:
        """Make the new version's mtime later than the current one's.

        File times only move with the kernel's clock tick, so two quick writes of the
        same size could look identical to the (size, mtime_ns) check, and a reader
        still holding the old file would take the new sidecar (and ETag) for it.
        Strictly increasing mtimes per key rule that out."""
        try:
            current = os.stat(path).st_mtime_ns
        except OSError:
            return st
        if st.st_mtime_ns > current:
            return st
        os.utime(temp_path, ns=(st.st_atime_ns, current + 1))
        return os.stat(temp_path)

    def _current_record(self, bucket: str, key: str, path: str) -> ObjectRecord | None:
        try:
            st = os.stat(path)
        except OSError:
            return None
        if not stat.S_ISREG(st.st_mode):
            return None
        return self._record_for_locked(bucket, key, path, st)

    def _record_for_locked(self, bucket: str, key: str, path: str, st: os.stat_result) -> ObjectRecord:
        stored = self._read_sidecar(bucket, key)
        if stored is not None and stored.describes(st):
            return stored
        return ObjectRecord(st.st_size, st.st_mtime_ns, self._md5_of(path, st.st_size, None), guess_content_type(key))

    @staticmethod
    def _make_parents(bucket_dir: str, names: list[str], key: str) -> None:
        directory = bucket_dir
        for name in names[:-1]:
            directory = os.path.join(directory, name)
            for _attempt in range(5):
                try:
                    os.mkdir(directory)
                    break
                except FileExistsError:
                    try:
                        if not stat.S_ISDIR(os.stat(directory).st_mode):
                            raise object_conflict(key) from None
                        break
                    except FileNotFoundError:
                        continue  # pruned by a delete between the two calls: again

    def delete_object(self, bucket: str, key: str) -> None:
        """Remove an object if it exists, and the directories it leaves empty."""
        bucket_dir = self.bucket_dir(bucket)
        try:
            names = key_to_names(key)
        except errors.S3Error:
            return  # too long to exist
        path = os.path.join(bucket_dir, *names)
        with self._lock(bucket, key):
            try:
                if stat.S_ISDIR(os.lstat(path).st_mode):
                    return  # a folder of other keys, not this key
                os.unlink(path)
            except (FileNotFoundError, NotADirectoryError):
                pass
            try:
                os.unlink(self._sidecar_path(bucket, key))
            except FileNotFoundError:
                pass
        directory = os.path.dirname(path)
        while len(directory) > len(bucket_dir):
            try:
                os.rmdir(directory)
            except OSError:
                break  # not empty (or already gone): stop climbing
            directory = os.path.dirname(directory)

    # -- listing ----------------------------------------------------------------------

    def list_entries(self, bucket: str, prefix: str, delimiter: str, start: str,
                     limit: int) -> tuple[list[ListedObject | str], bool]:
        """Up to `limit` entries (objects, or common-prefix strings when `delimiter`
        is set) after `start`, in S3 order; and whether more follow.

        As in S3, `start` is compared with entries after the roll-up: a common prefix
        at or before `start` is skipped with all its keys (so a NextMarker that is a
        common prefix resumes after it)."""
        bucket_dir = self.bucket_dir(bucket)
        walk = _KeyWalk(prefix, start)
        entries: list[ListedObject | str] = []
        top = os.stat(bucket_dir)
        for key, path in walk.keys(bucket_dir, "", frozenset({(top.st_dev, top.st_ino)})):
            if delimiter:
                found = key.find(delimiter, len(prefix))
                if found >= 0:
                    common = key[: found + len(delimiter)]
                    walk.skip = common
                    if common <= start:
                        continue
                    if len(entries) == limit:
                        return entries, True
                    entries.append(common)
                    continue
            try:
                record = self._record_for(bucket, key, path, os.stat(path))
            except OSError:
                continue  # deleted while listing
            if len(entries) == limit:
                return entries, True
            entries.append(ListedObject(key, record))
        return entries, False

    # -- multipart uploads ------------------------------------------------------------

    def _upload_dir(self, upload_id: str) -> str:
        return os.path.join(self.uploads, upload_id)

    def create_upload(self, bucket: str, key: str, representation: Representation,
                      checksum_algorithm: str | None) -> UploadRecord:
        self.bucket_dir(bucket)
        key_to_names(key)  # refuse keys that could never be completed
        upload = UploadRecord(secrets.token_urlsafe(32), bucket, key, time.time_ns(), representation,
                              checksum_algorithm)
        os.mkdir(self._upload_dir(upload.upload_id))
        self._write_json(os.path.join(self._upload_dir(upload.upload_id), "upload.json"), upload.to_json())
        return upload

    def get_upload(self, bucket: str, key: str, upload_id: str) -> UploadRecord:
        """An upload in progress for this bucket and key; NoSuchUpload otherwise."""
        self.bucket_dir(bucket)
        # Upload ids become path names: only our own format may get near the disk.
        if not _UPLOAD_ID.fullmatch(upload_id):
            raise errors.no_such_upload(upload_id)
        data = self._read_json(os.path.join(self._upload_dir(upload_id), "upload.json"))
        if data is None:
            raise errors.no_such_upload(upload_id)
        upload = UploadRecord.from_json(upload_id, data)
        if upload.bucket != bucket or upload.key != key:
            raise errors.no_such_upload(upload_id)
        return upload

    def commit_part(self, upload: UploadRecord, number: int, temp: TempFile,
                    checksum: tuple[str, str] | None) -> PartRecord:
        directory = self._upload_dir(upload.upload_id)
        st = temp.finish()
        assert temp.md5 is not None
        part = PartRecord(number, temp.md5.hexdigest(), st.st_size, st.st_mtime_ns, checksum)
        with self._lock("upload", upload.upload_id):
            if not os.path.isdir(directory):
                raise errors.no_such_upload(upload.upload_id)  # aborted meanwhile
            os.replace(temp.path, os.path.join(directory, f"{number:05d}.part"))
            temp.commit()
            self._write_json(os.path.join(directory, f"{number:05d}.json"),
                             {"etag": part.etag, "size": part.size, "mtime_ns": part.mtime_ns,
                              "checksum": list(checksum) if checksum else None})
        return part

    def list_parts(self, upload: UploadRecord) -> list[PartRecord]:
        directory = self._upload_dir(upload.upload_id)
        parts = []
        try:
            names = sorted(os.listdir(directory))
        except FileNotFoundError:
            raise errors.no_such_upload(upload.upload_id) from None
        for name in names:
            if not (name.endswith(".json") and name[:5].isdigit() and len(name) == 10):
                continue
            data = self._read_json(os.path.join(directory, name))
            if data is None:
                continue
            checksum = data.get("checksum")
            parts.append(PartRecord(int(name[:5]), str(data["etag"]), int(data["size"]), int(data["mtime_ns"]),
                                    (checksum[0], checksum[1]) if checksum else None))
        return parts

    def complete_upload(self, upload: UploadRecord, requested: list[tuple[int, str]]) -> ObjectRecord:
        """Assemble the listed parts into the object; the upload is gone afterwards."""
        directory = self._upload_dir(upload.upload_id)
        opened: list[tuple[int, PartRecord]] = []
        try:
            with self._lock("upload", upload.upload_id):
                # Open every part under the lock: the descriptors pin exactly the
                # bytes the recorded ETags describe, whatever is uploaded next.
                if not os.path.isdir(directory):
                    raise errors.no_such_upload(upload.upload_id)
                stored = {part.number: part for part in self.list_parts(upload)}
                for number, etag in requested:
                    part = stored.get(number)
                    if part is None or part.etag != bare_etag(etag):
                        raise _invalid_part(number, etag)
                    try:
                        fd = os.open(os.path.join(directory, f"{number:05d}.part"), os.O_RDONLY | os.O_CLOEXEC)
                    except FileNotFoundError:
                        raise _invalid_part(number, etag) from None
                    opened.append((fd, part))
                    if os.fstat(fd).st_size != part.size:
                        raise _invalid_part(number, etag)
            for index, (_fd, part) in enumerate(opened[:-1]):
                if part.size < MIN_PART_SIZE:
                    raise errors.S3Error(
                        "EntityTooSmall", "Your proposed upload is smaller than the minimum allowed object size.",
                        400, extra={"ProposedSize": str(part.size), "MinSizeAllowed": str(MIN_PART_SIZE),
                                    "PartNumber": str(part.number), "ETag": f'"{part.etag}"'})
            combined = hashlib.md5(b"".join(bytes.fromhex(part.etag) for _fd, part in opened),
                                   usedforsecurity=False)
            etag = f"{combined.hexdigest()}-{len(opened)}"
            sizes = [part.size for _fd, part in opened]
            temp = self.new_temp(md5=False)
            try:
                for fd, part in opened:
                    temp.copy_from(fd, 0, part.size)
                rep = upload.representation
                record = self.commit_object(
                    upload.bucket, upload.key, temp,
                    lambda st: ObjectRecord(st.st_size, st.st_mtime_ns, etag, rep.content_type, rep.headers,
                                            rep.metadata, sizes))
            finally:
                temp.discard()
        finally:
            for fd, _part in opened:
                os.close(fd)
        shutil.rmtree(directory, ignore_errors=True)
        return record

    def abort_upload(self, upload: UploadRecord) -> None:
        with self._lock("upload", upload.upload_id):
            shutil.rmtree(self._upload_dir(upload.upload_id), ignore_errors=True)

    def _uploads(self, bucket: str) -> list[UploadRecord]:
        uploads = []
        try:
            names = os.listdir(self.uploads)
        except FileNotFoundError:
            return []
        for upload_id in names:
            if not _UPLOAD_ID.fullmatch(upload_id):
                continue
            data = self._read_json(os.path.join(self._upload_dir(upload_id), "upload.json"))
            if data is None:
                continue
            try:
                upload = UploadRecord.from_json(upload_id, data)
            except (KeyError, TypeError, ValueError):
                continue
            if upload.bucket == bucket:
                uploads.append(upload)
        return uploads

    def list_uploads(self, bucket: str, prefix: str) -> list[UploadRecord]:
        """Uploads in progress under `prefix`, by key, then initiation time."""
        self.bucket_dir(bucket)
        uploads = [u for u in self._uploads(bucket) if u.key.startswith(prefix)]
        uploads.sort(key=lambda u: (u.key, u.initiated_ns, u.upload_id))
        return uploads


def _invalid_part(number: int, etag: str) -> errors.S3Error:
    return errors.S3Error(
        "InvalidPart",
        "One or more of the specified parts could not be found.  The part may not have been uploaded, "
        "or the specified entity tag may not match the part's entity tag.",
        400, extra={"PartNumber": str(number), "ETag": etag})


# --- request parsing helpers ---------------------------------------------------------


def _int_param(query, name: str, default: int, *, low: int, high: int | None, message: str) -> int:
    raw = query.get(name)
    if raw is None:
        return default
    if not re.fullmatch(r"-?[0-9]{1,19}", raw.strip()):
        raise errors.invalid_argument(message, name, raw)
    value = int(raw)
    if value < low or (high is not None and value > high):
        raise errors.invalid_argument(message, name, raw)
    return value


def _max_keys(query, name: str = "max-keys") -> int:
    value = _int_param(query, name, MAX_LIST_KEYS, low=0, high=2**31 - 1,
                       message=f"Argument {name} must be an integer between 0 and 2147483647")
    return min(value, MAX_LIST_KEYS)


def _part_number(query, *, required: bool) -> int | None:
    if "partNumber" not in query and not required:
        return None
    raw = query.get("partNumber", "")
    if not re.fullmatch(r"[0-9]{1,5}", raw) or not 1 <= int(raw) <= MAX_PART_NUMBER:
        raise errors.invalid_argument("Part number must be an integer between 1 and 10000, inclusive",
                                      "partNumber", raw)
    return int(raw)


def _url_encoder(query) -> Callable[[str], str] | None:
    encoding = query.get("encoding-type")
    if encoding is None:
        return None
    if encoding.lower() != "url":
        raise errors.invalid_argument("Invalid Encoding Method specified in Request", "encoding-type", encoding)
    return s3_url_encode


def _copy_source(headers) -> tuple[str, str]:
    """(bucket, key) of `x-amz-copy-source`: ``[/]bucket/key[?versionId=...]``, URL-encoded."""
    raw = headers.get("x-amz-copy-source", "")
    path = raw.partition("?")[0]  # a literal "?" in a key arrives encoded
    try:
        path = unquote(path, errors="strict")
    except UnicodeDecodeError:
        path = ""
    bucket, _, key = path.removeprefix("/").partition("/")
    if not bucket or not key or not valid_bucket_name(bucket):
        raise errors.invalid_argument("Copy Source must mention the source bucket and key: sourcebucket/sourcekey",
                                      "x-amz-copy-source", raw)
    return bucket, key


def _copy_source_range(headers, size: int) -> tuple[int, int]:
    """Offset and length of `x-amz-copy-source-range` (``bytes=first-last`` only)."""
    raw = headers.get("x-amz-copy-source-range")
    if raw is None:
        return 0, size
    match = re.fullmatch(r"bytes=([0-9]{1,19})-([0-9]{1,19})", raw.strip())
    if match is None or int(match[1]) > int(match[2]):
        raise errors.invalid_argument(
            "The x-amz-copy-source-range value must be of the form bytes=first-last where first and last are "
            "the zero-based offsets of the first and last bytes to copy", "x-amz-copy-source-range", raw)
    first, last = int(match[1]), int(match[2])
    if last >= size:
        raise errors.invalid_argument(f"Range specified is not valid for source object of size: {size}",
                                      "x-amz-copy-source-range", raw)
    return first, last - first + 1


async def _one_chunk(data: bytes) -> AsyncIterator[bytes]:
    yield data


def _xml_response(root: str, children: list[s3xml.Node] | str, status: int = 200,
                  headers: dict[str, str] | None = None) -> OriginResponse:
    body = s3xml.render(root, children)
    out = CIMultiDict(headers or {})
    out["Content-Type"] = s3xml.CONTENT_TYPE
    out["Content-Length"] = str(len(body))
    return OriginResponse(status, out, _one_chunk(body))


def _empty_response(status: int = 200, headers: dict[str, str] | None = None) -> OriginResponse:
    out = CIMultiDict(headers or {})
    if status != 204:
        out["Content-Length"] = "0"
    return OriginResponse(status, out)


# --- the origin ----------------------------------------------------------------------


class LocalOrigin:
    """Serves a local directory with S3's semantics (see the module docstring).

    `LocalOrigin(root)`; `await start()` creates `root` and its state directory;
    `await send(request)` answers one request (raising `S3Error` for S3 errors);
    `await close()` waits for the file operations in flight on its worker threads.
    A GET's response holds an open file until `OriginResponse.close()`."""

    def __init__(self, root: Path | str, *, max_workers: int = 32) -> None:
        self.root = Path(root).expanduser().absolute()
        self.description = f"local directory {self.root}"
        self.store = DirectoryStore(self.root)
        self._executor = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="sprox-local")
        self._handlers: dict[str, Callable[[S3Request], Any]] = {
            "ListBuckets": self._list_buckets,
            "CreateBucket": self._create_bucket,
            "DeleteBucket": self._delete_bucket,
            "HeadBucket": self._head_bucket,
            "GetBucketLocation": self._get_bucket_location,
            "ListObjects": self._list_objects_v1,
            "ListObjectsV2": self._list_objects_v2,
            "GetObject": functools.partial(self._get_object, head=False),
            "HeadObject": functools.partial(self._get_object, head=True),
            "PutObject": self._put_object,
            "CopyObject": self._copy_object,
            "DeleteObject": self._delete_object,
            "DeleteObjects": self._delete_objects,
            "CreateMultipartUpload": self._create_multipart_upload,
            "UploadPart": self._upload_part,
            "UploadPartCopy": self._upload_part_copy,
            "CompleteMultipartUpload": self._complete_multipart_upload,
            "AbortMultipartUpload": self._abort_multipart_upload,
            "ListParts": self._list_parts,
            "ListMultipartUploads": self._list_multipart_uploads,
        }

    async def _run(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run blocking file-system work on this origin's threads, off the event loop."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(function, *args, **kwargs))

    async def start(self) -> None:
        await self._run(self.store.prepare)

    async def close(self) -> None:
        # Waiting for running file operations (they cannot be interrupted) must not
        # block the loop either.
        await asyncio.to_thread(self._executor.shutdown, True, cancel_futures=True)

    async def send(self, request: S3Request) -> OriginResponse:
        handler = self._handlers.get(request.operation)
        if handler is None:
            raise errors.not_implemented(f"{request.operation} is not supported by the local-directory origin")
        return await handler(request)

    # -- buckets ----------------------------------------------------------------------

    async def _list_buckets(self, request: S3Request) -> OriginResponse:
        buckets = await self._run(self.store.list_buckets)
        return _xml_response("ListAllMyBucketsResult", [
            ("Owner", _owner()),
            ("Buckets", [("Bucket", [("Name", name), ("CreationDate", iso8601(created))])
                         for name, created in buckets]),
        ])

    async def _create_bucket(self, request: S3Request) -> OriginResponse:
        if request.body is not None:
            # The optional CreateBucketConfiguration names a region: one region here.
            await request.body.read_all(MAX_XML_BODY)
        await self._run(self.store.create_bucket, request.bucket)
        return _empty_response(200, {"Location": f"/{request.bucket}"})

    async def _delete_bucket(self, request: S3Request) -> OriginResponse:
        await self._run(self.store.delete_bucket, request.bucket)
        return _empty_response(204)

    async def _head_bucket(self, request: S3Request) -> OriginResponse:
        await self._run(self.store.bucket_dir, request.bucket)
        return _empty_response(200, {"x-amz-bucket-region": REGION})

    async def _get_bucket_location(self, request: S3Request) -> OriginResponse:
        await self._run(self.store.bucket_dir, request.bucket)
        return _xml_response("LocationConstraint", "")  # empty means us-east-1

    # -- listing ----------------------------------------------------------------------

    def _contents(self, entries: list[ListedObject | str], encode: Callable[[str], str],
                  owner: bool) -> tuple[list[s3xml.Node], list[s3xml.Node]]:
        contents: list[s3xml.Node] = []
        prefixes: list[s3xml.Node] = []
        for entry in entries:
            if isinstance(entry, str):
                prefixes.append(("CommonPrefixes", [("Prefix", encode(entry))]))
                continue
            record = entry.record
            contents.append(("Contents", [
                ("Key", encode(entry.key)),
                ("LastModified", iso8601(record.mtime_ns)),
                ("ETag", record.quoted_etag),
                ("Size", record.size),
                ("Owner", _owner() if owner else None),
                ("StorageClass", "STANDARD"),
            ]))
        return contents, prefixes

    async def _list_objects_v2(self, request: S3Request) -> OriginResponse:
        query = request.query
        url_encode = _url_encoder(query)
        encode = url_encode or (lambda s: s)
        max_keys = _max_keys(query)
        prefix = query.get("prefix", "")
        delimiter = query.get("delimiter", "")
        start_after = query.get("start-after")
        token = query.get("continuation-token")
        start = start_after or ""
        if token is not None:
            start = _decode_token(token)  # the token wins over start-after, as in S3
        if max_keys == 0:
            await self._run(self.store.bucket_dir, request.bucket)
            entries, truncated = [], False
        else:
            entries, truncated = await self._run(self.store.list_entries, request.bucket, prefix, delimiter,
                                                 start, max_keys)
        contents, prefixes = self._contents(entries, encode, query.get("fetch-owner") == "true")
        next_token = None
        if truncated:
            last = entries[-1]
            next_token = _encode_token(last if isinstance(last, str) else last.key)
        return _xml_response("ListBucketResult", [
            ("Name", request.bucket),
            ("Prefix", encode(prefix)),
            ("ContinuationToken", token),
            ("NextContinuationToken", next_token),
            ("StartAfter", encode(start_after) if start_after is not None else None),
            ("KeyCount", len(entries)),
            ("MaxKeys", max_keys),
            ("Delimiter", encode(delimiter) if delimiter else None),
            ("EncodingType", "url" if url_encode else None),
            ("IsTruncated", truncated),
            *contents,
            *prefixes,
        ])

    async def _list_objects_v1(self, request: S3Request) -> OriginResponse:
        query = request.query
        url_encode = _url_encoder(query)
        encode = url_encode or (lambda s: s)
        max_keys = _max_keys(query)
        prefix = query.get("prefix", "")
        delimiter = query.get("delimiter", "")
        marker = query.get("marker", "")
        if max_keys == 0:
            await self._run(self.store.bucket_dir, request.bucket)
            entries, truncated = [], False
        else:
            entries, truncated = await self._run(self.store.list_entries, request.bucket, prefix, delimiter,
                                                 marker, max_keys)
        contents, prefixes = self._contents(entries, encode, True)
        next_marker = None
        if truncated and delimiter:
            # Without a delimiter S3 leaves NextMarker out: clients use the last key.
            last = entries[-1]
            next_marker = encode(last if isinstance(last, str) else last.key)
        return _xml_response("ListBucketResult", [
            ("Name", request.bucket),
            ("Prefix", encode(prefix)),
            ("Marker", encode(marker)),
            ("NextMarker", next_marker),
            ("MaxKeys", max_keys),
            ("Delimiter", encode(delimiter) if delimiter else None),
            ("EncodingType", "url" if url_encode else None),
            ("IsTruncated", truncated),
            *contents,
            *prefixes,
        ])

    # -- reading objects --------------------------------------------------------------

    @staticmethod
    def _object_headers(record: ObjectRecord) -> CIMultiDict[str]:
        headers: CIMultiDict[str] = CIMultiDict()
        headers["Content-Type"] = record.content_type
        headers["ETag"] = record.quoted_etag
        headers["Last-Modified"] = http_date(record.last_modified)
        headers["Accept-Ranges"] = "bytes"
        headers.update(record.headers)
        headers.update(record.metadata)
        return headers

    async def _get_object(self, request: S3Request, *, head: bool) -> OriginResponse:
        part_number = _part_number(request.query, required=False)
        range_header = request.headers.get("Range")
        if part_number is not None and range_header is not None:
            raise errors.invalid_request("Cannot specify both Range header and partNumber query parameter")
        opened: OpenObject = await self._run(self.store.open_object, request.bucket, request.key)
        try:
            record = opened.record
            size = record.size
            check_conditions(request.headers, record.quoted_etag, record.last_modified)
            headers = self._object_headers(record)
            status, first, length = 200, 0, size
            if part_number is not None:
                first, length = _part_bounds(record, part_number)
                if record.part_sizes:
                    headers["x-amz-mp-parts-count"] = str(len(record.part_sizes))
                if length:
                    status = 206
                    headers["Content-Range"] = content_range(first, first + length - 1, size)
            else:
                try:
                    selected = parse_range(range_header, size)
                except RangeNotSatisfiable:
                    raise errors.invalid_range(size, range_header or "") from None
                if selected is not None:
                    status = 206
                    first, length = selected[0], selected[1] - selected[0] + 1
                    headers["Content-Range"] = content_range(selected[0], selected[1], size)
            headers["Content-Length"] = str(length)
            if (status == 200 and record.checksum and
                    request.headers.get("x-amz-checksum-mode", "").upper() == "ENABLED"):
                algorithm, value = record.checksum
                headers[f"x-amz-checksum-{algorithm}"] = value
                headers["x-amz-checksum-type"] = "FULL_OBJECT"
            apply_response_overrides(request.query, headers)
        except BaseException:
            await self._run(opened.close)
            raise
        if head:
            await self._run(opened.close)
            return OriginResponse(status, headers)

        async def close() -> None:
            await self._run(opened.close)

        return OriginResponse(status, headers, self._stream(opened, first, length), on_close=close)

    async def _stream(self, opened: OpenObject, offset: int, length: int) -> AsyncIterator[bytes]:
        end = offset + length
        while offset < end:
            chunk = await self._run(os.pread, opened.fd, min(CHUNK_SIZE, end - offset), offset)
            if not chunk:
                # Truncated in place by someone else after we sent Content-Length.
                raise UpstreamBodyError(f"local file shrank while being read ({offset} of {end} bytes)")
            offset += len(chunk)
            yield chunk

    # -- writing objects --------------------------------------------------------------

    async def _receive(self, request: S3Request, temp: TempFile) -> None:
        """Stream the request payload into `temp`, in CHUNK_SIZE writes off the loop."""
        if request.body is None:
            return
        pending: list[bytes] = []
        pending_size = 0
        async for chunk in request.body.decoded():
            pending.append(chunk)
            pending_size += len(chunk)
            if pending_size >= CHUNK_SIZE:
                await self._run(temp.write, pending)
                pending, pending_size = [], 0
        if pending:
            await self._run(temp.write, pending)

    async def _receive_verified(self, request: S3Request) -> tuple[TempFile, tuple[str, str] | None]:
        """The payload in a temp file, its digests checked; the caller discards it."""
        plan = ChecksumPlan.from_request(request.headers)
        hasher = plan.hasher()
        temp: TempFile = await self._run(self.store.new_temp, checksum=hasher)
        try:
            await self._receive(request, temp)
            trailers = request.body.trailers if request.body is not None else {}
            assert temp.md5 is not None
            checksum = plan.verify(temp.md5.digest(), hasher.b64digest() if hasher else None, trailers)
        except BaseException:
            await self._run(temp.discard)
            raise
        return temp, checksum

    async def _put_object(self, request: S3Request) -> OriginResponse:
        representation = Representation.from_request(request.headers)
        precondition = _write_precondition(request.headers)
        await self._run(self.store.bucket_dir, request.bucket)
        key_to_names(request.key)  # fail before reading a body that cannot be stored
        temp, checksum = await self._receive_verified(request)
        try:
            etag = temp.md5.hexdigest()
            record = await self._run(
                self.store.commit_object, request.bucket, request.key, temp,
                lambda st: ObjectRecord(st.st_size, st.st_mtime_ns, etag, representation.content_type,
                                        representation.headers, representation.metadata, None, checksum),
                precondition)
        finally:
            await self._run(temp.discard)
        headers = {"ETag": record.quoted_etag}
        if checksum:
            headers[f"x-amz-checksum-{checksum[0]}"] = checksum[1]
            headers["x-amz-checksum-type"] = "FULL_OBJECT"
        return _empty_response(200, headers)

    async def _open_copy_source(self, request: S3Request) -> OpenObject:
        bucket, key = _copy_source(request.headers)
        opened: OpenObject = await self._run(self.store.open_object, bucket, key)
        try:
            check_copy_source_conditions(request.headers, opened.record.quoted_etag, opened.record.last_modified)
        except BaseException:
            await self._run(opened.close)
            raise
        return opened

    async def _copy_object(self, request: S3Request) -> OriginResponse:
        directive = request.headers.get("x-amz-metadata-directive", "COPY").upper()
        if directive not in ("COPY", "REPLACE"):
            raise errors.invalid_argument("Unknown metadata directive.", "x-amz-metadata-directive",
                                          request.headers.get("x-amz-metadata-directive"))
        if _copy_source(request.headers) == (request.bucket, request.key) and directive == "COPY":
            raise errors.invalid_request(
                "This copy request is illegal because it is trying to copy an object to itself without "
                "changing the object's metadata, storage class, website redirect location or encryption "
                "attributes.")
        replacement = Representation.from_request(request.headers) if directive == "REPLACE" else None
        await self._run(self.store.bucket_dir, request.bucket)
        key_to_names(request.key)
        opened = await self._open_copy_source(request)
        try:
            source = opened.record
            representation = replacement or Representation.of(source)
            # Same bytes, same MD5: only a multipart source needs hashing afresh.
            multipart = source.part_sizes is not None or "-" in source.etag
            temp: TempFile = await self._run(self.store.new_temp, md5=multipart)
            try:
                await self._run(temp.copy_from, opened.fd, 0, source.size)
                etag = temp.md5.hexdigest() if temp.md5 is not None else source.etag
                checksum = source.checksum if not multipart else None
                record = await self._run(
                    self.store.commit_object, request.bucket, request.key, temp,
                    lambda st: ObjectRecord(st.st_size, st.st_mtime_ns, etag, representation.content_type,
                                            representation.headers, representation.metadata, None, checksum))
            finally:
                await self._run(temp.discard)
        finally:
            await self._run(opened.close)
        return _xml_response("CopyObjectResult", [
            ("LastModified", iso8601(record.mtime_ns)),
            ("ETag", record.quoted_etag),
        ])

    async def _delete_object(self, request: S3Request) -> OriginResponse:
        await self._run(self.store.delete_object, request.bucket, request.key)
        return _empty_response(204)

    async def _delete_objects(self, request: S3Request) -> OriginResponse:
        await self._run(self.store.bucket_dir, request.bucket)
        if request.body is None:
            raise errors.malformed_xml()
        root = s3xml.parse(await request.body.read_all(MAX_XML_BODY))
        if s3xml.local_name(root.tag) != "Delete":
            raise errors.malformed_xml()
        quiet = (s3xml.child_text(root, "Quiet") or "").strip().lower() == "true"
        keys = []
        for element in s3xml.children(root, "Object"):
            key = s3xml.child_text(element, "Key")
            if key is None:
                raise errors.malformed_xml()
            keys.append(key)
        if not keys or len(keys) > MAX_DELETE_KEYS:
            raise errors.malformed_xml()
        results: list[tuple[str, errors.S3Error | None]] = await self._run(self._delete_many, request.bucket, keys)
        nodes: list[s3xml.Node] = []
        for key, error in results:
            if error is not None:
                nodes.append(("Error", [("Key", key), ("Code", error.code), ("Message", error.message)]))
            elif not quiet:
                nodes.append(("Deleted", [("Key", key)]))
        return _xml_response("DeleteResult", nodes)

    def _delete_many(self, bucket: str, keys: list[str]) -> list[tuple[str, errors.S3Error | None]]:
        results: list[tuple[str, errors.S3Error | None]] = []
        for key in keys:
            try:
                if not key or len(key.encode()) > 1024:
                    raise key_too_long() if key else errors.invalid_argument("Key must not be empty")
                self.store.delete_object(bucket, key)
                results.append((key, None))
            except errors.S3Error as exc:
                results.append((key, exc))
            except PermissionError:
                results.append((key, errors.access_denied()))
            except OSError:
                log.exception("deleting %r from bucket %r failed", key, bucket)
                results.append((key, errors.internal_error()))
        return results

    # -- multipart uploads ------------------------------------------------------------

    async def _create_multipart_upload(self, request: S3Request) -> OriginResponse:
        representation = Representation.from_request(request.headers)
        algorithm = (request.headers.get("x-amz-checksum-algorithm") or "").lower() or None
        upload = await self._run(self.store.create_upload, request.bucket, request.key, representation, algorithm)
        return _xml_response("InitiateMultipartUploadResult", [
            ("Bucket", request.bucket),
            ("Key", request.key),
            ("UploadId", upload.upload_id),
        ])

    async def _get_upload(self, request: S3Request) -> UploadRecord:
        return await self._run(self.store.get_upload, request.bucket, request.key, request.query.get("uploadId", ""))

    async def _upload_part(self, request: S3Request) -> OriginResponse:
        number = _part_number(request.query, required=True)
        upload = await self._get_upload(request)
        temp, checksum = await self._receive_verified(request)
        try:
            part = await self._run(self.store.commit_part, upload, number, temp, checksum)
        finally:
            await self._run(temp.discard)
        headers = {"ETag": f'"{part.etag}"'}
        if checksum:
            headers[f"x-amz-checksum-{checksum[0]}"] = checksum[1]
        return _empty_response(200, headers)

    async def _upload_part_copy(self, request: S3Request) -> OriginResponse:
        number = _part_number(request.query, required=True)
        upload = await self._get_upload(request)
        opened = await self._open_copy_source(request)
        try:
            offset, length = _copy_source_range(request.headers, opened.record.size)
            temp: TempFile = await self._run(self.store.new_temp)
            try:
                await self._run(temp.copy_from, opened.fd, offset, length)
                part = await self._run(self.store.commit_part, upload, number, temp, None)
            finally:
                await self._run(temp.discard)
        finally:
            await self._run(opened.close)
        return _xml_response("CopyPartResult", [
            ("LastModified", iso8601(part.mtime_ns)),
            ("ETag", f'"{part.etag}"'),
        ])

    async def _complete_multipart_upload(self, request: S3Request) -> OriginResponse:
        upload = await self._get_upload(request)
        if request.body is None:
            raise errors.malformed_xml()
        requested = _parse_complete(await request.body.read_all(MAX_XML_BODY))
        record = await self._run(self.store.complete_upload, upload, requested)
        host = request.headers.get("Host", "localhost")
        location = f"http://{host}/{request.bucket}/{quote(request.key, safe='/~')}"
        return _xml_response("CompleteMultipartUploadResult", [
            ("Location", location),
            ("Bucket", request.bucket),
            ("Key", request.key),
            ("ETag", record.quoted_etag),
        ])

    async def _abort_multipart_upload(self, request: S3Request) -> OriginResponse:
        upload = await self._get_upload(request)
        await self._run(self.store.abort_upload, upload)
        return _empty_response(204)

    async def _list_parts(self, request: S3Request) -> OriginResponse:
        upload = await self._get_upload(request)
        marker = _int_param(request.query, "part-number-marker", 0, low=0, high=MAX_PART_NUMBER,
                            message="Argument part-number-marker must be an integer between 0 and 10000")
        max_parts = min(_int_param(request.query, "max-parts", 1000, low=0, high=2**31 - 1,
                                   message="Argument max-parts must be an integer between 0 and 2147483647"), 1000)
        parts = [part for part in await self._run(self.store.list_parts, upload) if part.number > marker]
        truncated = len(parts) > max_parts
        parts = parts[:max_parts]
        return _xml_response("ListPartsResult", [
            ("Bucket", request.bucket),
            ("Key", request.key),
            ("UploadId", upload.upload_id),
            ("PartNumberMarker", marker),
            ("NextPartNumberMarker", parts[-1].number if parts else marker),
            ("MaxParts", max_parts),
            ("IsTruncated", truncated),
            *[("Part", [
                ("PartNumber", part.number),
                ("LastModified", iso8601(part.mtime_ns)),
                ("ETag", f'"{part.etag}"'),
                ("Size", part.size),
            ]) for part in parts],
            ("Initiator", _owner()),
            ("Owner", _owner()),
            ("StorageClass", "STANDARD"),
        ])

    async def _list_multipart_uploads(self, request: S3Request) -> OriginResponse:
        query = request.query
        url_encode = _url_encoder(query)
        encode = url_encode or (lambda s: s)
        prefix = query.get("prefix", "")
        delimiter = query.get("delimiter", "")
        key_marker = query.get("key-marker", "")
        upload_id_marker = query.get("upload-id-marker", "")
        max_uploads = _max_keys(query, "max-uploads")
        uploads = await self._run(self.store.list_uploads, request.bucket, prefix)
        # Resume after (key-marker, upload-id-marker): later keys, or later uploads
        # of the marker key when an upload id is given.
        position = 0
        if key_marker:
            position = next((i for i, u in enumerate(uploads) if u.key > key_marker), len(uploads))
            if upload_id_marker:
                ids = [i for i, u in enumerate(uploads) if u.key == key_marker and u.upload_id == upload_id_marker]
                if ids:
                    position = ids[0] + 1
        entries: list[UploadRecord | str] = []
        truncated = False
        for upload in uploads[position:]:
            entry: UploadRecord | str = upload
            if delimiter:
                found = upload.key.find(delimiter, len(prefix))
                if found >= 0:
                    entry = upload.key[: found + len(delimiter)]
                    if entries and entries[-1] == entry:
                        continue
            if len(entries) == max_uploads:
                truncated = True
                break
            entries.append(entry)
        next_key = next_id = None
        if truncated and entries:
            last = entries[-1]
            next_key = last if isinstance(last, str) else last.key
            next_id = "" if isinstance(last, str) else last.upload_id
        return _xml_response("ListMultipartUploadsResult", [
            ("Bucket", request.bucket),
            ("KeyMarker", encode(key_marker)),
            ("UploadIdMarker", upload_id_marker),
            ("NextKeyMarker", encode(next_key) if next_key is not None else None),
            ("NextUploadIdMarker", next_id),
            ("Prefix", encode(prefix)),
            ("Delimiter", encode(delimiter) if delimiter else None),
            ("MaxUploads", max_uploads),
            ("EncodingType", "url" if url_encode else None),
            ("IsTruncated", truncated),
            *[("Upload", [
                ("Key", encode(u.key)),
                ("UploadId", u.upload_id),
                ("Initiator", _owner()),
                ("Owner", _owner()),
                ("StorageClass", "STANDARD"),
                ("Initiated", iso8601(u.initiated_ns)),
            ]) for u in entries if isinstance(u, UploadRecord)],
            *[("CommonPrefixes", [("Prefix", encode(p))]) for p in entries if isinstance(p, str)],
        ])


# --- small pure helpers used above ---------------------------------------------------


def _encode_token(entry: str) -> str:
    return base64.urlsafe_b64encode(entry.encode()).decode()


def _decode_token(token: str) -> str:
    try:
        if not token:
            raise ValueError("empty continuation token")
        return base64.urlsafe_b64decode(token.encode("ascii")).decode("utf-8")
    except (ValueError, UnicodeError):
        raise errors.invalid_argument("The continuation token provided is incorrect", "continuation-token",
                                      token) from None


def _part_bounds(record: ObjectRecord, number: int) -> tuple[int, int]:
    """(offset, length) of part `number` of an object; a single-part object has one."""
    sizes = record.part_sizes or [record.size]
    if number > len(sizes):
        raise errors.S3Error("InvalidPartNumber", "The requested partnumber is not satisfiable", 416,
                             extra={"PartNumberRequested": str(number), "ActualPartCount": str(len(sizes))})
    return sum(sizes[: number - 1]), sizes[number - 1]


def _parse_complete(body: bytes) -> list[tuple[int, str]]:
    """(part number, ETag) pairs of a CompleteMultipartUpload body, checked for order."""
    root = s3xml.parse(body)
    if s3xml.local_name(root.tag) != "CompleteMultipartUpload":
        raise errors.malformed_xml()
    parts: list[tuple[int, str]] = []
    for element in s3xml.children(root, "Part"):
        number = (s3xml.child_text(element, "PartNumber") or "").strip()
        etag = s3xml.child_text(element, "ETag")
        if not number.isdigit() or etag is None:
            raise errors.malformed_xml()
        parts.append((int(number), etag.strip()))
    if not parts:
        raise errors.malformed_xml()
    numbers = [number for number, _etag in parts]
    if any(later <= earlier for earlier, later in zip(numbers, numbers[1:])):
        raise errors.S3Error("InvalidPartOrder",
                             "The list of parts was not in ascending order. Parts must be ordered by part number.",
                             400)
    return parts


def _write_precondition(headers) -> Callable[[ObjectRecord | None], None] | None:
    """S3's conditional writes: `If-None-Match: *` (create only) and `If-Match`."""
    if_none_match = headers.get("If-None-Match")
    if_match = headers.get("If-Match")
    if if_none_match is None and if_match is None:
        return None
    if if_none_match is not None and if_none_match.strip() != "*":
        raise errors.not_implemented("If-None-Match on writes accepts only '*'")

    def check(current: ObjectRecord | None) -> None:
        if if_none_match is not None and current is not None:
            raise errors.precondition_failed("If-None-Match")
        if if_match is not None:
            if current is None:
                raise errors.S3Error("NoSuchKey", "The specified key does not exist.", 404)
            if not etag_matches(if_match, current.quoted_etag):
                raise errors.precondition_failed("If-Match")

    return check
