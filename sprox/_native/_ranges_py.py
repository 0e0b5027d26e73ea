"""HTTP Range resolution and byte-range to block mapping, in plain Python.

This is the readable reference for the compiled `sprox._native.ranges`: both have the
same public API and the same behaviour, down to exception types and messages, and the
tests run every case against both. Callers import from `sprox.ranges`, which picks one.

Range headers are resolved the way Amazon S3's GetObject resolves them:

- no header, an empty one, a unit other than ``bytes``, a malformed header, or more
  than one range: ``None``, meaning "send the whole object with 200" (S3 serves no
  multipart/byteranges responses and ignores what it cannot parse);
- one satisfiable range: ``(first, last)``, inclusive offsets, for a 206;
- one unsatisfiable range: `RangeNotSatisfiable`, for a 416 InvalidRange.

Every integer argument must fit in a signed 64-bit integer, as in the compiled module
(where they are C ``int64_t``); outside that this module raises OverflowError too.
"""

from __future__ import annotations

import operator
import re

__all__ = [
    "RangeNotSatisfiable",
    "block_bounds",
    "block_count",
    "block_span",
    "content_range",
    "parse_range",
]

INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1


class RangeNotSatisfiable(ValueError):
    """A single byte range that selects nothing of the object (S3: 416 InvalidRange).

    `range_requested` is the Range header as received and `object_size` the object's
    size in bytes: the two details S3 puts in its InvalidRange error body. The compiled
    module raises this same class.
    """

    def __init__(self, range_requested: str, object_size: int) -> None:
        super().__init__("The requested range is not satisfiable")
        self.range_requested = range_requested
        self.object_size = object_size

    def __reduce__(self) -> tuple[type[RangeNotSatisfiable], tuple[str, int]]:
        # The default would call cls(message) and fail: __init__ takes other arguments.
        return (type(self), (self.range_requested, self.object_size))


# RFC 9110's optional whitespace (OWS) is spaces and horizontal tabs only. A bare
# str.strip() would also remove newlines, vertical tabs and Unicode spaces.
_OWS = " \t"

# re.ASCII keeps IGNORECASE to ASCII letters: without it "ſ" would match "s" and the
# Kelvin sign "K" would match "k". [0-9] rather than \d, which also matches other
# scripts' digits. DOTALL so that a newline in the range set is kept (and rejected
# later) rather than ending the match.
_BYTES_UNIT = re.compile(
    r"[ \t]*bytes[ \t]*=(?P<range_set>.*)", re.ASCII | re.IGNORECASE | re.DOTALL
)
_RANGE_SPEC = re.compile(r"(?P<first>[0-9]*)[ \t]*-[ \t]*(?P<last>[0-9]*)", re.ASCII)

# A position with more significant digits than this is past INT64_MAX (19 digits).
_INT64_DIGITS = 19


def _as_int64(value: int) -> int:
    """`value` as an int, with the compiled module's argument checks."""
    value = operator.index(value)  # TypeError for floats, str, None, as Cython raises
    if not INT64_MIN <= value <= INT64_MAX:
        raise OverflowError("value too large to convert to int64_t")
    return value


def _single_range_spec(header: str) -> tuple[str, str] | None:
    """The (first, last) digit strings of a one-range ``bytes`` header, else None.

    Either string may be empty (``bytes=5-``, ``bytes=-5``), never both. Empty list
    elements are skipped, as RFC 9110's list syntax requires (``bytes=0-1,`` is one
    range); two or more ranges give None, because S3 then sends the whole object.
    """
    specifier = _BYTES_UNIT.fullmatch(header)
    if specifier is None:
        return None
    elements = [e.strip(_OWS) for e in specifier["range_set"].split(",")]
    ranges = [e for e in elements if e]
    if len(ranges) != 1:
        return None
    spec = _RANGE_SPEC.fullmatch(ranges[0])
    if spec is None or (not spec["first"] and not spec["last"]):
        return None
    return spec["first"], spec["last"]


def _position(digits: str) -> int:
    """The value of a non-empty run of ASCII digits, capped at INT64_MAX + 1.

    Every object ends before INT64_MAX, so the cap changes no answer; it also keeps
    int() away from its 4300-digit limit on hostile headers.
    """
    significant = digits.lstrip("0")
    if len(significant) > _INT64_DIGITS:
        return INT64_MAX + 1
    return min(int(significant or "0"), INT64_MAX + 1)


def _numerically_greater(digits: str, other_digits: str) -> bool:
    """Whether one digit string is a larger number than another, at any length."""
    significant = digits.lstrip("0")
    other_significant = other_digits.lstrip("0")
    return (len(significant), significant) > (len(other_significant), other_significant)


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """Resolve an HTTP Range header against an object of `size` bytes, as S3 does.

    Returns None when the whole object is to be sent (200), or the inclusive byte
    offsets ``(first, last)`` of the part to send (206), with
    ``0 <= first <= last < size``. Raises `RangeNotSatisfiable` (416) when the header
    is one well-formed range that selects no byte: a first position at or past the
    end, a zero-length suffix (``bytes=-0``), or any range on an empty object.

    Accepted forms, with the unit matched case-insensitively and spaces or tabs
    allowed around the unit, ``=`` and ``-``: ``bytes=a-b`` (a <= b, b may be past
    the end), ``bytes=a-`` and ``bytes=-n`` (the last n bytes; all of them if n is
    at least `size`). Positions are ASCII digits of any length. Raises ValueError for
    a negative `size` and TypeError for a header that is neither str nor None.
    """
    size = _as_int64(size)
    if size < 0:
        raise ValueError(f"object size must be >= 0, got {size}")
    if header is None:
        return None
    if not isinstance(header, str):
        raise TypeError(f"header must be str or None, not {type(header).__name__}")

    spec = _single_range_spec(header)
    if spec is None:
        return None
    first_digits, last_digits = spec

    if not first_digits:
        # Suffix range: the last n bytes.
        suffix_length = _position(last_digits)
        if suffix_length == 0 or size == 0:
            raise RangeNotSatisfiable(header, size)
        return size - min(suffix_length, size), size - 1

    if last_digits and _numerically_greater(first_digits, last_digits):
        # RFC 9110: a range whose last position precedes its first is invalid, and
        # an invalid Range header is ignored.
        return None
    first = _position(first_digits)
    if first >= size:
        raise RangeNotSatisfiable(header, size)
    if not last_digits:
        return first, size - 1
    return first, min(_position(last_digits), size - 1)


def content_range(first: int, last: int, size: int) -> str:
    """The Content-Range value of a 206: ``"bytes first-last/size"``.

    Raises ValueError unless ``0 <= first <= last < size``.
    """
    first = _as_int64(first)
    last = _as_int64(last)
    size = _as_int64(size)
    if not 0 <= first <= last < size:
        raise ValueError(f"byte range {first}-{last} is not inside an object of {size} bytes")
    return f"bytes {first}-{last}/{size}"


def block_span(first: int, last: int, block_size: int) -> tuple[int, int]:
    """Indices of the first and last block holding bytes ``first..last`` (inclusive).

    Blocks are `block_size` bytes long and aligned to offset 0. Raises ValueError
    unless ``block_size > 0`` and ``0 <= first <= last``.
    """
    first = _as_int64(first)
    last = _as_int64(last)
    block_size = _as_int64(block_size)
    if block_size <= 0:
        raise ValueError(f"block size must be > 0, got {block_size}")
    if not 0 <= first <= last:
        raise ValueError(f"invalid byte range {first}-{last}")
    return first // block_size, last // block_size


def block_bounds(index: int, block_size: int, size: int) -> tuple[int, int]:
    """Byte offsets ``(start, end)``, end exclusive, of block `index` of the object.

    Every block but the last is `block_size` bytes; the last one ends at `size`.
    Raises ValueError unless ``block_size > 0``, ``size >= 0`` and
    ``0 <= index < block_count(size, block_size)``.
    """
    index = _as_int64(index)
    block_size = _as_int64(block_size)
    size = _as_int64(size)
    count = block_count(size, block_size)
    if not 0 <= index < count:
        raise ValueError(
            f"block {index} is outside an object of {size} bytes in blocks of {block_size}"
        )
    start = index * block_size
    # start + block_size may not fit in int64 for the last block; size - start does.
    return start, start + min(block_size, size - start)


def block_count(size: int, block_size: int) -> int:
    """Number of `block_size` blocks covering `size` bytes (0 for an empty object).

    Raises ValueError unless ``size >= 0`` and ``block_size > 0``.
    """
    size = _as_int64(size)
    block_size = _as_int64(block_size)
    if block_size <= 0:
        raise ValueError(f"block size must be > 0, got {block_size}")
    if size < 0:
        raise ValueError(f"object size must be >= 0, got {size}")
    if size == 0:
        return 0
    # Not (size + block_size - 1) // block_size: that sum can pass INT64_MAX.
    return (size - 1) // block_size + 1
