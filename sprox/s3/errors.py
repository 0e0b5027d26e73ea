"""The S3 error family: one exception type carrying S3's code, HTTP status and message.

Anything below the HTTP layer raises `S3Error` (usually through one of the helpers
here); the server turns it into the XML body S3 itself would send, with a request id.
"""

from __future__ import annotations

import re
from xml.sax.saxutils import escape as _escape_markup

# Characters XML 1.0 cannot carry in any form, not even as a character reference
# (`&#x1;` is as fatal to a parser as a raw 0x01). An error echoes client input (a key
# in <Key>, a header value in <ArgumentValue>, where aiohttp leaves undecodable bytes
# as lone surrogates), and one such character there would make the whole body
# unreadable, or unencodable: the client would lose the error code along with it.
_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff\ud800-\udfff]")


def _text(value: str) -> str:
    """`value` as element text that every XML parser reads: markup escaped, a carriage
    return as a reference (a parser would turn a raw one into a newline), characters XML
    cannot hold replaced by U+FFFD."""
    return _escape_markup(_NOT_XML.sub("\ufffd", value), {"\r": "&#13;"})


class S3Error(Exception):
    """An error S3 would answer with `status` and `<Code>code</Code>`."""

    def __init__(
        self,
        code: str,
        message: str,
        status: int,
        *,
        resource: str | None = None,
        extra: dict[str, str] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.status = status
        self.resource = resource
        # Extra XML elements S3 adds for some codes (BucketName, Key, ArgumentName, ...).
        self.extra = extra or {}
        # Extra response headers (e.g. Last-Modified on 304, x-amz-delete-marker).
        self.headers = headers or {}

    def to_xml(self, request_id: str) -> bytes:
        parts = [
            '<?xml version="1.0" encoding="UTF-8"?>\n<Error>',
            f"<Code>{_text(self.code)}</Code>",
            f"<Message>{_text(self.message)}</Message>",
        ]
        for name, value in self.extra.items():
            parts.append(f"<{name}>{_text(value)}</{name}>")
        if self.resource is not None:
            parts.append(f"<Resource>{_text(self.resource)}</Resource>")
        parts.append(f"<RequestId>{_text(request_id)}</RequestId>")
        parts.append("</Error>")
        return "".join(parts).encode()


# Constructors for the codes Sprox itself produces. Messages are S3's own wording
# where S3 has one, so client libraries that match on them keep working.


def no_such_bucket(bucket: str) -> S3Error:
    return S3Error("NoSuchBucket", "The specified bucket does not exist", 404,
                   extra={"BucketName": bucket})


def no_such_key(key: str) -> S3Error:
    return S3Error("NoSuchKey", "The specified key does not exist.", 404, extra={"Key": key})


def no_such_upload(upload_id: str) -> S3Error:
    return S3Error(
        "NoSuchUpload",
        "The specified upload does not exist. The upload ID may be invalid, or the "
        "upload may have been aborted or completed.",
        404,
        extra={"UploadId": upload_id},
    )


def bucket_not_empty(bucket: str) -> S3Error:
    return S3Error("BucketNotEmpty", "The bucket you tried to delete is not empty", 409,
                   extra={"BucketName": bucket})


def bucket_already_owned(bucket: str) -> S3Error:
    return S3Error(
        "BucketAlreadyOwnedByYou",
        "Your previous request to create the named bucket succeeded and you already own it.",
        409,
        extra={"BucketName": bucket},
    )


def invalid_bucket_name(bucket: str) -> S3Error:
    return S3Error("InvalidBucketName", "The specified bucket is not valid.", 400,
                   extra={"BucketName": bucket})


def invalid_argument(message: str, name: str | None = None, value: str | None = None) -> S3Error:
    extra = {}
    if name is not None:
        extra["ArgumentName"] = name
        extra["ArgumentValue"] = value or ""
    return S3Error("InvalidArgument", message, 400, extra=extra)


def invalid_request(message: str) -> S3Error:
    return S3Error("InvalidRequest", message, 400)


def invalid_range(size: int, range_header: str = "") -> S3Error:
    return S3Error(
        "InvalidRange",
        "The requested range is not satisfiable",
        416,
        extra={"RangeRequested": range_header, "ActualObjectSize": str(size)},
        headers={"Content-Range": f"bytes */{size}"},
    )


def precondition_failed(condition: str) -> S3Error:
    return S3Error("PreconditionFailed", "At least one of the pre-conditions you specified did not hold",
                   412, extra={"Condition": condition})


def not_modified(headers: dict[str, str] | None = None) -> S3Error:
    # S3 answers 304 with no body; the server special-cases the empty body.
    return S3Error("NotModified", "Not Modified", 304, headers=headers)


def malformed_xml() -> S3Error:
    return S3Error(
        "MalformedXML",
        "The XML you provided was not well-formed or did not validate against our "
        "published schema",
        400,
    )


def not_implemented(what: str) -> S3Error:
    return S3Error("NotImplemented", f"A header or query you provided implies functionality "
                   f"that is not implemented: {what}", 501)


def access_denied(message: str = "Access Denied") -> S3Error:
    return S3Error("AccessDenied", message, 403)


def internal_error() -> S3Error:
    return S3Error("InternalError", "We encountered an internal error. Please try again.", 500)


def bad_gateway(message: str) -> S3Error:
    # Not an S3 code (S3 is never behind a proxy); used when the upstream fails
    # without an S3 answer of its own, so clients see a retryable 5xx.
    return S3Error("BadGateway", message, 502)


def gateway_timeout(message: str) -> S3Error:
    return S3Error("GatewayTimeout", message, 504)
