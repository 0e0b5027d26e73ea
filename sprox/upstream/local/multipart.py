"""Multipart uploads in progress, kept in ``.sprox/uploads/<upload id>/``::

    upload.json       the UploadRecord: bucket, key, initiation time, representation
    00001.part        part 1's bytes
    00001.json        part 1's PartRecord (ETag, size, mtime, checksum)

Completing an upload copies its parts, in order, into one temp file that
`DirectoryStore.commit_object` renames into place; the directory then goes.

Blocking, like `DirectoryStore`: runs on the origin's worker threads.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import shutil
import time

from ...s3 import errors
from ...s3.conditions import bare_etag
from .keys import key_to_names
from .records import ObjectRecord, PartRecord, Representation, StoredChecksum, UploadRecord
from .store import DirectoryStore, TempFile

MIN_PART_SIZE = 5 * 1024 * 1024
_UPLOAD_ID = re.compile(r"[A-Za-z0-9_-]{16,128}")
_PART_JSON = re.compile(r"[0-9]{5}\.json")


def invalid_part(number: int, etag: str) -> errors.S3Error:
    return errors.S3Error(
        "InvalidPart",
        "One or more of the specified parts could not be found.  The part may not have been uploaded, "
        "or the specified entity tag may not match the part's entity tag.",
        400, extra={"PartNumber": str(number), "ETag": etag})


class UploadStore:
    """The multipart uploads of a `DirectoryStore`."""

    def __init__(self, store: DirectoryStore) -> None:
        self.store = store

    # -- paths ------------------------------------------------------------------------

    def _dir(self, upload_id: str) -> str:
        return os.path.join(self.store.uploads, upload_id)

    def _part_path(self, upload_id: str, number: int, suffix: str) -> str:
        """``<nnnnn>.part`` (the bytes) or ``<nnnnn>.json`` (the record) of a part."""
        return os.path.join(self._dir(upload_id), f"{number:05d}{suffix}")

    def _read_upload(self, upload_id: str) -> dict | None:
        return self.store.read_json(os.path.join(self._dir(upload_id), "upload.json"))

    # -- uploads ----------------------------------------------------------------------

    def create(self, bucket: str, key: str, representation: Representation,
               checksum_algorithm: str | None) -> UploadRecord:
        self.store.bucket_dir(bucket)
        key_to_names(key)  # refuse keys that could never be completed
        upload = UploadRecord(secrets.token_urlsafe(32), bucket, key, time.time_ns(), representation,
                              checksum_algorithm)
        os.mkdir(self._dir(upload.upload_id))
        self.store.write_json(os.path.join(self._dir(upload.upload_id), "upload.json"), upload.to_json())
        return upload

    def get(self, bucket: str, key: str, upload_id: str) -> UploadRecord:
        """An upload in progress for this bucket and key; NoSuchUpload otherwise."""
        self.store.bucket_dir(bucket)
        # Upload ids become path names: only our own format may get near the disk.
        if not _UPLOAD_ID.fullmatch(upload_id):
            raise errors.no_such_upload(upload_id)
        data = self._read_upload(upload_id)
        if data is None:
            raise errors.no_such_upload(upload_id)
        upload = UploadRecord.from_json(upload_id, data)
        if upload.bucket != bucket or upload.key != key:
            raise errors.no_such_upload(upload_id)
        return upload

    def abort(self, upload: UploadRecord) -> None:
        with self.store.lock("upload", upload.upload_id):
            shutil.rmtree(self._dir(upload.upload_id), ignore_errors=True)

    def _of_bucket(self, bucket: str) -> list[UploadRecord]:
        uploads = []
        try:
            names = os.listdir(self.store.uploads)
        except FileNotFoundError:
            return []
        for upload_id in names:
            if not _UPLOAD_ID.fullmatch(upload_id):
                continue
            data = self._read_upload(upload_id)
            if data is None:
                continue
            try:
                upload = UploadRecord.from_json(upload_id, data)
            except (KeyError, TypeError, ValueError):
                continue
            if upload.bucket == bucket:
                uploads.append(upload)
        return uploads

    def list(self, bucket: str, prefix: str) -> list[UploadRecord]:
        """Uploads in progress under `prefix`, by key, then initiation time."""
        self.store.bucket_dir(bucket)
        uploads = [u for u in self._of_bucket(bucket) if u.key.startswith(prefix)]
        uploads.sort(key=lambda u: (u.key, u.initiated_ns, u.upload_id))
        return uploads

    def discard_bucket(self, bucket: str) -> None:
        """Remove the uploads of a deleted bucket."""
        for upload in self._of_bucket(bucket):
            shutil.rmtree(self._dir(upload.upload_id), ignore_errors=True)

    # -- parts ------------------------------------------------------------------------

    def commit_part(self, upload: UploadRecord, number: int, temp: TempFile,
                    checksum: StoredChecksum | None) -> PartRecord:
        """Move a finished temp file (written with MD5) into place as part `number`."""
        directory = self._dir(upload.upload_id)
        st = temp.finish()
        assert temp.md5 is not None
        part = PartRecord(number, temp.md5.hexdigest(), st.st_size, st.st_mtime_ns, checksum)
        with self.store.lock("upload", upload.upload_id):
            if not os.path.isdir(directory):
                raise errors.no_such_upload(upload.upload_id)  # aborted meanwhile
            os.replace(temp.path, self._part_path(upload.upload_id, number, ".part"))
            temp.commit()
            self.store.write_json(self._part_path(upload.upload_id, number, ".json"), part.to_json())
        return part

    def list_parts(self, upload: UploadRecord) -> list[PartRecord]:
        directory = self._dir(upload.upload_id)
        parts = []
        try:
            names = sorted(os.listdir(directory))
        except FileNotFoundError:
            raise errors.no_such_upload(upload.upload_id) from None
        for name in names:
            if not _PART_JSON.fullmatch(name):
                continue
            data = self.store.read_json(os.path.join(directory, name))
            if data is None:
                continue
            parts.append(PartRecord.from_json(int(name[:5]), data))
        return parts

    def complete(self, upload: UploadRecord, requested: list[tuple[int, str]]) -> ObjectRecord:
        """Assemble the listed parts into the object; the upload is gone afterwards."""
        directory = self._dir(upload.upload_id)
        opened: list[tuple[int, PartRecord]] = []
        try:
            with self.store.lock("upload", upload.upload_id):
                # Open every part under the lock: the descriptors pin exactly the
                # bytes the recorded ETags describe, whatever is uploaded next.
                if not os.path.isdir(directory):
                    raise errors.no_such_upload(upload.upload_id)
                stored = {part.number: part for part in self.list_parts(upload)}
                for number, etag in requested:
                    part = stored.get(number)
                    if part is None or part.etag != bare_etag(etag):
                        raise invalid_part(number, etag)
                    try:
                        fd = os.open(self._part_path(upload.upload_id, number, ".part"), os.O_RDONLY | os.O_CLOEXEC)
                    except FileNotFoundError:
                        raise invalid_part(number, etag) from None
                    opened.append((fd, part))
                    if os.fstat(fd).st_size != part.size:
                        raise invalid_part(number, etag)
            parts = [part for _fd, part in opened]
            _check_part_sizes(parts)
            combined = hashlib.md5(b"".join(bytes.fromhex(part.etag) for part in parts), usedforsecurity=False)
            etag = f"{combined.hexdigest()}-{len(parts)}"
            sizes = [part.size for part in parts]
            temp = self.store.new_temp(md5=False)
            try:
                for fd, part in opened:
                    temp.copy_from(fd, 0, part.size)
                record = self.store.commit_object(
                    upload.bucket, upload.key, temp,
                    lambda st: ObjectRecord.written(st, etag, upload.representation, part_sizes=sizes))
            finally:
                temp.discard()
        finally:
            for fd, _part in opened:
                os.close(fd)
        shutil.rmtree(directory, ignore_errors=True)
        return record


def _check_part_sizes(parts: list[PartRecord]) -> None:
    """EntityTooSmall unless every part but the last has the minimum size."""
    for part in parts[:-1]:
        if part.size < MIN_PART_SIZE:
            raise errors.S3Error(
                "EntityTooSmall", "Your proposed upload is smaller than the minimum allowed object size.",
                400, extra={"ProposedSize": str(part.size), "MinSizeAllowed": str(MIN_PART_SIZE),
                            "PartNumber": str(part.number), "ETag": part.quoted_etag})
