"""Signed streaming uploads: chained chunk signatures and signed trailers checked as the
body is read, and declared payload hashes checked against plain bodies. Vectors: the
example in AWS's S3 documentation ("Signature Calculations for the Authorization Header:
Transferring Payload in Multiple Chunks"), and bodies framed by tests/streaming_signer.py,
which is first checked against that same example."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import zlib

import pytest
from multidict import CIMultiDict

from sprox.s3.body import RequestBody
from sprox.s3.errors import S3Error
from sprox.s3.sigv4 import VerifiedRequest
from tests.streaming_signer import frame_signed, signing_key

# AWS's example: PUT /examplebucket/chunkObject.txt, 66560 bytes of "a" in a 65536-byte
# chunk, a 1024-byte chunk and the final chunk.
AWS_SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
AWS_TIMESTAMP = "20130524T000000Z"
AWS_SCOPE = "20130524/us-east-1/s3/aws4_request"
AWS_SEED = "4f232c4386841ef735655705268965c44a0e4690baa4adea153f7db9fa80a0a9"
AWS_CHUNK_SIGNATURES = [
    "ad80c730a21e5b8d04586a2213dd63b9a0e99e0e2307b0ade35a65485a288648",
    "0055627c9e194cb4542bae2aa5492e3c1575bbb81b612b7d234b86a503ef5497",
    "b6c6ea8a5354eaf15b3cb7646744f4275b71ea724fed81ceb9323e279d449df9",
]
AWS_PAYLOAD = b"a" * 66560
KEY = signing_key(AWS_SECRET, "20130524", "us-east-1")


def verified() -> VerifiedRequest:
    return VerifiedRequest(access_key="AKIAIOSFODNN7EXAMPLE", region="us-east-1",
                           timestamp=AWS_TIMESTAMP, scope=AWS_SCOPE, signature=AWS_SEED,
                           presigned=False, signing_key=KEY)


def aws_example_body(**options) -> bytes:
    return frame_signed(AWS_PAYLOAD, 65536, key=KEY, timestamp=AWS_TIMESTAMP, scope=AWS_SCOPE,
                        seed_signature=AWS_SEED, **options)


def request_body(data: bytes, headers: dict[str, str]) -> RequestBody:
    reader = asyncio.StreamReader()  # (needs the running loop: call within read())
    reader.feed_data(data)
    reader.feed_eof()
    return RequestBody.from_headers(reader, CIMultiDict({"Content-Length": str(len(data)), **headers}))


def body_for(data: bytes, mode: str, decoded_length: int, **extra_headers: str):
    def make() -> RequestBody:
        body = request_body(data, {"x-amz-content-sha256": mode,
                                   "x-amz-decoded-content-length": str(decoded_length), **extra_headers})
        body.expect_signatures(verified())
        return body
    return make


def read(make) -> tuple[bytes, S3Error | None]:
    """What a consumer of `decoded()` of the body `make()` returns is handed, and the
    error that ended it, if any."""
    async def main():
        body = make()
        got = bytearray()
        try:
            async for piece in body.decoded():
                got += piece
        except S3Error as exc:
            return bytes(got), exc
        return bytes(got), None
    return asyncio.run(main())


def test_the_test_signer_reproduces_the_aws_documentation_example():
    framed = aws_example_body()
    assert [line.split(b"=")[1].decode() for line in framed.split(b"\r\n") if b"chunk-signature" in line] \
        == AWS_CHUNK_SIGNATURES


def test_the_aws_documentation_example_is_accepted():
    body = body_for(aws_example_body(), "STREAMING-AWS4-HMAC-SHA256-PAYLOAD", len(AWS_PAYLOAD))
    assert read(body) == (AWS_PAYLOAD, None)


def tampered(framed: bytes, old: bytes, new: bytes) -> bytes:
    assert framed.count(old) >= 1
    return framed.replace(old, new, 1)


CASES = {
    # A changed byte in the second chunk's data.
    "data changed": lambda f: f[:-120] + b"b" + f[-119:],
    # The first chunk's signature replaced by the second's: chains break.
    "signature swapped": lambda f: tampered(f, AWS_CHUNK_SIGNATURES[0].encode(), AWS_CHUNK_SIGNATURES[1].encode()),
    # The final chunk's signature is wrong.
    "final signature wrong": lambda f: tampered(f, AWS_CHUNK_SIGNATURES[2].encode(), b"0" * 64),
    # A signature in upper case is not the signature.
    "upper-case signature": lambda f: tampered(f, AWS_CHUNK_SIGNATURES[1].encode(), AWS_CHUNK_SIGNATURES[1].upper().encode()),
}


@pytest.mark.parametrize("case", CASES)
def test_a_wrong_chunk_signature_is_refused_and_the_body_never_completes(case):
    framed = CASES[case](aws_example_body())
    got, error = read(body_for(framed, "STREAMING-AWS4-HMAC-SHA256-PAYLOAD", len(AWS_PAYLOAD)))
    assert error is not None and (error.code, error.status) == ("SignatureDoesNotMatch", 403)
    assert len(got) < len(AWS_PAYLOAD)  # the consumer never saw the whole body


def test_a_dropped_chunk_is_refused():
    framed = aws_example_body()
    first_end = framed.index(b"\r\n", framed.index(b"\r\n") + 2 + 65536) + 2
    # The second chunk sent as if it were the first: the data and the chain disagree.
    dropped = framed[first_end:]
    got, error = read(body_for(dropped, "STREAMING-AWS4-HMAC-SHA256-PAYLOAD", 1024))
    assert error is not None and error.code == "SignatureDoesNotMatch"
    assert got == b""


def test_unsigned_chunks_in_a_signed_stream_are_refused():
    framed = b"400\r\n" + b"a" * 1024 + b"\r\n0\r\n\r\n"
    got, error = read(body_for(framed, "STREAMING-AWS4-HMAC-SHA256-PAYLOAD", 1024))
    assert error is not None and (error.code, error.status) == ("SignatureDoesNotMatch", 403)
    assert got == b""


def crc32(data: bytes) -> str:
    return base64.b64encode(zlib.crc32(data).to_bytes(4, "big")).decode()


def trailer_body(trailers: dict[str, str], framed: bytes | None = None):
    framed = framed or aws_example_body(trailers=trailers)
    return body_for(framed, "STREAMING-AWS4-HMAC-SHA256-PAYLOAD-TRAILER", len(AWS_PAYLOAD),
                    **{"x-amz-trailer": "x-amz-checksum-crc32"})


def test_a_signed_trailer_is_checked():
    trailers = {"x-amz-checksum-crc32": crc32(AWS_PAYLOAD)}
    assert read(trailer_body(trailers)) == (AWS_PAYLOAD, None)


def test_a_changed_trailer_fails_its_signature():
    right = {"x-amz-checksum-crc32": crc32(AWS_PAYLOAD)}
    framed = aws_example_body(trailers=right)
    forged = framed.replace(right["x-amz-checksum-crc32"].encode(), crc32(b"other").encode())
    got, error = read(trailer_body(right, forged))
    assert error is not None and error.code == "SignatureDoesNotMatch"
    assert len(got) < len(AWS_PAYLOAD)


def test_a_signed_trailer_stream_without_its_trailer_signature_is_refused():
    right = {"x-amz-checksum-crc32": crc32(AWS_PAYLOAD)}
    framed = aws_example_body(trailers=right)
    start = framed.index(b"x-amz-trailer-signature:")
    stripped = framed[:start] + framed[framed.index(b"\r\n", start) + 2:]
    got, error = read(trailer_body(right, stripped))
    assert error is not None and error.code == "SignatureDoesNotMatch"


def test_sigv4a_streams_are_refused_when_signatures_are_checked():
    async def main():
        body = request_body(b"0\r\n\r\n", {"x-amz-content-sha256": "STREAMING-AWS4-ECDSA-P256-SHA256-PAYLOAD",
                                            "x-amz-decoded-content-length": "0"})
        body.expect_signatures(verified())

    with pytest.raises(S3Error) as caught:
        asyncio.run(main())
    assert (caught.value.code, caught.value.status) == ("NotImplemented", 501)


@pytest.mark.parametrize("declared_for", [b"the same bytes", b"other bytes"])
def test_a_declared_payload_hash_is_checked_before_the_last_byte(declared_for):
    data = b"the same bytes" * 50_000  # several reads
    declared = hashlib.sha256(declared_for * (50_000 if declared_for == b"the same bytes" else 1)).hexdigest()
    got, error = read(lambda: request_body(data, {"x-amz-content-sha256": declared}))
    if declared_for == b"the same bytes":
        assert (got, error) == (data, None)
    else:
        assert error is not None and (error.code, error.status) == ("XAmzContentSHA256Mismatch", 400)
        assert error.extra["ClientComputedContentSHA256"] == declared
        assert error.extra["S3ComputedContentSHA256"] == hashlib.sha256(data).hexdigest()
        assert len(got) < len(data)
