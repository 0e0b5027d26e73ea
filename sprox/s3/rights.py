"""What a verified access key may do: which buckets it may use, and whether it may
write. Checked after the signature and before anything else (the cache, listings, the
origin), in both lanes, so cached bytes reach only keys allowed their bucket.

A request's buckets are its own and, for CopyObject and UploadPartCopy, the bucket
named by `x-amz-copy-source` (read from there, written here): otherwise a key could
copy out of a bucket it may not read. ListBuckets would show every bucket, so a key
limited to some buckets may not call it (S3's s3:ListAllMyBuckets)."""

from __future__ import annotations

from typing import Protocol
from urllib.parse import unquote

from .errors import access_denied
from .request import S3Request

# POSTs that only read.
READ_ONLY_POSTS = frozenset({"SelectObjectContent"})


class KeyRights(Protocol):
    """config.AccessKey fits."""

    buckets: tuple[str, ...] | None  # None: every bucket
    write: bool

    def may_use(self, bucket: str) -> bool: ...


def denial(rights: KeyRights, request: S3Request) -> str | None:
    """Why `rights` do not allow `request`, or None when they do."""
    if rights.buckets is None and (rights.write or request.method in ("GET", "HEAD")):
        return None  # every bucket (copy sources too), and the method is allowed
    if request.bucket is None:
        if rights.buckets is not None:
            return "this key may use only some buckets, so it may not list them all"
    elif not rights.may_use(request.bucket):
        return f"this key may not use bucket {request.bucket!r}"
    if request.method not in ("GET", "HEAD") and request.operation not in READ_ONLY_POSTS and not rights.write:
        return "this key may only read"
    source = request.headers.get("x-amz-copy-source")
    if source is not None:
        bucket = unquote(source).lstrip("/").split("/", 1)[0]
        if not rights.may_use(bucket):
            return f"this key may not read bucket {bucket!r}"
    return None


def check(rights: KeyRights | None, request: S3Request) -> None:
    """AccessDenied (403) unless `rights` allow `request`. None: no keys (--auth none)."""
    if rights is None:
        return
    reason = denial(rights, request)
    if reason is not None:
        raise access_denied(f"Access Denied: {reason}.")

