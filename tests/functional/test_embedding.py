"""The public embedding API: Sprox in-process, as an async context manager and on a
background thread."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from sprox import Config, ConfigError, Sprox, run_in_thread
from tests.functional.test_passthrough import client_for


def test_run_in_thread_serves_s3(tmp_path):
    with run_in_thread(origin_dir=tmp_path / "origin") as sprox:
        s3 = client_for(sprox.endpoint)
        s3.create_bucket(Bucket="embedded")
        s3.put_object(Bucket="embedded", Key="k", Body=b"value")
        assert s3.get_object(Bucket="embedded", Key="k")["Body"].read() == b"value"
    assert (tmp_path / "origin" / "embedded" / "k").read_bytes() == b"value"


def test_async_context_manager(tmp_path):
    async def main():
        async with Sprox(Config(origin_dir=tmp_path, port=0)) as sprox:
            async with aiohttp.ClientSession() as session:
                async with session.get(f"{sprox.endpoint}/_sprox/health") as response:
                    assert response.status == 200
                    assert (await response.json())["status"] == "ok"
                async with session.put(f"{sprox.endpoint}/bucket-a") as response:
                    assert response.status == 200
                async with session.get(f"{sprox.endpoint}/") as response:
                    assert b"<Name>bucket-a</Name>" in await response.read()

    asyncio.run(main())


def test_bad_settings_raise_config_error():
    with pytest.raises(ConfigError, match="--port"):
        Sprox(port=-5)


def test_port_in_use_is_reported(tmp_path):
    with run_in_thread(origin_dir=tmp_path, cache_dir=tmp_path / "c1") as first:
        with pytest.raises(OSError):
            with run_in_thread(origin_dir=tmp_path, cache_dir=tmp_path / "c2", port=first.port):
                pass


def test_one_sprox_per_cache_directory(tmp_path):
    with run_in_thread(origin_dir=tmp_path, cache_dir=tmp_path / "cache"):
        with pytest.raises(ConfigError, match="--cache-dir"):
            with run_in_thread(origin_dir=tmp_path, cache_dir=tmp_path / "cache"):
                pass
