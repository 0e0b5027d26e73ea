"""CacheIndex persistence of what a record knows of an object's checksums."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from sprox.cache.index import CacheIndex
from sprox.cache.records import ObjectRecord

OLD_SCHEMA = """
CREATE TABLE objects (id INTEGER PRIMARY KEY, bucket TEXT NOT NULL, key TEXT NOT NULL, etag TEXT NOT NULL,
    size INTEGER NOT NULL, last_modified TEXT NOT NULL, headers TEXT NOT NULL, validated_at REAL NOT NULL,
    block_size INTEGER NOT NULL);
CREATE UNIQUE INDEX objects_by_key ON objects (bucket, key);
CREATE TABLE blocks (object_id INTEGER NOT NULL, idx INTEGER NOT NULL, crc INTEGER NOT NULL,
    PRIMARY KEY (object_id, idx)) WITHOUT ROWID;
"""


def reopened(path: Path) -> CacheIndex:
    index = CacheIndex(path)
    index.open()
    return index


def test_checksums_survive_a_restart_and_unknown_stays_unknown(tmp_path: Path) -> None:
    path = tmp_path / "index.sqlite"
    index = reopened(path)
    known = ObjectRecord(index.new_id(), "b", "known", '"e1"', 10, "", (), 0.0, 4,
                         checksums=(("x-amz-checksum-crc32", "AAAAAA=="),))
    none = ObjectRecord(index.new_id(), "b", "none", '"e2"', 10, "", (), 0.0, 4, checksums=())
    unknown = ObjectRecord(index.new_id(), "b", "unknown", '"e3"', 10, "", (), 0.0, 4)
    later = ObjectRecord(index.new_id(), "b", "later", '"e4"', 10, "", (), 0.0, 4)
    for record in (known, none, unknown, later):
        index.put(record)
    index.learned_checksums(later, (("x-amz-checksum-sha256", "x"), ("x-amz-checksum-type", "FULL_OBJECT")))
    index.close()

    index = reopened(path)
    assert index.get("b", "known").checksums == (("x-amz-checksum-crc32", "AAAAAA=="),)
    assert index.get("b", "none").checksums == ()
    assert index.get("b", "unknown").checksums is None
    assert index.get("b", "later").checksums == (("x-amz-checksum-sha256", "x"), ("x-amz-checksum-type", "FULL_OBJECT"))
    index.close()


def test_an_index_from_before_checksums_opens_with_them_unknown(tmp_path: Path) -> None:
    path = tmp_path / "index.sqlite"
    db = sqlite3.connect(path)
    db.executescript(OLD_SCHEMA)
    db.execute("INSERT INTO objects VALUES (1, 'b', 'k', '\"e\"', 10, '', '[]', 0.0, 4)")
    db.execute("INSERT INTO blocks VALUES (1, 0, 123)")
    db.commit()
    db.close()
    index = reopened(path)
    record = index.get("b", "k")
    assert record is not None and record.checksums is None and record.has(0)
    index.learned_checksums(record, ())
    index.close()
    assert reopened(path).get("b", "k").checksums == ()


def test_per_response_headers_are_never_replayed_from_the_cache():
    from sprox.cache.records import replayable

    for name in ("x-amz-request-id", "X-Amz-Id-2", "x-amzn-RequestId", "Date", "x-amz-checksum-crc32"):
        assert not replayable(name), name
    for name in ("Content-Type", "x-amz-meta-owner", "Cache-Control", "x-amz-version-id"):
        assert replayable(name), name
