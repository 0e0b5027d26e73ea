"""Inbound AWS Signature Version 2 (HMAC-SHA1), the way S3 checks it.

Still what boto3 makes for a presigned URL when no `signature_version` is configured
(`?AWSAccessKeyId=...&Signature=...&Expires=...`), and what older tools and
`signature_version="s3"` send in the header (`Authorization: AWS key:signature`).
`sigv4.SignatureVerifier` routes such requests here; every failure is an `S3Error`
with S3's code, status and message.

The string to sign (S3's "RESTAuthentication"):

    VERB \\n Content-MD5 \\n Content-Type \\n Date-or-Expires \\n
    CanonicalizedAmzHeaders CanonicalizedResource

- Date is the `Date` header as sent, or empty when `x-amz-date` is present (that one
  is then signed among the amz headers); a presigned URL has its `Expires` instead.
- CanonicalizedAmzHeaders: every `x-amz-*` header, lower-cased, sorted, repeated
  values joined with `,`, one `name:value\\n` each. A presigned URL carries its amz
  "headers" as query parameters (the session token, say): they count too, so every
  `x-amz-*` a request holds is signed, by construction.
- CanonicalizedResource: `/bucket` (for virtual-hosted requests) + the path exactly as
  sent, then the sub-resources S3 signs (`?acl`, `?uploadId=...`, `response-*`
  overrides...) sorted by name, values decoded.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from urllib.parse import unquote

from multidict import CIMultiDictProxy

from . import errors
from .errors import S3Error
from .request import OPERATION_PARAMS, S3Request

ALGORITHM = "AWS"  # the Authorization scheme: `AWS AKID:signature`
# The query parameters of a presigned URL.
QUERY_PARAMS = ("AWSAccessKeyId", "Signature", "Expires")

# The query parameters a V2 signature covers: the sub-resources S3 names and the
# response-* overrides (what SDKs sign), and every other parameter that selects what a
# request does (request.OPERATION_PARAMS): a parameter that changes the operation must
# be signed, or a presigned GET could be turned into, say, a PutObjectRetention. (A
# client that signs a newer sub-resource without it fails closed: SignatureDoesNotMatch.)
SIGNED_SUBRESOURCES = OPERATION_PARAMS | frozenset({
    # S3's sub-resources that no operation here is chosen by, and the response-* overrides
    "defaultObjectAcl", "select-type", "storageClass",
    "response-cache-control", "response-content-disposition", "response-content-encoding",
    "response-content-language", "response-content-type", "response-expires",
})


def _iso8601(epoch_seconds: float) -> str:
    return datetime.fromtimestamp(epoch_seconds, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def canonical_resource(request: S3Request, *, literal_path: bool = False) -> str:
    """`/bucket` + the raw path (virtual-hosted requests carry the bucket in Host),
    then the signed sub-resources, sorted by name, their values percent-decoded.

    A bucket's own resource is `/bucket/` however it was addressed (what SDKs sign
    for `GET /bucket?prefix=...`); `literal_path` keeps a path-style `/bucket` as sent,
    as a few clients sign it."""
    resource = request.raw_path
    if request.virtual_hosted and request.bucket is not None:
        resource = f"/{request.bucket}{resource}"
    elif request.bucket is not None and request.key is None and not literal_path and not resource.endswith("/"):
        resource += "/"
    signed: list[tuple[str, str]] = []
    for pair in request.raw_query.split("&") if request.raw_query else ():
        raw_name, eq, raw_value = pair.partition("=")
        # Decoded as the request parser decodes them (`+` is a space), so what is signed
        # is what the request means: `versio%6EId` is versionId, and signed as such.
        name = _decode_query(raw_name)
        if name in SIGNED_SUBRESOURCES:
            # `?uploads` and `?uploads=` are signed as sent: with and without the `=`.
            signed.append((name, eq + _decode_query(raw_value) if eq else ""))
    if signed:
        signed.sort(key=lambda item: item[0])  # by name only; equal names keep their order
        resource += "?" + "&".join(name + value for name, value in signed)
    return resource


def _decode_query(raw: str) -> str:
    return unquote(raw.replace("+", " "), errors="replace")


def canonical_amz_headers(headers: CIMultiDictProxy[str], query_amz: list[tuple[str, str]]) -> str:
    """One `name:value\\n` line per x-amz-* name, sorted; repeated values joined by `,`."""
    values: dict[str, list[str]] = {}
    for name, value in headers.items():
        lower = name.lower()
        if lower.startswith("x-amz-"):
            values.setdefault(lower, []).append(value.strip())
    for name, value in query_amz:
        values.setdefault(name, []).append(value.strip())
    return "".join(f"{name}:{','.join(values[name])}\n" for name in sorted(values))


def string_to_sign(request: S3Request, date: str, query_amz: list[tuple[str, str]] = (),
                   query_standard: Mapping[str, str] | None = None, *, literal_path: bool = False) -> str:
    headers = request.headers
    standard = []
    for name in ("Content-MD5", "Content-Type"):
        value = headers.get(name)
        if value is None and query_standard is not None:
            value = query_standard.get(name.lower())
        standard.append((value or "").strip())
    return (f"{request.method}\n{standard[0]}\n{standard[1]}\n{date}\n"
            f"{canonical_amz_headers(headers, list(query_amz))}{canonical_resource(request, literal_path=literal_path)}")


def sign(secret_key: str, to_sign: str) -> str:
    """The base64 HMAC-SHA1 of the string to sign: the signature a client sends."""
    digest = hmac.new(secret_key.encode("utf-8"), to_sign.encode("utf-8", "surrogateescape"), hashlib.sha1)
    return base64.b64encode(digest.digest()).decode("ascii")


# --- verification -------------------------------------------------------------------


def parse_authorization(header: str) -> tuple[str, str]:
    """(access key, signature) from `AWS AKID:signature`; InvalidArgument otherwise."""
    scheme, _, credentials = header.strip().partition(" ")
    access_key, sep, signature = credentials.strip().rpartition(":")
    if scheme != ALGORITHM or not sep or not access_key or not signature:
        raise S3Error("InvalidArgument", "AWS authorization header is invalid.  Expected AwsAccessKeyId:signature",
                      400, extra={"ArgumentName": "Authorization", "ArgumentValue": header})
    return access_key, signature


def request_time(headers: CIMultiDictProxy[str]) -> tuple[float, str, str]:
    """(epoch seconds, the header as sent, the date for the string to sign) from
    x-amz-date (then signed as an amz header, the date line left empty) or Date."""
    amz_dates = headers.getall("x-amz-date", [])
    if amz_dates:
        value, date_line = amz_dates[0], ""
    else:
        value, date_line = headers.get("Date"), headers.get("Date")
    when = _parse_date(value) if value is not None and len(amz_dates) <= 1 else None
    if when is None:
        raise errors.access_denied("AWS authentication requires a valid Date or x-amz-date header")
    return when, value, date_line.strip() if date_line else ""


def _parse_date(value: str) -> float | None:
    try:
        parsed = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        # SDKs that sign V2 send an HTTP date; some send x-amz-date in ISO 8601 basic.
        try:
            parsed = datetime.strptime(value.strip(), "%Y%m%dT%H%M%SZ")
        except ValueError:
            return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=timezone.utc)
    return parsed.timestamp()


def check_signature(request: S3Request, access_key: str, secret: str, provided: str,
                    to_sign: Callable[..., str]) -> None:
    """`to_sign(literal_path=...)` makes the string to sign; a bucket's path-style
    resource may be signed either way (see `canonical_resource`)."""
    candidates = [to_sign(literal_path=False)]
    if request.bucket is not None and request.key is None and not request.virtual_hosted \
            and not request.raw_path.endswith("/"):
        candidates.append(to_sign(literal_path=True))
    given = provided.encode("utf-8", "replace")
    # Every candidate is compared (no early exit), each in constant time.
    matches = [hmac.compare_digest(sign(secret, s).encode(), given) for s in candidates]
    if not any(matches):
        # S3 echoes what it signed so a client can compare it with its own.
        shown = candidates[0]
        raise S3Error(
            "SignatureDoesNotMatch",
            "The request signature we calculated does not match the signature you provided. "
            "Check your key and signing method.", 403,
            extra={"AWSAccessKeyId": access_key, "StringToSign": shown, "SignatureProvided": provided,
                   "StringToSignBytes": " ".join(f"{b:02x}" for b in shown.encode("utf-8", "replace"))})


def verify_header(request: S3Request, header: str, params: list[tuple[str, str]], keys: Mapping[str, str],
                  now: float, max_skew: float, invalid_key: Callable[[str], S3Error]) -> str:
    """The access key that signed `Authorization: AWS key:signature` (`params`: the
    query, decoded, in order); S3Error otherwise."""
    access_key, signature = parse_authorization(header)
    unsigned = sorted({name for name, _ in params if name.lower().startswith("x-amz-")})
    if unsigned:
        # A header-signed V2 request signs its headers, not such parameters: anyone on the
        # path could add them, and an upstream may read them as headers.
        raise S3Error("AccessDenied", "There were headers present in the request which were not signed", 403,
                      extra={"HeadersNotSigned": ", ".join(unsigned)})
    when, sent_as, date_line = request_time(request.headers)
    secret = keys.get(access_key)
    if secret is None:
        raise invalid_key(access_key)
    if abs(when - now) > max_skew:
        raise S3Error("RequestTimeTooSkewed",
                      "The difference between the request time and the current time is too large.", 403,
                      extra={"RequestTime": sent_as, "ServerTime": _iso8601(now),
                             "MaxAllowedSkewMilliseconds": str(int(max_skew * 1000))})
    check_signature(request, access_key, secret, signature,
                    lambda **how: string_to_sign(request, date_line, **how))
    return access_key


def verify_query(request: S3Request, params: list[tuple[str, str]], keys: Mapping[str, str], now: float,
                 invalid_key: Callable[[str], S3Error]) -> tuple[str, tuple[tuple[str, str], ...]]:
    """(access key, signed x-amz-* "headers") of a presigned URL (`params`: the query,
    decoded, in order). The URL carries its x-amz-* headers as parameters, signed: the
    caller applies them as the headers they are."""
    auth: dict[str, str] = {}
    query_amz: list[tuple[str, str]] = []
    query_standard: dict[str, str] = {}
    for name, value in params:
        if name in QUERY_PARAMS:
            if name in auth:
                raise errors.invalid_argument(f"{name} must appear only once.", name, value)
            auth[name] = value
        elif name.lower().startswith("x-amz-"):
            query_amz.append((name.lower(), value))
        elif name.lower() in ("content-md5", "content-type"):
            query_standard[name.lower()] = value
    if len(auth) != len(QUERY_PARAMS):
        raise errors.access_denied(
            "Query-string authentication requires the Signature, Expires and AWSAccessKeyId parameters")
    expires_text = auth["Expires"]
    if not expires_text.isascii() or not expires_text.isdigit() or len(expires_text) > 12:
        raise errors.access_denied("Invalid date (should be seconds since epoch): " + expires_text)
    expires = int(expires_text)
    access_key = auth["AWSAccessKeyId"]
    secret = keys.get(access_key)
    if secret is None:
        raise invalid_key(access_key)
    if now > expires:
        raise S3Error("AccessDenied", "Request has expired", 403,
                      extra={"Expires": _iso8601(expires), "ServerTime": _iso8601(now)})
    check_signature(request, access_key, secret, auth["Signature"],
                    lambda **how: string_to_sign(request, expires_text, query_amz, query_standard, **how))
    # The session token authenticated the URL's signer to S3: it is for Sprox, never a header.
    return access_key, tuple((n, v) for n, v in query_amz if n != "x-amz-security-token")
