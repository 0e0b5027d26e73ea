"""SigV4 header signatures of the common request, checked fast; the pure-Python twin of
`sprox._native.fastsig` and the reference for what it does.

A cache hit in the fast lane spends much of its CPU verifying its signature. Most hits
are the same kind of request: a GET or HEAD, no query, signed in the Authorization
header by an SDK, each signed header sent once with a plain value. This module checks
exactly those, and declines (None) everything else: anything unusual, and any
signature that does not verify. The full verifier (`sprox.s3.sigv4`) then decides
from scratch and words S3's error, so declining is always safe; accepting is only
ever done for a request the full verifier accepts too, with the same key (the tests
check this on random requests, for both implementations).

    FastSigV4(keys, clock, max_skew_seconds).verify(method, raw_path, raw_query, headers)
        -> access key id | None
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import re
from collections.abc import Callable, Mapping

__all__ = ["FastSigV4"]

ALGORITHM_PREFIX = b"AWS4-HMAC-SHA256\n"
SCOPE_TAIL = b"/s3/aws4_request\n"
CONTENT_SHA256 = "x-amz-content-sha256"
# The canonical request and the string to sign are built in a buffer of this size; a
# longer one is declined (the full verifier has no such limit).
MAX_CANONICAL_BYTES = 8192
SIGNING_KEY_CACHE_SIZE = 256

# What SDKs send: `AWS4-HMAC-SHA256 Credential=AK/YYYYMMDD/region/s3/aws4_request,
# SignedHeaders=a;b;c, Signature=<64 hex>`, with `,` or `, ` between the components.
_AUTHORIZATION_HEAD = re.compile(
    r"AWS4-HMAC-SHA256 Credential=([A-Za-z0-9._~+-]+)/([0-9]{8})/([a-z0-9-]+)/s3/aws4_request, ?"
    r"SignedHeaders=([a-z0-9-]+(?:;[a-z0-9-]+)*), ?")
_SIGNATURE = re.compile(r"[0-9a-f]{64}")
_AMZ_DATE = re.compile(r"[0-9]{8}T[0-9]{6}Z")


def fields_of(authorization: str) -> tuple[str, str, str, tuple[str, ...], str] | None:
    """(access key, date, region, signed header names, signature) of an Authorization
    header in the common form that signs `host`, else None."""
    head, found, signature = authorization.rpartition("Signature=")
    if not found or not _SIGNATURE.fullmatch(signature):
        return None
    fields = _head_fields(head)
    return None if fields is None else (*fields, signature)


@functools.lru_cache(maxsize=256)
def _head_fields(head: str) -> tuple[str, str, str, tuple[str, ...]] | None:
    # A client sends the same head (key, day, region, signed headers) request after
    # request: parsed once. Bounded: at most 256 heads are kept.
    match = _AUTHORIZATION_HEAD.fullmatch(head)
    if match is None:
        return None
    names = tuple(match.group(4).split(";"))
    if "host" not in names:
        return None
    return match.group(1), match.group(2), match.group(3), names


def plain_value(value: str) -> str | None:
    """A header value's canonical form when it needs no folding: ASCII, no tab, no run
    of spaces inside (leading and trailing spaces are trimmed); else None."""
    if not value.isascii() or "\t" in value or "  " in value.strip(" "):
        return None
    return value.strip(" ")


def unsigned_amz_headers(headers, signed: tuple[str, ...]) -> bool:
    """Whether the request has an x-amz-* header its signature does not cover."""
    return any(name[:6].lower() == "x-amz-" and name.lower() != CONTENT_SHA256 and name.lower() not in signed
               for name in headers)


def _epoch(timestamp: str) -> float | None:
    from datetime import datetime, timezone

    try:
        return datetime.strptime(timestamp, "%Y%m%dT%H%M%SZ").replace(tzinfo=timezone.utc).timestamp()
    except ValueError:
        return None


class FastSigV4:
    """See the module docstring."""

    def __init__(self, keys: Mapping[str, str], clock: Callable[[], float], max_skew_seconds: float) -> None:
        self._keys = keys
        self._clock = clock
        self._max_skew = max_skew_seconds
        self._signing_keys: dict[tuple[str, str, str], bytes] = {}

    def _signing_key(self, secret: str, date: str, region: str) -> bytes | None:
        known = self._signing_keys.get((secret, date, region))
        if known is not None:
            return known
        key = ("AWS4" + secret).encode("utf-8")
        if len(key) > 64:
            return None
        for part in (date, region, "s3", "aws4_request"):
            key = hmac.new(key, part.encode(), hashlib.sha256).digest()
        if len(self._signing_keys) >= SIGNING_KEY_CACHE_SIZE:
            del self._signing_keys[next(iter(self._signing_keys))]
        self._signing_keys[(secret, date, region)] = key
        return key

    def verify(self, method: str, raw_path: str, raw_query: str, headers) -> str | None:
        if raw_query:
            return None
        authorizations = headers.getall("Authorization", ())
        if len(authorizations) != 1:
            return None
        fields = fields_of(authorizations[0])
        if fields is None:
            return None
        access_key, date, region, signed_names, signature = fields
        dates = headers.getall("x-amz-date", ())
        hashes = headers.getall(CONTENT_SHA256, ())
        if len(dates) != 1 or len(hashes) != 1:
            return None
        timestamp = dates[0]
        if not _AMZ_DATE.fullmatch(timestamp) or timestamp[:8] != date:
            return None
        when = _epoch(timestamp)
        if when is None or abs(when - self._clock()) > self._max_skew:
            return None
        secret = self._keys.get(access_key)
        if secret is None or unsigned_amz_headers(headers, signed_names):
            return None
        lines = []
        for name in signed_names:
            values = headers.getall(name, ())
            if len(values) != 1:
                return None
            value = plain_value(values[0])
            if value is None:
                return None
            lines.append(f"{name}:{value}\n")
        if not (method.isascii() and raw_path.isascii() and hashes[0].isascii()):
            return None
        canonical = f"{method}\n{raw_path}\n\n{''.join(lines)}\n{';'.join(signed_names)}\n{hashes[0]}".encode()
        if len(canonical) > MAX_CANONICAL_BYTES:
            return None
        to_sign = (ALGORITHM_PREFIX + f"{timestamp}\n{date}/{region}".encode() + SCOPE_TAIL
                   + hashlib.sha256(canonical).hexdigest().encode())
        if len(to_sign) > MAX_CANONICAL_BYTES:
            return None
        key = self._signing_key(secret, date, region)
        if key is None:
            return None
        expected = hmac.new(key, to_sign, hashlib.sha256).hexdigest()
        if not hmac.compare_digest(expected, signature):
            return None
        return access_key
