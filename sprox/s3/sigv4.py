"""Inbound request signatures, the way S3 checks them: AWS Signature Version 4 here,
Version 2 in `sigv2.py`.

`SignatureVerifier.verify` authenticates a request a client sent to Sprox, signed
either in the `Authorization` header or as a presigned URL (query parameters), with
SigV4 or SigV2, and returns the access key id that signed it. Every failure is an
`S3Error` with S3's own code, status and message, so client libraries react to Sprox
as they would to S3.

What S3 does, and so what this module does:

- The canonical URI is the request path exactly as the client sent it: S3 neither
  normalises it (`a/../b` is a key) nor encodes it a second time.
- The canonical query is every query parameter decoded and re-encoded per RFC 3986,
  so `+`, `%20`, `%2f` and `%2F` mean what they mean to the request parser.
- Any region in the credential scope is accepted (clients pick their own region);
  the service must be `s3`.
- The payload hash is whatever the client put in `x-amz-content-sha256`; whether the
  body matches it is checked by whoever reads the body (`RequestBody`), not here.
- A streaming upload (`STREAMING-AWS4-HMAC-SHA256-PAYLOAD[-TRAILER]`) signs each
  chunk, chained from the request's own signature: `ChunkSignatures` checks them as
  the body is read.
- Every `x-amz-*` header the request carries must be signed, or a client's signed
  request could be extended by anyone on the path with headers Sprox then acts on.

Supported: `AWS4-HMAC-SHA256` and SigV2 (`AWS key:signature`, `?AWSAccessKeyId=...`);
not SigV4a (ECDSA) or POST policies.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from urllib.parse import quote, unquote_to_bytes

from multidict import CIMultiDictProxy

from . import errors, sigv2
from .errors import S3Error
from .request import S3Request

ALGORITHM = "AWS4-HMAC-SHA256"
SERVICE = "s3"
SCOPE_TERMINATOR = "aws4_request"
UNSIGNED_PAYLOAD = "UNSIGNED-PAYLOAD"

# S3's limits: requests may be 15 minutes off the server's clock, presigned URLs may
# live at most 7 days.
DEFAULT_MAX_SKEW_SECONDS = 15 * 60
MAX_PRESIGN_EXPIRES_SECONDS = 7 * 24 * 3600

# Signing keys change once a day per (secret, region): a few hundred entries cover
# every key and region a deployment sees, and bound what a client can make us keep.
SIGNING_KEY_CACHE_SIZE = 256

_AMZ_DATE_FORMAT = "%Y%m%dT%H%M%SZ"
_AMZ_DATE_RE = re.compile(r"[0-9]{8}T[0-9]{6}Z")
_SCOPE_DATE_RE = re.compile(r"[0-9]{8}")
# The canonical form trims a header value and collapses inner runs of blanks.
_BLANK_RUN_RE = re.compile(r"[ \t]+")

# Presigned-URL parameters, in the order S3's error message lists them.
_QUERY_AUTH_PARAMS = (
    "X-Amz-Algorithm",
    "X-Amz-Credential",
    "X-Amz-Signature",
    "X-Amz-Date",
    "X-Amz-SignedHeaders",
    "X-Amz-Expires",
)
# Any of these in the query means the client meant query authentication.
_QUERY_AUTH_MARKERS = frozenset({"X-Amz-Algorithm", "X-Amz-Credential", "X-Amz-Signature"})
# ... and these, query authentication with SigV2.
_V2_QUERY_AUTH_MARKERS = frozenset({"AWSAccessKeyId", "Signature"})

# Carried in the canonical request as the payload hash, so covered even when the
# client leaves it out of SignedHeaders.
_AMZ_HEADERS_COVERED_ANYWAY = frozenset({"x-amz-content-sha256"})


@dataclass(frozen=True, slots=True)
class SignatureFields:
    """What an `Authorization` header (or the presign query parameters) declare."""

    access_key: str
    date: str  # YYYYMMDD, from the credential scope
    region: str
    service: str
    signed_headers: tuple[str, ...]  # lower-cased, in the order the client listed them
    signature: str

    @property
    def scope(self) -> str:
        """The credential scope without the access key (`date/region/s3/aws4_request`)."""
        return f"{self.date}/{self.region}/{self.service}/{SCOPE_TERMINATOR}"


@dataclass(frozen=True, slots=True)
class VerifiedRequest:
    """A request whose signature checked out, with what streaming uploads need to
    verify their chunk signatures: the seed signature, scope, timestamp and key."""

    access_key: str
    region: str
    timestamp: str  # ISO 8601 basic (20240517T120000Z), as in the string to sign
    scope: str
    signature: str
    presigned: bool
    signing_key: bytes = field(repr=False)  # empty for SigV2
    version: int = 4  # the signature version: 4, or 2 (which cannot sign a stream's chunks)
    # A SigV2 presigned URL's signed x-amz-* parameters, which are headers to S3.
    query_headers: tuple[tuple[str, str], ...] = ()


class ChunkSignatures:
    """The chained signatures of a signed streaming upload, checked chunk by chunk.

    Each chunk's signature covers its data and the signature before it, starting from
    the request's (seed) signature, so no chunk can be altered, dropped, reordered or
    added, and the final (empty) chunk and the signed trailer end the chain. Raises
    SignatureDoesNotMatch (403), as S3 does, at the first signature that is wrong or
    missing."""

    __slots__ = ("_key", "_chunk_prefix", "_trailer_prefix", "previous")

    def __init__(self, verified: VerifiedRequest) -> None:
        self._key = verified.signing_key
        head = f"{verified.timestamp}\n{verified.scope}\n"
        self._chunk_prefix = f"{ALGORITHM}-PAYLOAD\n{head}"
        self._trailer_prefix = f"{ALGORITHM}-TRAILER\n{head}"
        self.previous = verified.signature

    def check_chunk(self, provided: str | None, data_sha256: str) -> None:
        """`data_sha256`: the hex SHA-256 of the chunk's data (of b"" for the final chunk)."""
        self._check(f"{self._chunk_prefix}{self.previous}\n{_EMPTY_SHA256}\n{data_sha256}", provided)

    def check_trailer(self, provided: str | None, trailers: Mapping[str, str]) -> None:
        """The trailer's signature, over `name:value\\n` for each trailer as sent."""
        canonical = "".join(f"{name}:{value}\n" for name, value in trailers.items())
        digest = hashlib.sha256(canonical.encode("utf-8")).hexdigest()
        self._check(f"{self._trailer_prefix}{self.previous}\n{digest}", provided)

    def _check(self, to_sign: str, provided: str | None) -> None:
        expected = hmac.new(self._key, to_sign.encode("utf-8"), hashlib.sha256).hexdigest()
        if provided is None or not hmac.compare_digest(expected.encode(), provided.encode("utf-8", "replace")):
            raise S3Error("SignatureDoesNotMatch",
                          "The request signature we calculated does not match the signature you "
                          "provided. Check your key and signing method.", 403,
                          extra={"StringToSign": to_sign, "SignatureProvided": provided or ""})
        self.previous = expected


_EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()


# --- errors -----------------------------------------------------------------------


def _header_malformed(detail: str) -> S3Error:
    return S3Error("AuthorizationHeaderMalformed",
                   f"The authorization header is malformed; {detail}", 400)


def _query_malformed(message: str) -> S3Error:
    return S3Error("AuthorizationQueryParametersError", message, 400)


def _credential_malformed(detail: str) -> S3Error:
    return _query_malformed(f"Error parsing the X-Amz-Credential parameter; {detail}")


def _invalid_access_key(access_key: str) -> S3Error:
    return S3Error("InvalidAccessKeyId",
                   "The AWS Access Key Id you provided does not exist in our records.", 403,
                   extra={"AWSAccessKeyId": access_key})


def _missing_date() -> S3Error:
    return errors.access_denied("AWS authentication requires a valid Date or x-amz-date header")


def _iso8601(epoch_seconds: float) -> str:
    return datetime.fromtimestamp(epoch_seconds, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# --- parsing ----------------------------------------------------------------------


def _parse_credential(credential: str, malformed: Callable[[str], S3Error]
                      ) -> tuple[str, str, str, str]:
    """Split `AKID/YYYYMMDD/region/s3/aws4_request` into (access key, date, region,
    service), raising `malformed(detail)` with S3's wording when it is not that."""
    parts = credential.split("/")
    if len(parts) != 5 or not all(parts):
        raise malformed('the Credential is mal-formed; expecting '
                        '"<YOUR-AKID>/YYYYMMDD/REGION/SERVICE/aws4_request".')
    access_key, date, region, service, terminator = parts
    if not _SCOPE_DATE_RE.fullmatch(date):
        raise malformed(f'incorrect date format "{date}". This date in the credential must be '
                        f'in the format "yyyyMMdd".')
    if service != SERVICE:
        raise malformed(f'incorrect service "{service}". This endpoint belongs to "{SERVICE}".')
    if terminator != SCOPE_TERMINATOR:
        raise malformed(f'incorrect terminal "{terminator}". This endpoint uses '
                        f'"{SCOPE_TERMINATOR}".')
    return access_key, date, region, service


def _parse_signed_headers(value: str, malformed: Callable[[str], S3Error]) -> tuple[str, ...]:
    names = tuple(name.lower() for name in value.split(";"))
    if not all(names):
        raise malformed(f'the SignedHeaders "{value}" are mal-formed.')
    if "host" not in names:
        # S3 requires the Host header to be signed: without it a request signed for
        # one endpoint could be replayed against another.
        raise malformed("the host header must be signed.")
    return names


_SIGNATURE_RE = re.compile(r"[0-9a-f]{64}")
_PLACEHOLDER = "0" * 64


def parse_authorization(header: str) -> SignatureFields:
    """Parse an `Authorization: AWS4-HMAC-SHA256 Credential=..., SignedHeaders=...,
    Signature=...` header.

    Raises `S3Error`: InvalidArgument for any other scheme (SigV2's `AWS key:sig` is
    `sigv2.parse_authorization`'s), AuthorizationHeaderMalformed for a bad SigV4 header."""
    # A client sends the same header but for the signature, request after request:
    # parse that part once. (A well-formed signature holds no separator, so putting a
    # placeholder in its place changes nothing about how the rest parses.)
    head, sep, signature = header.rpartition("Signature=")
    if sep and _SIGNATURE_RE.fullmatch(signature):
        try:
            fields = _parse_authorization_cached(head + sep + _PLACEHOLDER)
        except S3Error:
            return _parse_authorization(header)  # the error, worded with the header as sent
        return SignatureFields(fields.access_key, fields.date, fields.region, fields.service,
                               fields.signed_headers, signature)
    return _parse_authorization(header)


@functools.lru_cache(maxsize=256)
def _parse_authorization_cached(header: str) -> SignatureFields:
    return _parse_authorization(header)


def _parse_authorization(header: str) -> SignatureFields:
    scheme, _, rest = header.strip().partition(" ")
    if scheme != ALGORITHM:
        raise errors.S3Error("InvalidArgument", "Unsupported Authorization Type", 400,
                             extra={"ArgumentName": "Authorization", "ArgumentValue": header})
    components: dict[str, str] = {}
    for part in rest.split(","):
        part = part.strip()
        name, sep, value = part.partition("=")
        known = name in ("Credential", "SignedHeaders", "Signature")
        if not sep or not known or name in components:
            raise _header_malformed(f'the authorization component "{part}" is malformed.')
        components[name] = value
    if len(components) != 3:
        raise _header_malformed("the authorization header requires three components: "
                                "Credential, SignedHeaders, and Signature.")
    access_key, date, region, service = _parse_credential(components["Credential"],
                                                          _header_malformed)
    signed_headers = _parse_signed_headers(components["SignedHeaders"], _header_malformed)
    return SignatureFields(access_key, date, region, service, signed_headers,
                           components["Signature"])


@dataclass(frozen=True, slots=True)
class _QueryParam:
    encoded_name: str  # RFC 3986, as it goes into the canonical query
    encoded_value: str
    name: str  # decoded, to look up presign parameters
    value: str


def _rfc3986(raw: str) -> tuple[str, str]:
    """Decode one query component the way the request parser does ('+' is a space)
    and re-encode it the way SigV4 wants; returns (encoded, decoded)."""
    # Work on bytes so a client's non-UTF-8 escape still has one canonical form.
    data = unquote_to_bytes(raw.replace("+", " "))
    return quote(data, safe="-_.~"), data.decode("utf-8", "replace")


def _parse_raw_query(raw_query: str) -> list[_QueryParam]:
    params = []
    for pair in raw_query.split("&"):
        if not pair:
            continue  # `a=1&&b=2`: the request parser ignores empty pairs as well
        raw_name, _, raw_value = pair.partition("=")  # `?uploads` has an empty value
        encoded_name, name = _rfc3986(raw_name)
        encoded_value, value = _rfc3986(raw_value)
        params.append(_QueryParam(encoded_name, encoded_value, name, value))
    return params


def _canonical_query(params: list[_QueryParam], exclude: str | None) -> str:
    pairs = sorted((p.encoded_name, p.encoded_value) for p in params if p.name != exclude)
    return "&".join(f"{name}={value}" for name, value in pairs)


def canonical_query_string(raw_query: str, *, exclude: str | None = None) -> str:
    """The canonical query of a raw query string: every parameter (but `exclude`)
    decoded, RFC 3986 encoded, sorted by name then value."""
    return _canonical_query(_parse_raw_query(raw_query), exclude)


def canonical_headers(headers: CIMultiDictProxy[str], names: tuple[str, ...]) -> str:
    """The canonical header block: one `name:value\\n` line per signed header."""
    lines = []
    for name in names:
        values = headers.getall(name, ())
        if len(values) == 1 and "  " not in values[0] and "\t" not in values[0]:
            lines.append(f"{name}:{values[0].strip(' ')}\n")  # the common case, without a regex
        else:
            joined = ",".join(_BLANK_RUN_RE.sub(" ", v).strip(" \t") for v in values)
            lines.append(f"{name}:{joined}\n")
    return "".join(lines)


def canonical_request(method: str, raw_path: str, query: str, headers_block: str,
                      signed_headers: tuple[str, ...], payload_hash: str) -> str:
    return "\n".join((method, raw_path, query, headers_block, ";".join(signed_headers),
                      payload_hash))


def string_to_sign(timestamp: str, scope: str, canonical: str) -> str:
    # surrogateescape: header bytes aiohttp could not decode hash as the client sent them.
    digest = hashlib.sha256(canonical.encode("utf-8", "surrogateescape")).hexdigest()
    return f"{ALGORITHM}\n{timestamp}\n{scope}\n{digest}"


def derive_signing_key(secret_key: str, date: str, region: str, service: str = SERVICE) -> bytes:
    """kSigning = HMAC(HMAC(HMAC(HMAC("AWS4" + secret, date), region), service), "aws4_request")."""
    key = ("AWS4" + secret_key).encode()
    for part in (date, region, service, SCOPE_TERMINATOR):
        # surrogateescape: the region comes from the client, bytes and all.
        key = hmac.new(key, part.encode("utf-8", "surrogateescape"), hashlib.sha256).digest()
    return key


@functools.lru_cache(maxsize=1024)
def _parse_amz_date(value: str) -> float | None:
    # Cached: clients sign with the current second, so consecutive requests share it,
    # and strptime alone cost more than the rest of a signature check.
    if not _AMZ_DATE_RE.fullmatch(value):
        return None
    try:
        return datetime(int(value[0:4]), int(value[4:6]), int(value[6:8]), int(value[9:11]), int(value[11:13]),
                        int(value[13:15]), tzinfo=timezone.utc).timestamp()
    except ValueError:  # 20241399T...: the right shape, not a date
        return None


# --- verification -----------------------------------------------------------------


class SignatureVerifier:
    """Checks SigV4 and SigV2 signatures against a table of access key id → secret key.

    `keys` must not change once a server runs with it: the hit kernel copies the
    secrets when it is made (`kernel_keys`), and an entry it mirrors stays readable by
    the keys that read it. `clock` returns the current time in epoch seconds (tests
    pass a fixed one)."""

    def __init__(
        self,
        keys: Mapping[str, str],
        *,
        clock: Callable[[], float] = time.time,
        max_skew_seconds: int = DEFAULT_MAX_SKEW_SECONDS,
        signing_key_cache_size: int = SIGNING_KEY_CACHE_SIZE,
    ) -> None:
        self._keys = keys
        self._clock = clock
        self._max_skew = max_skew_seconds
        self._cache_size = signing_key_cache_size
        # (secret, date, region, service) → (signing key, keyed HMAC); dicts keep
        # insertion order, so the first entry is the oldest and is the one evicted.
        self._signing_keys: dict[tuple[str, str, str, str], tuple[bytes, hmac.HMAC]] = {}

    def verify(self, request: S3Request) -> str:
        """The access key id that signed `request`; raises `S3Error` otherwise."""
        return self.authenticate(request).access_key

    def fast_check(self):
        """A `sprox.fastsig.FastSigV4` over the same keys, clock and skew: the common
        request checked in C, never accepting what this verifier would refuse."""
        from ..fastsig import FastSigV4

        return FastSigV4(self._keys, self._clock, float(self._max_skew))

    def kernel_keys(self) -> tuple[Mapping[str, str], float] | None:
        """(keys, max skew in seconds) for the hit kernel, which checks the common
        request against the wall clock; None with another clock (tests), which keeps
        every check here."""
        if self._clock is not time.time:
            return None
        return self._keys, float(self._max_skew)

    def authenticate(self, request: S3Request) -> VerifiedRequest:
        """Like `verify`, returning what chunk-signature checks need as well."""
        authorization = request.headers.getall("Authorization", [])
        query = _parse_raw_query(request.raw_query)
        query_auth = any(p.name in _QUERY_AUTH_MARKERS for p in query)
        v2_query_auth = not query_auth and any(p.name in _V2_QUERY_AUTH_MARKERS for p in query)
        if authorization and (query_auth or v2_query_auth):
            raise errors.S3Error(
                "InvalidArgument",
                "Only one auth mechanism allowed; only the X-Amz-Algorithm query parameter, "
                "Signature query string parameter or the Authorization header should be specified",
                400, extra={"ArgumentName": "Authorization",
                            "ArgumentValue": authorization[0]})
        if len(authorization) > 1:
            raise _header_malformed("only one Authorization header is allowed.")
        if authorization and authorization[0].lstrip().startswith(sigv2.ALGORITHM + " "):
            access_key = sigv2.verify_header(request, authorization[0], [(p.name, p.value) for p in query],
                                             self._keys, self._clock(), self._max_skew, _invalid_access_key)
            return _verified_v2(access_key, presigned=False)
        if authorization:
            return self._verify_header(request, authorization[0], query)
        if query_auth:
            return self._verify_presigned(request, query)
        if v2_query_auth:
            access_key, query_headers = sigv2.verify_query(request, [(p.name, p.value) for p in query],
                                                           self._keys, self._clock(), _invalid_access_key)
            return _verified_v2(access_key, presigned=True, query_headers=query_headers)
        raise errors.access_denied()

    def signing_key(self, access_key: str, date: str, region: str, service: str = SERVICE) -> bytes:
        """The derived SigV4 signing key for `access_key` on `date` (YYYYMMDD) in
        `region`; raises InvalidAccessKeyId for a key not in the table."""
        secret = self._keys.get(access_key)
        if secret is None:
            raise _invalid_access_key(access_key)
        return self._cached_signing_key(secret, date, region, service)

    def _cached_signing_key(self, secret: str, date: str, region: str, service: str) -> bytes:
        return self._keyed_hmac(secret, date, region, service)[0]

    def _keyed_hmac(self, secret: str, date: str, region: str, service: str) -> tuple[bytes, hmac.HMAC]:
        """(signing key, an HMAC-SHA256 already keyed with it, to copy per request)."""
        cache_key = (secret, date, region, service)
        entry = self._signing_keys.get(cache_key)
        if entry is None:
            key = derive_signing_key(secret, date, region, service)
            entry = (key, hmac.new(key, digestmod=hashlib.sha256))
            if len(self._signing_keys) >= self._cache_size:
                del self._signing_keys[next(iter(self._signing_keys))]
            self._signing_keys[cache_key] = entry
        return entry

    # -- header authentication --

    def _verify_header(self, request: S3Request, header: str,
                       query: list[_QueryParam]) -> VerifiedRequest:
        fields = parse_authorization(header)
        payload_hash = request.headers.get("x-amz-content-sha256")
        if payload_hash is None:
            raise errors.invalid_request(
                "Missing required header for this request: x-amz-content-sha256")
        timestamp, request_time, sent_as = self._header_time(request.headers)
        if fields.date != timestamp[:8]:
            raise _header_malformed(f'Invalid credential date "{fields.date}". This date is not '
                                    f'the same as X-Amz-Date: "{timestamp[:8]}".')
        secret = self._keys.get(fields.access_key)
        if secret is None:
            raise _invalid_access_key(fields.access_key)
        now = self._clock()
        if abs(request_time - now) > self._max_skew:
            raise S3Error(
                "RequestTimeTooSkewed",
                "The difference between the request time and the current time is too large.",
                403,
                extra={"RequestTime": sent_as, "ServerTime": _iso8601(now),
                       "MaxAllowedSkewMilliseconds": str(self._max_skew * 1000)})
        return self._check_signature(request, fields, secret, timestamp,
                                     _canonical_query(query, None), payload_hash,
                                     presigned=False)

    @staticmethod
    def _header_time(headers: CIMultiDictProxy[str]) -> tuple[str, float, str]:
        """(timestamp for the string to sign, epoch seconds, the header as sent) from
        x-amz-date, or from Date when x-amz-date is absent."""
        amz_dates = headers.getall("x-amz-date", [])
        if amz_dates:
            if len(amz_dates) != 1:
                raise _missing_date()
            when = _parse_amz_date(amz_dates[0])
            if when is None:
                raise _missing_date()
            return amz_dates[0], when, amz_dates[0]
        http_date = headers.get("Date")
        if http_date is None:
            raise _missing_date()
        try:
            parsed = parsedate_to_datetime(http_date)
        except (TypeError, ValueError):
            raise _missing_date() from None
        if parsed.tzinfo is None:  # "-0000" means UTC with no zone information
            parsed = parsed.replace(tzinfo=timezone.utc)
        parsed = parsed.astimezone(timezone.utc)
        return parsed.strftime(_AMZ_DATE_FORMAT), parsed.timestamp(), http_date

    # -- query (presigned URL) authentication --

    def _verify_presigned(self, request: S3Request, query: list[_QueryParam]) -> VerifiedRequest:
        auth: dict[str, str] = {}
        for param in query:
            if param.name in _QUERY_AUTH_PARAMS:
                if param.name in auth:
                    raise _query_malformed(f"{param.name} must appear only once.")
                auth[param.name] = param.value
        if len(auth) != len(_QUERY_AUTH_PARAMS):
            raise _query_malformed(
                "Query-string authentication version 4 requires the X-Amz-Algorithm, "
                "X-Amz-Credential, X-Amz-Signature, X-Amz-Date, X-Amz-SignedHeaders, "
                "and X-Amz-Expires parameters.")
        if auth["X-Amz-Algorithm"] != ALGORITHM:
            raise _query_malformed(f'X-Amz-Algorithm only supports "{ALGORITHM}"')
        access_key, date, region, service = _parse_credential(auth["X-Amz-Credential"],
                                                              _credential_malformed)
        timestamp = auth["X-Amz-Date"]
        signed_at = _parse_amz_date(timestamp)
        if signed_at is None:
            raise _query_malformed(
                "X-Amz-Date must be in the ISO8601 Long Format \"yyyyMMdd'T'HHmmss'Z'\"")
        expires = self._presign_expires(auth["X-Amz-Expires"])
        if date != timestamp[:8]:
            raise _credential_malformed(f'Invalid credential date "{date}". This date is not '
                                        f'the same as X-Amz-Date: "{timestamp[:8]}".')
        signed_headers = _parse_signed_headers(
            auth["X-Amz-SignedHeaders"],
            lambda detail: _query_malformed(f"Error parsing the X-Amz-SignedHeaders parameter; "
                                            f"{detail}"))
        fields = SignatureFields(access_key, date, region, service, signed_headers,
                                 auth["X-Amz-Signature"])
        secret = self._keys.get(access_key)
        if secret is None:
            raise _invalid_access_key(access_key)
        now = self._clock()
        if now < signed_at - self._max_skew:
            raise errors.access_denied("Request is not valid yet")
        if now > signed_at + expires:
            raise S3Error("AccessDenied", "Request has expired", 403,
                          extra={"X-Amz-Expires": str(expires),
                                 "Expires": _iso8601(signed_at + expires),
                                 "ServerTime": _iso8601(now)})
        # A presigned URL cannot know its payload: UNSIGNED-PAYLOAD, unless the client
        # also sent x-amz-content-sha256 (botocore and the other SDKs sign with it then).
        payload_hash = request.headers.get("x-amz-content-sha256", UNSIGNED_PAYLOAD)
        return self._check_signature(request, fields, secret, timestamp,
                                     _canonical_query(query, "X-Amz-Signature"),
                                     payload_hash, presigned=True)

    @staticmethod
    def _presign_expires(value: str) -> int:
        if not re.fullmatch(r"-?[0-9]{1,12}", value):
            raise _query_malformed("X-Amz-Expires should be a number")
        expires = int(value)
        if expires < 0:
            raise _query_malformed("X-Amz-Expires must be non-negative")
        if expires == 0:
            raise _query_malformed("X-Amz-Expires must be greater than 0")
        if expires > MAX_PRESIGN_EXPIRES_SECONDS:
            raise _query_malformed("X-Amz-Expires must be less than a week (in seconds) that is; "
                                   f"{MAX_PRESIGN_EXPIRES_SECONDS}")
        return expires

    # -- shared --

    def _check_signature(self, request: S3Request, fields: SignatureFields, secret: str,
                         timestamp: str, query: str, payload_hash: str, *,
                         presigned: bool) -> VerifiedRequest:
        unsigned = sorted({
            lower for lower in (name.lower() for name in request.headers if name[:6].lower() == "x-amz-")
            if lower not in fields.signed_headers and lower not in _AMZ_HEADERS_COVERED_ANYWAY
        })
        if unsigned:
            raise S3Error("AccessDenied",
                          "There were headers present in the request which were not signed", 403,
                          extra={"HeadersNotSigned": ", ".join(unsigned)})
        canonical = canonical_request(
            request.method, request.raw_path, query,
            canonical_headers(request.headers, fields.signed_headers),
            fields.signed_headers, payload_hash)
        to_sign = string_to_sign(timestamp, fields.scope, canonical)
        signing_key, keyed = self._keyed_hmac(secret, fields.date, fields.region, fields.service)
        mac = keyed.copy()  # the key schedule is done once per signing key, not per request
        mac.update(to_sign.encode("utf-8", "surrogateescape"))
        expected = mac.hexdigest()
        provided = fields.signature.encode("utf-8", "surrogateescape")
        if not hmac.compare_digest(expected.encode(), provided):
            # S3 echoes what it signed so a client can diff it against its own: nothing
            # here is secret, the client sent every part of it.
            raise S3Error(
                "SignatureDoesNotMatch",
                "The request signature we calculated does not match the signature you "
                "provided. Check your key and signing method.",
                403,
                extra={"AWSAccessKeyId": fields.access_key, "StringToSign": to_sign,
                       "SignatureProvided": fields.signature, "CanonicalRequest": canonical})
        return VerifiedRequest(
            access_key=fields.access_key, region=fields.region, timestamp=timestamp,
            scope=fields.scope, signature=fields.signature, presigned=presigned,
            signing_key=signing_key)


def _verified_v2(access_key: str, *, presigned: bool,
                 query_headers: tuple[tuple[str, str], ...] = ()) -> VerifiedRequest:
    return VerifiedRequest(access_key=access_key, region="", timestamp="", scope="", signature="",
                           presigned=presigned, signing_key=b"", version=2, query_headers=query_headers)
