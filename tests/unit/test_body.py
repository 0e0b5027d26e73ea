"""RequestBody: the size limit S3 puts on one upload, for bodies with a length and
for chunked bodies without one."""

from __future__ import annotations

import asyncio

import pytest
from multidict import CIMultiDict

from sprox.s3.body import MAX_UPLOAD_BYTES, RequestBody
from sprox.s3.errors import S3Error


def reader_of(data: bytes) -> asyncio.StreamReader:
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    reader.feed_eof()
    return reader


async def consume(body: RequestBody) -> bytes:
    return b"".join([piece async for piece in body.decoded()])


def test_a_declared_length_over_five_gib_is_refused_before_reading() -> None:
    headers = CIMultiDict({"Content-Length": str(MAX_UPLOAD_BYTES + 1)})
    body = RequestBody.from_headers(None, headers)
    with pytest.raises(S3Error) as caught:
        body.check_declared_size()  # (the front end calls it once the request is authenticated)
    assert (caught.value.code, caught.value.status) == ("EntityTooLarge", 400)
    assert caught.value.extra == {"ProposedSize": str(MAX_UPLOAD_BYTES + 1), "MaxSizeAllowed": str(MAX_UPLOAD_BYTES)}
    RequestBody.from_headers(None, CIMultiDict({"Content-Length": str(MAX_UPLOAD_BYTES)})).check_declared_size()


def test_an_aws_chunked_body_longer_than_declared_fails_before_handing_on_the_extra() -> None:
    """Declared 10 bytes, sent 15 then 5: nothing past the declared length is handed on,
    so an upstream framed by that length never sees a whole (truncated) body."""
    framed = b"f\r\n" + b"a" * 15 + b"\r\n5\r\n" + b"b" * 5 + b"\r\n0\r\n\r\n"
    headers = CIMultiDict({"Content-Encoding": "aws-chunked", "x-amz-decoded-content-length": "10",
                           "x-amz-content-sha256": "STREAMING-UNSIGNED-PAYLOAD-TRAILER",
                           "Content-Length": str(len(framed))})

    async def run() -> list[bytes]:
        body = RequestBody.from_headers(reader_of(framed), headers)
        got: list[bytes] = []
        with pytest.raises(S3Error) as caught:
            async for piece in body.decoded():
                got.append(piece)
        assert caught.value.code == "IncompleteBody"
        return got

    assert sum(len(p) for p in asyncio.run(run())) <= 10


def test_a_chunked_body_without_length_is_cut_off_past_the_limit() -> None:
    async def run(size: int, limit: int) -> bytes:
        body = RequestBody(reader_of(b"x" * size), "", None, None, max_length=limit)
        return await consume(body)

    assert asyncio.run(run(1000, 1000)) == b"x" * 1000
    with pytest.raises(S3Error) as caught:
        asyncio.run(run(1001, 1000))
    assert caught.value.code == "EntityTooLarge"


def test_a_chunked_body_over_the_limit_never_hands_on_its_last_bytes() -> None:
    """With a declared SHA-256 the last piece waits for the hash; past the limit the
    body fails before that piece, so whoever forwards it never completes it."""
    async def run() -> list[bytes]:
        reader = asyncio.StreamReader()
        for _ in range(3):
            reader.feed_data(b"y" * 300_000)
        reader.feed_eof()
        body = RequestBody(reader, "0" * 64, None, None, max_length=700_000)
        got = []
        with pytest.raises(S3Error):
            async for piece in body.raw():
                got.append(piece)
        return got

    assert sum(len(p) for p in asyncio.run(run())) < 700_000
