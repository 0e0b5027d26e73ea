"""Block files: one sparse file per object version, each block at its natural offset,
so any contiguous cached span is one `sendfile` call.

File descriptors are shared between requests and reference-counted: a descriptor is
closed only when no request is using it, so a `sendfile` in progress can never be
handed a closed (or, worse, reused) descriptor."""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import os
import zlib
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .records import ObjectRecord

log = logging.getLogger("sprox.cache")

MAX_IDLE_FDS = 256

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
_fallocate = getattr(_libc, "fallocate", None)
if _fallocate is not None:
    _fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong]


def punch_hole(fd: int, offset: int, length: int) -> bool:
    """Free a block's disk space inside a file; False where the file system can't."""
    if _fallocate is None:
        return False
    if _fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length) != 0:
        err = ctypes.get_errno()
        if err not in (errno.EOPNOTSUPP, errno.ENOSYS):
            log.warning("punching a hole failed: %s", os.strerror(err))
        return False
    return True


class _OpenFile:
    __slots__ = ("fd", "direct_fd", "users", "unlinked")

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.direct_fd = -1  # an O_DIRECT descriptor, opened on first use (--direct-io)
        self.users = 0
        self.unlinked = False


class BlockFiles:
    """Owns the block files under `directory` and every descriptor open on them.
    Blocking helpers (`read_block`, `block_matches`) are for offline tools and executors;
    the running cache reads and writes through its I/O backend (`io.py`)."""

    def __init__(self, directory: Path, executor: ThreadPoolExecutor) -> None:
        self.directory = directory
        self.executor = executor
        self._open: dict[int, _OpenFile] = {}  # record id -> file
        self._idle: OrderedDict[int, None] = OrderedDict()  # record ids with no users, LRU

    def prepare(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)

    def supports_direct_io(self) -> str | None:
        """None when O_DIRECT works in the block directory, else why not (tmpfs, for one,
        refuses it)."""
        probe = self.directory / ".direct-io-probe"
        try:
            fd = os.open(probe, os.O_RDWR | os.O_CREAT | os.O_DIRECT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            return f"the file system of {str(self.directory)!r} refuses O_DIRECT ({exc.strerror})"
        os.close(fd)
        probe.unlink()
        return None

    def path(self, record: ObjectRecord) -> Path:
        return self.directory / record.file_name

    # -- descriptors (event-loop thread only) -----------------------------------------------

    def acquire(self, record: ObjectRecord, direct: bool = False) -> int:
        """A descriptor for the record's file, held until `release`; with `direct`, one
        opened with O_DIRECT (for the I/O backend in --direct-io mode)."""
        entry = self._open.get(record.id)
        if entry is None:
            path = self.path(record)
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            except FileNotFoundError:
                path.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            entry = self._open[record.id] = _OpenFile(fd)
        else:
            self._idle.pop(record.id, None)
        entry.users += 1
        if direct:
            if entry.direct_fd < 0:
                try:
                    entry.direct_fd = os.open(self.path(record), os.O_RDWR | os.O_DIRECT | os.O_CLOEXEC)
                except OSError:
                    self.release(record)
                    raise
            return entry.direct_fd
        return entry.fd

    def release(self, record: ObjectRecord) -> None:
        entry = self._open.get(record.id)
        if entry is None:
            return
        entry.users -= 1
        if entry.users == 0:
            if entry.unlinked:
                self._close(record.id)
            else:
                self._idle[record.id] = None
                while len(self._idle) > MAX_IDLE_FDS:
                    oldest, _ = self._idle.popitem(last=False)
                    self._close(oldest)

    def _close(self, record_id: int) -> None:
        entry = self._open.pop(record_id, None)
        self._idle.pop(record_id, None)
        if entry is not None:
            os.close(entry.fd)
            if entry.direct_fd >= 0:
                os.close(entry.direct_fd)

    def remove(self, record: ObjectRecord) -> None:
        """Delete a record's file; descriptors in use stay valid until released."""
        entry = self._open.get(record.id)
        if entry is not None:
            entry.unlinked = True
            if entry.users == 0:
                self._close(record.id)
        try:
            os.unlink(self.path(record))
        except FileNotFoundError:
            pass

    def close_all(self) -> None:
        for record_id in list(self._open):
            self._close(record_id)

    # -- blocking I/O (executor) ------------------------------------------------------------

    @staticmethod
    def read_block(fd: int, offset: int, length: int) -> bytes:
        parts = []
        while length > 0:
            chunk = os.pread(fd, length, offset)
            if not chunk:
                break
            parts.append(chunk)
            offset += len(chunk)
            length -= len(chunk)
        return b"".join(parts)

    @classmethod
    def block_matches(cls, fd: int, offset: int, length: int, crc: int) -> bool:
        data = cls.read_block(fd, offset, length)
        return len(data) == length and zlib.crc32(data) == crc
