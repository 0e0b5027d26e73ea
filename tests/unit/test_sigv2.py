"""SigV2 verification against signatures made by botocore's own V2 signers (header:
`HmacV1Auth`, presigned: `HmacV1QueryAuth`, and boto3's default presigned URL), never
by our own code."""

from __future__ import annotations

import time
from email.utils import formatdate
from urllib.parse import urlsplit

import boto3
import pytest
from botocore.auth import HmacV1Auth, HmacV1QueryAuth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from multidict import CIMultiDict, CIMultiDictProxy

from sprox.s3 import sigv2
from sprox.s3.body import RequestBody
from sprox.s3.errors import S3Error
from sprox.s3.request import S3Request, parse_request
from sprox.s3.sigv4 import SignatureVerifier

ACCESS_KEY = "AKIDEXAMPLE"
SECRET_KEY = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"
ENDPOINT = "http://sprox.test:8080"
NOW = 1_715_947_200.0  # 2024-05-17T12:00:00Z


def verifier(now: float = NOW) -> SignatureVerifier:
    return SignatureVerifier({ACCESS_KEY: SECRET_KEY, "AKIDOTHER": "other-secret"}, clock=lambda: now)


def wire(aws_request: AWSRequest, *, domain: str | None = None, url_only: bool = False) -> S3Request:
    """The request as it reaches Sprox; `url_only`: a presigned URL handed to a client
    that sends nothing but the URL (a browser, curl)."""
    prepared = aws_request.prepare()
    parts = urlsplit(prepared.url)
    target = parts.path + (f"?{parts.query}" if parts.query else "")
    headers = CIMultiDict([("Host", parts.netloc), *([] if url_only else prepared.headers.items())])
    return parse_request(prepared.method, target, CIMultiDictProxy(headers), domain=domain)


def header_signed(method: str, url: str, headers: dict[str, str] | None = None, *, at: float = NOW,
                  secret: str = SECRET_KEY, auth_path: str | None = None,
                  monkeypatch: pytest.MonkeyPatch | None = None) -> AWSRequest:
    request = AWSRequest(method=method, url=url, headers=headers or {})
    if auth_path is not None:
        request.auth_path = auth_path
    signer = HmacV1Auth(Credentials(ACCESS_KEY, secret))
    signer._get_date = lambda: formatdate(at, usegmt=True)  # botocore signs "now": pin it
    signer.add_auth(request)
    return request


def presigned(method: str, url: str, *, expires_at: float = NOW + 3600, headers: dict[str, str] | None = None,
              token: str | None = None) -> AWSRequest:
    request = AWSRequest(method=method, url=url, headers=headers or {})
    signer = HmacV1QueryAuth(Credentials(ACCESS_KEY, SECRET_KEY, token), expires=0)
    signer._get_date = lambda: str(int(expires_at))
    signer.add_auth(request)
    return request


def expect_error(request: S3Request, code: str, status: int, now: float = NOW) -> S3Error:
    with pytest.raises(S3Error) as caught:
        verifier(now).authenticate(request)
    assert (caught.value.code, caught.value.status) == (code, status), caught.value.message
    return caught.value


# --- what botocore signs, Sprox accepts ----------------------------------------------------

HEADER_CASES = [
    ("get object", "GET", "/bucket/data/file.parquet", {}),
    ("key with spaces and plus", "GET", "/bucket/a%20b%2Bc/%E2%82%AC", {}),
    ("put with type, md5 and metadata", "PUT", "/bucket/key",
     {"Content-Type": "text/plain", "Content-MD5": "1B2M2Y8AsgTpgAmY7PhCfg==", "x-amz-meta-Colour": "blue",
      "x-amz-acl": "private"}),
    ("list with prefix (not signed)", "GET", "/bucket?prefix=a%2Fb&delimiter=%2F&max-keys=5", {}),
    ("sub-resources sorted", "GET", "/bucket/key?versionId=3%2F4&acl", {}),
    ("response overrides", "GET", "/bucket/key?response-content-type=text%2Fplain&response-expires=x", {}),
    ("multipart part", "PUT", "/bucket/key?partNumber=2&uploadId=abc%2Bdef", {}),
    ("initiate multipart", "POST", "/bucket/key?uploads", {}),
    ("delete objects", "POST", "/bucket?delete", {"Content-MD5": "abc=="}),
    ("list buckets", "GET", "/", {}),
]


@pytest.mark.parametrize(("method", "path", "headers"), [c[1:] for c in HEADER_CASES],
                         ids=[c[0] for c in HEADER_CASES])
def test_header_signatures_from_botocore_verify(method: str, path: str, headers: dict[str, str]) -> None:
    request = header_signed(method, ENDPOINT + path, dict(headers))
    verified = verifier().authenticate(wire(request))
    assert (verified.access_key, verified.version, verified.presigned) == (ACCESS_KEY, 2, False)


def test_x_amz_date_instead_of_date_leaves_the_date_line_empty() -> None:
    """S3's rule (botocore always sends Date, so its signer signs the string S3 defines)."""
    amz_date = formatdate(NOW, usegmt=True)
    to_sign = f"GET\n\n\n\nx-amz-date:{amz_date}\n/bucket/key"
    signature = HmacV1Auth(Credentials(ACCESS_KEY, SECRET_KEY)).sign_string(to_sign)
    headers = {"Host": "h", "x-amz-date": amz_date, "Authorization": f"AWS {ACCESS_KEY}:{signature}"}
    assert verifier().verify(parse_request("GET", "/bucket/key", CIMultiDictProxy(CIMultiDict(headers)))) == ACCESS_KEY


def test_virtual_hosted_request_signs_the_bucket_in_the_resource() -> None:
    request = header_signed("GET", "http://photos.sprox.test/cat.jpg", auth_path="/photos/cat.jpg")
    assert verifier().verify(wire(request, domain="sprox.test")) == ACCESS_KEY


def test_the_string_to_sign_is_s3s() -> None:
    """The AWS documentation's own example layout (Object GET, "RESTAuthentication")."""
    request = parse_request("GET", "/awsexamplebucket1/photos/puppy.jpg", CIMultiDictProxy(CIMultiDict(
        {"Host": "s3.amazonaws.com", "Date": "Tue, 27 Mar 2007 19:36:42 +0000"})))
    assert sigv2.string_to_sign(request, "Tue, 27 Mar 2007 19:36:42 +0000") == \
        "GET\n\n\nTue, 27 Mar 2007 19:36:42 +0000\n/awsexamplebucket1/photos/puppy.jpg"
    request = parse_request("PUT", "/static.example.com/db-backup.dat.gz", CIMultiDictProxy(CIMultiDict([
        ("Content-Type", "application/x-download"), ("Content-MD5", "4gJE4saaMU4BqNR0kLY+lw=="),
        ("X-Amz-Meta-ReviewedBy", "joe@example.com"), ("X-Amz-Meta-ReviewedBy", "jane@example.com"),
        ("X-Amz-Meta-FileChecksum", "0x02661779"), ("x-amz-date", "Tue, 27 Mar 2007 21:06:08 +0000")])))
    assert sigv2.string_to_sign(request, "") == (
        "PUT\n4gJE4saaMU4BqNR0kLY+lw==\napplication/x-download\n\n"
        "x-amz-date:Tue, 27 Mar 2007 21:06:08 +0000\nx-amz-meta-filechecksum:0x02661779\n"
        "x-amz-meta-reviewedby:joe@example.com,jane@example.com\n/static.example.com/db-backup.dat.gz")


def test_presigned_urls_from_botocore_verify() -> None:
    for path in ("/bucket/key", "/bucket/a%20b%2Bc", "/bucket/key?response-content-disposition=attachment"):
        verified = verifier().authenticate(wire(presigned("GET", ENDPOINT + path)))
        assert (verified.access_key, verified.version, verified.presigned) == (ACCESS_KEY, 2, True)


def test_presigned_url_with_a_session_token_signs_the_token() -> None:
    request = wire(presigned("GET", ENDPOINT + "/bucket/key", token="session-token+/="), url_only=True)
    assert "x-amz-security-token=" in request.raw_query
    assert "x-amz-security-token" not in request.query  # an auth parameter: never forwarded
    assert verifier().verify(request) == ACCESS_KEY
    tampered = parse_request("GET", request.raw_path + "?" + request.raw_query.replace("session-token", "other"),
                             request.headers)
    expect_error(tampered, "SignatureDoesNotMatch", 403)


def test_boto3_default_presigned_url_is_sigv2_and_verifies() -> None:
    client = boto3.client("s3", endpoint_url=ENDPOINT, aws_access_key_id=ACCESS_KEY,
                          aws_secret_access_key=SECRET_KEY, region_name="us-east-1")
    url = client.generate_presigned_url("get_object", Params={"Bucket": "bucket", "Key": "dir/a b.txt"},
                                        ExpiresIn=600)
    parts = urlsplit(url)
    assert "AWSAccessKeyId=" in parts.query and "Signature=" in parts.query
    request = parse_request("GET", f"{parts.path}?{parts.query}",
                            CIMultiDictProxy(CIMultiDict({"Host": parts.netloc})))
    assert request.key == "dir/a b.txt" and not request.query  # the auth parameters are not S3's
    assert SignatureVerifier({ACCESS_KEY: SECRET_KEY}).verify(request) == ACCESS_KEY


# --- S3's answers to what does not verify ---------------------------------------------------


def test_expired_presigned_url_is_403_request_has_expired() -> None:
    error = expect_error(wire(presigned("GET", ENDPOINT + "/bucket/key", expires_at=NOW - 1)), "AccessDenied", 403)
    assert error.message == "Request has expired"
    assert error.extra["Expires"] == "2024-05-17T11:59:59Z"


@pytest.mark.parametrize("change", ["key", "method", "signed-subresource", "secret"])
def test_a_changed_request_is_signature_does_not_match(change: str) -> None:
    secret = "another-secret" if change == "secret" else SECRET_KEY
    signed = header_signed("GET", ENDPOINT + "/bucket/key?acl", secret=secret)
    request = wire(signed)
    method, target = request.method, request.raw_path + "?" + request.raw_query
    if change == "key":
        target = target.replace("/key", "/other")
    elif change == "method":
        method = "DELETE"
    elif change == "signed-subresource":
        target = target.replace("?acl", "?tagging")
    error = expect_error(parse_request(method, target, request.headers), "SignatureDoesNotMatch", 403)
    assert error.extra["AWSAccessKeyId"] == ACCESS_KEY
    assert error.extra["StringToSign"].startswith(method + "\n")


def test_an_unsigned_query_parameter_does_not_break_the_signature() -> None:
    request = wire(header_signed("GET", ENDPOINT + "/bucket?prefix=a"))
    changed = parse_request("GET", request.raw_path + "?prefix=b", request.headers)
    assert verifier().verify(changed) == ACCESS_KEY  # as in S3: prefix is not signed in V2


def test_an_added_amz_header_breaks_the_signature() -> None:
    request = wire(header_signed("PUT", ENDPOINT + "/bucket/key"))
    headers = CIMultiDict(request.headers)
    headers["x-amz-acl"] = "public-read"
    expect_error(parse_request("PUT", request.raw_path, CIMultiDictProxy(headers)), "SignatureDoesNotMatch", 403)


def test_a_tampered_presigned_signature_or_expiry_is_refused() -> None:
    request = wire(presigned("GET", ENDPOINT + "/bucket/key"))
    later = request.raw_query.replace(f"Expires={int(NOW + 3600)}", f"Expires={int(NOW + 7200)}")
    expect_error(parse_request("GET", f"{request.raw_path}?{later}", request.headers), "SignatureDoesNotMatch", 403)


@pytest.mark.parametrize(("query", "code", "status"), [
    ("AWSAccessKeyId=AKIDEXAMPLE&Signature=abc", "AccessDenied", 403),
    ("AWSAccessKeyId=AKIDEXAMPLE&Signature=abc&Expires=tomorrow", "AccessDenied", 403),
    ("AWSAccessKeyId=NOSUCHKEY&Signature=abc&Expires=1915000000", "InvalidAccessKeyId", 403),
    ("AWSAccessKeyId=AKIDEXAMPLE&AWSAccessKeyId=AKIDEXAMPLE&Signature=a&Expires=1915000000", "InvalidArgument", 400),
])
def test_malformed_presigned_urls(query: str, code: str, status: int) -> None:
    expect_error(parse_request("GET", f"/bucket/key?{query}", CIMultiDictProxy(CIMultiDict({"Host": "h"}))),
                 code, status)


@pytest.mark.parametrize(("authorization", "code", "status"), [
    ("AWS AKIDEXAMPLE", "InvalidArgument", 400),
    ("AWS :signature", "InvalidArgument", 400),
    ("AWS NOSUCHKEY:c2lnbmF0dXJl", "InvalidAccessKeyId", 403),
])
def test_malformed_authorization_headers(authorization: str, code: str, status: int) -> None:
    headers = {"Host": "h", "Date": formatdate(NOW, usegmt=True), "Authorization": authorization}
    expect_error(parse_request("GET", "/bucket/key", CIMultiDictProxy(CIMultiDict(headers))), code, status)


def test_header_auth_needs_a_date_within_fifteen_minutes() -> None:
    request = wire(header_signed("GET", ENDPOINT + "/bucket/key"))
    headers = CIMultiDict(request.headers)
    del headers["Date"]
    expect_error(parse_request("GET", "/bucket/key", CIMultiDictProxy(headers)), "AccessDenied", 403)
    error = expect_error(request, "RequestTimeTooSkewed", 403, now=NOW + 16 * 60)
    assert error.extra["MaxAllowedSkewMilliseconds"] == "900000"
    assert verifier(NOW + 14 * 60).verify(request) == ACCESS_KEY


def test_header_and_query_auth_together_are_refused() -> None:
    request = wire(presigned("GET", ENDPOINT + "/bucket/key"))
    headers = CIMultiDict(request.headers)
    headers["Authorization"] = "AWS AKIDEXAMPLE:c2ln"
    expect_error(parse_request("GET", f"{request.raw_path}?{request.raw_query}", CIMultiDictProxy(headers)),
                 "InvalidArgument", 400)


def test_a_sigv2_request_cannot_carry_a_chunk_signed_stream() -> None:
    """Chunk signatures chain from a SigV4 seed a SigV2 request does not have."""
    request = wire(header_signed("PUT", ENDPOINT + "/bucket/key",
                                 {"x-amz-content-sha256": "STREAMING-AWS4-HMAC-SHA256-PAYLOAD",
                                  "x-amz-decoded-content-length": "5", "Content-Length": "90"}))
    verified = verifier().authenticate(request)
    body = RequestBody.from_headers(None, request.headers)
    with pytest.raises(S3Error) as caught:
        body.expect_signatures(verified)
    assert caught.value.code == "InvalidRequest"


def test_signing_is_botocores_for_any_secret() -> None:
    """sigv2.sign is the HMAC-SHA1 botocore computes (base64)."""
    for secret in ("s", SECRET_KEY, "€uro/+="):
        assert sigv2.sign(secret, "GET\n\n\n0\n/b/k") == HmacV1Auth(Credentials("a", secret)).sign_string(
            "GET\n\n\n0\n/b/k")


def test_current_time_is_used_by_default() -> None:
    request = wire(presigned("GET", ENDPOINT + "/bucket/key", expires_at=time.time() + 60))
    assert SignatureVerifier({ACCESS_KEY: SECRET_KEY}).verify(request) == ACCESS_KEY


def test_a_path_style_bucket_resource_is_signed_with_its_slash_or_without() -> None:
    """botocore signs `GET /bucket?prefix=` as `/bucket/` (S3's form); a client signing
    the literal `/bucket` is accepted too."""
    signed = header_signed("GET", ENDPOINT + "/bucket?prefix=a", auth_path="/bucket/")
    assert verifier().verify(wire(signed)) == ACCESS_KEY
    literal = header_signed("GET", ENDPOINT + "/bucket?prefix=a")
    assert verifier().verify(wire(literal)) == ACCESS_KEY


# --- what a V2 signature does not cover cannot change what the request does ---------------


def _with_extra_query(request: S3Request, extra: str, method: str | None = None) -> S3Request:
    target = f"{request.raw_path}?{request.raw_query}&{extra}" if request.raw_query else f"{request.raw_path}?{extra}"
    return parse_request(method or request.method, target, request.headers)


@pytest.mark.parametrize("extra", ["versio%6EId=OLD", "%61cl", "response-content-typ%65=text/html",
                                   "partNumbe%72=2", "versionId=OLD", "uploadId=x"])
def test_a_sub_resource_added_to_a_presigned_url_in_any_spelling_breaks_it(extra: str) -> None:
    request = wire(presigned("GET", ENDPOINT + "/bucket/key"), url_only=True)
    assert verifier().verify(request) == ACCESS_KEY
    expect_error(_with_extra_query(request, extra), "SignatureDoesNotMatch", 403)


@pytest.mark.parametrize(("method", "path", "extra", "operation"), [
    ("PUT", "/bucket/key", "retention", "PutObjectRetention"),
    ("PUT", "/bucket/key", "legal-hold", "PutObjectLegalHold"),
    ("DELETE", "/bucket", "encryption", "DeleteBucketEncryption"),
    ("PUT", "/bucket", "publicAccessBlock", "PutBucketPublicAccessBlock"),
    ("GET", "/bucket/key", "attributes", "GetObjectAttributes"),
])
def test_every_parameter_that_picks_the_operation_is_signed(method: str, path: str, extra: str,
                                                           operation: str) -> None:
    """Sub-resources SDKs leave out of SigV2 still select an operation here: signed too,
    so a presigned PUT cannot become a PutObjectRetention."""
    request = wire(presigned(method, ENDPOINT + path), url_only=True)
    changed = _with_extra_query(request, extra)
    assert changed.operation == operation
    expect_error(changed, "SignatureDoesNotMatch", 403)


def test_a_signed_value_cannot_be_respelled_into_another() -> None:
    """`+` is a space to the request parser: `a%2Bb` signed cannot become `a+b`."""
    request = wire(header_signed("GET", ENDPOINT + "/bucket/key?versionId=a%2Bb", auth_path="/bucket/key"))
    assert verifier().verify(request) == ACCESS_KEY
    respelled = parse_request("GET", "/bucket/key?versionId=a+b", request.headers)
    assert respelled.query["versionId"] == "a b"
    expect_error(respelled, "SignatureDoesNotMatch", 403)


def test_amz_parameters_of_a_header_signed_request_are_refused() -> None:
    request = wire(header_signed("PUT", ENDPOINT + "/bucket/key"))
    error = expect_error(_with_extra_query(request, "x-amz-acl=public-read"), "AccessDenied", 403)
    assert error.extra["HeadersNotSigned"] == "x-amz-acl"


def test_a_presigned_urls_amz_parameters_are_its_headers() -> None:
    """botocore moves a presigned URL's x-amz-* headers into its query: they are signed,
    and handed back as headers (the session token stays Sprox's own)."""
    headers = {"x-amz-acl": "private", "x-amz-meta-colour": "blue"}
    request = wire(presigned("PUT", ENDPOINT + "/bucket/key", headers=headers, token="tok"), url_only=True)
    verified = verifier().authenticate(request)
    assert dict(verified.query_headers) == headers
    tampered = parse_request("PUT", f"{request.raw_path}?{request.raw_query.replace('blue', 'red')}", request.headers)
    expect_error(tampered, "SignatureDoesNotMatch", 403)
