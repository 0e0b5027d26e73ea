"""S3's additional checksums (`x-amz-checksum-<algorithm>`): computed while a body
streams, compared with what the client declared in a header or an aws-chunked trailer.

Every algorithm S3 offers is computed here, none depending on an optional package: the
hashes from hashlib, CRC32 from zlib, and CRC32C, CRC64NVME and the xxHash family from
awscrt (AWS's aws-c-checksums, hardware-accelerated; a required dependency)."""

from __future__ import annotations

import base64
import hashlib
import zlib

from awscrt import checksums as _crt

# As S3 names them (lower case, as in the header names), with the digest size in bytes.
DIGEST_SIZES = {
    "crc32": 4, "crc32c": 4, "crc64nvme": 8, "sha1": 20, "sha256": 32, "sha512": 64, "md5": 16,
    "xxhash64": 8, "xxhash3": 8, "xxhash128": 16,
}
ALGORITHMS = tuple(DIGEST_SIZES)
_CRCS = {"crc32": zlib.crc32, "crc32c": _crt.crc32c, "crc64nvme": _crt.crc64nvme}
_XXHASHES = {"xxhash64": _crt.XXHash.new_xxhash64, "xxhash3": _crt.XXHash.new_xxhash3_64,
             "xxhash128": _crt.XXHash.new_xxhash3_128}


class Checksum:
    """A running checksum in S3's encoding (base64 of the big-endian digest)."""

    def __init__(self, algorithm: str) -> None:
        self.algorithm = algorithm
        self._crc_function = _CRCS.get(algorithm)
        self._crc = 0
        if algorithm in _XXHASHES:
            self._hash = _XXHASHES[algorithm]()
        elif self._crc_function is None:
            # MD5 here is an integrity check the client asked for, not a security control.
            self._hash = hashlib.new(algorithm, usedforsecurity=False)
        else:
            self._hash = None

    def update(self, data: bytes) -> None:
        if self._hash is not None:
            self._hash.update(data)
        else:
            self._crc = self._crc_function(data, self._crc)

    def b64digest(self) -> str:
        if self._crc_function is not None:
            raw = self._crc.to_bytes(DIGEST_SIZES[self.algorithm], "big")
        elif self.algorithm in _XXHASHES:
            raw = self._hash.finalize()
        else:
            raw = self._hash.digest()
        return base64.b64encode(raw).decode()


def supported(algorithm: str) -> bool:
    return algorithm in DIGEST_SIZES


def header_name(algorithm: str) -> str:
    return f"x-amz-checksum-{algorithm}"


def algorithm_of(header: str) -> str | None:
    """`x-amz-checksum-crc32` -> `crc32`; None for anything else."""
    name = header.lower()
    if name.startswith("x-amz-checksum-"):
        algorithm = name[len("x-amz-checksum-"):]
        if algorithm in DIGEST_SIZES:
            return algorithm
    return None
