"""bench/upstream.py, the S3-like upstream of the benchmarks: its GET bodies are paced
per request (as one S3 GET streams, ~80 MB/s), in order and byte for byte.

The pace itself is a schedule (`pace`), checked as numbers; the server is checked for
the bytes it sends while pacing. No test here measures time.
"""

from __future__ import annotations

import asyncio

import aiohttp
from aiohttp import web

from bench.upstream import PACE_CHUNK, Upstream, pace


def test_the_pace_covers_the_body_in_order_each_chunk_at_its_share_of_the_rate() -> None:
    count, rate = 3 * PACE_CHUNK + 1000, 80e6
    chunks = pace(count, rate, PACE_CHUNK)
    assert [at for at, _, _ in chunks] == [0, PACE_CHUNK, 2 * PACE_CHUNK, 3 * PACE_CHUNK]
    assert [size for _, size, _ in chunks] == [PACE_CHUNK] * 3 + [1000]
    assert [due for _, _, due in chunks] == [at / rate for at, _, _ in chunks]
    assert pace(0, rate, PACE_CHUNK) == []


def test_a_paced_get_sends_the_right_bytes_whole_and_ranged(tmp_path) -> None:
    data = bytes(range(256)) * 4096 + b"tail"  # 1 MiB and 4 bytes: several chunks
    (tmp_path / "bucket").mkdir()
    (tmp_path / "bucket" / "object").write_bytes(data)

    async def scenario() -> None:
        runner = web.AppRunner(Upstream(tmp_path, latency=0.0, bandwidth=400e6).app())
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        try:
            async with aiohttp.ClientSession() as session:
                url = f"http://127.0.0.1:{port}/bucket/object"
                async with session.get(url) as response:
                    assert response.status == 200 and await response.read() == data
                async with session.get(url, headers={"Range": "bytes=300000-700003"}) as response:
                    assert response.status == 206 and await response.read() == data[300000:700004]
                async with session.get(url, headers={"Range": "bytes=-4"}) as response:
                    assert response.status == 206 and await response.read() == b"tail"
        finally:
            await runner.cleanup()

    asyncio.run(scenario())
