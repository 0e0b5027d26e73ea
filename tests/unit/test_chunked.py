"""AwsChunkedDecoder: round trips of bodies framed here and by botocore, and a table of
malformed framings that must each fail with a 400 (never hang: every reader is fed EOF)."""

from __future__ import annotations

import asyncio
import hashlib
import io

import pytest
from aiohttp.streams import StreamReader as AiohttpStreamReader
from botocore.httpchecksum import AwsChunkedWrapper, Crc32Checksum
from hypothesis import given, settings
from hypothesis import strategies as st

from sprox.s3.chunked import MAX_CHUNK_BYTES, PIECE_BYTES, AwsChunkedDecoder
from sprox.s3.errors import S3Error

CRLF = b"\r\n"


def fake_signature(index: int) -> str:
    return hashlib.sha256(b"chunk %d" % index).hexdigest()


def frame(data: bytes, sizes: list[int] | None = None, *, signed: bool = False,
          trailers: dict[str, str] | None = None, trailer_signature: str | None = None,
          trailer_end: bytes = CRLF) -> bytes:
    """Frame `data` as aws-chunked, cut into chunks of `sizes` (cycled; default one
    chunk). `trailers` None means a stream without a trailer section."""
    sizes = sizes or [max(len(data), 1)]
    out = []
    offset = index = 0
    while offset < len(data):
        piece = data[offset:offset + sizes[index % len(sizes)]]
        extension = f";chunk-signature={fake_signature(index)}".encode() if signed else b""
        out.append(b"%x%s\r\n%s\r\n" % (len(piece), extension, piece))
        offset += len(piece)
        index += 1
    out.append(b"0" + (f";chunk-signature={fake_signature(index)}".encode() if signed else b"")
               + CRLF)
    if trailers is None:
        out.append(CRLF)
    else:
        for name, value in trailers.items():
            out.append(f"{name}:{value}".encode() + CRLF)
        if trailer_signature is not None:
            out.append(f"x-amz-trailer-signature:{trailer_signature}".encode() + CRLF)
        out.append(trailer_end)
    return b"".join(out)


async def _decode(body: bytes, with_trailer: bool, feed_sizes: list[int] | None,
                  **options) -> tuple[list[bytes], AwsChunkedDecoder]:
    reader = asyncio.StreamReader()

    async def feed() -> None:
        # Feed in pieces, yielding between them, so lines and chunks straddle reads.
        offset = index = 0
        while offset < len(body):
            size = feed_sizes[index % len(feed_sizes)] if feed_sizes else len(body)
            reader.feed_data(body[offset:offset + size])
            offset += size
            index += 1
            await asyncio.sleep(0)
        reader.feed_eof()

    feeder = asyncio.create_task(feed())
    try:
        decoder = AwsChunkedDecoder(reader, with_trailer=with_trailer, **options)
        pieces = [piece async for piece in decoder]
    finally:
        await feeder
    return pieces, decoder


def decode(body: bytes, *, with_trailer: bool = False, feed_sizes: list[int] | None = None,
           **options) -> tuple[list[bytes], AwsChunkedDecoder]:
    return asyncio.run(_decode(body, with_trailer, feed_sizes, **options))


# --- well-formed bodies -------------------------------------------------------------


def test_empty_payload() -> None:
    pieces, decoder = decode(b"0\r\n\r\n")
    assert pieces == []
    assert decoder.trailers == {} and decoder.chunk_signatures == []


def test_signed_chunks_keep_their_signatures_in_order() -> None:
    body = frame(b"abcdefghij", [4], signed=True)
    pieces, decoder = decode(body)
    assert b"".join(pieces) == b"abcdefghij"
    # 4 + 4 + 2 bytes, then the final chunk: four signatures.
    assert decoder.chunk_signatures == [fake_signature(i) for i in range(4)]


@pytest.mark.parametrize("trailer_end", [CRLF, b""], ids=["blank-line", "eof"])
def test_unsigned_trailer(trailer_end: bytes) -> None:
    body = frame(b"hello world", [5], trailers={"X-Amz-Checksum-CRC32": "DUoRhQ=="},
                 trailer_end=trailer_end)
    pieces, decoder = decode(body, with_trailer=True)
    assert b"".join(pieces) == b"hello world"
    assert decoder.trailers == {"x-amz-checksum-crc32": "DUoRhQ=="}
    assert decoder.trailer_signature is None


def test_signed_trailer() -> None:
    body = frame(b"x" * 100, [64], signed=True,
                 trailers={"x-amz-checksum-crc32c": "sOO8/Q=="}, trailer_signature="ab" * 32)
    pieces, decoder = decode(body, with_trailer=True)
    assert b"".join(pieces) == b"x" * 100
    assert decoder.trailers == {"x-amz-checksum-crc32c": "sOO8/Q=="}
    assert decoder.trailer_signature == "ab" * 32
    assert len(decoder.chunk_signatures) == 3


def test_trailer_mode_with_no_trailers() -> None:
    pieces, decoder = decode(b"3\r\nabc\r\n0\r\n\r\n", with_trailer=True)
    assert pieces == [b"abc"] and decoder.trailers == {}


@pytest.mark.parametrize("chunk_size", [1, 7, 8192, 1 << 20])
def test_botocore_framing(chunk_size: int) -> None:
    """Bodies framed by botocore's own aws-chunked writer (what boto3 sends)."""
    data = bytes(i * 31 % 251 for i in range(50_000))
    wrapper = AwsChunkedWrapper(io.BytesIO(data), checksum_cls=Crc32Checksum,
                                checksum_name="x-amz-checksum-crc32", chunk_size=chunk_size)
    body = wrapper.read()
    checksum = Crc32Checksum()
    checksum.update(data)
    pieces, decoder = decode(body, with_trailer=True)
    assert b"".join(pieces) == data
    assert decoder.trailers == {"x-amz-checksum-crc32": checksum.b64digest()}


def test_large_chunk_is_yielded_in_bounded_pieces() -> None:
    data = bytes(range(256)) * 4096 * 3  # 3 MiB in one chunk
    pieces, _ = decode(frame(data))
    assert b"".join(pieces) == data
    assert max(map(len, pieces)) == PIECE_BYTES


def test_largest_allowed_chunk() -> None:
    data = b"\x5a" * MAX_CHUNK_BYTES
    pieces, _ = decode(frame(data))
    assert sum(map(len, pieces)) == MAX_CHUNK_BYTES


def test_uppercase_hex_and_leading_zeros() -> None:
    pieces, _ = decode(b"000A\r\n0123456789\r\n0\r\n\r\n")
    assert pieces == [b"0123456789"]


@settings(max_examples=200, deadline=None)
@given(
    data=st.binary(max_size=3000),
    sizes=st.lists(st.integers(1, 700), min_size=1, max_size=8),
    feed_sizes=st.lists(st.integers(1, 500), min_size=1, max_size=8),
    piece_bytes=st.integers(1, 1024),
    signed=st.booleans(),
    trailers=st.none() | st.dictionaries(
        st.sampled_from(["x-amz-checksum-crc32", "x-amz-checksum-sha256", "x-amz-meta-a"]),
        st.text("ABCxyz0123+/=", min_size=1, max_size=60), max_size=3),
    trailer_end=st.sampled_from([CRLF, b""]),
)
def test_round_trip(data: bytes, sizes: list[int], feed_sizes: list[int], piece_bytes: int,
                    signed: bool, trailers: dict[str, str] | None, trailer_end: bytes) -> None:
    body = frame(data, sizes, signed=signed, trailers=trailers, trailer_end=trailer_end)
    pieces, decoder = decode(body, with_trailer=trailers is not None, feed_sizes=feed_sizes,
                             piece_bytes=piece_bytes)
    assert b"".join(pieces) == data
    assert all(0 < len(p) <= piece_bytes for p in pieces)
    assert decoder.trailers == (trailers or {})
    if signed:
        framed = body.count(b";chunk-signature=")
        assert decoder.chunk_signatures == [fake_signature(i) for i in range(framed)]
    else:
        assert decoder.chunk_signatures == []


def test_decodes_once() -> None:
    async def run() -> None:
        reader = asyncio.StreamReader()
        reader.feed_data(b"0\r\n\r\n")
        reader.feed_eof()
        decoder = AwsChunkedDecoder(reader)
        assert [p async for p in decoder] == []
        with pytest.raises(RuntimeError):
            decoder.__aiter__()

    asyncio.run(run())


# --- malformed bodies ---------------------------------------------------------------

SIG = fake_signature(0)
SIXTEEN_TRAILERS = b"".join(b"x-amz-meta-%d:v\r\n" % i for i in range(16))

MALFORMED = [
    # (id, body, with_trailer, expected code)
    ("empty-body", b"", False, "IncompleteBody"),
    ("bad-hex", b"zz\r\nabc\r\n0\r\n\r\n", False, "InvalidChunkSizeError"),
    ("0x-prefix", b"0x3\r\nabc\r\n0\r\n\r\n", False, "InvalidChunkSizeError"),
    ("plus-sign", b"+3\r\nabc\r\n0\r\n\r\n", False, "InvalidChunkSizeError"),
    ("underscore", b"1_0\r\n" + b"a" * 16 + b"\r\n0\r\n\r\n", False, "InvalidChunkSizeError"),
    ("leading-space", b" 3\r\nabc\r\n0\r\n\r\n", False, "InvalidChunkSizeError"),
    ("empty-size", b"\r\nabc\r\n0\r\n\r\n", False, "InvalidChunkSizeError"),
    ("oversize-chunk", b"%x\r\n" % (MAX_CHUNK_BYTES + 1), False, "InvalidChunkSizeError"),
    ("huge-size", b"f" * 40 + b"\r\n", False, "InvalidChunkSizeError"),
    ("bare-lf", b"3\nabc\r\n0\r\n\r\n", False, "InvalidRequest"),
    ("cr-inside-line", b"3\r;chunk-signature=ab\r\nabc\r\n0\r\n\r\n", False, "InvalidRequest"),
    ("missing-crlf-after-data", b"3\r\nabcX\r\n0\r\n\r\n", False, "InvalidRequest"),
    ("lf-only-after-data", b"3\r\nabc\n0\r\n\r\n", False, "InvalidRequest"),
    ("short-data", b"10\r\nabc", False, "IncompleteBody"),
    ("eof-before-data-crlf", b"3\r\nabc", False, "IncompleteBody"),
    ("eof-mid-crlf", b"3\r\nabc\r", False, "IncompleteBody"),
    ("eof-mid-size-line", b"3\r", False, "IncompleteBody"),
    ("missing-final-chunk", b"3\r\nabc\r\n", False, "IncompleteBody"),
    ("missing-crlf-after-final", b"3\r\nabc\r\n0\r\n", False, "IncompleteBody"),
    ("junk-instead-of-final-crlf", b"3\r\nabc\r\n0\r\nxy\r\n", False, "InvalidRequest"),
    ("garbage-after", b"3\r\nabc\r\n0\r\n\r\nxyz", False, "InvalidRequest"),
    ("garbage-after-trailers", b"0\r\nx-amz-checksum-crc32:AAAAAA==\r\n\r\nxyz", True,
     "InvalidRequest"),
    ("long-line", b"3;chunk-signature=" + b"a" * 5000 + b"\r\nabc\r\n0\r\n\r\n", False,
     "InvalidRequest"),
    ("very-long-line", b"1" * 200_000 + b"\r\n", False, "InvalidRequest"),
    ("very-long-line-no-newline", b"a" * 200_000, False, "InvalidRequest"),
    ("unknown-extension", b"3;foo=bar\r\nabc\r\n0\r\n\r\n", False, "InvalidRequest"),
    ("empty-signature", b"3;chunk-signature=\r\nabc\r\n0\r\n\r\n", False, "InvalidRequest"),
    ("non-hex-signature", b"3;chunk-signature=xyz\r\nabc\r\n0\r\n\r\n", False, "InvalidRequest"),
    ("two-extensions", b"3;chunk-signature=ab;x=y\r\nabc\r\n0\r\n\r\n", False, "InvalidRequest"),
    ("signed-then-unsigned", b"3;chunk-signature=" + SIG.encode() + b"\r\nabc\r\n0\r\n\r\n",
     False, "InvalidRequest"),
    ("unsigned-then-signed", b"3\r\nabc\r\n0;chunk-signature=" + SIG.encode() + b"\r\n\r\n",
     False, "InvalidRequest"),
    ("trailer-without-colon", b"0\r\nx-amz-checksum-crc32\r\n\r\n", True, "InvalidRequest"),
    ("trailer-empty-name", b"0\r\n:abc\r\n\r\n", True, "InvalidRequest"),
    ("trailer-name-with-space", b"0\r\nx amz:abc\r\n\r\n", True, "InvalidRequest"),
    ("trailer-non-ascii", b"0\r\nx-amz-meta-a:\xc3\xa9\r\n\r\n", True, "InvalidRequest"),
    ("trailer-repeated", b"0\r\na:1\r\na:2\r\n\r\n", True, "InvalidRequest"),
    ("trailer-signature-repeated", b"0\r\nx-amz-trailer-signature:ab\r\n"
     b"x-amz-trailer-signature:ab\r\n\r\n", True, "InvalidRequest"),
    ("trailer-line-too-long", b"0\r\nx-amz-meta-a:" + b"v" * 5000 + b"\r\n\r\n", True,
     "InvalidRequest"),
    ("too-many-trailers", b"0\r\n" + SIXTEEN_TRAILERS + b"x-amz-meta-x:v\r\n\r\n", True,
     "InvalidRequest"),
    ("trailer-cut-mid-line", b"0\r\nx-amz-checksum-crc32:AAAA", True, "IncompleteBody"),
    ("trailer-bare-lf", b"0\r\nx-amz-checksum-crc32:AAAA\n\r\n", True, "InvalidRequest"),
    ("trailers-without-trailer-mode", b"0\r\nx-amz-checksum-crc32:AAAA\r\n\r\n", False,
     "InvalidRequest"),
]


@pytest.mark.parametrize(("body", "with_trailer", "code"), [row[1:] for row in MALFORMED],
                         ids=[row[0] for row in MALFORMED])
# 1- and 7-byte feeds split every line and CRLF; the 4093-byte one keeps huge bodies quick.
@pytest.mark.parametrize("feed_sizes", [None, [1, 7, 4093]], ids=["whole", "pieces"])
def test_malformed(body: bytes, with_trailer: bool, code: str,
                   feed_sizes: list[int] | None) -> None:
    with pytest.raises(S3Error) as caught:
        decode(body, with_trailer=with_trailer, feed_sizes=feed_sizes)
    assert caught.value.status == 400
    assert caught.value.code == code


def test_sixteen_trailers_are_allowed() -> None:
    _, decoder = decode(b"0\r\n" + SIXTEEN_TRAILERS + b"\r\n", with_trailer=True)
    assert len(decoder.trailers) == 16


def test_error_comes_after_the_good_data() -> None:
    """Data before a framing error is yielded; the error surfaces before completion."""

    async def run() -> list[bytes]:
        reader = asyncio.StreamReader()
        reader.feed_data(b"3\r\nabc\r\n3\r\nde")
        reader.feed_eof()
        pieces = []
        with pytest.raises(S3Error, match="IncompleteBody"):
            async for piece in AwsChunkedDecoder(reader):
                pieces.append(piece)
        return pieces

    assert asyncio.run(run()) == [b"abc"]


# --- aiohttp's reader (what the server hands us) ------------------------------------


class _ConnectionStub:
    """The slice of aiohttp's request protocol its StreamReader uses for flow control."""

    connected = True
    _reading_paused = False

    def pause_reading(self) -> None:
        self._reading_paused = True

    def resume_reading(self, resume_parser: bool = True) -> None:
        self._reading_paused = False


async def _decode_with_aiohttp(body: bytes) -> list[bytes]:
    loop = asyncio.get_running_loop()
    # limit=2**16 is what aiohttp's web server gives a request payload.
    reader = AiohttpStreamReader(_ConnectionStub(), limit=2**16, loop=loop)
    reader.feed_data(body)
    reader.feed_eof()
    return [piece async for piece in AwsChunkedDecoder(reader)]


def test_aiohttp_reader_round_trip() -> None:
    data = bytes(range(256)) * 1000
    assert b"".join(asyncio.run(_decode_with_aiohttp(frame(data, [10_000], signed=True)))) == data


@pytest.mark.parametrize("body", [b"1" * 300_000 + b"\r\n", b"3;" + b"a" * 5000 + b"\r\n"],
                         ids=["over-aiohttp-limit", "over-our-limit"])
def test_aiohttp_reader_long_line(body: bytes) -> None:
    with pytest.raises(S3Error) as caught:
        asyncio.run(_decode_with_aiohttp(body))
    assert caught.value.status == 400
