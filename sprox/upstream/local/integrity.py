"""The integrity checks of a write (PutObject, UploadPart) and the checksum it stores.

Who checks what:

- `RequestBody.decoded()` (``sprox/s3/body.py``) verifies a declared
  ``x-amz-checksum-*`` value, from a header or from the trailer ``x-amz-trailer``
  announces, and fails with BadDigest before handing over the last bytes. The local
  origin does not compute that checksum again: it stores and returns the declared value.
- `ChecksumPlan` does the rest: it validates the checksum headers before the body is
  read, checks Content-MD5 (which RequestBody does not), and computes a checksum only
  where no one else does: when the client names an algorithm without a value
  (``x-amz-sdk-checksum-algorithm``), or declares one for a request without a body.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass

from ...s3 import checksums, errors
from ...s3.body import RequestBody
from .records import StoredChecksum

def _check_checksum_value(algorithm: str, value: str) -> None:
    """InvalidRequest unless `value` is the base64 of a digest of the right size."""
    try:
        raw = base64.b64decode(value, validate=True)
    except ValueError:
        raw = b""
    if len(raw) != checksums.DIGEST_SIZES[algorithm]:
        raise errors.invalid_request(f"Value for x-amz-checksum-{algorithm} header is invalid.")


@dataclass(slots=True)
class ChecksumPlan:
    """Which integrity checks a write's headers ask for, decided before the body."""

    content_md5: bytes | None = None
    algorithm: str | None = None
    header_value: str | None = None  # base64, when declared in a header
    from_trailer: bool = False  # declared in the trailer x-amz-trailer announces

    @classmethod
    def from_request(cls, headers) -> ChecksumPlan:
        plan = cls()
        md5 = headers.get("Content-MD5")
        if md5 is not None:
            try:
                plan.content_md5 = base64.b64decode(md5, validate=True)
            except ValueError:
                plan.content_md5 = b""
            if len(plan.content_md5) != 16:
                raise errors.S3Error("InvalidDigest", "The Content-MD5 you specified was invalid.", 400)

        present = [alg for alg in checksums.ALGORITHMS if checksums.header_name(alg) in headers]
        trailer = headers.get("x-amz-trailer", "").strip().lower()
        if trailer:
            algorithm = trailer.removeprefix("x-amz-checksum-")
            if not trailer.startswith("x-amz-checksum-") or algorithm not in checksums.ALGORITHMS:
                raise errors.invalid_request("The value specified in the x-amz-trailer header is not supported")
            present.append(algorithm)
            plan.from_trailer = True
        if len(present) > 1:
            raise errors.invalid_request(
                "Expecting a single x-amz-checksum- header. Multiple checksum Types are not allowed.")
        if present:
            plan.algorithm = present[0]
            if not plan.from_trailer:
                plan.header_value = headers[checksums.header_name(plan.algorithm)]
                _check_checksum_value(plan.algorithm, plan.header_value)
            return plan
        declared = headers.get("x-amz-sdk-checksum-algorithm") or headers.get("x-amz-checksum-algorithm")
        if declared:
            if declared.lower() not in checksums.ALGORITHMS:
                valid = ", ".join(a.upper() for a in checksums.ALGORITHMS)
                raise errors.invalid_request("Checksum algorithm provided is unsupported. Please try again "
                                             f"with any of the valid types: [{valid}]")
            plan.algorithm = declared.lower()  # computed and returned, nothing to verify
        return plan

    @property
    def declared(self) -> bool:
        """Whether the client sends a checksum value (in a header or a trailer)."""
        return self.header_value is not None or self.from_trailer

    def hasher(self, body: RequestBody | None) -> checksums.Checksum | None:
        """A running checksum for Sprox to compute itself, None when there is nothing to
        compute: no algorithm, one Sprox cannot compute, or a declared value that `body`
        verifies as it is read."""
        if self.algorithm is None or not checksums.supported(self.algorithm):
            return None
        if self.declared and body is not None:
            return None
        return checksums.Checksum(self.algorithm)

    def verify(self, md5: bytes, body: RequestBody | None, computed: str | None) -> StoredChecksum | None:
        """Check the payload's digests once it is read in full (`md5` its MD5, `computed`
        the value of `hasher`, if there was one); the object's checksum to store, if any."""
        if self.content_md5 is not None and self.content_md5 != md5:
            raise errors.S3Error("BadDigest", "The Content-MD5 you specified did not match what we received.", 400)
        if self.algorithm is None:
            return None
        if computed is not None:
            # No body declared a value for RequestBody to verify: compare here.
            if self.header_value is not None and base64.b64decode(self.header_value) != base64.b64decode(computed):
                raise errors.S3Error(
                    "BadDigest",
                    f"The {self.algorithm.upper()} you specified did not match the calculated checksum.", 400)
            return self.algorithm, computed
        # Verified by the body already, or an algorithm Sprox cannot compute: either
        # way the client's value is the one to keep.
        value = body.declared_checksum() if body is not None else self.header_value
        if value is None:
            return None
        if self.from_trailer:  # header values were checked before the body was read
            _check_checksum_value(self.algorithm, value)
        return self.algorithm, value
