"""A request body as S3 defines it: plain, or `aws-chunked` with optional trailers.

Bodies are streamed, never held whole in memory. A body can be consumed once, either
raw (the bytes on the wire) or decoded (the object's payload).
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from typing import Protocol

from . import checksums, errors
from .numbers import decimal

READ_SIZE = 256 * 1024
# S3's largest single upload (PutObject, UploadPart): 5 GiB. A body that declares more
# is refused before a byte is read; one of unknown length (Transfer-Encoding: chunked)
# is cut off as it passes the limit, before the upload can complete.
MAX_UPLOAD_BYTES = 5 * 1024 ** 3

# x-amz-content-sha256 values that announce an aws-chunked body.
STREAMING_SIGNED = "STREAMING-AWS4-HMAC-SHA256-PAYLOAD"
STREAMING_SIGNED_TRAILER = "STREAMING-AWS4-HMAC-SHA256-PAYLOAD-TRAILER"
STREAMING_UNSIGNED_TRAILER = "STREAMING-UNSIGNED-PAYLOAD-TRAILER"
STREAMING_ECDSA = "STREAMING-AWS4-ECDSA-P256-SHA256-PAYLOAD"
STREAMING_ECDSA_TRAILER = "STREAMING-AWS4-ECDSA-P256-SHA256-PAYLOAD-TRAILER"
STREAMING_MODES = frozenset(
    {STREAMING_SIGNED, STREAMING_SIGNED_TRAILER, STREAMING_UNSIGNED_TRAILER,
     STREAMING_ECDSA, STREAMING_ECDSA_TRAILER}
)
# Streams whose chunks carry HMAC signatures, chained from the request's signature.
STREAMING_HMAC_SIGNED = frozenset({STREAMING_SIGNED, STREAMING_SIGNED_TRAILER})
_HEX_DIGITS = frozenset("0123456789abcdef")


class ByteReader(Protocol):
    """What a body is read from (aiohttp's `StreamReader` fits)."""

    async def read(self, n: int = -1) -> bytes: ...
    async def readline(self) -> bytes: ...
    async def readexactly(self, n: int) -> bytes: ...


class RequestBody:
    """An incoming request body.

    `decoded_length` is the payload size (for aws-chunked bodies, the
    `x-amz-decoded-content-length` header); `raw_length` the bytes on the wire.
    After `decoded()` is exhausted, `trailers` holds any aws-chunked trailers
    (e.g. `x-amz-checksum-crc32`)."""

    def __init__(self, reader: ByteReader, content_sha256: str, raw_length: int | None,
                 decoded_length: int | None, content_encoding: str = "", headers=None,
                 *, verify_checksum: bool = True, max_length: int = MAX_UPLOAD_BYTES) -> None:
        self._reader = reader
        self.max_length = max_length
        # CompleteMultipartUpload's checksum headers describe the object, not the body.
        self._verify_checksum = verify_checksum
        self._headers = headers if headers is not None else {}
        self.content_sha256 = content_sha256
        self.raw_length = raw_length
        self.decoded_length = decoded_length
        self.content_encoding = content_encoding
        self.trailers: dict[str, str] = {}
        # The request's sigv4.ChunkSignatures, set once its signature checked out:
        # decoded() then checks every chunk's signature too.
        self.chunk_signatures = None
        self._consumed = False

    @classmethod
    def from_headers(cls, reader: ByteReader, headers, *, verify_checksum: bool = True) -> RequestBody:
        sha = headers.get("x-amz-content-sha256", "")
        raw_length = _int_header(headers, "Content-Length")
        encoding_tokens = [t.strip() for t in headers.get("Content-Encoding", "").split(",") if t.strip()]
        chunked = sha in STREAMING_MODES or "aws-chunked" in encoding_tokens
        if chunked:
            decoded = _int_header(headers, "x-amz-decoded-content-length")
            if decoded is None:
                raise errors.S3Error("MissingContentLength",
                                     "You must provide the Content-Length HTTP header.", 411)
        else:
            decoded = raw_length
        return cls(reader, sha, raw_length, decoded, ",".join(encoding_tokens), headers,
                   verify_checksum=verify_checksum)

    @classmethod
    def from_bytes(cls, data: bytes, headers) -> RequestBody:
        """A plain body already read into memory (small XML bodies Sprox must inspect).
        Its checksum was verified when it was first read."""
        import asyncio

        reader = asyncio.StreamReader()
        reader.feed_data(data)
        reader.feed_eof()
        return cls(reader, headers.get("x-amz-content-sha256", ""), len(data), len(data), "",
                   headers, verify_checksum=False)

    def check_declared_size(self) -> None:
        """EntityTooLarge when the body declares more than one upload may hold. Called
        once the request is authenticated (an unsigned one gets its 403 first); a body
        of unknown length is held to the limit as it streams."""
        if self.decoded_length is not None and self.decoded_length > self.max_length:
            raise _too_large(self.decoded_length, self.max_length)

    @property
    def verifies_checksum(self) -> bool:
        """Whether decoded() checks the declared x-amz-checksum-* (not for a
        CompleteMultipartUpload, whose checksum headers describe the object)."""
        return self._verify_checksum

    @property
    def aws_chunked(self) -> bool:
        return self.content_sha256 in STREAMING_MODES or "aws-chunked" in self.content_encoding.split(",")

    @property
    def has_trailer(self) -> bool:
        return self.content_sha256.endswith("-TRAILER")

    def _claim(self) -> None:
        if self._consumed:
            raise RuntimeError("request body consumed twice")
        self._consumed = True

    def expect_signatures(self, verified) -> None:
        """The request's signature (`sigv4.VerifiedRequest`) checked out: a signed
        stream's chunks must now carry signatures chained from it."""
        if self.content_sha256 in (STREAMING_ECDSA, STREAMING_ECDSA_TRAILER):
            # Its chunks are signed with SigV4a, which Sprox cannot check: accepting the
            # stream would accept chunks anyone could have changed.
            raise errors.S3Error("NotImplemented", "SigV4a (ECDSA) streaming uploads are not supported; "
                                 "use STREAMING-AWS4-HMAC-SHA256-PAYLOAD.", 501)
        if self.content_sha256 in STREAMING_HMAC_SIGNED:
            if verified.version != 4:
                # The chunks' signatures chain from a SigV4 seed signature, which a
                # SigV2-signed request does not have: nothing to check them against.
                raise errors.invalid_request(f"{self.content_sha256} needs a request signed with "
                                             "AWS4-HMAC-SHA256.")
            from .sigv4 import ChunkSignatures

            self.chunk_signatures = ChunkSignatures(verified)

    @property
    def payload_sha256(self) -> str | None:
        """The body's SHA-256 as the client declared it (a hex digest in
        x-amz-content-sha256), or None for unsigned, streaming and undeclared bodies."""
        value = self.content_sha256
        if len(value) == 64 and not self.aws_chunked and set(value) <= _HEX_DIGITS:
            return value
        return None

    async def raw(self) -> AsyncIterator[bytes]:
        """The bytes on the wire, unchanged. A declared payload hash is checked as they
        pass, and the last piece is held back until it matches (XAmzContentSHA256Mismatch
        otherwise), so whoever stores or forwards the body never completes a wrong one."""
        self._claim()
        declared = self.payload_sha256
        digest = hashlib.sha256() if declared is not None else None
        remaining = self.raw_length
        received = 0
        held = b""
        while remaining is None or remaining > 0:
            chunk = await self._reader.read(READ_SIZE if remaining is None else min(READ_SIZE, remaining))
            if not chunk:
                break
            if remaining is not None:
                remaining -= len(chunk)
            else:  # no Content-Length (Transfer-Encoding: chunked): bounded as it streams
                received += len(chunk)
                if received > self.max_length:
                    raise _too_large(received, self.max_length)
            if digest is None:
                yield chunk
                continue
            digest.update(chunk)
            if held:
                yield held
            held = chunk
        if remaining:
            raise errors.S3Error("IncompleteBody",
                                 "You did not provide the number of bytes specified by the "
                                 "Content-Length HTTP header", 400)
        if digest is not None:
            computed = digest.hexdigest()
            if computed != declared:
                raise errors.S3Error(
                    "XAmzContentSHA256Mismatch",
                    "The provided 'x-amz-content-sha256' header does not match what was computed.",
                    400, extra={"ClientComputedContentSHA256": declared,
                                "S3ComputedContentSHA256": computed})
            if held:
                yield held

    async def decoded(self) -> AsyncIterator[bytes]:
        """The payload: aws-chunked framing removed, length checked, and the declared
        `x-amz-checksum-*` (in a header, or in a trailer announced by `x-amz-trailer`)
        verified.

        The last piece is held back until the checksum is verified, so a consumer
        that stores or forwards what it is given never completes a body that fails
        verification: it gets `S3Error` (BadDigest) instead of the final bytes."""
        algorithm = self.checksum_algorithm if self._verify_checksum else None
        checksum = checksums.Checksum(algorithm) if algorithm and checksums.supported(algorithm) else None
        decoder = None
        if self.aws_chunked:
            from .chunked import AwsChunkedDecoder

            self._claim()
            signatures = self.chunk_signatures if self.content_sha256 in STREAMING_HMAC_SIGNED else None
            decoder = AwsChunkedDecoder(self._reader, with_trailer=self.has_trailer, signatures=signatures)
            pieces = decoder.__aiter__()
        else:
            pieces = self.raw()
        total = 0
        held = b""
        async for piece in pieces:
            total += len(piece)
            if decoder is not None and self.decoded_length is not None and total > self.decoded_length:
                # Refused before the extra bytes go anywhere: whoever forwards the body
                # with the declared length must never see a whole (truncated) one.
                raise errors.S3Error("IncompleteBody", "The request body is longer than the "
                                     "x-amz-decoded-content-length HTTP header says", 400)
            if checksum is not None:
                checksum.update(piece)
            if held:
                yield held
            held = piece
        if decoder is not None:
            self.trailers = decoder.trailers
            if self.decoded_length is not None and total != self.decoded_length:
                raise errors.S3Error("IncompleteBody",
                                     "You did not provide the number of bytes specified by the "
                                     "x-amz-decoded-content-length HTTP header", 400)
        if checksum is not None:
            declared = self.declared_checksum()
            if declared is None:
                raise errors.invalid_request(f"The x-amz-checksum-{algorithm} trailer announced "
                                             "by x-amz-trailer is missing.")
            if checksum.b64digest() != declared:
                raise errors.S3Error("BadDigest", f"The {algorithm.upper()} you specified did not "
                                     "match the calculated checksum.", 400)
        if held:
            yield held

    @property
    def checksum_algorithm(self) -> str | None:
        """The additional checksum the client declared, if any (e.g. `crc32`)."""
        for name in self._headers.keys():
            algorithm = checksums.algorithm_of(name)
            if algorithm is not None:
                return algorithm
        if self.has_trailer or "x-amz-trailer" in self._headers:
            return checksums.algorithm_of(self._headers.get("x-amz-trailer", "").strip())
        return None

    def declared_checksum(self) -> str | None:
        """The checksum value the client declared (header, or trailer once read)."""
        algorithm = self.checksum_algorithm
        if algorithm is None:
            return None
        name = checksums.header_name(algorithm)
        value = self._headers.get(name) or self.trailers.get(name)
        return value.strip() if value else None

    async def read_all(self, limit: int) -> bytes:
        """The whole payload, for small XML bodies; refuses more than `limit` bytes."""
        parts = []
        size = 0
        async for chunk in self.decoded():
            size += len(chunk)
            if size > limit:
                raise errors.S3Error("MaxMessageLengthExceeded", "Your request was too big.", 400)
            parts.append(chunk)
        return b"".join(parts)


def _too_large(size: int, limit: int) -> errors.S3Error:
    return errors.S3Error("EntityTooLarge", "Your proposed upload exceeds the maximum allowed size", 400,
                          extra={"ProposedSize": str(size), "MaxSizeAllowed": str(limit)})


def _int_header(headers, name: str) -> int | None:
    value = headers.get(name)
    if value is None:
        return None
    number = decimal(value)
    if number is None:
        raise errors.invalid_argument(f"{name} must be a non-negative integer", name, value)
    return number
