"""The cache index: object records in memory for the hot lookup, persisted to SQLite
(WAL mode) by one writer thread so the event loop never waits on the database.

Order of events that makes the index crash-safe: a block's bytes are written to its
block file first, and only then is the block added here; so after a crash every block
the index names had its bytes written (and its CRC lets a read after restart catch a
block whose bytes did not survive a power failure)."""

from __future__ import annotations

import json
import logging
import queue
import sqlite3
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

from .records import ObjectRecord

log = logging.getLogger("sprox.cache")

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS objects (
    id INTEGER PRIMARY KEY,
    bucket TEXT NOT NULL,
    key TEXT NOT NULL,
    etag TEXT NOT NULL,
    size INTEGER NOT NULL,
    last_modified TEXT NOT NULL,
    headers TEXT NOT NULL,
    validated_at REAL NOT NULL,
    block_size INTEGER NOT NULL,
    checksums TEXT  -- JSON [[name, value], ...] of x-amz-checksum-*; NULL: not known yet
);
CREATE UNIQUE INDEX IF NOT EXISTS objects_by_key ON objects (bucket, key);
CREATE TABLE IF NOT EXISTS blocks (
    object_id INTEGER NOT NULL,
    idx INTEGER NOT NULL,
    crc INTEGER NOT NULL,
    PRIMARY KEY (object_id, idx)
) WITHOUT ROWID;
"""

_STOP = object()


class CacheIndex:
    """Records by (bucket, key) and by id. Mutations update memory at once and are
    queued for the writer thread; `flush()` waits until they are committed."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.by_key: dict[tuple[str, str], ObjectRecord] = {}
        self.by_id: dict[int, ObjectRecord] = {}
        self._next_id = 1
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._db: sqlite3.Connection | None = None
        self.write_errors = 0
        # Called with (bucket, key) when the key's record is replaced, dropped or learns
        # its checksums (the hit kernel's mirror forgets the key: sprox/cache/mirror.py).
        self.on_key_change: Callable[[str, str], None] | None = None

    # -- lifecycle (blocking: call from a thread) -------------------------------------------

    def open(self) -> None:
        """Load every record and block, then start the writer thread."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.executescript(SCHEMA)
        if "checksums" not in {row[1] for row in db.execute("PRAGMA table_info(objects)")}:
            # An index from before checksums were kept: its records' are not known yet.
            db.execute("ALTER TABLE objects ADD COLUMN checksums TEXT")
        for row in db.execute("SELECT id, bucket, key, etag, size, last_modified, headers, "
                              "validated_at, block_size, checksums FROM objects"):
            record = ObjectRecord(row[0], row[1], row[2], row[3], row[4], row[5],
                                  tuple(tuple(h) for h in json.loads(row[6])), row[7], row[8],
                                  checksums=_checksums_from_json(row[9]))
            self._remember(record)
        for object_id, idx, crc in db.execute("SELECT object_id, idx, crc FROM blocks"):
            record = self.by_id.get(object_id)
            if record is not None and 0 <= idx < record.block_count:
                record.set_present(idx, crc, verified=False)
        self._next_id = 1 + max(self.by_id, default=0)
        self._db = db
        self._thread = threading.Thread(target=self._writer, name="sprox-index", daemon=True)
        self._thread.start()

    def close(self) -> None:
        if self._thread is not None:
            self._queue.put(_STOP)
            self._thread.join()
            self._thread = None
        if self._db is not None:
            self._db.close()
            self._db = None

    def flush_blocking(self, timeout: float | None = None) -> None:
        done = threading.Event()
        self._queue.put(done)
        done.wait(timeout)

    # -- queries ---------------------------------------------------------------------------

    def get(self, bucket: str, key: str) -> ObjectRecord | None:
        return self.by_key.get((bucket, key))

    def records(self) -> Iterator[ObjectRecord]:
        return iter(list(self.by_id.values()))

    # -- mutations -------------------------------------------------------------------------

    def new_id(self) -> int:
        object_id = self._next_id
        self._next_id += 1
        return object_id

    def put(self, record: ObjectRecord) -> ObjectRecord | None:
        """Make `record` the one for its key; returns the record it replaced."""
        old = self.by_key.get((record.bucket, record.key))
        if self.on_key_change is not None:
            self.on_key_change(record.bucket, record.key)
        if old is not None:
            self.by_id.pop(old.id, None)
        self._remember(record)
        self._queue.put(("put", record.id, record.bucket, record.key, record.etag, record.size,
                         record.last_modified, json.dumps(record.headers), record.validated_at,
                         record.block_size, _checksums_to_json(record.checksums)))
        return old

    def drop(self, record: ObjectRecord) -> bool:
        """Forget a record (if it is still the current one for its id)."""
        if self.by_id.get(record.id) is not record:
            return False
        del self.by_id[record.id]
        if self.by_key.get((record.bucket, record.key)) is record:
            del self.by_key[(record.bucket, record.key)]
            if self.on_key_change is not None:
                self.on_key_change(record.bucket, record.key)
        self._queue.put(("drop", record.id))
        return True

    def add_block(self, record: ObjectRecord, index: int, crc: int) -> bool:
        """Mark a block present: call only after its bytes are written."""
        if self.by_id.get(record.id) is not record:
            return False  # dropped while the block was being filled
        record.set_present(index, crc)
        self._queue.put(("block", record.id, index, crc))
        return True

    def drop_block(self, record: ObjectRecord, index: int) -> None:
        record.clear(index)
        if self.by_id.get(record.id) is record:
            self._queue.put(("unblock", record.id, index))

    def validated(self, record: ObjectRecord, when: float) -> None:
        record.validated_at = when
        self._queue.put(("validated", record.id, when))

    def learned_checksums(self, record: ObjectRecord, checksums: tuple[tuple[str, str], ...]) -> None:
        """The origin told the object's checksums (a HEAD or full GET with checksum mode)."""
        record.learned_checksums(checksums)
        if self.on_key_change is not None and self.by_key.get((record.bucket, record.key)) is record:
            self.on_key_change(record.bucket, record.key)
        self._queue.put(("checksums", record.id, _checksums_to_json(checksums)))

    def _remember(self, record: ObjectRecord) -> None:
        self.by_key[(record.bucket, record.key)] = record
        self.by_id[record.id] = record

    # -- the writer thread ---------------------------------------------------------------------

    def _writer(self) -> None:
        assert self._db is not None
        db = self._db
        while True:
            op = self._queue.get()
            batch = [op]
            # Group what is queued into one transaction: one commit for many blocks.
            while len(batch) < 2000:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            stop = False
            waiters = []
            try:
                db.execute("BEGIN")
                for op in batch:
                    if op is _STOP:
                        stop = True
                    elif isinstance(op, threading.Event):
                        waiters.append(op)
                    else:
                        self._apply(db, op)
                db.execute("COMMIT")
            except sqlite3.Error:
                self.write_errors += 1
                log.exception("cache index write failed; the cache keeps serving from memory")
                try:
                    db.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
            for waiter in waiters:
                waiter.set()
            if stop:
                return

    @staticmethod
    def _apply(db: sqlite3.Connection, op: tuple) -> None:
        kind = op[0]
        if kind == "block":
            db.execute("INSERT OR REPLACE INTO blocks (object_id, idx, crc) VALUES (?, ?, ?)", op[1:])
        elif kind == "unblock":
            db.execute("DELETE FROM blocks WHERE object_id = ? AND idx = ?", op[1:])
        elif kind == "put":
            # A key has one record: replacing it drops the old version's blocks too.
            for (old_id,) in db.execute("SELECT id FROM objects WHERE bucket = ? AND key = ?", op[2:4]).fetchall():
                db.execute("DELETE FROM blocks WHERE object_id = ?", (old_id,))
                db.execute("DELETE FROM objects WHERE id = ?", (old_id,))
            db.execute("INSERT OR REPLACE INTO objects (id, bucket, key, etag, size, last_modified, headers, "
                       "validated_at, block_size, checksums) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", op[1:])
        elif kind == "drop":
            db.execute("DELETE FROM blocks WHERE object_id = ?", op[1:])
            db.execute("DELETE FROM objects WHERE id = ?", op[1:])
        elif kind == "validated":
            db.execute("UPDATE objects SET validated_at = ? WHERE id = ?", (op[2], op[1]))
        elif kind == "checksums":
            db.execute("UPDATE objects SET checksums = ? WHERE id = ?", (op[2], op[1]))


def _checksums_to_json(checksums: tuple[tuple[str, str], ...] | None) -> str | None:
    return None if checksums is None else json.dumps(checksums)


def _checksums_from_json(text: str | None) -> tuple[tuple[str, str], ...] | None:
    return None if text is None else tuple(tuple(pair) for pair in json.loads(text))
