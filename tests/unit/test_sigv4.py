"""SignatureVerifier against signatures made by botocore's own signers (header and
presigned) and by the examples in AWS's S3 documentation, never by our own code."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from urllib.parse import quote, urlsplit

import botocore.auth
import pytest
from botocore.auth import S3SigV4Auth, S3SigV4QueryAuth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from botocore.utils import percent_encode_sequence
from hypothesis import given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict, CIMultiDictProxy

from sprox.s3.errors import S3Error
from sprox.s3.request import S3Request, parse_request
from sprox.s3.sigv4 import (
    SignatureVerifier,
    canonical_query_string,
    derive_signing_key,
    parse_authorization,
)

ACCESS_KEY = "AKIDEXAMPLE"
SECRET_KEY = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"
OTHER_ACCESS_KEY = "AKIDOTHER"
SIGNED_AT = datetime(2024, 5, 17, 12, 0, 0, tzinfo=timezone.utc)
ENDPOINT = "http://sprox.test:8080"


@pytest.fixture(autouse=True)
def frozen_signer_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    """botocore signs at SIGNED_AT, whatever the real time."""
    monkeypatch.setattr(botocore.auth, "get_current_datetime",
                        lambda remove_tzinfo=True: SIGNED_AT.replace(tzinfo=None))


def verifier_at(when: datetime = SIGNED_AT, **options) -> SignatureVerifier:
    return SignatureVerifier({ACCESS_KEY: SECRET_KEY, OTHER_ACCESS_KEY: "other-secret"},
                         clock=lambda: when.timestamp(), **options)


@dataclass
class WireRequest:
    """A request as it reaches Sprox: method, target and headers, easy to tamper with."""

    method: str
    target: str
    headers: list[tuple[str, str]] = field(default_factory=list)

    def header(self, name: str) -> str:
        return next(v for k, v in self.headers if k.lower() == name.lower())

    def with_header(self, name: str, value: str | None) -> WireRequest:
        headers = [(k, v) for k, v in self.headers if k.lower() != name.lower()]
        if value is not None:
            headers.append((name, value))
        return WireRequest(self.method, self.target, headers)

    def parsed(self) -> S3Request:
        return parse_request(self.method, self.target, CIMultiDictProxy(CIMultiDict(self.headers)))


def _wire(aws_request: AWSRequest) -> WireRequest:
    parts = urlsplit(aws_request.url)
    target = parts.path + (f"?{parts.query}" if parts.query else "")
    # The HTTP client adds Host from the URL; botocore signs that same value.
    headers = [("Host", parts.netloc)] + [(k, v) for k, v in aws_request.headers.items()]
    return WireRequest(aws_request.method, target, headers)


class _FixedPayloadAuth(S3SigV4Auth):
    """botocore's S3 signer with a given x-amz-content-sha256 (UNSIGNED-PAYLOAD,
    STREAMING-...), as SDKs send for unsigned and aws-chunked uploads."""

    def __init__(self, credentials: Credentials, region: str, payload_hash: str) -> None:
        super().__init__(credentials, "s3", region)
        self._payload_hash = payload_hash

    def payload(self, request: AWSRequest) -> str:
        return self._payload_hash


def sign(method: str, path: str, *, query: str = "", params: dict | None = None,
         headers: dict[str, str] | None = None, body: bytes = b"", region: str = "us-east-1",
         payload_hash: str | None = None, access_key: str = ACCESS_KEY,
         secret_key: str = SECRET_KEY) -> WireRequest:
    """Sign with `Authorization` header auth. `query` is the raw query as a client puts
    it on the wire; `params` go through botocore's own query encoding instead."""
    url = ENDPOINT + path + (f"?{query}" if query else "")
    request = AWSRequest(method=method, url=url, headers=headers or {}, data=body,
                         params=params or {})
    credentials = Credentials(access_key, secret_key)
    signer = (S3SigV4Auth(credentials, "s3", region) if payload_hash is None
              else _FixedPayloadAuth(credentials, region, payload_hash))
    signer.add_auth(request)
    return _wire(request.prepare())


def presign(method: str, path: str, *, query: str = "", expires: int = 3600,
            headers: dict[str, str] | None = None, region: str = "eu-west-3") -> WireRequest:
    url = ENDPOINT + path + (f"?{query}" if query else "")
    request = AWSRequest(method=method, url=url, headers=headers or {})
    S3SigV4QueryAuth(Credentials(ACCESS_KEY, SECRET_KEY), "s3", region,
                     expires=expires).add_auth(request)
    return _wire(request.prepare())


def object_path(key: str, bucket: str = "bucket") -> str:
    # How botocore's serializer puts a key in the URL.
    return f"/{bucket}/{quote(key, safe='/~')}"


def assert_s3_error(wire: WireRequest, code: str, status: int, *,
                    verifier: SignatureVerifier | None = None, message: str | None = None) -> S3Error:
    with pytest.raises(S3Error) as caught:
        (verifier or verifier_at()).verify(wire.parsed())
    assert (caught.value.code, caught.value.status) == (code, status), caught.value.message
    if message is not None:
        assert caught.value.message == message
    return caught.value


# --- AWS documentation examples -----------------------------------------------------


def test_signing_key_matches_aws_documentation_example() -> None:
    # "Examples of how to derive a signing key for Signature Version 4" (AWS docs).
    key = derive_signing_key("wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY", "20120215",
                             "us-east-1", "iam")
    assert key.hex() == "f4780e2d9f65fa895f9c67b32ce1baf0b0d8a43505a000a1a9e090d414db404d"


DOC_ACCESS_KEY = "AKIAIOSFODNN7EXAMPLE"
EMPTY_SHA256 = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
DOC_VERIFIER = SignatureVerifier({DOC_ACCESS_KEY: "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"},
                             clock=lambda: datetime(2013, 5, 24, tzinfo=timezone.utc).timestamp())


def test_aws_documentation_get_object_example() -> None:
    # S3 API reference, "Signature Calculations for the Authorization Header", GET Object.
    wire = WireRequest("GET", "/test.txt", [
        ("Host", "examplebucket.s3.amazonaws.com"),
        ("Range", "bytes=0-9"),
        ("x-amz-content-sha256", EMPTY_SHA256),
        ("x-amz-date", "20130524T000000Z"),
        ("Authorization", "AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20130524/us-east-1/"
         "s3/aws4_request,SignedHeaders=host;range;x-amz-content-sha256;x-amz-date,Signature="
         "f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41"),
    ])
    assert DOC_VERIFIER.verify(wire.parsed()) == DOC_ACCESS_KEY


def test_aws_documentation_presigned_example() -> None:
    # S3 API reference, "Authenticating Requests: Using Query Parameters".
    wire = WireRequest(
        "GET",
        "/test.txt?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIAIOSFODNN7EXAMPLE%2F"
        "20130524%2Fus-east-1%2Fs3%2Faws4_request&X-Amz-Date=20130524T000000Z&X-Amz-Expires=86400"
        "&X-Amz-SignedHeaders=host&X-Amz-Signature="
        "aeeed9bbccd4d02ee5c0109b86d86835f995330da4c265957d157751f604d404",
        [("Host", "examplebucket.s3.amazonaws.com")])
    assert DOC_VERIFIER.verify(wire.parsed()) == DOC_ACCESS_KEY


# --- header auth: accepted --------------------------------------------------------

KEYS = [
    "plain.txt",
    "with space/and  two",
    "ünïcödé/文件/😀",
    "a+b",
    "a%2Fb",
    "tilde~name",
    "a/../b",
    "./dot/./x",
    "double//slash",
    "trailing/",
    "!$&'()*,;=:@[]",
    "question?hash#",
]


@pytest.mark.parametrize("key", KEYS)
@pytest.mark.parametrize("method", ["GET", "PUT", "HEAD", "DELETE"])
def test_header_auth_object_keys(key: str, method: str) -> None:
    body = b"payload" if method == "PUT" else b""
    wire = sign(method, object_path(key), body=body)
    request = wire.parsed()
    assert request.key == key
    assert verifier_at().verify(request) == ACCESS_KEY


QUERIES = [
    # (id, raw query as botocore's serializer writes it)
    ("list-v2", percent_encode_sequence({"list-type": "2", "prefix": "a/b", "delimiter": "/"})),
    ("special-values", percent_encode_sequence(
        {"prefix": "with space+plus~tilde", "start-after": "ü/文",
         "continuation-token": "ab=="})),
    ("no-value", "uploads"),
    ("no-value-and-values", "uploads&prefix=x%2Fy"),
    ("upload-part", "partNumber=3&uploadId=abc.DEF-ghi_~"),
    ("repeated-name", "a=2&a=1&a=10"),
    ("empty-value", "prefix=&delimiter=%2F"),
    ("versions", "versions&key-marker=k&version-id-marker=v"),
]


@pytest.mark.parametrize("query", [q for _, q in QUERIES], ids=[i for i, _ in QUERIES])
def test_header_auth_query_parameters(query: str) -> None:
    wire = sign("GET", "/bucket", query=query)
    assert verifier_at().verify(wire.parsed()) == ACCESS_KEY


def test_query_params_with_plus_for_space() -> None:
    """botocore's params path (like minio-go) sends a space as '+' and signs it as %20."""
    wire = sign("GET", "/bucket", params={"prefix": "a b/c", "list-type": "2"})
    assert "prefix=a+b%2Fc" in wire.target
    request = wire.parsed()
    assert request.query["prefix"] == "a b/c"
    assert verifier_at().verify(request) == ACCESS_KEY


@pytest.mark.parametrize("payload_hash", [
    "UNSIGNED-PAYLOAD",
    "STREAMING-AWS4-HMAC-SHA256-PAYLOAD",
    "STREAMING-AWS4-HMAC-SHA256-PAYLOAD-TRAILER",
    "STREAMING-UNSIGNED-PAYLOAD-TRAILER",
    EMPTY_SHA256,
])
def test_header_auth_payload_hash_values(payload_hash: str) -> None:
    wire = sign("PUT", object_path("k"), payload_hash=payload_hash, headers={
        "Content-Encoding": "aws-chunked", "x-amz-decoded-content-length": "5"})
    assert wire.header("x-amz-content-sha256") == payload_hash
    assert verifier_at().verify(wire.parsed()) == ACCESS_KEY


def test_header_values_are_trimmed_and_collapsed() -> None:
    wire = sign("PUT", object_path("k"), headers={
        "x-amz-meta-note": "  several   spaces\tand tab  ",
        "Content-Type": "text/plain;  charset=utf-8",
        "x-amz-meta-empty": "",
    })
    assert verifier_at().verify(wire.parsed()) == ACCESS_KEY


def test_any_region_is_accepted() -> None:
    for region in ("us-east-1", "eu-central-1", "auto", "garage"):
        assert verifier_at().verify(sign("GET", "/bucket", region=region).parsed()) == ACCESS_KEY


def test_date_header_instead_of_x_amz_date() -> None:
    # botocore keeps a Date header it finds and then signs with it, not x-amz-date.
    wire = sign("GET", object_path("k"), headers={"Date": "placeholder"})
    assert all(name.lower() != "x-amz-date" for name, _ in wire.headers)
    assert verifier_at().verify(wire.parsed()) == ACCESS_KEY


def test_virtual_hosted_request() -> None:
    request = AWSRequest(method="GET", url="http://bucket.s3.sprox.test/some/key")
    S3SigV4Auth(Credentials(ACCESS_KEY, SECRET_KEY), "s3", "us-east-1").add_auth(request)
    wire = _wire(request.prepare())
    parsed = parse_request(wire.method, wire.target, CIMultiDictProxy(CIMultiDict(wire.headers)),
                           domain="s3.sprox.test")
    assert (parsed.bucket, parsed.key) == ("bucket", "some/key")
    assert verifier_at().verify(parsed) == ACCESS_KEY


def test_authenticate_returns_what_chunk_signatures_need() -> None:
    wire = sign("PUT", object_path("k"), region="eu-west-1",
                payload_hash="STREAMING-AWS4-HMAC-SHA256-PAYLOAD")
    verified = verifier_at().authenticate(wire.parsed())
    assert verified.access_key == ACCESS_KEY
    assert verified.timestamp == "20240517T120000Z"
    assert verified.scope == "20240517/eu-west-1/s3/aws4_request"
    assert verified.signature == wire.header("Authorization").rsplit("Signature=", 1)[1]
    assert verified.signing_key == derive_signing_key(SECRET_KEY, "20240517", "eu-west-1")
    assert not verified.presigned
    assert "signing_key" not in repr(verified)


@settings(max_examples=150, deadline=None)
@given(
    key=st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=40),
    prefix=st.text(st.characters(blacklist_categories=("Cs",)), max_size=20),
)
def test_any_key_and_query_value(key: str, prefix: str) -> None:
    wire = sign("GET", object_path(key), query=percent_encode_sequence({"prefix": prefix}))
    assert verifier_at().verify(wire.parsed()) == ACCESS_KEY


# --- header auth: refused -----------------------------------------------------------


def signed_base() -> WireRequest:
    return sign("GET", "/bucket/some/key", query="list-type=2&prefix=a%2Fb",
                headers={"x-amz-meta-a": "1", "Range": "bytes=0-9"})


def _with_target(wire: WireRequest, old: str, new: str) -> WireRequest:
    assert old in wire.target
    return WireRequest(wire.method, wire.target.replace(old, new), wire.headers)


def _with_method(wire: WireRequest, method: str) -> WireRequest:
    return WireRequest(method, wire.target, wire.headers)


def _with_signature_end(wire: WireRequest, change) -> WireRequest:
    header = wire.header("Authorization")
    return wire.with_header("Authorization", header[:-64] + change(header[-64:]))


def _flip_last_digit(signature: str) -> str:
    return signature[:-1] + ("1" if signature[-1] == "0" else "0")


# (id, tamper: signed base request -> request that must fail with SignatureDoesNotMatch)
TAMPERED = [
    ("path", lambda w: _with_target(w, "/some/key", "/some/kez")),
    ("path-encoding", lambda w: _with_target(w, "/some/key", "/some%2Fkey")),
    ("path-dot-segment", lambda w: _with_target(w, "/some/key", "/x/../some/key")),
    ("method", lambda w: _with_method(w, "DELETE")),
    ("query-value", lambda w: _with_target(w, "a%2Fb", "a%2Fc")),
    ("query-added", lambda w: _with_target(w, "list-type=2", "list-type=2&delimiter=%2F")),
    ("query-dropped", lambda w: _with_target(w, "&prefix=a%2Fb", "")),
    ("signed-header", lambda w: w.with_header("x-amz-meta-a", "2")),
    ("signed-header-removed", lambda w: w.with_header("Range", None)),
    ("host", lambda w: w.with_header("Host", "evil.test")),
    ("payload-hash", lambda w: w.with_header("x-amz-content-sha256", "UNSIGNED-PAYLOAD")),
    ("signature", lambda w: _with_signature_end(w, _flip_last_digit)),
    ("signature-uppercase", lambda w: _with_signature_end(w, str.upper)),
    ("signature-non-ascii", lambda w: _with_signature_end(w, lambda sig: sig[:-1] + "é")),
    ("other-secret", lambda w: sign("GET", "/bucket", access_key=OTHER_ACCESS_KEY)),
]


@pytest.mark.parametrize("tamper", [t for _, t in TAMPERED], ids=[i for i, _ in TAMPERED])
def test_tampered_request_is_refused(tamper) -> None:
    base = signed_base()
    assert verifier_at().verify(base.parsed()) == ACCESS_KEY  # the untampered one passes
    error = assert_s3_error(tamper(base), "SignatureDoesNotMatch", 403, message=(
        "The request signature we calculated does not match the signature you provided. "
        "Check your key and signing method."))
    assert "CanonicalRequest" in error.extra and "StringToSign" in error.extra


def test_unknown_access_key() -> None:
    error = assert_s3_error(sign("GET", "/bucket", access_key="AKIDNOBODY"), "InvalidAccessKeyId",
                            403, message="The AWS Access Key Id you provided does not exist in our "
                            "records.")
    assert error.extra["AWSAccessKeyId"] == "AKIDNOBODY"


@pytest.mark.parametrize(("offset", "accepted"), [
    (timedelta(minutes=14, seconds=59), True),
    (timedelta(minutes=-14, seconds=-59), True),
    (timedelta(minutes=15, seconds=1), False),
    (timedelta(minutes=-15, seconds=-1), False),
    (timedelta(days=1), False),
])
def test_clock_skew(offset: timedelta, accepted: bool) -> None:
    verifier = verifier_at(SIGNED_AT + offset)
    wire = sign("GET", "/bucket")
    if accepted:
        assert verifier.verify(wire.parsed()) == ACCESS_KEY
    else:
        error = assert_s3_error(wire, "RequestTimeTooSkewed", 403, verifier=verifier)
        assert error.extra["RequestTime"] == "20240517T120000Z"
        assert error.extra["MaxAllowedSkewMilliseconds"] == "900000"


def test_custom_max_skew() -> None:
    verifier = verifier_at(SIGNED_AT + timedelta(seconds=61), max_skew_seconds=60)
    assert_s3_error(sign("GET", "/bucket"), "RequestTimeTooSkewed", 403, verifier=verifier)


def test_no_credentials_at_all() -> None:
    assert_s3_error(WireRequest("GET", "/bucket/key", [("Host", "sprox.test")]), "AccessDenied",
                    403, message="Access Denied")


def test_missing_content_sha256() -> None:
    assert_s3_error(sign("GET", "/bucket").with_header("x-amz-content-sha256", None),
                    "InvalidRequest", 400,
                    message="Missing required header for this request: x-amz-content-sha256")


@pytest.mark.parametrize("date", [None, "garbage", "20240517T120000", "2024-05-17T12:00:00Z",
                                  "20241399T120000Z"])
def test_missing_or_invalid_date(date: str | None) -> None:
    assert_s3_error(sign("GET", "/bucket").with_header("x-amz-date", date), "AccessDenied", 403)


def test_invalid_date_header() -> None:
    wire = sign("GET", "/bucket", headers={"Date": "x"}).with_header("Date", "not a date")
    assert_s3_error(wire, "AccessDenied", 403)


def test_unsigned_amz_header_is_refused() -> None:
    wire = sign("PUT", object_path("k")).with_header("x-amz-copy-source", "/other/secret")
    error = assert_s3_error(
        wire, "AccessDenied", 403,
        message="There were headers present in the request which were not signed")
    assert error.extra["HeadersNotSigned"] == "x-amz-copy-source"


def test_unsigned_plain_header_is_fine() -> None:
    wire = sign("GET", "/bucket").with_header("User-Agent", "added after signing")
    assert verifier_at().verify(wire.parsed()) == ACCESS_KEY


def _with_authorization(value: str) -> WireRequest:
    return sign("GET", "/bucket").with_header("Authorization", value)


GOOD_CREDENTIAL = "Credential=AKIDEXAMPLE/20240517/us-east-1/s3/aws4_request"
GOOD_SIGNED = "SignedHeaders=host;x-amz-content-sha256;x-amz-date"
GOOD_SIGNATURE = "Signature=" + "0" * 64

MALFORMED_AUTHORIZATION = [
    # (id, Authorization value, code)
    ("sigv2-no-colon", "AWS AKIDEXAMPLE", "InvalidArgument"),
    ("bearer", "Bearer token", "InvalidArgument"),
    ("sigv4a", f"AWS4-ECDSA-P256-SHA256 {GOOD_CREDENTIAL}, {GOOD_SIGNED}, {GOOD_SIGNATURE}",
     "InvalidArgument"),
    ("empty", "", "InvalidArgument"),
    ("algorithm-only", "AWS4-HMAC-SHA256", "AuthorizationHeaderMalformed"),
    ("no-signature", f"AWS4-HMAC-SHA256 {GOOD_CREDENTIAL}, {GOOD_SIGNED}",
     "AuthorizationHeaderMalformed"),
    ("no-signed-headers", f"AWS4-HMAC-SHA256 {GOOD_CREDENTIAL}, {GOOD_SIGNATURE}",
     "AuthorizationHeaderMalformed"),
    ("no-credential", f"AWS4-HMAC-SHA256 {GOOD_SIGNED}, {GOOD_SIGNATURE}",
     "AuthorizationHeaderMalformed"),
    ("unknown-component", f"AWS4-HMAC-SHA256 {GOOD_CREDENTIAL}, {GOOD_SIGNED}, {GOOD_SIGNATURE}, "
     "Foo=bar", "AuthorizationHeaderMalformed"),
    ("repeated-component", f"AWS4-HMAC-SHA256 {GOOD_CREDENTIAL}, {GOOD_CREDENTIAL}, {GOOD_SIGNED}, "
     f"{GOOD_SIGNATURE}", "AuthorizationHeaderMalformed"),
    ("component-without-equals", f"AWS4-HMAC-SHA256 {GOOD_CREDENTIAL}, {GOOD_SIGNED}, Signature",
     "AuthorizationHeaderMalformed"),
    ("scope-four-parts", "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20240517/us-east-1/s3, "
     f"{GOOD_SIGNED}, {GOOD_SIGNATURE}", "AuthorizationHeaderMalformed"),
    ("scope-six-parts", "AWS4-HMAC-SHA256 Credential=AKID/EXAMPLE/20240517/us-east-1/s3/"
     f"aws4_request, {GOOD_SIGNED}, {GOOD_SIGNATURE}", "AuthorizationHeaderMalformed"),
    ("scope-empty-region", "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20240517//s3/aws4_request, "
     f"{GOOD_SIGNED}, {GOOD_SIGNATURE}", "AuthorizationHeaderMalformed"),
    ("service-not-s3", "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20240517/us-east-1/ec2/"
     f"aws4_request, {GOOD_SIGNED}, {GOOD_SIGNATURE}", "AuthorizationHeaderMalformed"),
    ("bad-terminator", "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20240517/us-east-1/s3/"
     f"aws4_requestx, {GOOD_SIGNED}, {GOOD_SIGNATURE}", "AuthorizationHeaderMalformed"),
    ("bad-scope-date", "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/2024-05-17/us-east-1/s3/"
     f"aws4_request, {GOOD_SIGNED}, {GOOD_SIGNATURE}", "AuthorizationHeaderMalformed"),
    ("scope-date-not-request-date", "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20240516/us-east-1/"
     f"s3/aws4_request, {GOOD_SIGNED}, {GOOD_SIGNATURE}", "AuthorizationHeaderMalformed"),
    ("host-not-signed", f"AWS4-HMAC-SHA256 {GOOD_CREDENTIAL}, "
     f"SignedHeaders=x-amz-content-sha256;x-amz-date, {GOOD_SIGNATURE}",
     "AuthorizationHeaderMalformed"),
    ("empty-signed-header", f"AWS4-HMAC-SHA256 {GOOD_CREDENTIAL}, SignedHeaders=host;;x-amz-date, "
     f"{GOOD_SIGNATURE}", "AuthorizationHeaderMalformed"),
]


@pytest.mark.parametrize(("authorization", "code"), [row[1:] for row in MALFORMED_AUTHORIZATION],
                         ids=[row[0] for row in MALFORMED_AUTHORIZATION])
def test_malformed_authorization(authorization: str, code: str) -> None:
    assert_s3_error(_with_authorization(authorization), code, 400)


def test_sigv2_header_is_verified_not_refused() -> None:
    """SigV2 is S3's too (tests/unit/test_sigv2.py): a made-up signature does not match."""
    assert_s3_error(_with_authorization("AWS AKIDEXAMPLE:c2lnbmF0dXJl"), "SignatureDoesNotMatch", 403)


def test_undecodable_bytes_in_the_scope() -> None:
    """aiohttp hands undecodable header bytes over as lone surrogates: refused, not a crash."""
    wire = sign("GET", "/bucket")
    header = wire.header("Authorization").replace("/us-east-1/", "/us-\udcff/")
    assert_s3_error(wire.with_header("Authorization", header), "SignatureDoesNotMatch", 403)


def test_two_authorization_headers() -> None:
    wire = sign("GET", "/bucket")
    wire.headers.append(("Authorization", wire.header("Authorization")))
    assert_s3_error(wire, "AuthorizationHeaderMalformed", 400)


def test_parse_authorization() -> None:
    fields = parse_authorization(
        "AWS4-HMAC-SHA256 Credential=AKID/20240517/auto/s3/aws4_request,"
        "SignedHeaders=Host;x-amz-date,Signature=abc")
    assert fields.access_key == "AKID"
    assert (fields.date, fields.region, fields.service) == ("20240517", "auto", "s3")
    assert fields.signed_headers == ("host", "x-amz-date")
    assert fields.signature == "abc"
    assert fields.scope == "20240517/auto/s3/aws4_request"


def test_canonical_query_string() -> None:
    # Decoded ('+' is a space), re-encoded per RFC 3986 (upper-case hex, '~' bare, '*'
    # escaped), sorted by name then value, valueless names get '='.
    assert canonical_query_string("uploads&b=%2f&a=x+y&a=%7E&c=%E2%82%AC&d=*") == (
        "a=x%20y&a=~&b=%2F&c=%E2%82%AC&d=%2A&uploads=")
    assert canonical_query_string("X-Amz-Signature=abc&a=1", exclude="X-Amz-Signature") == "a=1"


# --- presigned URLs -----------------------------------------------------------------


@pytest.mark.parametrize("key", KEYS)
def test_presigned_object_keys(key: str) -> None:
    wire = presign("GET", object_path(key))
    request = wire.parsed()
    assert request.key == key and "X-Amz-Signature" not in request.query
    assert verifier_at().verify(request) == ACCESS_KEY


# botocore's presigner keeps one value per name, so the repeated-name row is left out.
PRESIGN_QUERIES = [(i, q) for i, q in QUERIES if i != "repeated-name"]


@pytest.mark.parametrize("query", [q for _, q in PRESIGN_QUERIES],
                         ids=[i for i, _ in PRESIGN_QUERIES])
def test_presigned_query_parameters(query: str) -> None:
    assert verifier_at().verify(presign("GET", "/bucket", query=query).parsed()) == ACCESS_KEY


def test_presigned_put_with_signed_headers() -> None:
    wire = presign("PUT", object_path("upload.bin"),
                   headers={"Content-Type": "application/octet-stream", "x-amz-meta-a": "1"})
    assert "content-type" in wire.target and "x-amz-meta-a" in wire.target
    verified = verifier_at().authenticate(wire.parsed())
    assert verified.presigned and verified.region == "eu-west-3"
    assert_s3_error(wire.with_header("x-amz-meta-a", "2"), "SignatureDoesNotMatch", 403)
    assert_s3_error(wire.with_header("Content-Type", "text/html"), "SignatureDoesNotMatch", 403)


def test_presigned_unsigned_amz_header() -> None:
    wire = presign("PUT", object_path("k")).with_header("x-amz-acl", "public-read")
    error = assert_s3_error(wire, "AccessDenied", 403)
    assert error.extra["HeadersNotSigned"] == "x-amz-acl"


@pytest.mark.parametrize(("offset", "expires", "expected"), [
    (timedelta(0), 3600, None),
    (timedelta(seconds=3600), 3600, None),
    (timedelta(seconds=3601), 3600, "Request has expired"),
    (timedelta(days=7), 604800, None),
    (timedelta(days=7, seconds=1), 604800, "Request has expired"),
    (timedelta(minutes=-14), 3600, None),
    (timedelta(minutes=-16), 3600, "Request is not valid yet"),
])
def test_presigned_validity_window(offset: timedelta, expires: int, expected: str | None) -> None:
    wire = presign("GET", object_path("k"), expires=expires)
    verifier = verifier_at(SIGNED_AT + offset)
    if expected is None:
        assert verifier.verify(wire.parsed()) == ACCESS_KEY
    else:
        error = assert_s3_error(wire, "AccessDenied", 403, verifier=verifier, message=expected)
        if expected == "Request has expired":
            assert error.extra["X-Amz-Expires"] == str(expires)


def _replace_param(wire: WireRequest, name: str, value: str | None) -> WireRequest:
    path, _, query = wire.target.partition("?")
    pairs = [p for p in query.split("&") if p.partition("=")[0] != name]
    if value is not None:
        pairs.append(f"{name}={value}")
    return WireRequest(wire.method, f"{path}?{'&'.join(pairs)}", wire.headers)


def presigned_base() -> WireRequest:
    return presign("GET", object_path("some key"), query="versionId=3")


PRESIGN_REFUSED = [
    # (id, tamper: presigned base request -> refused request, code, status)
    ("tampered-path", lambda w: _with_target(w, "some%20key", "other"),
     "SignatureDoesNotMatch", 403),
    ("tampered-param", lambda w: _replace_param(w, "versionId", "4"),
     "SignatureDoesNotMatch", 403),
    ("added-param", lambda w: _replace_param(w, "response-content-type", "text%2Fhtml"),
     "SignatureDoesNotMatch", 403),
    ("longer-expiry", lambda w: _replace_param(w, "X-Amz-Expires", "7200"),
     "SignatureDoesNotMatch", 403),
    ("tampered-signature", lambda w: _replace_param(w, "X-Amz-Signature", "0" * 64),
     "SignatureDoesNotMatch", 403),
    ("method", lambda w: _with_method(w, "DELETE"), "SignatureDoesNotMatch", 403),
    ("host", lambda w: w.with_header("Host", "other.test"), "SignatureDoesNotMatch", 403),
    ("unknown-key", lambda w: _replace_param(
        w, "X-Amz-Credential", "AKIDNOBODY%2F20240517%2Feu-west-3%2Fs3%2Faws4_request"),
     "InvalidAccessKeyId", 403),
    ("expires-zero", lambda w: _replace_param(w, "X-Amz-Expires", "0"),
     "AuthorizationQueryParametersError", 400),
    ("expires-negative", lambda w: _replace_param(w, "X-Amz-Expires", "-1"),
     "AuthorizationQueryParametersError", 400),
    ("expires-over-a-week", lambda w: _replace_param(w, "X-Amz-Expires", "604801"),
     "AuthorizationQueryParametersError", 400),
    ("expires-not-a-number", lambda w: _replace_param(w, "X-Amz-Expires", "soon"),
     "AuthorizationQueryParametersError", 400),
    ("missing-expires", lambda w: _replace_param(w, "X-Amz-Expires", None),
     "AuthorizationQueryParametersError", 400),
    ("missing-signed-headers", lambda w: _replace_param(w, "X-Amz-SignedHeaders", None),
     "AuthorizationQueryParametersError", 400),
    ("missing-signature", lambda w: _replace_param(w, "X-Amz-Signature", None),
     "AuthorizationQueryParametersError", 400),
    ("missing-date", lambda w: _replace_param(w, "X-Amz-Date", None),
     "AuthorizationQueryParametersError", 400),
    ("bad-date", lambda w: _replace_param(w, "X-Amz-Date", "2024-05-17"),
     "AuthorizationQueryParametersError", 400),
    ("bad-algorithm", lambda w: _replace_param(w, "X-Amz-Algorithm", "AWS4-HMAC-SHA512"),
     "AuthorizationQueryParametersError", 400),
    ("bad-credential", lambda w: _replace_param(w, "X-Amz-Credential", "AKIDEXAMPLE%2F20240517"),
     "AuthorizationQueryParametersError", 400),
    ("credential-not-s3", lambda w: _replace_param(
        w, "X-Amz-Credential", "AKIDEXAMPLE%2F20240517%2Feu-west-3%2Fsts%2Faws4_request"),
     "AuthorizationQueryParametersError", 400),
    ("credential-other-day", lambda w: _replace_param(
        w, "X-Amz-Credential", "AKIDEXAMPLE%2F20240516%2Feu-west-3%2Fs3%2Faws4_request"),
     "AuthorizationQueryParametersError", 400),
    ("host-not-signed", lambda w: _replace_param(w, "X-Amz-SignedHeaders", "x-amz-date"),
     "AuthorizationQueryParametersError", 400),
    ("repeated-signature",
     lambda w: _with_target(w, "&X-Amz-Signature=",
                            f"&X-Amz-Signature={'0' * 64}&X-Amz-Signature="),
     "AuthorizationQueryParametersError", 400),
    ("also-authorization-header",
     lambda w: w.with_header("Authorization", signed_base().header("Authorization")),
     "InvalidArgument", 400),
    ("sigv2-presigned",
     lambda w: WireRequest("GET", "/bucket/k?AWSAccessKeyId=AKIDEXAMPLE&Expires=1715950000"
                                  "&Signature=abc%3D", [("Host", "sprox.test")]),
     "SignatureDoesNotMatch", 403),
]


@pytest.mark.parametrize(("tamper", "code", "status"), [row[1:] for row in PRESIGN_REFUSED],
                         ids=[row[0] for row in PRESIGN_REFUSED])
def test_presigned_refused(tamper, code: str, status: int) -> None:
    base = presigned_base()
    assert verifier_at().verify(base.parsed()) == ACCESS_KEY  # the untampered one passes
    assert_s3_error(tamper(base), code, status)


# --- signing keys -------------------------------------------------------------------


def test_signing_key_for_known_and_unknown_access_keys() -> None:
    verifier = verifier_at()
    assert verifier.signing_key(ACCESS_KEY, "20240517", "us-east-1") == derive_signing_key(
        SECRET_KEY, "20240517", "us-east-1", "s3")
    with pytest.raises(S3Error, match="InvalidAccessKeyId"):
        verifier.signing_key("AKIDNOBODY", "20240517", "us-east-1")


def test_signing_keys_are_cached_and_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    import sprox.s3.sigv4 as sigv4

    derivations = []
    real_derive = sigv4.derive_signing_key

    def counting_derive(*args: str) -> bytes:
        derivations.append(args)
        return real_derive(*args)

    monkeypatch.setattr(sigv4, "derive_signing_key", counting_derive)
    verifier = verifier_at(signing_key_cache_size=4)
    wire = sign("GET", "/bucket")
    for _ in range(3):
        verifier.verify(wire.parsed())
    assert len(derivations) == 1

    for region in ("r1", "r2", "r3", "r4", "r5"):
        verifier.verify(sign("GET", "/bucket", region=region).parsed())
    assert len(derivations) == 6
    assert len(verifier._signing_keys) == 4
    verifier.verify(wire.parsed())  # us-east-1 was the oldest entry, so it was evicted
    assert len(derivations) == 7


def test_keys_table_is_read_per_request() -> None:
    keys = {ACCESS_KEY: "old secret"}
    verifier = SignatureVerifier(keys, clock=lambda: SIGNED_AT.timestamp())
    wire = sign("GET", "/bucket")
    assert_s3_error(wire, "SignatureDoesNotMatch", 403, verifier=verifier)
    keys[ACCESS_KEY] = SECRET_KEY  # rotated in place
    assert verifier.verify(wire.parsed()) == ACCESS_KEY
