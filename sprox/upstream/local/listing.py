"""Listing: keys in S3 order, rolled up into common prefixes, a page at a time.

`list_entries` walks a bucket's directory tree (blocking, on a worker thread) and
`page_of_uploads` pages through multipart uploads; both roll keys up with
`common_prefix`. Continuation tokens are positions in that order.
"""

from __future__ import annotations

import base64
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from ...s3 import errors
from .keys import decode_segment
from .records import ObjectRecord, UploadRecord
from .store import DirectoryStore


@dataclass(slots=True)
class ListedObject:
    key: str
    record: ObjectRecord


def common_prefix(key: str, prefix: str, delimiter: str) -> str | None:
    """The common prefix `key` is rolled up into (up to and including the first
    `delimiter` after `prefix`); None when it is listed on its own."""
    if not delimiter:
        return None
    found = key.find(delimiter, len(prefix))
    return key[: found + len(delimiter)] if found >= 0 else None


def entry_name(entry: ListedObject | UploadRecord | str) -> str:
    """The key of a listed object or upload, or the common prefix itself."""
    return entry if isinstance(entry, str) else entry.key


class KeyWalk:
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
        """(key, file path) pairs below `directory`, whose keys start with `key_prefix`."""
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


def list_entries(store: DirectoryStore, bucket: str, prefix: str, delimiter: str, start: str,
                 limit: int) -> tuple[list[ListedObject | str], bool]:
    """Up to `limit` entries (objects, or common-prefix strings when `delimiter`
    is set) after `start`, in S3 order; and whether more follow. Blocking.

    As in S3, `start` is compared with entries after the roll-up: a common prefix
    at or before `start` is skipped with all its keys (so a NextMarker that is a
    common prefix resumes after it)."""
    bucket_dir = store.bucket_dir(bucket)
    walk = KeyWalk(prefix, start)
    entries: list[ListedObject | str] = []
    top = os.stat(bucket_dir)
    for key, path in walk.keys(bucket_dir, "", frozenset({(top.st_dev, top.st_ino)})):
        common = common_prefix(key, prefix, delimiter)
        if common is not None:
            walk.skip = common
            if common <= start:
                continue
            if len(entries) == limit:
                return entries, True
            entries.append(common)
            continue
        try:
            record = store.record_for(bucket, key, path, os.stat(path))
        except OSError:
            continue  # deleted while listing
        if len(entries) == limit:
            return entries, True
        entries.append(ListedObject(key, record))
    return entries, False


def page_of_uploads(uploads: Sequence[UploadRecord], prefix: str, delimiter: str, key_marker: str,
                    upload_id_marker: str, limit: int) -> tuple[list[UploadRecord | str], bool]:
    """Up to `limit` entries (uploads, or common prefixes) of `uploads` (sorted by key)
    after (`key_marker`, `upload_id_marker`); and whether more follow."""
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
    for upload in uploads[position:]:
        entry: UploadRecord | str = upload
        common = common_prefix(upload.key, prefix, delimiter)
        if common is not None:
            entry = common
            if entries and entries[-1] == entry:
                continue
        if len(entries) == limit:
            return entries, True
        entries.append(entry)
    return entries, False


def encode_token(entry: str) -> str:
    """The ListObjectsV2 continuation token that resumes after `entry`."""
    return base64.urlsafe_b64encode(entry.encode()).decode()


def decode_token(token: str) -> str:
    """The entry a continuation token resumes after; InvalidArgument if it is not one."""
    try:
        if not token:
            raise ValueError("empty continuation token")
        return base64.urlsafe_b64decode(token.encode("ascii")).decode("utf-8")
    except (ValueError, UnicodeError):
        raise errors.invalid_argument("The continuation token provided is incorrect", "continuation-token",
                                      token) from None
