"""The layout of a Parquet object, from its footer: where each column chunk of each row
group lies, and where the metadata (page indexes, footer) begins.

A Parquet file ends with its footer (Thrift FileMetaData), the footer's length as 4
little-endian bytes, and the magic `PAR1`. Only the tail is needed: pyarrow reads the
metadata from a buffer holding just those bytes (offsets inside it are absolute file
offsets, which is all Sprox uses). Anything that does not check out (no magic, a length
past the object, a chunk outside the data region, a footer pyarrow refuses) is no
layout: the object is then served like any other, with no prefetch."""

from __future__ import annotations

import bisect
from array import array
from dataclasses import dataclass

MAGIC = b"PAR1"
TAIL = 8  # footer length (4 bytes) and the magic
MAX_FOOTER = 64 * 2**20  # a longer footer is not read for prefetching


def footer_length(last8: bytes, size: int) -> int | None:
    """The footer's length from the object's last 8 bytes; None if they are not a
    Parquet tail, or the length cannot fit in an object of `size` bytes (which also
    holds the leading magic)."""
    if len(last8) != TAIL or last8[4:] != MAGIC:
        return None
    length = int.from_bytes(last8[:4], "little")
    if length <= 0 or length > MAX_FOOTER or length + TAIL + len(MAGIC) > size:
        return None
    return length


@dataclass(frozen=True, slots=True)
class ParquetLayout:
    """Column chunk spans by (row group, column), and by offset for lookups, in arrays:
    20 bytes a chunk (a wide file's layout holds tens of thousands)."""

    size: int
    metadata_start: int  # first byte after the last column chunk: page indexes, footer
    row_groups: int
    columns: int
    begins: array  # chunk starts, index rg * columns + col
    ends: array  # chunk ends (exclusive), same index
    starts: array  # chunk starts, sorted
    order: array  # chunk index of each entry of `starts`

    @property
    def chunks(self) -> int:
        return len(self.begins)

    def chunk(self, row_group: int, column: int) -> tuple[int, int]:
        i = row_group * self.columns + column
        return self.begins[i], self.ends[i]

    def chunks_overlapping(self, first: int, last: int) -> list[tuple[int, int]]:
        """(row group, column) of every chunk holding a byte of [first, last]."""
        found = []
        i = max(0, bisect.bisect_right(self.starts, first) - 1)
        while i < len(self.starts) and self.starts[i] <= last:
            index = self.order[i]
            if self.ends[index] > first:
                found.append(divmod(index, self.columns))
            i += 1
        return found


def parse_footer(tail: bytes, size: int) -> ParquetLayout | None:
    """The layout of a Parquet object of `size` bytes from its tail (footer, length,
    magic); None when the footer is not one, or lies about where its chunks are."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    length = footer_length(tail[-TAIL:], size)
    if length is None or len(tail) < length + TAIL:
        return None
    footer_start = size - TAIL - length
    try:
        meta = pq.read_metadata(pa.BufferReader(tail[-(length + TAIL):]))
        row_groups, columns = meta.num_row_groups, meta.num_columns
        spans: list[tuple[int, int]] = []
        for rg in range(row_groups):
            group = meta.row_group(rg)
            for col in range(columns):
                chunk = group.column(col)
                start = chunk.data_page_offset
                if chunk.has_dictionary_page and chunk.dictionary_page_offset:
                    # (Some writers set 0 for "none": only a real, earlier offset counts.)
                    start = min(start, chunk.dictionary_page_offset)
                spans.append((start, start + chunk.total_compressed_size))
    except (OSError, ValueError, TypeError, IndexError, pa.ArrowException):
        return None
    if columns == 0 or not spans:
        return None
    for start, end in spans:
        if not len(MAGIC) <= start < end <= footer_start:
            return None  # the footer lies: no prefetch from it
    order = sorted(range(len(spans)), key=lambda i: spans[i][0])
    return ParquetLayout(size=size, metadata_start=max(end for _, end in spans), row_groups=row_groups,
                         columns=columns, begins=array("q", (b for b, _ in spans)),
                         ends=array("q", (e for _, e in spans)),
                         starts=array("q", (spans[i][0] for i in order)), order=array("i", order))


def is_parquet_key(key: str) -> bool:
    return key.lower().endswith(".parquet")
