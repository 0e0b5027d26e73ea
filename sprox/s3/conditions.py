"""HTTP semantics S3 applies to object reads: dates, conditional headers, overrides.

Shared by every component that answers GetObject/HeadObject itself (the local origin,
the cache), so that all of them agree with S3 on the details:

- `http_date` / `parse_http_date`: RFC 7231 dates (`Last-Modified`, `If-*-Since`).
- `check_conditions`: `If-Match`, `If-Unmodified-Since`, `If-None-Match`,
  `If-Modified-Since`, in S3's precedence, raising `S3Error` 412 or 304.
- `check_copy_source_conditions`: the `x-amz-copy-source-if-*` family of CopyObject
  and UploadPartCopy, where every failure is a 412.
- `apply_response_overrides`: the `response-content-type` (...) query parameters.

ETags are passed as they appear in an `ETag` header (quoted); last-modified times as
POSIX timestamps (float seconds). HTTP dates have one-second resolution, so every
comparison truncates the object's time to whole seconds, as S3 does.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from datetime import timezone
from email.utils import formatdate, parsedate_to_datetime

from . import errors

# Query parameter -> response header it replaces (GetObject/HeadObject).
RESPONSE_OVERRIDES: dict[str, str] = {
    "response-content-type": "Content-Type",
    "response-content-language": "Content-Language",
    "response-expires": "Expires",
    "response-cache-control": "Cache-Control",
    "response-content-disposition": "Content-Disposition",
    "response-content-encoding": "Content-Encoding",
}


def http_date(timestamp: float) -> str:
    """`timestamp` as an RFC 7231 IMF-fixdate: ``Wed, 21 Oct 2015 07:28:00 GMT``."""
    return formatdate(math.floor(timestamp), usegmt=True)


def parse_http_date(value: str | None) -> float | None:
    """An HTTP date (IMF-fixdate, RFC 850 or asctime form) as a POSIX timestamp.

    None when `value` is missing or not a date: S3 ignores conditional headers whose
    date it cannot parse rather than failing the request."""
    if not value:
        return None
    try:
        parsed = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if parsed is None:
        return None
    if parsed.tzinfo is None:
        # HTTP dates are always GMT; parsedate_to_datetime leaves "-0000" naive.
        parsed = parsed.replace(tzinfo=timezone.utc)
    try:
        return parsed.timestamp()
    except (OverflowError, OSError, ValueError):
        return None


def bare_etag(etag: str) -> str:
    """An entity tag without quotes or weak prefix: ``W/"abc"`` -> ``abc``."""
    etag = etag.strip()
    if etag.startswith("W/"):
        etag = etag[2:]
    if len(etag) >= 2 and etag[0] == '"' and etag[-1] == '"':
        etag = etag[1:-1]
    return etag


def etag_matches(header: str, etag: str) -> bool:
    """Whether an `If-Match`/`If-None-Match` value names `etag`.

    The value may be ``*`` (any existing object) or a comma-separated list; S3
    compares opaque tags and also accepts them unquoted, so quotes and ``W/`` are
    ignored on both sides."""
    wanted = bare_etag(etag)
    for candidate in header.split(","):
        candidate = candidate.strip()
        if candidate == "*" or (candidate and bare_etag(candidate) == wanted):
            return True
    return False


def _seconds(timestamp: float) -> int:
    return math.floor(timestamp)


def not_modified_headers(etag: str, last_modified: float) -> dict[str, str]:
    """The headers S3 keeps on a 304 answer (its body is always empty)."""
    return {"ETag": etag, "Last-Modified": http_date(last_modified)}


def check_conditions(headers: Mapping[str, str], etag: str, last_modified: float) -> None:
    """Evaluate GetObject/HeadObject conditional headers against an existing object.

    S3's order (that of RFC 7232 section 6): `If-Match`, else `If-Unmodified-Since`,
    decides 412 PreconditionFailed; then `If-None-Match`, else `If-Modified-Since`,
    decides 304 Not Modified. A date condition is ignored when the matching ETag
    condition is present, and so is an unparseable date.

    Returns None when the request should proceed; raises `S3Error` (412 or 304, the
    304 carrying ETag and Last-Modified) otherwise."""
    modified = _seconds(last_modified)

    if_match = headers.get("If-Match")
    if if_match is not None:
        if not etag_matches(if_match, etag):
            raise errors.precondition_failed("If-Match")
    else:
        since = parse_http_date(headers.get("If-Unmodified-Since"))
        if since is not None and modified > since:
            raise errors.precondition_failed("If-Unmodified-Since")

    if_none_match = headers.get("If-None-Match")
    if if_none_match is not None:
        if etag_matches(if_none_match, etag):
            raise errors.not_modified(not_modified_headers(etag, last_modified))
    else:
        since = parse_http_date(headers.get("If-Modified-Since"))
        if since is not None and modified <= since:
            raise errors.not_modified(not_modified_headers(etag, last_modified))


def check_copy_source_conditions(headers: Mapping[str, str], etag: str, last_modified: float) -> None:
    """Evaluate `x-amz-copy-source-if-*` headers against the copy source.

    Same precedence as `check_conditions`, but S3 answers every failure, including
    a matching `...-if-none-match`, with 412 PreconditionFailed."""
    modified = _seconds(last_modified)

    if_match = headers.get("x-amz-copy-source-if-match")
    if if_match is not None:
        if not etag_matches(if_match, etag):
            raise errors.precondition_failed("x-amz-copy-source-If-Match")
    else:
        since = parse_http_date(headers.get("x-amz-copy-source-if-unmodified-since"))
        if since is not None and modified > since:
            raise errors.precondition_failed("x-amz-copy-source-If-Unmodified-Since")

    if_none_match = headers.get("x-amz-copy-source-if-none-match")
    if if_none_match is not None:
        if etag_matches(if_none_match, etag):
            raise errors.precondition_failed("x-amz-copy-source-If-None-Match")
    else:
        since = parse_http_date(headers.get("x-amz-copy-source-if-modified-since"))
        if since is not None and modified <= since:
            raise errors.precondition_failed("x-amz-copy-source-If-Modified-Since")


def apply_response_overrides(query: Mapping[str, str], headers) -> None:
    """Replace response headers named by `response-*` query parameters, in place.

    `headers` is a mutable multidict (e.g. `CIMultiDict`); a parameter replaces every
    value of its header, as S3 does."""
    for param, header in RESPONSE_OVERRIDES.items():
        value = query.get(param)
        if value is not None:
            headers[header] = value
