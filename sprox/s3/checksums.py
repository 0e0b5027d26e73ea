"""S3's additional checksums (`x-amz-checksum-<algorithm>`): computed while a body
streams, compared with what the client declared in a header or an aws-chunked trailer."""

from __future__ import annotations

import base64
import hashlib
import zlib
from collections.abc import Callable

try:  # a small C extension; the fastest CRC32C available
    import crc32c as _crc32c_mod

    _crc32c: Callable[[bytes, int], int] | None = lambda data, crc: _crc32c_mod.crc32c(data, crc)
except ImportError:  # pragma: no cover - depends on the environment
    _crc32c = None

try:  # botocore's optional CRT dependency provides CRC64NVME (and CRC32C)
    from awscrt import checksums as _crt  # type: ignore[import-not-found]
except ImportError:
    _crt = None

if _crc32c is None and _crt is not None:  # pragma: no cover
    _crc32c = lambda data, crc: _crt.crc32c(data, crc)  # noqa: E731

ALGORITHMS = ("crc32", "crc32c", "crc64nvme", "sha1", "sha256")


class Checksum:
    """A running checksum in S3's encoding (base64 of the big-endian digest)."""

    def __init__(self, algorithm: str) -> None:
        self.algorithm = algorithm
        self._crc = 0
        self._hash = hashlib.new(algorithm) if algorithm in ("sha1", "sha256") else None

    def update(self, data: bytes) -> None:
        if self._hash is not None:
            self._hash.update(data)
        elif self.algorithm == "crc32":
            self._crc = zlib.crc32(data, self._crc)
        elif self.algorithm == "crc32c":
            assert _crc32c is not None
            self._crc = _crc32c(data, self._crc)
        else:
            self._crc = _crt.crc64nvme(data, self._crc)

    def b64digest(self) -> str:
        if self._hash is not None:
            raw = self._hash.digest()
        else:
            raw = self._crc.to_bytes(8 if self.algorithm == "crc64nvme" else 4, "big")
        return base64.b64encode(raw).decode()


def supported(algorithm: str) -> bool:
    if algorithm == "crc32c":
        return _crc32c is not None
    if algorithm == "crc64nvme":
        return _crt is not None
    return algorithm in ALGORITHMS


def header_name(algorithm: str) -> str:
    return f"x-amz-checksum-{algorithm}"


def algorithm_of(header: str) -> str | None:
    """`x-amz-checksum-crc32` -> `crc32`; None for anything else."""
    name = header.lower()
    if name.startswith("x-amz-checksum-"):
        algorithm = name[len("x-amz-checksum-"):]
        if algorithm in ALGORITHMS:
            return algorithm
    return None
