"""A client's side of signed streaming uploads (STREAMING-AWS4-HMAC-SHA256-PAYLOAD and
its -TRAILER form), written from AWS's "Transferring Payload in Multiple Chunks" and
"Signature calculations for trailing headers" pages, for tests. botocore has no chunk
signer; this one is checked against the example in AWS's documentation
(tests/unit/test_chunk_signatures.py) before tests trust it."""

from __future__ import annotations

import hashlib
import hmac

EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()


def signing_key(secret: str, date: str, region: str) -> bytes:
    key = ("AWS4" + secret).encode()
    for part in (date, region, "s3", "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    return key


def frame_signed(payload: bytes, chunk_size: int, *, key: bytes, timestamp: str, scope: str,
                 seed_signature: str, trailers: dict[str, str] | None = None) -> bytes:
    """`payload` framed as aws-chunked with chained chunk signatures; with `trailers`,
    followed by them and their x-amz-trailer-signature."""
    previous = seed_signature
    out = []

    def sign(kind: str, last: str) -> str:
        to_sign = f"AWS4-HMAC-SHA256-{kind}\n{timestamp}\n{scope}\n{previous}\n{last}"
        return hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()

    pieces = [payload[i:i + chunk_size] for i in range(0, len(payload), chunk_size)] + [b""]
    for piece in pieces:
        previous = sign("PAYLOAD", f"{EMPTY_SHA256}\n{hashlib.sha256(piece).hexdigest()}")
        out.append(b"%x;chunk-signature=%s\r\n" % (len(piece), previous.encode()))
        if piece:
            out.append(piece + b"\r\n")
    if trailers is None:
        out.append(b"\r\n")
        return b"".join(out)
    canonical = "".join(f"{name}:{value}\n" for name, value in trailers.items())
    previous = sign("TRAILER", hashlib.sha256(canonical.encode()).hexdigest())
    for name, value in trailers.items():
        out.append(f"{name}:{value}\r\n".encode())
    out.append(f"x-amz-trailer-signature:{previous}\r\n\r\n".encode())
    return b"".join(out)
