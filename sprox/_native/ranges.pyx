"""HTTP Range resolution and byte-range to block mapping, compiled.

The pure-Python twin `sprox._native._ranges_py` is the reference: it documents the
behaviour, and this module must match it exactly, exceptions and messages included
(the tests compare the two on every case and on random input). Callers import from
`sprox.ranges`, which picks one of the two.

Integers are C int64_t throughout: arguments are converted on entry, raising
TypeError for non-integers and OverflowError outside int64, before any other check.
"""

cimport cython
from cpython.number cimport PyNumber_Index
from libc.stdint cimport INT64_MAX, int64_t
from libc.string cimport memcmp

# One exception class for both implementations, so callers catch one name.
from sprox._native._ranges_py import RangeNotSatisfiable

__all__ = [
    "RangeNotSatisfiable",
    "block_bounds",
    "block_count",
    "block_span",
    "content_range",
    "parse_range",
]


cdef extern from *:
    """
    /* Points *chars at the characters of the str `text` and returns 1 when all of
       them are ASCII; returns 0 otherwise, and -1 with an exception set on error.
       An ASCII str stores one byte per character, so nothing is copied. */
    static int sprox_ascii_chars(PyObject *text, const char **chars, Py_ssize_t *length) {
    #if PY_VERSION_HEX < 0x030C0000
        /* Python 3.11 can still hold a legacy string whose data is not ready yet;
           its ascii flag would read as unset. */
        if (PyUnicode_READY(text) < 0) return -1;
    #endif
        if (!PyUnicode_IS_ASCII(text)) return 0;
        *chars = (const char *)PyUnicode_DATA(text);
        *length = PyUnicode_GET_LENGTH(text);
        return 1;
    }
    """
    int sprox_ascii_chars(object text, const char **chars, Py_ssize_t *length) except -1


cdef inline int64_t _as_int64(object value) except? -1:
    # Typed int64_t arguments would accept a float and truncate it through __int__;
    # the twin, like every Python API that takes an index, refuses it.
    if not isinstance(value, int):
        value = PyNumber_Index(value)
    return value


cdef struct Position:
    # A run of ASCII digits in the header.
    bint present          # False for the empty side of "a-" or "-n"
    int64_t value         # saturated at INT64_MAX: every object ends before that
    const char *digits    # significant digits (leading zeros skipped), for exact
    Py_ssize_t ndigits    # comparisons of positions too large for value


cdef struct RangeSpec:
    Position first
    Position last


cdef inline bint _is_ows(char c) noexcept nogil:
    # RFC 9110 OWS: spaces and horizontal tabs, nothing else.
    return c == c' ' or c == c'\t'


cdef inline bint _is_digit(char c) noexcept nogil:
    return c'0' <= c <= c'9'


cdef inline Py_ssize_t _skip_ows(const char *text, Py_ssize_t i, Py_ssize_t end) noexcept nogil:
    while i < end and _is_ows(text[i]):
        i += 1
    return i


@cython.cdivision(True)  # both operands are non-negative
cdef Py_ssize_t _scan_position(
    const char *text, Py_ssize_t i, Py_ssize_t end, Position *position
) noexcept nogil:
    """Read the digits at text[i:end] into `position`; return the index after them."""
    cdef Py_ssize_t start = i
    cdef int64_t value = 0
    cdef int64_t digit
    while i < end and text[i] == c'0':
        i += 1
    position.digits = text + i
    while i < end and _is_digit(text[i]):
        digit = text[i] - c'0'
        # Saturate instead of overflowing: a position past int64 is past every end.
        # Once saturated, value stays INT64_MAX: the test below is then always true.
        if value > (INT64_MAX - digit) // 10:
            value = INT64_MAX
        else:
            value = value * 10 + digit
        i += 1
    position.present = i > start
    position.value = value
    position.ndigits = (text + i) - position.digits
    return i


cdef bint _greater(const Position *a, const Position *b) noexcept nogil:
    """Whether position `a` is a larger number than `b`, exactly, at any length."""
    if a.value != INT64_MAX and b.value != INT64_MAX:
        return a.value > b.value
    # At least one saturated: compare the digits (no leading zeros) by length, then
    # lexicographically, which is numeric order for equal lengths.
    if a.ndigits != b.ndigits:
        return a.ndigits > b.ndigits
    return memcmp(a.digits, b.digits, <size_t>a.ndigits) > 0


cdef bint _scan_range_spec(
    const char *text, Py_ssize_t start, Py_ssize_t end, RangeSpec *spec
) noexcept nogil:
    """Parse one list element with OWS already trimmed: "a-b", "a-" or "-n"."""
    cdef Py_ssize_t i = _scan_position(text, start, end, &spec.first)
    i = _skip_ows(text, i, end)
    if i == end or text[i] != c'-':
        return False
    i = _skip_ows(text, i + 1, end)
    i = _scan_position(text, i, end, &spec.last)
    return i == end and (spec.first.present or spec.last.present)


cdef bint _scan_single_range(const char *text, Py_ssize_t length, RangeSpec *spec) noexcept nogil:
    """Parse a Range header that holds exactly one byte range into `spec`.

    False for anything else: another unit, bad syntax, no range, several ranges.
    Empty list elements ("bytes=0-1,") are skipped, as RFC 9110's list syntax requires.
    """
    cdef Py_ssize_t i = _skip_ows(text, 0, length)
    cdef Py_ssize_t element_end, trimmed_start, trimmed_end
    cdef int ranges = 0
    cdef const char *unit = b"bytes"
    cdef Py_ssize_t k

    if length - i < 5:
        return False
    for k in range(5):
        # ASCII case-insensitive: setting bit 0x20 lowercases letters only, and no
        # other ASCII character lands on a lowercase letter through it.
        if (text[i + k] | 0x20) != unit[k]:
            return False
    i = _skip_ows(text, i + 5, length)
    if i == length or text[i] != c'=':
        return False
    i += 1

    while True:
        element_end = i
        while element_end < length and text[element_end] != c',':
            element_end += 1
        trimmed_start = _skip_ows(text, i, element_end)
        trimmed_end = element_end
        while trimmed_end > trimmed_start and _is_ows(text[trimmed_end - 1]):
            trimmed_end -= 1
        if trimmed_end > trimmed_start:
            ranges += 1
            if ranges > 1:
                return False
            if not _scan_range_spec(text, trimmed_start, trimmed_end, spec):
                return False
        if element_end == length:
            break
        i = element_end + 1
    return ranges == 1


# The public functions take Python objects and convert them in argument order, so
# that their signatures (keywords included) and their errors match the twin's; the
# typed cdef functions behind them do the work.


def parse_range(header, size):
    """Resolve an HTTP Range header against an object of `size` bytes, as S3 does.

    Returns None when the whole object is to be sent (200), or the inclusive byte
    offsets ``(first, last)`` of the part to send (206), with
    ``0 <= first <= last < size``. Raises `RangeNotSatisfiable` (416) when the header
    is one well-formed range that selects no byte. See `_ranges_py.parse_range`.
    """
    return _parse_range(header, _as_int64(size))


cdef object _parse_range(object header, int64_t size):
    cdef const char *chars = NULL
    cdef Py_ssize_t length = 0
    cdef RangeSpec spec

    if size < 0:
        raise ValueError(f"object size must be >= 0, got {size}")
    if header is None:
        return None
    if not isinstance(header, str):
        raise TypeError(f"header must be str or None, not {type(header).__name__}")
    # Every character a valid header may hold is ASCII, so any other one makes the
    # header invalid (whole object) wherever it is.
    if not sprox_ascii_chars(header, &chars, &length):
        return None
    if not _scan_single_range(chars, length, &spec):
        return None

    if not spec.first.present:
        # Suffix range: the last n bytes.
        if spec.last.value == 0 or size == 0:
            raise RangeNotSatisfiable(header, size)
        return size - min(spec.last.value, size), size - 1

    if spec.last.present and _greater(&spec.first, &spec.last):
        # RFC 9110: a range whose last position precedes its first is invalid, and
        # an invalid Range header is ignored.
        return None
    if spec.first.value >= size:
        raise RangeNotSatisfiable(header, size)
    if not spec.last.present:
        return spec.first.value, size - 1
    return spec.first.value, min(spec.last.value, size - 1)


def content_range(first, last, size):
    """The Content-Range value of a 206: ``"bytes first-last/size"``.

    Raises ValueError unless ``0 <= first <= last < size``.
    """
    return _content_range(_as_int64(first), _as_int64(last), _as_int64(size))


cdef str _content_range(int64_t first, int64_t last, int64_t size):
    if not 0 <= first <= last < size:
        raise ValueError(f"byte range {first}-{last} is not inside an object of {size} bytes")
    return f"bytes {first}-{last}/{size}"


def block_span(first, last, block_size):
    """Indices of the first and last block holding bytes ``first..last`` (inclusive).

    Blocks are `block_size` bytes long and aligned to offset 0. Raises ValueError
    unless ``block_size > 0`` and ``0 <= first <= last``.
    """
    return _block_span(_as_int64(first), _as_int64(last), _as_int64(block_size))


@cython.cdivision(True)  # operands are checked non-negative and the divisor positive
cdef tuple _block_span(int64_t first, int64_t last, int64_t block_size):
    if block_size <= 0:
        raise ValueError(f"block size must be > 0, got {block_size}")
    if not 0 <= first <= last:
        raise ValueError(f"invalid byte range {first}-{last}")
    return first // block_size, last // block_size


def block_bounds(index, block_size, size):
    """Byte offsets ``(start, end)``, end exclusive, of block `index` of the object.

    Every block but the last is `block_size` bytes; the last one ends at `size`.
    Raises ValueError unless ``block_size > 0``, ``size >= 0`` and
    ``0 <= index < block_count(size, block_size)``.
    """
    return _block_bounds(_as_int64(index), _as_int64(block_size), _as_int64(size))


cdef tuple _block_bounds(int64_t index, int64_t block_size, int64_t size):
    # Counting first also checks block_size and size, before index, as the twin does.
    cdef int64_t count = _block_count(size, block_size)
    cdef int64_t start
    if not 0 <= index < count:
        raise ValueError(
            f"block {index} is outside an object of {size} bytes in blocks of {block_size}"
        )
    # index < block count, so start < size and nothing below leaves int64.
    start = index * block_size
    return start, start + min(block_size, size - start)


def block_count(size, block_size):
    """Number of `block_size` blocks covering `size` bytes (0 for an empty object).

    Raises ValueError unless ``size >= 0`` and ``block_size > 0``.
    """
    return _block_count(_as_int64(size), _as_int64(block_size))


@cython.cdivision(True)  # the checks above the division rule out negatives and zero
cdef int64_t _block_count(int64_t size, int64_t block_size) except -1:
    if block_size <= 0:
        raise ValueError(f"block size must be > 0, got {block_size}")
    if size < 0:
        raise ValueError(f"object size must be >= 0, got {size}")
    if size == 0:
        return 0
    # Not (size + block_size - 1) // block_size: that sum can pass INT64_MAX.
    return (size - 1) // block_size + 1
