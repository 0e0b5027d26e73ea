"""Bodies stream both ways: a large PUT and GET through Sprox never sit in its memory.

Sprox's peak resident memory (VmHWM) is read from /proc after moving an object several
times larger than the bound."""

from __future__ import annotations

import hashlib
import http.client
import uuid
from pathlib import Path

import pytest

from tests.functional.test_passthrough import client_for

SIZE = 384 * 1024 * 1024
PIECE = 1024 * 1024
PEAK_BOUND = 160 * 1024 * 1024  # Python + aiohttp + botocore at rest is ~60 MiB


def peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def pieces():
    block = hashlib.sha256(b"stream").digest() * (PIECE // 32)
    for i in range(SIZE // PIECE):
        yield i.to_bytes(8, "big") + block[8:]


@pytest.mark.slow
@pytest.mark.parametrize("framing", ["content-length", "chunked"])
@pytest.mark.parametrize("origin", ["local", "seaweedfs"])
def test_large_put_and_get_stream_through_bounded_memory(origin, framing, request):
    """A chunked PUT (no Content-Length, `curl -T -`) streams as one with a length does."""
    sprox = request.getfixturevalue("sprox_local" if origin == "local" else "sprox_seaweed")
    bucket = f"big-{uuid.uuid4().hex[:10]}"
    client_for(sprox.endpoint).create_bucket(Bucket=bucket)
    host, port = sprox.endpoint.removeprefix("http://").rsplit(":", 1)

    expected = hashlib.sha256()
    conn = http.client.HTTPConnection(host, int(port), timeout=120)
    conn.putrequest("PUT", f"/{bucket}/large.bin")
    if framing == "chunked":
        conn.putheader("Transfer-Encoding", "chunked")
    else:
        conn.putheader("Content-Length", str(SIZE))
    conn.endheaders()
    for piece in pieces():
        expected.update(piece)
        conn.send(b"%x\r\n%s\r\n" % (len(piece), piece) if framing == "chunked" else piece)
    if framing == "chunked":
        conn.send(b"0\r\n\r\n")
    response = conn.getresponse()
    assert response.status == 200, response.read()
    response.read()

    conn.request("GET", f"/{bucket}/large.bin")
    response = conn.getresponse()
    assert response.status == 200
    got, total = hashlib.sha256(), 0
    while chunk := response.read(PIECE):
        got.update(chunk)
        total += len(chunk)
    conn.close()
    assert total == SIZE and got.hexdigest() == expected.hexdigest()
    assert peak_rss(sprox.sprox.pid) < PEAK_BOUND
