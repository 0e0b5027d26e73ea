"""Parquet layouts from footers: chunk spans, lookups by offset, and footers refused."""

from __future__ import annotations

import io

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sprox.cache.parquet import MAX_FOOTER, footer_length, is_parquet_key, parse_footer


def parquet(row_groups: int = 3, rows: int = 1000, dictionary: bool = False) -> bytes:
    table = pa.table({"a": pa.array(range(row_groups * rows), pa.int64()),
                      "b": pa.array([f"v{i % 7}" for i in range(row_groups * rows)])})
    sink = io.BytesIO()
    pq.write_table(table, sink, row_group_size=rows, use_dictionary=dictionary)
    return sink.getvalue()


def tail_of(data: bytes) -> bytes:
    return data[-(int.from_bytes(data[-8:-4], "little") + 8):]


@pytest.mark.parametrize("dictionary", [False, True])
def test_the_layout_gives_every_chunk_where_pyarrow_says_it_is(dictionary):
    data = parquet(dictionary=dictionary)
    layout = parse_footer(tail_of(data), len(data))
    assert layout is not None and (layout.row_groups, layout.columns) == (3, 2)
    meta = pq.read_metadata(pa.BufferReader(data))
    for rg in range(3):
        for col in range(2):
            chunk = meta.row_group(rg).column(col)
            start = min(o for o in (chunk.dictionary_page_offset, chunk.data_page_offset) if o)
            assert layout.chunk(rg, col) == (start, start + chunk.total_compressed_size)
            first, end = layout.chunk(rg, col)
            assert layout.chunks_overlapping(first, end - 1) == [(rg, col)]
            assert (rg, col) in layout.chunks_overlapping(end - 1, end - 1)
    assert layout.metadata_start == max(layout.ends) and layout.chunks == 6
    everything = layout.chunks_overlapping(0, len(data))
    assert sorted(everything) == [(rg, col) for rg in range(3) for col in range(2)]
    assert layout.chunks_overlapping(0, 3) == []  # the leading magic


def test_a_tail_that_is_not_parquet_is_refused():
    assert footer_length(b"12345678", 100) is None
    assert footer_length((50).to_bytes(4, "little") + b"PAR1", 40) is None  # longer than the object
    assert footer_length((0).to_bytes(4, "little") + b"PAR1", 40) is None
    assert footer_length((MAX_FOOTER + 1).to_bytes(4, "little") + b"PAR1", 10**9) is None
    assert footer_length((20).to_bytes(4, "little") + b"PAR1", 40) == 20
    garbage = bytes(range(200)) + (100).to_bytes(4, "little") + b"PAR1"
    assert parse_footer(garbage, 10_000) is None  # a length and magic, and no footer


def test_a_footer_whose_offsets_lie_is_refused():
    data = parquet()
    tail = tail_of(data)
    # The same footer at the end of a shorter object: its chunks would lie past the
    # object's data region.
    assert parse_footer(tail, len(tail) + 4) is None
    assert parse_footer(tail, len(data)) is not None
    assert parse_footer(tail[:-1] + b"X", len(data)) is None  # a broken magic


def test_parquet_keys_are_known_by_their_suffix():
    assert is_parquet_key("a/b.parquet") and is_parquet_key("X.PARQUET")
    assert not is_parquet_key("a/b.csv") and not is_parquet_key("parquet")
