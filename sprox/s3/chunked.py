"""Decoding of the `aws-chunked` body framing S3 streaming uploads use.

On the wire::

    hex-size[;chunk-signature=SIG]\\r\\n DATA \\r\\n      (repeated)
    0[;chunk-signature=SIG]\\r\\n                        (the final chunk)
    \\r\\n                                               (without trailers)
    name:value\\r\\n ... [x-amz-trailer-signature:SIG\\r\\n] \\r\\n   (with trailers)

Everything here is read from a client, so every read is bounded: header and trailer
lines, chunk sizes, the number of trailers, and the pieces of data handed on.
Chunk signatures are checked as each chunk ends when the decoder is given the
request's `ChunkSignatures` (signed streaming uploads to a Sprox that verifies
SigV4); otherwise they are only collected.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
from collections.abc import AsyncIterator

from aiohttp.http_exceptions import LineTooLong

from .body import ByteReader
from .errors import S3Error

# A chunk header is a hex size plus one signature (64 hex digits for HMAC, ~144 for
# ECDSA); a trailer is a checksum. 4 KiB is ample for both.
MAX_LINE_BYTES = 4096
# The largest chunk accepted; SDKs send 64 KiB to 1 MiB chunks.
MAX_CHUNK_BYTES = 16 * 1024 * 1024
MAX_TRAILER_LINES = 16
# Data is handed on in pieces no larger than this, whatever the chunk size.
PIECE_BYTES = 256 * 1024

TRAILER_SIGNATURE = "x-amz-trailer-signature"

_CRLF = b"\r\n"
_HEX_RE = re.compile(rb"[0-9a-fA-F]+")
_EXTENSION_RE = re.compile(rb"chunk-signature=([0-9a-fA-F]+)")
# An HTTP field name (RFC 9110 token).
_TOKEN_RE = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


def _incomplete() -> S3Error:
    return S3Error("IncompleteBody", "You did not provide the number of bytes specified by the "
                   "Content-Length HTTP header", 400)


def _malformed(detail: str) -> S3Error:
    return S3Error("InvalidRequest", f"Malformed aws-chunked body: {detail}.", 400)


def _bad_chunk_size(detail: str) -> S3Error:
    return S3Error("InvalidChunkSizeError", f"Invalid aws-chunked chunk size: {detail}.", 400)


class AwsChunkedDecoder:
    """Iterate with `async for piece in decoder` to get the payload, frames removed.

    Raises `S3Error` (status 400) on any framing error: IncompleteBody when the body
    ends early, InvalidChunkSizeError for a bad or oversized chunk size, InvalidRequest
    for any other malformation, including bytes after the end of the framing.

    Once iteration has finished:
    - `chunk_signatures`: each chunk's `chunk-signature`, the final chunk's included,
      in order (empty for unsigned streams);
    - `trailers`: trailer name (lower case) → value, `x-amz-trailer-signature` excluded;
    - `trailer_signature`: the `x-amz-trailer-signature` value, or None.
    """

    def __init__(self, reader: ByteReader, *, with_trailer: bool = False,
                 piece_bytes: int = PIECE_BYTES, max_chunk_bytes: int = MAX_CHUNK_BYTES,
                 signatures=None) -> None:
        self._reader = reader
        # sigv4.ChunkSignatures: every chunk (and the trailer) must carry a right one.
        self._signatures = signatures
        self._with_trailer = with_trailer
        self._piece_bytes = piece_bytes
        self._max_chunk_bytes = max_chunk_bytes
        self._started = False
        self.chunk_signatures: list[str] = []
        self.trailers: dict[str, str] = {}
        self.trailer_signature: str | None = None

    def __aiter__(self) -> AsyncIterator[bytes]:
        if self._started:
            raise RuntimeError("an aws-chunked body can be decoded once")
        self._started = True
        return self._decode()

    async def _decode(self) -> AsyncIterator[bytes]:
        signed: bool | None = None  # whether the stream's chunks carry signatures
        while True:
            line = await self._read_line()
            if line is None:
                raise _incomplete()
            size, signature = self._parse_chunk_header(line)
            if signed is None:
                signed = signature is not None
            elif signed != (signature is not None):
                raise _malformed("chunks with and without chunk-signature are mixed")
            if signature is not None:
                self.chunk_signatures.append(signature)
            digest = hashlib.sha256() if self._signatures is not None else None
            remaining = size
            while remaining:
                piece = await self._read_exactly(min(remaining, self._piece_bytes))
                remaining -= len(piece)
                if digest is not None:
                    digest.update(piece)
                yield piece
            if size and await self._read_exactly(2) != _CRLF:
                raise _malformed("chunk data is not followed by CRLF")
            if digest is not None:
                # Checked once the chunk is whole. Its earlier pieces were already handed
                # on; RequestBody.decoded() holds the body's last piece back until the
                # decoder has finished, so a consumer never completes an upload whose
                # signatures fail.
                self._signatures.check_chunk(signature, digest.hexdigest())
            if size == 0:
                break
        if self._with_trailer:
            await self._read_trailers()
            if self._signatures is not None:
                self._signatures.check_trailer(self.trailer_signature, self.trailers)
        else:
            line = await self._read_line()
            if line is None:
                raise _incomplete()
            if line:
                raise _malformed("the final chunk is not followed by CRLF")
        if await self._reader.read(1):
            raise _malformed("data after the final chunk")

    def _parse_chunk_header(self, line: bytes) -> tuple[int, str | None]:
        size_text, sep, extension = line.partition(b";")
        # int(x, 16) would accept "0x10", "1_0", " 10" and "+10": check the digits first.
        if not _HEX_RE.fullmatch(size_text):
            raise _bad_chunk_size(f"{size_text[:32]!r} is not a hexadecimal number")
        size = int(size_text, 16)
        if size > self._max_chunk_bytes:
            raise _bad_chunk_size(f"{size} bytes is more than the {self._max_chunk_bytes} allowed")
        if not sep:
            return size, None
        match = _EXTENSION_RE.fullmatch(extension)
        if match is None:
            raise _malformed(f"unsupported chunk extension {extension[:32]!r}")
        return size, match.group(1).decode("ascii")

    async def _read_trailers(self) -> None:
        # The trailer section ends with an empty line. Some SDKs omit it and end the body
        # right after the last trailer's CRLF, so a clean end of body also ends it.
        for _ in range(MAX_TRAILER_LINES):
            line = await self._read_line()
            if not line:  # None (end of body) or b"" (the empty line)
                return
            self._add_trailer(line)
        if await self._read_line():
            raise _malformed(f"more than {MAX_TRAILER_LINES} trailer lines")

    def _add_trailer(self, line: bytes) -> None:
        name, sep, value = line.partition(b":")
        if not sep or not _TOKEN_RE.fullmatch(name):
            raise _malformed(f"invalid trailer line {line[:32]!r}")
        try:
            text = value.strip(b" \t").decode("ascii")
        except UnicodeDecodeError:
            raise _malformed("trailer values must be ASCII") from None
        key = name.decode("ascii").lower()
        if key == TRAILER_SIGNATURE:
            if self.trailer_signature is not None:
                raise _malformed(f"{TRAILER_SIGNATURE} is repeated")
            self.trailer_signature = text
        elif key in self.trailers:
            raise _malformed(f"trailer {key} is repeated")
        else:
            self.trailers[key] = text

    async def _read_line(self) -> bytes | None:
        """One CRLF-terminated line without its CRLF, or None at a clean end of body.

        Readers bound `readline()` themselves (asyncio at its `limit`, aiohttp at twice
        its buffer limit) and raise when a line is longer; either way nothing larger
        than that is ever held, and anything over MAX_LINE_BYTES is refused here."""
        try:
            line = await self._reader.readline()
        except (ValueError, LineTooLong):
            raise _malformed(f"line longer than {MAX_LINE_BYTES} bytes") from None
        if not line:
            return None
        if len(line) > MAX_LINE_BYTES:
            raise _malformed(f"line longer than {MAX_LINE_BYTES} bytes")
        if not line.endswith(b"\n"):
            raise _incomplete()  # the body ended in the middle of a line
        if not line.endswith(_CRLF) or b"\r" in line[:-2]:
            raise _malformed("line not terminated by CRLF")
        return line[:-2]

    async def _read_exactly(self, n: int) -> bytes:
        try:
            return await self._reader.readexactly(n)
        except asyncio.IncompleteReadError:
            raise _incomplete() from None
