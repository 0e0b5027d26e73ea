"""Sprox's configuration: one `Config`, from flags > `SPROX_*` env > TOML file > defaults.

Every setting is declared once in `SETTINGS`; the CLI flags, the environment variable
names and the config-file keys are all derived from that table, so they cannot drift
apart. Bad values raise `ConfigError` naming the setting, where it came from, and why.
"""

from __future__ import annotations

import fnmatch
import ipaddress
import os
import socket
import sqlite3
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from .eventloop import EVENT_LOOPS
from .s3.numbers import decimal

LOG_LEVELS = ("debug", "info", "warning", "error")
AUTH_MODES = ("none", "sigv4")
IO_BACKENDS = ("auto", "uring", "threads")
ADDRESSING = ("auto", "path", "virtual")


class ConfigError(ValueError):
    """A setting has a bad value. `str()` is the message a user should see."""

    def __init__(self, setting: str, message: str) -> None:
        super().__init__(f"{setting}: {message}")
        self.setting = setting


@dataclass(frozen=True)
class AccessKey:
    """A key clients may sign with, and what it may do: `buckets` are bucket names or
    shell-style patterns (`logs-*`), None for every bucket; `write` allows requests
    other than GET and HEAD."""

    access_key: str
    secret_key: str
    buckets: tuple[str, ...] | None = None
    write: bool = True

    def may_use(self, bucket: str) -> bool:
        return self.buckets is None or any(fnmatch.fnmatchcase(bucket, p) for p in self.buckets)


def http_url(host: str, port: int) -> str:
    """http://host:port, an IPv6 address in brackets."""
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(base) / "sprox"


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "sprox"


GiB = 1024**3
MiB = 1024**2
KiB = 1024
MIN_BLOCK_SIZE = 64 * 1024
MAX_BLOCK_SIZE = 64 * MiB
PREFETCH_MODES = ("parquet", "off")


@dataclass(frozen=True)
class Config:
    """A validated configuration. Build one with keyword arguments (validated on
    construction) or with `load()` from command-line values, environment and file."""

    host: str = "127.0.0.1"
    port: int = 9000
    max_connections: int = 4096
    upstream: str | None = None
    upstream_region: str | None = None
    upstream_addressing: str = "auto"
    upstream_timeout: float = 60.0
    origin_dir: Path | None = None
    domain: str | None = None
    auth: str | None = None  # None: decided from keys and host (see `auth_mode`)
    access_key: str | None = None
    secret_key: str | None = None
    keys: tuple[AccessKey, ...] = ()
    admin_host: str = "127.0.0.1"
    admin_port: int | None = None  # None: the admin routes are on the data port
    log_level: str = "info"
    config: Path | None = None
    cache_dir: Path | None = None  # None: default_cache_dir()
    cache_size: int = 10 * GiB
    block_size: int = 128 * KiB  # the fill unit: a miss fetches what is read, rounded to blocks
    ttl: float = 60.0
    list_ttl: float = 0.0
    no_cache: bool = False
    io_backend: str = "auto"
    event_loop: str = "auto"
    io_uring: bool = False
    direct_io: bool = False
    prefetch: str = "parquet"
    peers: tuple = ()  # of peers.PeerAddress: the other nodes of a tier, told about writes

    def __post_init__(self) -> None:
        # Embedding code may pass plain strings for paths (Sprox(origin_dir="/data")).
        for name in ("origin_dir", "cache_dir", "config"):
            value = getattr(self, name)
            if isinstance(value, str):
                object.__setattr__(self, name, Path(value).expanduser())
        if isinstance(self.peers, str):
            try:
                object.__setattr__(self, "peers", _parse_peers(self.peers))
            except ValueError as exc:
                raise ConfigError("--peers", str(exc)) from None
        _validate(self)

    # Derived views: computed, never stored twice.

    @property
    def access_keys(self) -> dict[str, str]:
        """Every key clients may sign with: access key id -> secret."""
        return {k.access_key: k.secret_key for k in self.key_rights.values()}

    @property
    def key_rights(self) -> dict[str, AccessKey]:
        """Every key clients may sign with, by access key id. --access-key may use
        every bucket and write."""
        merged = {k.access_key: k for k in self.keys}
        if self.access_key:
            merged[self.access_key] = AccessKey(self.access_key, self.secret_key or "")
        return merged

    @property
    def admin_key(self) -> AccessKey | None:
        """A key the data port's admin routes accept (every bucket, and write), with
        which `sprox cache stats|purge` sign; None without such a key."""
        return next((k for k in self.key_rights.values() if k.buckets is None and k.write), None)

    @property
    def auth_mode(self) -> str:
        if self.auth:
            return self.auth
        return "sigv4" if self.access_keys else "none"

    @property
    def local_origin_dir(self) -> Path | None:
        """The directory served as buckets, or None when fronting an S3 upstream."""
        if self.upstream:
            return None
        return self.origin_dir or default_data_dir() / "origin"

    @property
    def cache_path(self) -> Path | None:
        """Where cached blocks and the index live, or None with --no-cache."""
        if self.no_cache:
            return None
        return self.cache_dir or default_cache_dir()

    @property
    def cache_io(self) -> str:
        """How cache fills are written and cold blocks read: auto, uring or threads."""
        return "uring" if self.io_uring else self.io_backend

    @property
    def logs_path(self) -> Path:
        """Where the access log's Parquet files go (kept even with --no-cache)."""
        return (self.cache_dir or default_cache_dir()) / "logs"

    @property
    def endpoint(self) -> str:
        return http_url(self.host, self.port)

    def with_port(self, port: int) -> Config:
        return replace(self, port=port)


# -- the settings table ---------------------------------------------------------------


@dataclass(frozen=True)
class Setting:
    name: str  # Config field name; flag is --name-with-dashes, env SPROX_NAME
    help: str
    parse: Callable[[str], Any] = str
    choices: tuple[str, ...] | None = None
    metavar: str | None = None
    secret: bool = False  # never echoed in messages
    file_only: bool = False  # structured: config file only
    switch: bool = False  # a flag without a value (--no-cache); env and file take true/false

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        return "SPROX_" + self.name.upper()


def _parse_int(text: str) -> int:
    text = text.strip()
    number = decimal(text.removeprefix("-"))
    if number is None:
        raise ValueError(f"{text!r} is not a whole number")
    return -number if text.startswith("-") else number


def _parse_float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a number") from None


def _parse_path(text: str) -> Path:
    return Path(text).expanduser()


_SIZE_UNITS = {
    "": 1, "b": 1,
    "k": 1024, "kib": 1024, "kb": 1000,
    "m": 1024**2, "mib": 1024**2, "mb": 1000**2,
    "g": 1024**3, "gib": 1024**3, "gb": 1000**3,
    "t": 1024**4, "tib": 1024**4, "tb": 1000**4,
}


def parse_size(text: str) -> int:
    """`50GiB`, `4MiB`, `1.5TB`, `4096` -> bytes. Bare K/M/G/T are binary units."""
    raw = text.strip().replace("_", "")
    number = raw.rstrip("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ").strip()
    unit = raw[len(number):].strip().lower()
    if unit not in _SIZE_UNITS or not number:
        raise ValueError(f"{text!r} is not a size like 4MiB, 50GiB or 1TB")
    try:
        value = float(number)
    except ValueError:
        raise ValueError(f"{text!r} is not a size like 4MiB, 50GiB or 1TB") from None
    if value < 0 or value != value or value == float("inf"):
        raise ValueError(f"{text!r} must be a non-negative size")
    return int(value * _SIZE_UNITS[unit])


def _parse_peers(text: str) -> tuple:
    from .peers import parse_peers

    return parse_peers(text)


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{text!r} is not true or false")


SETTINGS: tuple[Setting, ...] = (
    Setting("host", "address to listen on (default 127.0.0.1)", metavar="ADDR"),
    Setting("port", "port to listen on; 0 picks a free one (default 9000)", _parse_int, metavar="PORT"),
    Setting("max_connections", "client connections served at once; one more is answered 503 SlowDown "
            "and closed, so clients back off and retry (default 4096)", _parse_int, metavar="N"),
    Setting("upstream", "S3 endpoint to front, e.g. https://s3.us-east-1.amazonaws.com "
            "(credentials from the standard AWS chain)", metavar="URL"),
    Setting("upstream_region", "region to sign upstream requests for (default: AWS config, "
            "else us-east-1)", metavar="REGION"),
    Setting("upstream_addressing", "bucket addressing towards the upstream: auto (virtual-hosted "
            "for AWS, path-style otherwise), path or virtual", choices=ADDRESSING),
    Setting("upstream_timeout", "seconds to wait for the upstream to connect or send data "
            "(default 60)", _parse_float, metavar="SECONDS"),
    Setting("origin_dir", "serve this directory as buckets (one subdirectory per bucket) "
            "instead of an S3 upstream", _parse_path, metavar="DIR"),
    Setting("domain", "base domain for virtual-hosted requests (bucket.DOMAIN)", metavar="DOMAIN"),
    Setting("auth", "how clients authenticate: none (loopback only) or sigv4 (requests signed with "
            "SigV4 or SigV2, in the header or as presigned URLs; default: sigv4 when keys are "
            "configured, else none)", choices=AUTH_MODES),
    Setting("access_key", "access key id clients sign with (sigv4)", metavar="KEY"),
    Setting("secret_key", "secret key for --access-key", metavar="SECRET", secret=True),
    Setting("keys", "several access keys ([[keys]] tables with access_key, secret_key, and "
            "optionally buckets (names or patterns; default every bucket) and write (default true))",
            file_only=True),
    Setting("cache_dir", "where cached blocks and the cache index live (default: "
            "$XDG_CACHE_HOME/sprox, else ~/.cache/sprox)", _parse_path, metavar="DIR"),
    Setting("cache_size", "disk budget for cached bytes, e.g. 50GiB (default 10GiB)", parse_size,
            metavar="SIZE"),
    Setting("block_size", "cache block size, 64KiB to 64MiB, a multiple of 4KiB (default 128KiB; a cache "
            "directory built with another size keeps it unless this is given)", parse_size, metavar="SIZE"),
    Setting("ttl", "seconds an object's cached record is trusted before it is revalidated "
            "with the upstream (default 60)", _parse_float, metavar="SECONDS"),
    Setting("list_ttl", "seconds a listing may be served from memory; 0 turns listing caching off "
            "(default 0: S3 listings are strongly consistent)", _parse_float, metavar="SECONDS"),
    Setting("no_cache", "pure pass-through: cache nothing", _parse_bool, switch=True),
    Setting("io_backend", "how cache fills are written and cold blocks read: auto (io_uring when the "
            "kernel and the build allow it, else a thread pool), uring, or threads", choices=IO_BACKENDS),
    Setting("io_uring", "same as --io-backend uring", _parse_bool, switch=True),
    Setting("event_loop", "the event loop: auto (uvloop when installed, else the standard loop; the "
            "default), asyncio (the standard loop) or uvloop (an error if it is not installed)",
            choices=EVENT_LOOPS),
    Setting("prefetch", "read ahead of Parquet scans: parquet (the default: once a .parquet object's "
            "footer is known, a read of a column chunk fetches the same column's next row groups in the "
            "background) or off", choices=PREFETCH_MODES),
    Setting("direct_io", "write cache fills and read cold blocks with O_DIRECT (aligned buffers), "
            "so filling the cache does not evict hot bytes from the page cache", _parse_bool, switch=True),
    Setting("admin_port", "serve the admin routes (/_sprox/health, cache stats and purge, metrics) "
            "unsigned on this port, and not on the data port; 0 picks a free one (default: on the data "
            "port, where with keys configured they answer only requests signed by a key that may use "
            "every bucket)", _parse_int, metavar="PORT"),
    Setting("peers", "the other nodes of a tier, told about every write before it is answered: "
            "host:port of each one's admin routes, comma-separated; a name that resolves to several "
            "addresses (a Kubernetes headless Service) means each of them", _parse_peers, metavar="HOST:PORT,..."),
    Setting("admin_host", "address for --admin-port (default 127.0.0.1)", metavar="ADDR"),
    Setting("log_level", "log verbosity", choices=LOG_LEVELS),
    Setting("config", "TOML configuration file", _parse_path, metavar="FILE"),
)
SETTINGS_BY_NAME = {s.name: s for s in SETTINGS}


def _convert(setting: Setting, raw: Any, source: str) -> Any:
    where = {"flag": setting.flag, "env": setting.env, "file": setting.name}[source]
    shown = "***" if setting.secret else repr(raw)
    if setting.name == "keys":
        return _convert_keys(raw, where)
    if setting.name == "peers" and source == "file" and isinstance(raw, list) \
            and all(isinstance(item, str) for item in raw):
        raw = ",".join(raw)  # peers = ["a:9000", "b:9000"] as well as "a:9000,b:9000"
    if source == "file" and not isinstance(raw, str):
        # TOML gives typed values; check the type rather than re-parsing text.
        if setting.switch and isinstance(raw, bool):
            return raw
        if setting.parse in (_parse_int, parse_size) and isinstance(raw, int) and not isinstance(raw, bool):
            return raw
        if setting.parse is _parse_float and isinstance(raw, (int, float)) and not isinstance(raw, bool):
            return float(raw)
        raise ConfigError(where, f"expected a {'number' if setting.parse is not str else 'string'}, got {shown}")
    try:
        value = setting.parse(raw)
    except ValueError as exc:
        raise ConfigError(where, str(exc) if not setting.secret else "invalid value") from None
    if setting.choices and value not in setting.choices:
        raise ConfigError(where, f"{shown} is not one of {', '.join(setting.choices)}")
    return value


def _convert_keys(raw: Any, where: str) -> tuple[AccessKey, ...]:
    if not isinstance(raw, list):
        raise ConfigError(where, "expected a list of [[keys]] tables")
    keys = []
    fields = {"access_key", "secret_key", "buckets", "write"}
    for i, item in enumerate(raw):
        here = f"{where}[{i}]"
        if not isinstance(item, dict) or not isinstance(item.get("access_key"), str) or \
                not isinstance(item.get("secret_key"), str) or not item["access_key"]:
            raise ConfigError(here, "needs the string fields access_key and secret_key")
        unknown = set(item) - fields
        if unknown:
            raise ConfigError(f"{here}.{sorted(unknown)[0]}", f"unknown field; a key has {', '.join(sorted(fields))}")
        buckets = item.get("buckets")
        if buckets is not None and (not isinstance(buckets, list) or not buckets or
                                    not all(isinstance(b, str) and b for b in buckets)):
            raise ConfigError(f"{here}.buckets", "expected a non-empty list of bucket names or patterns "
                              '(["*"] for every bucket)')
        write = item.get("write", True)
        if not isinstance(write, bool):
            raise ConfigError(f"{here}.write", f"{write!r} is not true or false")
        keys.append(AccessKey(item["access_key"], item["secret_key"],
                              None if buckets is None or "*" in buckets else tuple(buckets), write))
    names = [k.access_key for k in keys]
    duplicate = next((n for n in names if names.count(n) > 1), None)
    if duplicate is not None:
        raise ConfigError(where, f"access key {duplicate!r} is configured twice")
    return tuple(keys)


def read_config_file(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError("--config", f"{str(path)!r} does not exist") from None
    except OSError as exc:
        raise ConfigError("--config", f"cannot read {str(path)!r}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("--config", f"{str(path)!r} is not valid TOML: {exc}") from None
    # A [sprox] table is allowed so the file can be shared with other tools.
    if isinstance(data.get("sprox"), dict):
        data = data["sprox"]
    values = {}
    for name, raw in data.items():
        key = name.replace("-", "_")
        if key not in SETTINGS_BY_NAME or key == "config":
            raise ConfigError(f"{path}: {name}", "unknown setting")
        values[key] = _convert(SETTINGS_BY_NAME[key], raw, "file")
    return values


def load(flags: Mapping[str, Any], environ: Mapping[str, str] | None = None) -> Config:
    """Build a Config. `flags` maps setting names to raw strings (None = not given)."""
    environ = os.environ if environ is None else environ
    from_flags = {n: _convert(SETTINGS_BY_NAME[n], v, "flag") for n, v in flags.items() if v is not None}
    from_env = {}
    for setting in SETTINGS:
        if not setting.file_only and setting.env in environ and environ[setting.env] != "":
            from_env[setting.name] = _convert(setting, environ[setting.env], "env")
    config_path = from_flags.get("config") or from_env.get("config")
    from_file = read_config_file(config_path) if config_path else {}
    merged = {**from_file, **from_env, **from_flags}
    if "block_size" not in merged and not merged.get("no_cache"):
        # A cache directory keeps the block size it was built with unless --block-size
        # says otherwise: a new default must not drop the blocks of a cache already there.
        recorded = _recorded_block_size(Path(merged.get("cache_dir") or default_cache_dir()))
        if recorded is not None:
            merged["block_size"] = recorded
    return Config(**merged)


def _recorded_block_size(cache_dir: Path) -> int | None:
    from .cache.admin import recorded_block_size

    try:
        size = recorded_block_size(cache_dir)
    except sqlite3.Error:
        return None  # an unreadable index is the cache's to report when it opens
    if size is None or not MIN_BLOCK_SIZE <= size <= MAX_BLOCK_SIZE or size % 4096:
        return None
    return size


# -- validation ------------------------------------------------------------------------


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _validate(c: Config) -> None:
    if not isinstance(c.port, int) or not 0 <= c.port <= 65535:
        raise ConfigError("--port", f"{c.port!r} is not a port number (0-65535)")
    if not isinstance(c.max_connections, int) or isinstance(c.max_connections, bool) or c.max_connections < 1:
        raise ConfigError("--max-connections", f"{c.max_connections!r} is not a positive whole number")
    if not c.host:
        raise ConfigError("--host", "must not be empty")
    if not c.admin_host:
        raise ConfigError("--admin-host", "must not be empty (an empty host would listen on every address)")
    if c.access_key and any(k.access_key == c.access_key for k in c.keys):
        # Which one would win is a surprise either way, and one of them may be the
        # restricted key the operator meant: refuse rather than pick.
        raise ConfigError("--access-key", f"{c.access_key!r} is also a [[keys]] entry: configure it once")
    if not is_loopback(c.host):
        try:
            socket.getaddrinfo(c.host, None, flags=socket.AI_NUMERICHOST)
        except socket.gaierror:
            # A name is allowed, but say which setting when it is plainly not one.
            if any(ch in c.host for ch in "/ @"):
                raise ConfigError("--host", f"{c.host!r} is not an address or host name") from None
    if c.upstream is not None:
        parts = urlsplit(c.upstream)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError("--upstream", f"{c.upstream!r} is not an http(s) URL like https://s3.amazonaws.com")
        if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username:
            raise ConfigError("--upstream", f"{c.upstream!r} must be a bare endpoint URL (no path, query or user)")
        try:
            parts.port
        except ValueError:
            raise ConfigError("--upstream", f"{c.upstream!r} has an invalid port") from None
        if c.origin_dir is not None:
            raise ConfigError("--origin-dir", "cannot be combined with --upstream: choose one origin")
    if c.upstream_addressing not in ADDRESSING:
        raise ConfigError("--upstream-addressing", f"{c.upstream_addressing!r} is not one of {', '.join(ADDRESSING)}")
    if not (c.upstream_timeout > 0):
        raise ConfigError("--upstream-timeout", f"{c.upstream_timeout!r} must be greater than 0")
    if c.origin_dir is not None and c.origin_dir.exists() and not c.origin_dir.is_dir():
        raise ConfigError("--origin-dir", f"{str(c.origin_dir)!r} exists and is not a directory")
    if c.log_level not in LOG_LEVELS:
        raise ConfigError("--log-level", f"{c.log_level!r} is not one of {', '.join(LOG_LEVELS)}")
    if c.auth is not None and c.auth not in AUTH_MODES:
        raise ConfigError("--auth", f"{c.auth!r} is not one of {', '.join(AUTH_MODES)}")
    if bool(c.access_key) != bool(c.secret_key):
        missing = "--secret-key" if c.access_key else "--access-key"
        raise ConfigError(missing, "--access-key and --secret-key must be given together")
    if c.auth_mode == "sigv4" and not c.access_keys:
        raise ConfigError("--auth", "sigv4 needs at least one key (--access-key/--secret-key or [[keys]])")
    if c.auth_mode == "none" and not is_loopback(c.host):
        raise ConfigError(
            "--auth",
            f"none is only allowed on a loopback address, and --host is {c.host!r}: "
            "configure keys (--access-key/--secret-key) to listen beyond this machine",
        )
    if c.domain is not None and (not c.domain or "/" in c.domain or ":" in c.domain):
        raise ConfigError("--domain", f"{c.domain!r} is not a domain name")
    if not MIN_BLOCK_SIZE <= c.block_size <= MAX_BLOCK_SIZE or c.block_size % 4096:
        raise ConfigError("--block-size", f"{c.block_size} bytes is not a multiple of 4KiB "
                          "between 64KiB and 64MiB")
    if c.cache_size < c.block_size and not c.no_cache:
        raise ConfigError("--cache-size", f"{c.cache_size} bytes is smaller than one block ({c.block_size})")
    if c.event_loop not in EVENT_LOOPS:
        raise ConfigError("--event-loop", f"{c.event_loop!r} is not one of {', '.join(EVENT_LOOPS)}")
    if c.prefetch not in PREFETCH_MODES:
        raise ConfigError("--prefetch", f"{c.prefetch!r} is not one of {', '.join(PREFETCH_MODES)}")
    if c.io_backend not in IO_BACKENDS:
        raise ConfigError("--io-backend", f"{c.io_backend!r} is not one of {', '.join(IO_BACKENDS)}")
    if c.io_uring and c.io_backend not in ("auto", "uring"):
        raise ConfigError("--io-uring", f"contradicts --io-backend {c.io_backend}")
    if c.admin_port is not None:
        if not 0 <= c.admin_port <= 65535:
            raise ConfigError("--admin-port", f"{c.admin_port} is not a port number (0 to 65535)")
        if c.admin_port == c.port and c.port != 0:
            raise ConfigError("--admin-port", f"{c.admin_port} is the data port (--port): use another one")
    if not c.ttl >= 0:
        raise ConfigError("--ttl", f"{c.ttl!r} must be 0 or more seconds")
    if not c.list_ttl >= 0:
        raise ConfigError("--list-ttl", f"{c.list_ttl!r} must be 0 or more seconds")
    if c.cache_dir is not None and c.cache_dir.exists() and not c.cache_dir.is_dir():
        raise ConfigError("--cache-dir", f"{str(c.cache_dir)!r} exists and is not a directory")
    if c.peers and c.auth_mode == "sigv4" and c.admin_key is None:
        raise ConfigError("--peers", "needs a key that may use every bucket and write (--access-key, or a "
                          "[[keys]] entry without buckets): nodes sign their calls to each other with it")


__all__ = ["AccessKey", "Config", "ConfigError", "SETTINGS", "load", "is_loopback",
           "default_data_dir", "default_cache_dir", "parse_size"]
