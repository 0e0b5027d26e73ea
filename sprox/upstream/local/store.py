"""The blocking file-system layer of the local origin: buckets, object files and their
sidecars, temporary files and the atomic rename that commits them.

Everything here may block on the disk and runs on the origin's worker threads, never
on the event loop. Methods raise `S3Error` for conditions S3 reports.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import stat
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ...s3 import errors
from ...s3.request import valid_bucket_name
from .keys import key_to_names, key_too_long, object_conflict
from .records import ObjectRecord

log = logging.getLogger("sprox.local")

CHUNK_SIZE = 256 * 1024
STATE_DIR = ".sprox"
# Temporary files older than this at start-up were left by a crash.
STALE_TEMP_SECONDS = 3600
MAX_KEY_BYTES = 1024


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
            _unlink_if_present(self.path)


@dataclass(slots=True)
class OpenObject:
    """An object opened for reading: the descriptor pins the bytes `record` describes."""

    fd: int
    record: ObjectRecord

    def close(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)


def _unlink_if_present(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


class DirectoryStore:
    """The root directory and its ``.sprox/`` state: buckets, objects, sidecars, locks.

    Multipart uploads live in ``.sprox/uploads/``, handled by `multipart.UploadStore`
    on top of this store."""

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

    def lock(self, *identity: str) -> threading.Lock:
        """The lock for one key, ``lock(bucket, key)``, or other named thing."""
        return self._locks[hash(identity) % len(self._locks)]

    # -- start-up and state files -----------------------------------------------------

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

    def write_json(self, path: str, data: dict[str, Any]) -> None:
        """Atomically replace `path` with `data` as JSON."""
        fd, tmp_path = tempfile.mkstemp(dir=self.tmp, prefix="j-")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as out:
                json.dump(data, out)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            os.replace(tmp_path, path)
        except BaseException:
            _unlink_if_present(tmp_path)
            raise

    @staticmethod
    def read_json(path: str) -> dict[str, Any] | None:
        """The JSON object in `path`; None if it is missing or unreadable."""
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
                info = self.read_json(os.path.join(self._bucket_meta(entry.name), "bucket.json"))
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
        self.write_json(os.path.join(self._bucket_meta(bucket), "bucket.json"), {"created_ns": time.time_ns()})

    def delete_bucket(self, bucket: str) -> None:
        """Remove an empty bucket and its sidecars (its uploads are the caller's)."""
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

    # -- objects: sidecars ------------------------------------------------------------

    def _sidecar_path(self, bucket: str, key: str) -> str:
        digest = hashlib.sha256(key.encode()).hexdigest()
        return os.path.join(self._bucket_meta(bucket), digest[:2], digest + ".json")

    def _read_sidecar(self, bucket: str, key: str) -> ObjectRecord | None:
        data = self.read_json(self._sidecar_path(bucket, key))
        if data is None:
            return None
        try:
            return ObjectRecord.from_json(data)
        except (KeyError, TypeError, ValueError):
            return None

    def _write_sidecar(self, bucket: str, key: str, record: ObjectRecord) -> None:
        self.write_json(self._sidecar_path(bucket, key), record.to_json(key))

    def record_for(self, bucket: str, key: str, path: str, st: os.stat_result, fd: int | None = None) -> ObjectRecord:
        """The record describing the file `st` describes, computing (and caching) it
        when the file was added or changed outside Sprox."""
        stored = self._read_sidecar(bucket, key)
        if stored is not None and stored.describes(st):
            return stored
        record = self._describe_anew(key, path, st, fd, stored)
        with self.lock(bucket, key):
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
            self._write_sidecar(bucket, key, record)
        return record

    def _current_record(self, bucket: str, key: str, path: str) -> ObjectRecord | None:
        """The record of the object at `path`, None if there is none; the caller holds
        the key's lock, and nothing is cached."""
        try:
            st = os.stat(path)
        except OSError:
            return None
        if not stat.S_ISREG(st.st_mode):
            return None
        stored = self._read_sidecar(bucket, key)
        if stored is not None and stored.describes(st):
            return stored
        return self._describe_anew(key, path, st, None, stored)

    def _describe_anew(self, key: str, path: str, st: os.stat_result, fd: int | None,
                       stale: ObjectRecord | None) -> ObjectRecord:
        """A record for a file its sidecar (`stale`, if any) does not describe: the MD5
        of its bytes, and the sidecar's metadata if those bytes are the same."""
        etag = _md5_of(path, st.st_size, fd)
        if stale is not None and stale.part_sizes is None and stale.etag == etag:
            # Same bytes, new mtime (touched, copied with a new date): keep its metadata.
            return replace(stale, size=st.st_size, mtime_ns=st.st_mtime_ns)
        return ObjectRecord.guessed(key, st, etag)

    # -- objects: reading -------------------------------------------------------------

    def open_object(self, bucket: str, key: str) -> OpenObject:
        """Open an object for reading; NoSuchBucket / NoSuchKey if absent."""
        bucket_dir = self.bucket_dir(bucket)
        try:
            path = os.path.join(bucket_dir, *key_to_names(key))
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
            return OpenObject(fd, self.record_for(bucket, key, path, st, fd))
        except BaseException:
            os.close(fd)
            raise

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
        with self.lock(bucket, key):
            if precondition is not None:
                precondition(self._current_record(bucket, key, path))
            st = _later_than_current(temp.path, st, path)
            record = make_record(st)
            for _attempt in range(5):
                try:
                    _make_parents(bucket_dir, names, key)
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
                self._write_sidecar(bucket, key, record)
                return record
        raise errors.internal_error()

    # -- objects: deleting ------------------------------------------------------------

    def delete_object(self, bucket: str, key: str) -> None:
        """Remove an object if it exists, and the directories it leaves empty."""
        bucket_dir = self.bucket_dir(bucket)
        try:
            names = key_to_names(key)
        except errors.S3Error:
            return  # too long to exist
        path = os.path.join(bucket_dir, *names)
        with self.lock(bucket, key):
            try:
                if stat.S_ISDIR(os.lstat(path).st_mode):
                    return  # a folder of other keys, not this key
                os.unlink(path)
            except (FileNotFoundError, NotADirectoryError):
                pass
            _unlink_if_present(self._sidecar_path(bucket, key))
        directory = os.path.dirname(path)
        while len(directory) > len(bucket_dir):
            try:
                os.rmdir(directory)
            except OSError:
                break  # not empty (or already gone): stop climbing
            directory = os.path.dirname(directory)

    def delete_objects(self, bucket: str, keys: list[str]) -> list[tuple[str, errors.S3Error | None]]:
        """DeleteObjects: each key with the error deleting it met, or None."""
        results: list[tuple[str, errors.S3Error | None]] = []
        for key in keys:
            try:
                if not key or len(key.encode()) > MAX_KEY_BYTES:
                    raise key_too_long() if key else errors.invalid_argument("Key must not be empty")
                self.delete_object(bucket, key)
                results.append((key, None))
            except errors.S3Error as exc:
                results.append((key, exc))
            except PermissionError:
                results.append((key, errors.access_denied()))
            except OSError:
                log.exception("deleting %r from bucket %r failed", key, bucket)
                results.append((key, errors.internal_error()))
        return results


def _md5_of(path: str, size: int, fd: int | None) -> str:
    """The MD5 hex of the first `size` bytes of `path` (read through `fd` if given)."""
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


def _make_parents(bucket_dir: str, names: list[str], key: str) -> None:
    """Create the directories above an object's file; ObjectConflict where an object
    stands in the way."""
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
