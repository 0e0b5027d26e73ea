"""The response head of a cache hit, as bytes for the wire: the record's headers
rendered once per record (`name: value\r\n` each) and kept on it, so a hit costs no
header dictionary at all. The Python fast lane puts them after its status line; the
hit kernel keeps a copy in its mirror (sprox/cache/mirror.py). The cache decides what
an answer carries (`HitPlan.with_checksums`); this module only renders it."""

from __future__ import annotations

from .cache.records import ObjectRecord, response_headers


def record_head(record: ObjectRecord, with_checksums: bool = False) -> bytes | None:
    """The record's response headers rendered, with its checksum headers when asked
    (None while the record does not know them)."""
    if with_checksums:
        if record.checksums is None:
            return None
        if record.rendered_with_checksums is None:
            record.rendered_with_checksums = _render(response_headers(record).items(), record.checksums)
        return record.rendered_with_checksums
    if record.rendered is None:
        record.rendered = _render(response_headers(record).items())
    return record.rendered


def _render(*header_lists) -> bytes:
    return "".join(f"{name}: {value}\r\n" for headers in header_lists for name, value in headers).encode()
