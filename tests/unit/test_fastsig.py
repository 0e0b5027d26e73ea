"""The fast SigV4 check (sprox.fastsig) against botocore's signer and the full verifier:
it accepts only what the full verifier accepts, with the same key, and its compiled
form answers exactly as its pure-Python twin (parametrized `py` / `c`, and compared on
random requests)."""

from __future__ import annotations

import os
from datetime import datetime, timezone

import botocore.auth
import pytest
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from hypothesis import given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict, CIMultiDictProxy

import sprox.fastsig
from sprox._native import _fastsig_py
from sprox.s3.errors import S3Error
from sprox.s3.request import parse_request
from sprox.s3.sigv4 import SignatureVerifier

ACCESS_KEY, SECRET_KEY = "AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"
KEYS = {ACCESS_KEY: SECRET_KEY, "AKIDOTHER": "other-secret"}
SIGNED_AT = datetime(2024, 5, 17, 12, 0, 0, tzinfo=timezone.utc)
NOW = SIGNED_AT.timestamp()

IMPLEMENTATIONS = {"py": _fastsig_py.FastSigV4}
if sprox.fastsig.NATIVE:
    from sprox._native import fastsig as _fastsig_c

    IMPLEMENTATIONS["c"] = _fastsig_c.FastSigV4


@pytest.fixture(autouse=True)
def frozen_signer_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(botocore.auth, "get_current_datetime",
                        lambda remove_tzinfo=True: SIGNED_AT.replace(tzinfo=None))


@pytest.fixture(params=sorted(IMPLEMENTATIONS))
def fast(request):
    return IMPLEMENTATIONS[request.param](KEYS, lambda: NOW, 900.0)


def signed(method: str = "GET", path: str = "/bucket/data/part-0.parquet", headers: dict | None = None,
           secret: str = SECRET_KEY) -> tuple[str, str, str, CIMultiDictProxy]:
    request = AWSRequest(method=method, url=f"http://127.0.0.1:9000{path}", headers=headers or {})
    S3SigV4Auth(Credentials(ACCESS_KEY, secret), "s3", "us-east-1").add_auth(request)
    raw_path, _, raw_query = request.url.removeprefix("http://127.0.0.1:9000").partition("?")
    all_headers = CIMultiDict([("Host", "127.0.0.1:9000"), *request.headers.items(),
                               ("User-Agent", "test"), ("Accept-Encoding", "identity")])
    return method, raw_path, raw_query, CIMultiDictProxy(all_headers)


UNPARSED = "not an S3 request"


def full_verdict(method, raw_path, raw_query, headers) -> str | None:
    """The full verifier's access key, None when it refuses the signature, UNPARSED
    when the request is refused before (the fast lane asks the fast check only about
    requests that parsed)."""
    target = raw_path + (f"?{raw_query}" if raw_query else "")
    try:
        request = parse_request(method, target, headers)
    except S3Error:
        return UNPARSED
    try:
        return SignatureVerifier(KEYS, clock=lambda: NOW).verify(request)
    except S3Error:
        return None


def with_headers(request, **changes) -> tuple:
    """`request` with headers set (a value) or removed (None); `x_amz_acl` names x-amz-acl."""
    method, path, query, headers = request
    new = CIMultiDict(headers)
    for name, value in changes.items():
        name = name.replace("_", "-")
        if value is None:
            new.popall(name, None)
        else:
            new[name] = value
    return method, path, query, CIMultiDictProxy(new)


# Read at import: the session's autouse fixture hides SPROX_* variables from tests.
NO_EXTENSIONS = os.environ.get("SPROX_NO_EXTENSIONS") == "1"


def test_the_normal_build_loads_the_compiled_check() -> None:
    if NO_EXTENSIONS:
        assert sprox.fastsig.NATIVE is False
        return
    assert sprox.fastsig.NATIVE is True
    assert sprox.fastsig.FastSigV4.__module__ == "sprox._native.fastsig"


@pytest.mark.parametrize("how", [
    {},
    {"method": "HEAD"},
    {"headers": {"Range": "bytes=4096-8191"}},
    {"path": "/bucket/a%20b/%E2%82%AC.bin", "headers": {"Range": "bytes=0-0", "If-Match": '"abc"'}},
    {"headers": {"x-amz-checksum-mode": "ENABLED", "Range": "bytes=-100"}},
], ids=["get", "head", "range", "encoded-key", "checksum-mode"])
def test_what_botocore_signs_is_accepted(fast, how) -> None:
    request_ = signed(**how)  # (signed here: the signer's clock is frozen for the test)
    assert full_verdict(*request_) == ACCESS_KEY
    assert fast.verify(*request_) == ACCESS_KEY


def test_access_keys_with_punctuation_are_accepted(fast) -> None:
    """Keys of one's own (`[[keys]]`) are not always AWS-shaped."""
    keys = {"analytics_ro-1.x": SECRET_KEY}
    request = AWSRequest(method="GET", url="http://127.0.0.1:9000/bucket/key")
    S3SigV4Auth(Credentials("analytics_ro-1.x", SECRET_KEY), "s3", "us-east-1").add_auth(request)
    headers = CIMultiDictProxy(CIMultiDict([("Host", "127.0.0.1:9000"), *request.headers.items()]))
    assert type(fast)(keys, lambda: NOW, 900.0).verify("GET", "/bucket/key", "", headers) == "analytics_ro-1.x"


def test_declines(fast) -> None:
    base = signed(headers={"Range": "bytes=0-99"})
    method, path, query, headers = base
    declined = {
        "a query": (method, path, "acl", headers),
        "another method": ("DELETE", path, query, headers),
        "another key": (method, path.replace("part-0", "part-1"), query, headers),
        "wrong secret": signed(headers={"Range": "bytes=0-99"}, secret="not-it"),
        "a changed signed header": with_headers(base, Range="bytes=0-100"),
        "an unsigned x-amz header": with_headers(base, x_amz_acl="public-read"),
        "a tab in a signed value": signed(headers={"Range": "bytes=0-9\t"}),
        "no x-amz-date": with_headers(base, x_amz_date=None),
        "no payload hash": with_headers(base, x_amz_content_sha256=None),
        "an unknown key": with_headers(base, Authorization=headers["Authorization"].replace(ACCESS_KEY, "AKIDNOBODY")),
        "sigv2": with_headers(base, Authorization="AWS AKIDEXAMPLE:c2lnbmF0dXJl"),
    }
    twice = CIMultiDict(headers)
    twice.add("Range", "bytes=0-99")
    declined["a signed header twice"] = (method, path, query, CIMultiDictProxy(twice))
    for why, request in declined.items():
        assert fast.verify(*request) is None, why
    late = type(fast)(KEYS, lambda: NOW + 901, 900.0)
    assert late.verify(*base) is None  # skew
    assert fast.verify(*base) == ACCESS_KEY


_HEADER_NAMES = st.sampled_from(["Range", "If-Match", "If-None-Match", "x-amz-checksum-mode", "Content-Type",
                                 "x-amz-meta-a", "Cache-Control"])
_VALUES = st.text(alphabet=st.sampled_from("ab= -\t\"é0"), max_size=8)


@settings(max_examples=int(os.environ.get("SPROX_FUZZ_EXAMPLES", "200")), deadline=None)
@given(st.dictionaries(_HEADER_NAMES, _VALUES, max_size=4),
       st.sampled_from(["GET", "HEAD"]),
       st.text(alphabet=st.sampled_from("ab/%2E€ "), min_size=1, max_size=12),
       st.lists(st.tuples(st.sampled_from(["drop", "add", "change"]), _HEADER_NAMES, _VALUES), max_size=2))
def test_random_requests_compiled_equals_twin_and_never_beyond_the_full_verifier(headers, method, key, changes):
    from urllib.parse import quote

    try:
        request = signed(method, "/bucket/" + quote(key, safe="/%"), {k: v for k, v in headers.items()})
    except (ValueError, UnicodeEncodeError):
        return  # not a request botocore makes
    method_, path, query, got = request
    mutated = CIMultiDict(got)
    for action, name, value in changes:
        if action == "drop":
            mutated.popall(name, None)
        elif action == "add":
            mutated.add(name, value)
        else:
            mutated[name] = value
    request = (method_, path, query, CIMultiDictProxy(mutated))
    answers = {name: impl(KEYS, lambda: NOW, 900.0).verify(*request) for name, impl in IMPLEMENTATIONS.items()}
    assert len(set(answers.values())) == 1, answers
    verdict = full_verdict(*request)
    if answers["py"] is not None and verdict is not UNPARSED:
        assert verdict == answers["py"]
