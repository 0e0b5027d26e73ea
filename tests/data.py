"""Self-checking test data.

Object bytes: the byte at offset i is a function of (key, i), so a wrong range, a
shifted block or bytes of another object are caught by `check_bytes`. Tables: Parquet
and CSV files with deterministic rows and known aggregates (`TableFacts`).
"""

from __future__ import annotations

import functools
import hashlib
import random
from dataclasses import dataclass
from pathlib import Path

_BLOCK = 64 * 1024


def _seed(key: str) -> bytes:
    return hashlib.blake2b(key.encode(), digest_size=32).digest()


@functools.lru_cache(maxsize=32)
def _pattern(key: str) -> int:
    """64 KiB of pseudo-random bytes seeded by `key`, as a little-endian int."""
    return int.from_bytes(random.Random(_seed(key)).randbytes(_BLOCK), "little")


@functools.lru_cache(maxsize=4096)
def _block(key: str, index: int) -> bytes:
    # Block `index` is the key's pattern XOR an 8-byte mask derived from (key, index):
    # blocks differ from one another, so an offset off by a multiple of 64 KiB shows.
    mask = hashlib.blake2b(_seed(key) + index.to_bytes(8, "little"), digest_size=8).digest()
    mask_int = int.from_bytes(mask * (_BLOCK // 8), "little")
    return (_pattern(key) ^ mask_int).to_bytes(_BLOCK, "little")


def expected_bytes(key: str, offset: int, length: int) -> bytes:
    """Bytes [offset, offset + length) of the object named `key`."""
    if offset < 0 or length < 0:
        raise ValueError("offset and length must be >= 0")
    if length == 0:
        return b""
    first, last = offset // _BLOCK, (offset + length - 1) // _BLOCK
    joined = b"".join(_block(key, i) for i in range(first, last + 1))
    start = offset - first * _BLOCK
    return joined[start:start + length]


def object_bytes(key: str, size: int) -> bytes:
    """The whole content of a test object named `key` of `size` bytes."""
    return expected_bytes(key, 0, size)


def check_bytes(key: str, offset: int, data: bytes) -> int | None:
    """The offset in the object of the first byte of `data` that is wrong, or None.

    `data` is what a read of object `key` returned starting at `offset`.
    """
    step = 1 << 20
    for start in range(0, len(data), step):
        got = data[start:start + step]
        want = expected_bytes(key, offset + start, len(got))
        if got != want:
            return offset + start + next(i for i, (a, b) in enumerate(zip(got, want)) if a != b)
    return None


def assert_bytes(key: str, offset: int, data: bytes, size: int | None = None) -> None:
    """Assert `data` is object `key` from `offset` (and exactly `size` bytes, if given)."""
    if size is not None:
        assert len(data) == size, f"{key}: got {len(data)} bytes, expected {size}"
    bad = check_bytes(key, offset, data)
    assert bad is None, f"{key}: wrong byte at offset {bad} (read started at {offset}, {len(data)} bytes)"


@dataclass(frozen=True)
class TableFacts:
    """What a query over a table from `make_parquet`/`make_csv` must return.

    Columns: id (int64, 0..rows-1), value (int64, (id * 37) % 1009), name (string
    "row-<id>"). `value_sum` is sum(value); `id_sum` is sum(id).
    """

    rows: int
    id_sum: int
    value_sum: int


def table_facts(rows: int) -> TableFacts:
    return TableFacts(rows=rows, id_sum=rows * (rows - 1) // 2,
                      value_sum=sum((i * 37) % 1009 for i in range(rows)))


def _table(rows: int):
    import pyarrow as pa
    import pyarrow.compute as pc

    ids = pa.array(range(rows), type=pa.int64())
    values = pc.remainder(pc.multiply(ids, 37), 1009)
    names = pa.array([f"row-{i}" for i in range(rows)], type=pa.string())
    return pa.table({"id": ids, "value": values, "name": names})


def make_parquet(path: Path | str, rows: int = 100_000, row_groups: int = 4) -> TableFacts:
    """Write a Parquet file of `rows` rows in `row_groups` row groups."""
    import pyarrow.parquet as pq

    per_group = -(-rows // row_groups)
    pq.write_table(_table(rows), str(path), row_group_size=per_group)
    return table_facts(rows)


def make_csv(path: Path | str, rows: int) -> TableFacts:
    """Write a CSV file (header line, then `rows` rows) of the same columns."""
    import pyarrow.csv as pacsv

    pacsv.write_csv(_table(rows), str(path))
    return table_facts(rows)
