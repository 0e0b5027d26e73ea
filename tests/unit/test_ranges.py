"""Range header resolution and block mapping, run against both implementations.

Every case runs on the pure-Python twin (id ``py``) and the compiled module (id
``c``). An unbuilt extension fails the ``c`` cases rather than skipping them, unless
SPROX_NO_EXTENSIONS=1 says the run is meant to be Python-only.
"""

from __future__ import annotations

import importlib
import os
import pickle
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sprox.ranges
from sprox._native import _ranges_py

NO_EXTENSIONS = os.environ.get("SPROX_NO_EXTENSIONS") == "1"
REPO_ROOT = Path(__file__).resolve().parents[2]
INT64_MAX = 2**63 - 1
INT64_MIN = -(2**63)


def load(name: str) -> ModuleType:
    """The implementation called `name`; ImportError (a test failure) if not built."""
    if name == "py":
        return _ranges_py
    if NO_EXTENSIONS:
        pytest.skip("SPROX_NO_EXTENSIONS=1: the compiled module is not under test")
    return importlib.import_module("sprox._native.ranges")


def short_id(value: object) -> str:
    """A test id that stays readable for the 5000-digit headers."""
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:30]}...({len(text)} chars)"


@pytest.fixture(params=["py", "c"])
def impl(request: pytest.FixtureRequest) -> ModuleType:
    return load(request.param)


@pytest.fixture(scope="module")
def native() -> ModuleType:
    return load("c")


# --- parse_range -----------------------------------------------------------------

UNSATISFIABLE = "416"  # expected outcome: RangeNotSatisfiable
HUGE = "1" + "0" * 39  # 40 digits, far past int64
BIG = 2**40

# (header, object size, expected): None = whole object (200), (first, last) = 206.
PARSE_CASES: list[tuple[str | None, int, tuple[int, int] | str | None]] = [
    # No range asked for.
    (None, 10, None),
    ("", 10, None),
    (" \t", 10, None),
    # bytes=a-b
    ("bytes=0-0", 10, (0, 0)),
    ("bytes=0-9", 10, (0, 9)),
    ("bytes=2-5", 10, (2, 5)),
    ("bytes=9-9", 10, (9, 9)),
    ("bytes=5-5", 10, (5, 5)),
    ("bytes=3-100", 10, (3, 9)),  # last past the end: to the end
    ("bytes=0-10", 10, (0, 9)),
    ("bytes=10-10", 10, UNSATISFIABLE),  # first at the end
    ("bytes=10-20", 10, UNSATISFIABLE),
    ("bytes=11-12", 10, UNSATISFIABLE),
    ("bytes=5-2", 10, None),  # last before first: invalid, ignored
    ("bytes=20-10", 10, None),  # invalid even though also past the end
    ("bytes=1-0", 0, None),
    ("bytes=007-009", 10, (7, 9)),  # leading zeros
    ("bytes=0-0", 1, (0, 0)),
    (f"bytes=0-{BIG}", BIG, (0, BIG - 1)),
    (f"bytes={BIG - 1}-{BIG - 1}", BIG, (BIG - 1, BIG - 1)),
    (f"bytes={INT64_MAX - 1}-{INT64_MAX}", INT64_MAX, (INT64_MAX - 1, INT64_MAX - 1)),
    # bytes=a-
    ("bytes=0-", 10, (0, 9)),
    ("bytes=9-", 10, (9, 9)),
    ("bytes=10-", 10, UNSATISFIABLE),
    ("bytes=0-", 1, (0, 0)),
    (f"bytes={INT64_MAX}-", INT64_MAX, UNSATISFIABLE),
    # bytes=-n (suffix)
    ("bytes=-1", 10, (9, 9)),
    ("bytes=-3", 10, (7, 9)),
    ("bytes=-10", 10, (0, 9)),
    ("bytes=-11", 10, (0, 9)),  # longer than the object: all of it, still a 206
    ("bytes=-1000", 1, (0, 0)),
    ("bytes=-0", 10, UNSATISFIABLE),
    ("bytes=-000", 10, UNSATISFIABLE),
    (f"bytes=-{INT64_MAX}", 10, (0, 9)),
    # Empty objects: every valid single range is unsatisfiable.
    ("bytes=0-0", 0, UNSATISFIABLE),
    ("bytes=0-", 0, UNSATISFIABLE),
    ("bytes=0-100", 0, UNSATISFIABLE),
    ("bytes=-1", 0, UNSATISFIABLE),
    ("bytes=-0", 0, UNSATISFIABLE),
    ("bytes=", 0, None),
    (None, 0, None),
    # Several ranges: S3 sends the whole object.
    ("bytes=0-1,5-6", 10, None),
    ("bytes=0-1, 5-6", 10, None),
    ("bytes=0-1,0-1", 10, None),
    ("bytes=-1,0-", 10, None),
    ("bytes=20-30,40-50", 10, None),  # even when none is satisfiable
    ("bytes=0-1,junk", 10, None),
    # Empty list elements are not ranges (RFC 9110 list syntax).
    ("bytes=0-1,", 10, (0, 1)),
    ("bytes=, 0-1", 10, (0, 1)),
    ("bytes=,,2-3,,", 10, (2, 3)),
    ("bytes=,", 10, None),
    ("bytes=, ,", 10, None),
    # Units.
    ("Bytes=0-1", 10, (0, 1)),
    ("BYTES=0-1", 10, (0, 1)),
    ("bYtEs=0-1", 10, (0, 1)),
    ("items=0-1", 10, None),
    ("byte=0-1", 10, None),
    ("bytess=0-1", 10, None),
    ("xbytes=0-1", 10, None),
    ("=0-1", 10, None),
    ("0-1", 10, None),
    ("bytes 0-1", 10, None),
    ("bytes:0-1", 10, None),
    ("bytes==0-1", 10, None),
    ("byteſ=0-1", 10, None),  # U+017F folds to "s" in Unicode, not in ASCII
    ("\uff42ytes=0-1", 10, None),  # fullwidth b
    # Optional whitespace (spaces and tabs) around the unit, "=" and "-".
    (" bytes=0-1", 10, (0, 1)),
    ("bytes=0-1 ", 10, (0, 1)),
    ("bytes =0-1", 10, (0, 1)),
    ("bytes= 0-1", 10, (0, 1)),
    ("bytes = 0 - 1", 10, (0, 1)),
    ("\tbytes\t=\t0\t-\t1\t", 10, (0, 1)),
    ("bytes=  -  3", 10, (7, 9)),
    ("bytes=4 -", 10, (4, 9)),
    ("bytes=0 1-2", 10, None),  # whitespace inside a number
    ("bytes=0-1 2", 10, None),
    ("b ytes=0-1", 10, None),
    ("bytes=0-1\n", 10, None),  # only SP and HTAB are whitespace here
    ("\nbytes=0-1", 10, None),
    ("bytes=0-1\r", 10, None),
    ("bytes=\x0b0-1", 10, None),
    ("bytes=\xa00-1", 10, None),  # no-break space
    ("bytes=0\u2003-1", 10, None),  # em space
    # Junk and near misses.
    ("bytes", 10, None),
    ("bytes=", 10, None),
    ("bytes=-", 10, None),
    ("bytes= - ", 10, None),
    ("bytes=--1", 10, None),
    ("bytes=1--2", 10, None),
    ("bytes=1-2-3", 10, None),
    ("bytes=+1-2", 10, None),
    ("bytes=1-+2", 10, None),
    ("bytes=-+2", 10, None),
    ("bytes=1_0-20", 10, None),  # int() would take "1_0"
    ("bytes=0x1-2", 10, None),
    ("bytes=1.0-2", 10, None),
    ("bytes=1e2-", 10, None),
    ("bytes=a-b", 10, None),
    ("bytes=0-1;", 10, None),
    ("bytes=\u0661-\u0662", 10, None),  # Arabic-Indic digits: isdigit() is True
    ("bytes=\xb2-3", 10, None),  # superscript two
    ("bytes=1\x00-2", 10, None),
    ("bytes=\ud800-1", 10, None),  # lone surrogate: not encodable as UTF-8
    ("\x00", 10, None),
    ("é", 10, None),
    # Positions past int64: a first one is past every end, a last one means the end.
    (f"bytes={HUGE}-", 10, UNSATISFIABLE),
    (f"bytes={HUGE}-{HUGE}", 10, UNSATISFIABLE),
    (f"bytes={HUGE}-{HUGE}9", 10, UNSATISFIABLE),
    (f"bytes={HUGE}9-{HUGE}", 10, None),  # first > last, exactly compared
    (f"bytes={HUGE}-5", 10, None),
    (f"bytes=9223372036854775808-{INT64_MAX}", 10, None),  # INT64_MAX + 1 > INT64_MAX
    (f"bytes={INT64_MAX}-9223372036854775808", 10, UNSATISFIABLE),
    (f"bytes=2-{HUGE}", 10, (2, 9)),
    (f"bytes=0-{'9' * 5000}", 10, (0, 9)),  # past int()'s 4300-digit limit
    (f"bytes=-{HUGE}", 10, (0, 9)),
    (f"bytes=-{'0' * 50}", 10, UNSATISFIABLE),
    (f"bytes={'0' * 50}1-{'0' * 60}2", 10, (1, 2)),
    (f"bytes=-{HUGE}", 0, UNSATISFIABLE),
    (f"bytes={HUGE}-", INT64_MAX, UNSATISFIABLE),
    (f"bytes=5-{HUGE}", INT64_MAX, (5, INT64_MAX - 1)),
]


@pytest.mark.parametrize(("header", "size", "expected"), PARSE_CASES, ids=short_id)
def test_parse_range(
    impl: ModuleType,
    header: str | None,
    size: int,
    expected: tuple[int, int] | str | None,
) -> None:
    if expected == UNSATISFIABLE:
        with pytest.raises(_ranges_py.RangeNotSatisfiable) as raised:
            impl.parse_range(header, size)
        assert raised.value.range_requested == header
        assert raised.value.object_size == size
        assert str(raised.value) == "The requested range is not satisfiable"
    else:
        assert impl.parse_range(header, size) == expected


def test_unsatisfiable_is_one_class_and_a_value_error(impl: ModuleType) -> None:
    assert impl.RangeNotSatisfiable is _ranges_py.RangeNotSatisfiable
    assert issubclass(impl.RangeNotSatisfiable, ValueError)


def test_unsatisfiable_survives_pickling(impl: ModuleType) -> None:
    with pytest.raises(impl.RangeNotSatisfiable) as raised:
        impl.parse_range("bytes=5-", 3)
    copy = pickle.loads(pickle.dumps(raised.value))
    assert (copy.range_requested, copy.object_size, str(copy)) == (
        "bytes=5-",
        3,
        "The requested range is not satisfiable",
    )


def test_parse_range_accepts_keywords_and_str_subclasses(impl: ModuleType) -> None:
    class Header(str):
        pass

    assert impl.parse_range(header=Header("bytes=1-2"), size=10) == (1, 2)


@pytest.mark.parametrize(
    ("header", "size", "error", "message"),
    [
        ("bytes=0-1", -1, ValueError, "object size must be >= 0, got -1"),
        (None, -1, ValueError, "object size must be >= 0, got -1"),
        (b"bytes=0-1", 10, TypeError, "header must be str or None, not bytes"),
        (5, 10, TypeError, "header must be str or None, not int"),
        ("bytes=0-1", 10.0, TypeError, "'float' object cannot be interpreted as an integer"),
        ("bytes=0-1", "10", TypeError, "'str' object cannot be interpreted as an integer"),
        ("bytes=0-1", 2**63, OverflowError, None),
        ("bytes=0-1", INT64_MIN - 1, OverflowError, None),
    ],
    ids=short_id,
)
def test_parse_range_rejects_bad_arguments(
    impl: ModuleType, header: Any, size: Any, error: type[Exception], message: str | None
) -> None:
    with pytest.raises(error) as raised:
        impl.parse_range(header, size)
    assert not isinstance(raised.value, _ranges_py.RangeNotSatisfiable)
    if message is not None:
        assert str(raised.value) == message


# --- content_range ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("first", "last", "size", "expected"),
    [
        (0, 0, 1, "bytes 0-0/1"),
        (0, 9, 10, "bytes 0-9/10"),
        (5, 5, 10, "bytes 5-5/10"),
        (
            INT64_MAX - 2,
            INT64_MAX - 1,
            INT64_MAX,
            f"bytes {INT64_MAX - 2}-{INT64_MAX - 1}/{INT64_MAX}",
        ),
    ],
)
def test_content_range(impl: ModuleType, first: int, last: int, size: int, expected: str) -> None:
    assert impl.content_range(first, last, size) == expected


@pytest.mark.parametrize(
    ("first", "last", "size"),
    [(-1, 0, 10), (3, 2, 10), (0, 10, 10), (10, 10, 10), (0, 0, 0), (0, 0, -1)],
)
def test_content_range_rejects_ranges_outside_the_object(
    impl: ModuleType, first: int, last: int, size: int
) -> None:
    with pytest.raises(ValueError, match="is not inside an object of"):
        impl.content_range(first, last, size)


@pytest.mark.parametrize(
    ("header", "size", "expected"),
    [(h, s, e) for h, s, e in PARSE_CASES if isinstance(e, tuple)],
    ids=short_id,
)
def test_content_range_of_every_206(
    impl: ModuleType, header: str, size: int, expected: tuple[int, int]
) -> None:
    first, last = expected
    assert impl.content_range(first, last, size) == f"bytes {first}-{last}/{size}"


# --- blocks ----------------------------------------------------------------------

# (first, last, block_size, expected block indices)
BLOCK_SPAN_CASES = [
    (0, 0, 1, (0, 0)),
    (0, 0, 4, (0, 0)),
    (0, 3, 4, (0, 0)),
    (0, 4, 4, (0, 1)),
    (3, 4, 4, (0, 1)),
    (4, 7, 4, (1, 1)),
    (5, 17, 4, (1, 4)),
    (8, 8, 4, (2, 2)),
    (0, INT64_MAX, 1, (0, INT64_MAX)),
    (0, INT64_MAX, INT64_MAX, (0, 1)),
    (INT64_MAX, INT64_MAX, 2**20, (INT64_MAX // 2**20, INT64_MAX // 2**20)),
]


@pytest.mark.parametrize(("first", "last", "block_size", "expected"), BLOCK_SPAN_CASES)
def test_block_span(
    impl: ModuleType, first: int, last: int, block_size: int, expected: tuple[int, int]
) -> None:
    assert impl.block_span(first, last, block_size) == expected


@pytest.mark.parametrize(
    ("first", "last", "block_size", "message"),
    [
        (0, 1, 0, "block size must be > 0, got 0"),
        (0, 1, -4, "block size must be > 0, got -4"),
        (-1, 1, 4, "invalid byte range -1-1"),
        (-5, -1, 4, "invalid byte range -5--1"),
        (5, 4, 4, "invalid byte range 5-4"),
    ],
)
def test_block_span_rejects_bad_arguments(
    impl: ModuleType, first: int, last: int, block_size: int, message: str
) -> None:
    with pytest.raises(ValueError) as raised:
        impl.block_span(first, last, block_size)
    assert str(raised.value) == message


# (index, block_size, object size, expected (start, end exclusive))
BLOCK_BOUNDS_CASES = [
    (0, 4, 10, (0, 4)),
    (1, 4, 10, (4, 8)),
    (2, 4, 10, (8, 10)),  # the short last block
    (0, 4, 4, (0, 4)),
    (0, 4, 1, (0, 1)),
    (0, 100, 10, (0, 10)),
    (0, INT64_MAX, INT64_MAX, (0, INT64_MAX)),
    (1, INT64_MAX - 1, INT64_MAX, (INT64_MAX - 1, INT64_MAX)),
    (INT64_MAX - 1, 1, INT64_MAX, (INT64_MAX - 1, INT64_MAX)),
    # The last block's nominal end, start + block_size, would pass INT64_MAX.
    (1, 2**62 + 1, INT64_MAX, (2**62 + 1, INT64_MAX)),
]


@pytest.mark.parametrize(("index", "block_size", "size", "expected"), BLOCK_BOUNDS_CASES)
def test_block_bounds(
    impl: ModuleType, index: int, block_size: int, size: int, expected: tuple[int, int]
) -> None:
    assert impl.block_bounds(index, block_size, size) == expected


@pytest.mark.parametrize(
    ("index", "block_size", "size", "message"),
    [
        (3, 4, 10, "block 3 is outside an object of 10 bytes in blocks of 4"),
        (-1, 4, 10, "block -1 is outside an object of 10 bytes in blocks of 4"),
        (0, 4, 0, "block 0 is outside an object of 0 bytes in blocks of 4"),
        (1, 4, 4, "block 1 is outside an object of 4 bytes in blocks of 4"),
        (INT64_MAX, 2, 10, f"block {INT64_MAX} is outside an object of 10 bytes in blocks of 2"),
        (0, 0, 10, "block size must be > 0, got 0"),
        (0, -1, 10, "block size must be > 0, got -1"),
        (0, 4, -1, "object size must be >= 0, got -1"),
        (-1, 0, -1, "block size must be > 0, got 0"),  # arguments before the index
        (-1, 4, -1, "object size must be >= 0, got -1"),
    ],
)
def test_block_bounds_rejects_bad_arguments(
    impl: ModuleType, index: int, block_size: int, size: int, message: str
) -> None:
    with pytest.raises(ValueError) as raised:
        impl.block_bounds(index, block_size, size)
    assert str(raised.value) == message


@pytest.mark.parametrize(
    ("size", "block_size", "expected"),
    [
        (0, 1, 0),
        (0, 4, 0),
        (1, 4, 1),
        (4, 4, 1),
        (5, 4, 2),
        (10, 4, 3),
        (10, 1, 10),
        (INT64_MAX, 1, INT64_MAX),
        (INT64_MAX, INT64_MAX, 1),
        (INT64_MAX, 2**62, 2),  # size + block_size - 1 would pass INT64_MAX
    ],
)
def test_block_count(impl: ModuleType, size: int, block_size: int, expected: int) -> None:
    assert impl.block_count(size, block_size) == expected


@pytest.mark.parametrize(
    ("size", "block_size", "message"),
    [
        (10, 0, "block size must be > 0, got 0"),
        (10, -3, "block size must be > 0, got -3"),
        (-1, 4, "object size must be >= 0, got -1"),
        (-1, 0, "block size must be > 0, got 0"),
    ],
)
def test_block_count_rejects_bad_arguments(
    impl: ModuleType, size: int, block_size: int, message: str
) -> None:
    with pytest.raises(ValueError) as raised:
        impl.block_count(size, block_size)
    assert str(raised.value) == message


@pytest.mark.parametrize("name", ["block_span", "block_bounds", "block_count", "content_range"])
@pytest.mark.parametrize(
    ("bad", "error"),
    [(2**63, OverflowError), (INT64_MIN - 1, OverflowError), (1.0, TypeError), (None, TypeError)],
    ids=short_id,
)
def test_block_functions_take_int64_integers_only(
    impl: ModuleType, name: str, bad: Any, error: type[Exception]
) -> None:
    function = getattr(impl, name)
    arity = 2 if name == "block_count" else 3
    for position in range(arity):
        args = [1] * arity
        args[position] = bad
        with pytest.raises(error):
            function(*args)


# --- the two implementations agree on random input --------------------------------

PROPERTY_SETTINGS = settings(
    max_examples=400,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)

sizes = st.one_of(
    st.integers(0, 64),
    st.integers(0, 2**40),
    st.integers(0, INT64_MAX),
    st.sampled_from([0, 1, INT64_MAX - 1, INT64_MAX]),
)
ows = st.text(alphabet=" \t", max_size=2)
positions = st.one_of(
    st.integers(0, 70).map(str),
    st.integers(0, 2**64).map(str),
    st.integers(0, 10**45).map(str),
    st.sampled_from([str(INT64_MAX), str(INT64_MAX + 1), "0" * 25 + "7"]),
    st.tuples(st.text("0", max_size=3), st.integers(0, 10**25)).map(lambda t: f"{t[0]}{t[1]}"),
)
range_specs = st.one_of(
    st.builds(lambda a, s1, s2, b: f"{a}{s1}-{s2}{b}", positions, ows, ows, positions),
    st.builds(lambda a, s: f"{a}{s}-", positions, ows),
    st.builds(lambda s, n: f"-{s}{n}", ows, positions),
    st.sampled_from(["", "-", "x", "1-2-3", "+1-2", "1_0-2"]),
)
structured_headers = st.builds(
    lambda lead, unit, s1, s2, specs, seps, tail: (
        f"{lead}{unit}{s1}={s2}" + "".join(s + sep for s, sep in zip(specs, seps)) + tail
    ),
    ows,
    st.sampled_from(["bytes", "Bytes", "BYTES", "bytes", "byte", "items", "", "bytesx", "bYteS"]),
    ows,
    ows,
    st.lists(range_specs, min_size=1, max_size=3),
    st.lists(st.sampled_from(["", ",", ", ", " ,", ",,"]), min_size=3, max_size=3),
    st.sampled_from(["", " ", "\t", ",", "\n", "x"]),
)
# Text made of the characters that matter, so near-misses come up often.
near_miss_text = st.text(alphabet="bytesBYTES=-0123456789, \t\n+_xſ٣\x00é", max_size=30)
headers = st.one_of(
    st.none(),
    structured_headers,
    near_miss_text,
    near_miss_text.map(lambda t: "bytes=" + t),
    st.text(max_size=30),
)
int64s = st.one_of(
    st.integers(-3, 70),
    st.integers(INT64_MIN, INT64_MAX),
    st.sampled_from([INT64_MIN, -1, 0, 1, INT64_MAX - 1, INT64_MAX]),
)
any_ints = st.one_of(int64s, st.integers(-(2**70), 2**70))


def outcome(function: Callable[..., Any], *args: Any) -> tuple[Any, ...]:
    """What a call did, comparable across implementations: a result or an error."""
    try:
        return ("returned", function(*args))
    except _ranges_py.RangeNotSatisfiable as error:
        return ("416", error.range_requested, error.object_size, str(error))
    except (ValueError, TypeError) as error:
        return ("raised", type(error), str(error))
    except OverflowError:
        # Only the type: Cython's message names the platform's C type.
        return ("raised", OverflowError)


@PROPERTY_SETTINGS
@given(header=headers, size=sizes)
def test_parse_range_twins_agree(native: ModuleType, header: str | None, size: int) -> None:
    result = outcome(native.parse_range, header, size)
    assert result == outcome(_ranges_py.parse_range, header, size)
    if result[0] == "returned" and result[1] is not None:
        first, last = result[1]
        assert 0 <= first <= last < size


@PROPERTY_SETTINGS
@given(header=st.one_of(st.none(), structured_headers), size=any_ints)
def test_parse_range_twins_agree_on_any_size(
    native: ModuleType, header: str | None, size: int
) -> None:
    assert outcome(native.parse_range, header, size) == outcome(
        _ranges_py.parse_range, header, size
    )


@PROPERTY_SETTINGS
@given(
    name=st.sampled_from(["block_span", "block_bounds", "content_range"]),
    a=any_ints,
    b=any_ints,
    c=any_ints,
)
def test_three_argument_twins_agree(native: ModuleType, name: str, a: int, b: int, c: int) -> None:
    assert outcome(getattr(native, name), a, b, c) == outcome(getattr(_ranges_py, name), a, b, c)


@PROPERTY_SETTINGS
@given(size=any_ints, block_size=any_ints)
def test_block_count_twins_agree(native: ModuleType, size: int, block_size: int) -> None:
    assert outcome(native.block_count, size, block_size) == outcome(
        _ranges_py.block_count, size, block_size
    )


@st.composite
def byte_ranges_in_blocks(draw: st.DrawFn) -> tuple[int, int, int, int]:
    """(first, last, block_size, size) with 0 <= first <= last < size."""
    size = draw(st.one_of(st.integers(1, 10_000), st.integers(1, INT64_MAX)))
    block_size = draw(st.one_of(st.integers(1, 64), st.integers(1, INT64_MAX)))
    first = draw(st.integers(0, size - 1))
    last = draw(st.integers(first, size - 1))
    return first, last, block_size, size


@pytest.mark.parametrize("name", ["py", "c"])
@PROPERTY_SETTINGS
@given(case=byte_ranges_in_blocks())
def test_blocks_cover_the_range_exactly(name: str, case: tuple[int, int, int, int]) -> None:
    ranges = load(name)
    first, last, block_size, size = case
    first_block, last_block = ranges.block_span(first, last, block_size)
    count = ranges.block_count(size, block_size)
    assert 0 <= first_block <= last_block < count
    start, end = ranges.block_bounds(first_block, block_size, size)
    assert start <= first < end
    start, end = ranges.block_bounds(last_block, block_size, size)
    assert start <= last < end
    assert ranges.block_bounds(count - 1, block_size, size)[1] == size
    if last_block > first_block:  # neighbouring blocks touch
        assert (
            ranges.block_bounds(first_block, block_size, size)[1]
            == (ranges.block_bounds(first_block + 1, block_size, size)[0])
        )


# --- which implementation the selector picked -------------------------------------

API = [
    "RangeNotSatisfiable",
    "block_bounds",
    "block_count",
    "block_span",
    "content_range",
    "parse_range",
]


def test_both_implementations_export_the_same_api(native: ModuleType) -> None:
    assert sorted(_ranges_py.__all__) == sorted(native.__all__) == API
    assert sorted(sprox.ranges.__all__) == sorted([*API, "NATIVE"])


def test_normal_build_uses_the_extension() -> None:
    """Fails when a build silently fell back to Python (extension missing or broken)."""
    if NO_EXTENSIONS:
        assert sprox.ranges.NATIVE is False
        assert sprox.ranges.parse_range is _ranges_py.parse_range
        return
    assert sprox.ranges.NATIVE is True
    native = importlib.import_module("sprox._native.ranges")
    for name in API:
        assert getattr(sprox.ranges, name) is getattr(native, name), name


def test_no_extensions_env_selects_the_twin() -> None:
    env = {**os.environ, "SPROX_NO_EXTENSIONS": "1"}
    program = (
        "import sprox.ranges as r; "
        "print(r.NATIVE, r.parse_range.__module__, r.parse_range('bytes=-2', 5))"
    )
    completed = subprocess.run(
        [sys.executable, "-c", program],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.split() == ["False", "sprox._native._ranges_py", "(3,", "4)"]
