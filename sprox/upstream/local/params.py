"""What the local origin's operations read from a request besides bucket and key:
query parameters, copy-source headers, conditional-write headers and XML bodies.

Pure functions of the request; each raises the `S3Error` S3 answers for bad input.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import quote_plus, unquote

from ...s3 import errors
from ...s3 import xml as s3xml
from ...s3.conditions import etag_matches
from ...s3.request import valid_bucket_name
from .records import ObjectRecord

MAX_PART_NUMBER = 10_000
MAX_DELETE_KEYS = 1000
MAX_LIST_KEYS = 1000
MAX_LIST_PARTS = 1000
_MAX_INT32 = 2**31 - 1


# --- query parameters ----------------------------------------------------------------


def int_param(query, name: str, default: int, *, low: int, high: int | None, message: str) -> int:
    raw = query.get(name)
    if raw is None:
        return default
    if not re.fullmatch(r"-?[0-9]{1,19}", raw.strip()):
        raise errors.invalid_argument(message, name, raw)
    value = int(raw)
    if value < low or (high is not None and value > high):
        raise errors.invalid_argument(message, name, raw)
    return value


def page_size(query, name: str, most: int) -> int:
    """A page size (`max-keys`, `max-uploads`, `max-parts`): any int32, capped at `most`."""
    value = int_param(query, name, most, low=0, high=_MAX_INT32,
                      message=f"Argument {name} must be an integer between 0 and {_MAX_INT32}")
    return min(value, most)


def part_number(query, *, required: bool) -> int | None:
    if "partNumber" not in query and not required:
        return None
    raw = query.get("partNumber", "")
    if not re.fullmatch(r"[0-9]{1,5}", raw) or not 1 <= int(raw) <= MAX_PART_NUMBER:
        raise errors.invalid_argument("Part number must be an integer between 1 and 10000, inclusive",
                                      "partNumber", raw)
    return int(raw)


def s3_url_encode(value: str) -> str:
    """S3's `encoding-type=url` form: query escaping (space as "+"), keeping "/" and
    "*" and escaping "~"; botocore undoes it with `unquote_plus`."""
    return quote_plus(value, safe="/*").replace("~", "%7E")


def _unchanged(value: str) -> str:
    return value


@dataclass(slots=True)
class ListParams:
    """The parameters the list operations share: prefix, delimiter, page size, and
    how keys are written in the answer (`encoding-type`)."""

    prefix: str
    delimiter: str
    max_entries: int
    url_encoded: bool

    @classmethod
    def from_query(cls, query, max_name: str = "max-keys") -> ListParams:
        encoding = query.get("encoding-type")
        if encoding is not None and encoding.lower() != "url":
            raise errors.invalid_argument("Invalid Encoding Method specified in Request", "encoding-type", encoding)
        return cls(query.get("prefix", ""), query.get("delimiter", ""), page_size(query, max_name, MAX_LIST_KEYS),
                   encoding is not None)

    @property
    def encode(self) -> Callable[[str], str]:
        """How keys and prefixes are written in the answer."""
        return s3_url_encode if self.url_encoded else _unchanged


# --- headers -------------------------------------------------------------------------


def copy_source(headers) -> tuple[str, str]:
    """(bucket, key) of `x-amz-copy-source`: ``[/]bucket/key[?versionId=...]``, URL-encoded."""
    raw = headers.get("x-amz-copy-source", "")
    path = raw.partition("?")[0]  # a literal "?" in a key arrives encoded
    try:
        path = unquote(path, errors="strict")
    except UnicodeDecodeError:
        path = ""
    bucket, _, key = path.removeprefix("/").partition("/")
    if not bucket or not key or not valid_bucket_name(bucket):
        raise errors.invalid_argument("Copy Source must mention the source bucket and key: sourcebucket/sourcekey",
                                      "x-amz-copy-source", raw)
    return bucket, key


def copy_source_range(headers, size: int) -> tuple[int, int]:
    """Offset and length of `x-amz-copy-source-range` (``bytes=first-last`` only)."""
    raw = headers.get("x-amz-copy-source-range")
    if raw is None:
        return 0, size
    match = re.fullmatch(r"bytes=([0-9]{1,19})-([0-9]{1,19})", raw.strip())
    if match is None or int(match[1]) > int(match[2]):
        raise errors.invalid_argument(
            "The x-amz-copy-source-range value must be of the form bytes=first-last where first and last are "
            "the zero-based offsets of the first and last bytes to copy", "x-amz-copy-source-range", raw)
    first, last = int(match[1]), int(match[2])
    if last >= size:
        raise errors.invalid_argument(f"Range specified is not valid for source object of size: {size}",
                                      "x-amz-copy-source-range", raw)
    return first, last - first + 1


def metadata_directive(headers) -> str:
    """CopyObject's `x-amz-metadata-directive`: COPY (the default) or REPLACE."""
    directive = headers.get("x-amz-metadata-directive", "COPY").upper()
    if directive not in ("COPY", "REPLACE"):
        raise errors.invalid_argument("Unknown metadata directive.", "x-amz-metadata-directive",
                                      headers.get("x-amz-metadata-directive"))
    return directive


def write_precondition(headers) -> Callable[[ObjectRecord | None], None] | None:
    """S3's conditional writes: `If-None-Match: *` (create only) and `If-Match`."""
    if_none_match = headers.get("If-None-Match")
    if_match = headers.get("If-Match")
    if if_none_match is None and if_match is None:
        return None
    if if_none_match is not None and if_none_match.strip() != "*":
        raise errors.not_implemented("If-None-Match on writes accepts only '*'")

    def check(current: ObjectRecord | None) -> None:
        if if_none_match is not None and current is not None:
            raise errors.precondition_failed("If-None-Match")
        if if_match is not None:
            if current is None:
                raise errors.S3Error("NoSuchKey", "The specified key does not exist.", 404)
            if not etag_matches(if_match, current.quoted_etag):
                raise errors.precondition_failed("If-Match")

    return check


# --- XML bodies ----------------------------------------------------------------------


def _root(body: bytes, name: str):
    root = s3xml.parse(body)
    if s3xml.local_name(root.tag) != name:
        raise errors.malformed_xml()
    return root


def delete_request(body: bytes) -> tuple[list[str], bool]:
    """The keys of a DeleteObjects body, and whether it asks for a quiet answer."""
    root = _root(body, "Delete")
    quiet = (s3xml.child_text(root, "Quiet") or "").strip().lower() == "true"
    keys = []
    for element in s3xml.children(root, "Object"):
        key = s3xml.child_text(element, "Key")
        if key is None:
            raise errors.malformed_xml()
        keys.append(key)
    if not keys or len(keys) > MAX_DELETE_KEYS:
        raise errors.malformed_xml()
    return keys, quiet


# A PartNumber element: an integer as XML Schema writes one, bounded so that any
# value past MAX_PART_NUMBER is still read, then answered InvalidPart (no such part).
_PART_NUMBER_TEXT = re.compile(r"[0-9]{1,10}")


def complete_request(body: bytes) -> list[tuple[int, str]]:
    """(part number, ETag) pairs of a CompleteMultipartUpload body, checked for order."""
    root = _root(body, "CompleteMultipartUpload")
    parts: list[tuple[int, str]] = []
    for element in s3xml.children(root, "Part"):
        number = (s3xml.child_text(element, "PartNumber") or "").strip()
        etag = s3xml.child_text(element, "ETag")
        # ASCII digits, few of them: str.isdigit() also passes "²" (which int() then
        # refuses) and other scripts' digits, and int() refuses more than 4300 digits.
        if not _PART_NUMBER_TEXT.fullmatch(number) or etag is None:
            raise errors.malformed_xml()
        parts.append((int(number), etag.strip()))
    if not parts:
        raise errors.malformed_xml()
    numbers = [number for number, _etag in parts]
    if any(later <= earlier for earlier, later in zip(numbers, numbers[1:])):
        raise errors.S3Error("InvalidPartOrder",
                             "The list of parts was not in ascending order. Parts must be ordered by part number.",
                             400)
    return parts
