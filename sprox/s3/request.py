"""The S3 request model: one parse of an incoming HTTP request into what S3 sees.

The bucket and key come from the raw request target (never a normalised path), so a
key such as `a/../b` or `a//b` stays exactly that key. Path-style
(`/bucket/key`) and virtual-hosted (`bucket.DOMAIN/key`) addressing are both parsed.
"""

from __future__ import annotations

import itertools
import re
import secrets
from dataclasses import dataclass, field
from typing import TYPE_CHECKING
from urllib.parse import parse_qsl, unquote, urlsplit

from multidict import CIMultiDictProxy, MultiDict, MultiDictProxy

from . import errors

if TYPE_CHECKING:
    from .body import RequestBody

# Query parameters that carry a presigned request's signature (SigV4, then SigV2's):
# they authenticate the request to Sprox and must never be forwarded or treated as a
# sub-resource.
PRESIGN_PARAMS = frozenset(
    {
        "X-Amz-Algorithm",
        "X-Amz-Credential",
        "X-Amz-Date",
        "X-Amz-Expires",
        "X-Amz-SignedHeaders",
        "X-Amz-Signature",
        "X-Amz-Security-Token",
        "AWSAccessKeyId",
        "Signature",
        "Expires",
        "x-amz-security-token",  # a SigV2 URL carries its amz headers in lower case
    }
)

# S3 bucket naming rules (the general-purpose bucket subset every S3 service accepts,
# plus the legacy upper-case/underscore names some S3-compatible services still allow).
_BUCKET_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{1,61}[A-Za-z0-9]$")
MAX_KEY_BYTES = 1024


# Request ids: a random prefix per process and a counter. Unique, opaque like S3's, and
# free: a random token per request cost a getrandom(2) call on every cache hit.
_ID_PREFIX = secrets.token_hex(4).upper()
_id_counter = itertools.count(secrets.randbelow(1 << 32))


def new_request_id() -> str:
    return f"{_ID_PREFIX}{next(_id_counter) & 0xFFFFFFFF:08X}"


def valid_bucket_name(name: str) -> bool:
    return bool(_BUCKET_RE.match(name)) and ".." not in name


@dataclass(slots=True)
class RequestStats:
    """What serving one request cost, for the access log."""

    upstream_requests: int = 0
    upstream_bytes: int = 0
    cache: str | None = None  # HIT, MISS, PARTIAL, BYPASS; None for other operations


@dataclass(slots=True)
class S3Request:
    """What one HTTP request means to S3. Fields are read-only by convention."""

    request_id: str
    method: str
    operation: str
    bucket: str | None
    key: str | None
    # Decoded query parameters in request order, presign parameters removed.
    query: MultiDictProxy[str]
    headers: CIMultiDictProxy[str]
    # The raw path and query exactly as the client sent them (for SigV4 verification).
    raw_path: str
    raw_query: str
    virtual_hosted: bool = False
    body: RequestBody | None = field(default=None)
    stats: RequestStats = field(default_factory=RequestStats)
    access_key: str | None = None  # the key the request was signed with, once verified

    @property
    def resource(self) -> str:
        if self.bucket is None:
            return "/"
        if self.key is None:
            return f"/{self.bucket}"
        return f"/{self.bucket}/{self.key}"


def _host_without_port(host: str) -> str:
    if host.startswith("["):  # [v6]:port
        return host[: host.find("]") + 1]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def split_target(target: str) -> tuple[str, str]:
    """Split a request target into (raw path, raw query); absolute-form targets
    (`http://host/path`) keep only their path: the host in them is never used."""
    if not target.startswith("/"):
        try:
            parts = urlsplit(target)
            parts.port  # noqa: B018 (raises ValueError for a port that is no number)
        except ValueError:
            # urlsplit refuses some authorities outright ("http://[x/", names that
            # change under NFKC normalisation): an unparsable URI, not a server error.
            raise errors.S3Error("InvalidURI", "Couldn't parse the specified URI.", 400) from None
        if not parts.scheme or not parts.netloc:
            raise errors.S3Error("InvalidURI", "Couldn't parse the specified URI.", 400)
        return parts.path or "/", parts.query
    path, _, query = target.partition("?")
    return path, query


def _decode(raw: str, what: str) -> str:
    try:
        return unquote(raw, errors="strict")
    except UnicodeDecodeError:
        raise errors.S3Error("InvalidURI", f"Couldn't parse the specified URI ({what} is not UTF-8).",
                             400) from None


def parse_query(raw_query: str) -> MultiDict[str]:
    query: MultiDict[str] = MultiDict()
    if raw_query:
        try:
            pairs = parse_qsl(raw_query, keep_blank_values=True, errors="strict")
        except UnicodeDecodeError:
            raise errors.S3Error("InvalidURI", "Couldn't parse the specified URI.", 400) from None
        for name, value in pairs:
            if name not in PRESIGN_PARAMS:
                query.add(name, value)
    return query


def parse_request(
    method: str,
    target: str,
    headers: CIMultiDictProxy[str],
    *,
    domain: str | None = None,
    request_id: str | None = None,
) -> S3Request:
    """Parse an HTTP request line and headers into an `S3Request`.

    Raises `S3Error` for targets S3 would reject (bad UTF-8, invalid bucket names,
    over-long keys)."""
    if not target.isascii():
        # Off the wire a target is ASCII (the lane refuses anything else), but a caller
        # may hand over any str: one with lone surrogates would become a key or query
        # value that cannot be encoded, and fail far from here.
        try:
            target.encode("utf-8")
        except UnicodeEncodeError:
            raise errors.S3Error("InvalidURI", "Couldn't parse the specified URI.", 400) from None
    raw_path, raw_query = split_target(target)
    query = parse_query(raw_query)
    path = _decode(raw_path, "path")

    bucket: str | None = None
    key: str | None = None
    virtual = False
    host = _host_without_port(headers.get("Host", "")).lower()
    if domain and host != domain and host.endswith("." + domain):
        bucket = host[: -len(domain) - 1]
        virtual = True
        key = path[1:] or None
    else:
        rest = path[1:]
        if rest:
            bucket, sep, key_part = rest.partition("/")
            key = key_part if sep and key_part else None
    if bucket is not None and not valid_bucket_name(bucket):
        raise errors.invalid_bucket_name(bucket)
    if key is not None and len(key.encode()) > MAX_KEY_BYTES:
        raise errors.S3Error("KeyTooLongError", "Your key is too long", 400)

    return S3Request(
        request_id=request_id or new_request_id(),
        method=method.upper(),
        operation=operation_name(method.upper(), bucket, key, query, headers),
        bucket=bucket,
        key=key,
        query=MultiDictProxy(query),
        headers=headers,
        raw_path=raw_path,
        raw_query=raw_query,
        virtual_hosted=virtual,
    )


# Bucket sub-resources whose operations Sprox forwards but does not interpret.
_BUCKET_SUBRESOURCES = (
    "acl", "analytics", "cors", "encryption", "intelligent-tiering", "inventory",
    "lifecycle", "logging", "metrics", "notification", "object-lock", "ownershipControls",
    "policy", "policyStatus", "publicAccessBlock", "replication", "requestPayment",
    "tagging", "versioning", "website", "accelerate",
)
_OBJECT_SUBRESOURCES = ("acl", "tagging", "retention", "legal-hold", "attributes", "torrent")
# Every query parameter whose presence or value decides the operation (or the object
# version or part) a request acts on, as `operation_name` and the cache read them: a
# signature that does not cover one of these does not cover what the request does
# (SigV2 signs only some parameters; sigv2.py signs these too). `list-type` is not
# here: it only picks between ListObjects and ListObjectsV2, both reads.
OPERATION_PARAMS = frozenset(_BUCKET_SUBRESOURCES + _OBJECT_SUBRESOURCES + (
    "location", "uploads", "versions", "uploadId", "partNumber", "versionId", "delete", "restore", "select",
))


def _subresource(query: MultiDict[str], names: tuple[str, ...]) -> str | None:
    for name in names:
        if name in query:
            return name
    return None


def _camel(name: str) -> str:
    return "".join(p[:1].upper() + p[1:] for p in name.split("-"))


def operation_name(method: str, bucket: str | None, key: str | None, query: MultiDict[str],
                   headers: CIMultiDictProxy[str]) -> str:
    """The S3 API operation a request invokes (e.g. `GetObject`, `ListObjectsV2`).

    Operations Sprox does not model get a descriptive name and are still forwarded."""
    if bucket is None:
        return "ListBuckets" if method == "GET" else "Unknown"
    if key is None:
        sub = _subresource(query, _BUCKET_SUBRESOURCES)
        if method == "GET":
            if "location" in query:
                return "GetBucketLocation"
            if "uploads" in query:
                return "ListMultipartUploads"
            if "versions" in query:
                return "ListObjectVersions"
            if sub:
                return "GetBucket" + _camel(sub)
            if query.get("list-type") == "2":
                return "ListObjectsV2"
            return "ListObjects"
        if method == "HEAD":
            return "HeadBucket"
        if method == "PUT":
            return "PutBucket" + _camel(sub) if sub else "CreateBucket"
        if method == "DELETE":
            return "DeleteBucket" + _camel(sub) if sub else "DeleteBucket"
        if method == "POST":
            return "DeleteObjects" if "delete" in query else "PostObject"
        return "Unknown"
    sub = _subresource(query, _OBJECT_SUBRESOURCES)
    if method == "GET":
        if "uploadId" in query:
            return "ListParts"
        return "GetObject" + _camel(sub) if sub else "GetObject"
    if method == "HEAD":
        return "HeadObject"
    if method == "PUT":
        if "partNumber" in query and "uploadId" in query:
            return "UploadPartCopy" if "x-amz-copy-source" in headers else "UploadPart"
        if sub:
            return "PutObject" + _camel(sub)
        return "CopyObject" if "x-amz-copy-source" in headers else "PutObject"
    if method == "POST":
        if "uploads" in query:
            return "CreateMultipartUpload"
        if "uploadId" in query:
            return "CompleteMultipartUpload"
        if "restore" in query:
            return "RestoreObject"
        if "select" in query:
            return "SelectObjectContent"
        return "Unknown"
    if method == "DELETE":
        if "uploadId" in query:
            return "AbortMultipartUpload"
        return "DeleteObject" + _camel(sub) if sub else "DeleteObject"
    return "Unknown"
