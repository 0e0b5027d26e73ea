"""What the access log records of an object read's answer (frontend.object_span),
including from hostile upstream headers, which must never raise."""

from __future__ import annotations

import pytest

from sprox.frontend import object_span


@pytest.mark.parametrize("method,status,content_range,length,expected", [
    ("GET", 206, "bytes 100-199/1000", "100", (100, 1000)),
    ("GET", 206, "bytes 100-199/*", "100", (100, None)),
    ("GET", 200, None, "1000", (0, 1000)),
    ("GET", 200, None, 1000, (0, 1000)),
    ("HEAD", 200, None, "1000", (None, 1000)),
    ("GET", 404, None, "300", (None, None)),
    ("GET", 206, "bytes ¹-2/3", "2", (None, None)),  # not ASCII digits: int() would raise
    ("GET", 206, "bytes 1-2/³", "2", (1, None)),
    ("GET", 200, None, "²", (None, None)),
    ("GET", 206, "items 1-2/3", "2", (None, None)),
])
def test_object_span(method, status, content_range, length, expected):
    assert object_span(method, status, content_range, length) == expected
