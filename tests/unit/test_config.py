"""Configuration: precedence flags > env > file, and every bad value named clearly."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from sprox.config import Config, ConfigError, load


def test_defaults_are_a_loopback_local_origin_without_auth():
    c = load({}, environ={})
    assert (c.host, c.port, c.auth_mode) == ("127.0.0.1", 9000, "none")
    assert c.upstream is None and c.local_origin_dir is not None


def test_precedence_flags_over_env_over_file(tmp_path: Path):
    cfg = tmp_path / "sprox.toml"
    cfg.write_text('port = 7000\nlog_level = "debug"\nupstream_region = "eu-west-1"\n')
    env = {"SPROX_CONFIG": str(cfg), "SPROX_PORT": "8000", "SPROX_LOG_LEVEL": "warning"}
    c = load({"port": "9100"}, environ=env)
    assert c.port == 9100  # flag beats env and file
    assert c.log_level == "warning"  # env beats file
    assert c.upstream_region == "eu-west-1"  # file beats default


def test_several_keys_from_file_turn_on_sigv4(tmp_path: Path):
    cfg = tmp_path / "sprox.toml"
    cfg.write_text('[[keys]]\naccess_key = "a1"\nsecret_key = "s1"\n[[keys]]\naccess_key = "a2"\nsecret_key = "s2"\n')
    c = load({"config": str(cfg)}, environ={})
    assert c.access_keys == {"a1": "s1", "a2": "s2"} and c.auth_mode == "sigv4"


def test_keys_carry_their_buckets_and_write_right(tmp_path: Path):
    cfg = tmp_path / "sprox.toml"
    cfg.write_text('[[keys]]\naccess_key = "r"\nsecret_key = "s"\nbuckets = ["data", "logs-*"]\nwrite = false\n'
                   '[[keys]]\naccess_key = "w"\nsecret_key = "s"\nbuckets = ["*"]\n')
    c = load({"config": str(cfg), "access_key": "flag", "secret_key": "fs"}, environ={})
    reader, writer, flag = c.key_rights["r"], c.key_rights["w"], c.key_rights["flag"]
    assert (reader.buckets, reader.write) == (("data", "logs-*"), False)
    assert reader.may_use("data") and reader.may_use("logs-2024") and not reader.may_use("database")
    assert (writer.buckets, writer.write) == (None, True) and writer.may_use("anything")
    assert (flag.buckets, flag.write) == (None, True)  # --access-key may do everything


@pytest.mark.parametrize("table,named", [
    ('buckets = "data"', "keys[0].buckets"),
    ("buckets = []", "keys[0].buckets"),
    ('write = "no"', "keys[0].write"),
    ('colour = "blue"', "keys[0].colour"),
])
def test_bad_key_tables_name_the_field(tmp_path: Path, table: str, named: str):
    cfg = tmp_path / "sprox.toml"
    cfg.write_text(f'[[keys]]\naccess_key = "a"\nsecret_key = "s"\n{table}\n')
    with pytest.raises(ConfigError, match=named.replace("[", r"\[").replace("]", r"\]")):
        load({"config": str(cfg)}, environ={})


def test_a_key_configured_twice_is_refused(tmp_path: Path):
    cfg = tmp_path / "sprox.toml"
    cfg.write_text('[[keys]]\naccess_key = "a"\nsecret_key = "s"\n' * 2)
    with pytest.raises(ConfigError, match="configured twice"):
        load({"config": str(cfg)}, environ={})


@pytest.mark.parametrize("flags", [{"admin_port": "70000"}, {"admin_port": "x"},
                                   {"admin_port": "9000", "port": "9000"}])
def test_bad_admin_ports_are_named(flags):
    with pytest.raises(ConfigError, match="--admin-port"):
        load(flags, environ={})


BAD = [
    # (flags, env, setting named in the message)
    ({"port": "abc"}, {}, "--port"),
    ({"port": "70000"}, {}, "--port"),
    ({}, {"SPROX_PORT": "-1"}, "--port"),
    ({"upstream": "ftp://x"}, {}, "--upstream"),
    ({"upstream": "http://host/path"}, {}, "--upstream"),
    ({"upstream": "http://h", "origin_dir": "/tmp"}, {}, "--origin-dir"),
    ({"log_level": "loud"}, {}, "--log-level"),
    ({"auth": "basic"}, {}, "--auth"),
    ({"auth": "sigv4"}, {}, "--auth"),
    ({"host": "0.0.0.0"}, {}, "--auth"),  # no keys beyond loopback
    ({"host": "0.0.0.0", "auth": "none", "access_key": "a", "secret_key": "b"}, {}, "--auth"),
    ({"access_key": "a"}, {}, "--secret-key"),
    ({"upstream_timeout": "0"}, {}, "--upstream-timeout"),
    ({"upstream_addressing": "sideways"}, {}, "--upstream-addressing"),
    ({"io_backend": "carrier-pigeon"}, {}, "--io-backend"),
    ({"io_backend": "threads", "io_uring": "true"}, {}, "--io-uring"),
    ({"block_size": "3000"}, {}, "--block-size"),
    ({"cache_size": "1KiB"}, {}, "--cache-size"),
    ({"cache_size": "lots"}, {}, "--cache-size"),
    ({"ttl": "-1"}, {}, "--ttl"),
    ({}, {"SPROX_NO_CACHE": "maybe"}, "SPROX_NO_CACHE"),
    ({}, {"SPROX_UPSTREAM_TIMEOUT": "soon"}, "SPROX_UPSTREAM_TIMEOUT"),
    ({"config": "/nonexistent/sprox.toml"}, {}, "--config"),
]


@pytest.mark.parametrize("flags,env,setting", BAD)
def test_bad_values_name_the_setting(flags, env, setting):
    with pytest.raises(ConfigError) as info:
        load(flags, environ=env)
    assert setting in str(info.value)


def test_bad_file_values_name_the_file_and_setting(tmp_path: Path):
    cfg = tmp_path / "sprox.toml"
    cfg.write_text('port = "nine"\n')
    with pytest.raises(ConfigError, match="port"):
        load({"config": str(cfg)}, environ={})
    cfg.write_text('colour = "blue"\n')
    with pytest.raises(ConfigError, match="colour: unknown setting"):
        load({"config": str(cfg)}, environ={})
    cfg.write_text("port = \n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load({"config": str(cfg)}, environ={})


def test_sigv4_beyond_loopback_is_allowed_with_keys():
    c = Config(host="0.0.0.0", access_key="ak", secret_key="sk")
    assert c.auth_mode == "sigv4"


def test_cli_exits_nonzero_naming_the_setting():
    result = subprocess.run([sys.executable, "-m", "sprox", "serve", "--port", "nope"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "--port" in result.stderr and "nope" in result.stderr


def test_cli_rejects_unknown_choice_naming_the_flag():
    result = subprocess.run([sys.executable, "-m", "sprox", "serve", "--auth", "maybe"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "--auth" in result.stderr


def test_cli_version_says_whether_native_code_loaded():
    result = subprocess.run([sys.executable, "-m", "sprox", "--version"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.startswith("sprox ")
    assert "native" in result.stdout or "pure-Python" in result.stdout


def test_sizes_and_switches():
    c = load({"cache_size": "50GiB", "block_size": "1MiB", "io_uring": "true"}, environ={"SPROX_NO_CACHE": "0"})
    assert (c.cache_size, c.block_size, c.cache_io, c.no_cache) == (50 * 2**30, 2**20, "uring", False)
    assert load({"cache_size": "1.5TB"}, environ={}).cache_size == 1_500_000_000_000
    assert load({"no_cache": "true"}, environ={}).cache_path is None


def test_cli_refuses_an_impossible_explicit_uring(tmp_path):
    env = {**__import__("os").environ, "SPROX_NO_URING": "1"}
    result = subprocess.run([sys.executable, "-m", "sprox", "serve", "--port", "0", "--io-backend", "uring",
                             "--origin-dir", str(tmp_path / "o"), "--cache-dir", str(tmp_path / "c")],
                            capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 2 and "--io-backend" in result.stderr


def test_max_connections_from_flag_env_and_file(tmp_path: Path):
    assert load({}, environ={}).max_connections == 4096
    cfg = tmp_path / "sprox.toml"
    cfg.write_text("max_connections = 300\n")
    assert load({"config": str(cfg)}, environ={}).max_connections == 300
    assert load({"config": str(cfg)}, environ={"SPROX_MAX_CONNECTIONS": "200"}).max_connections == 200
    assert load({"max_connections": "100"}, environ={"SPROX_MAX_CONNECTIONS": "200"}).max_connections == 100


@pytest.mark.parametrize("flags,env,named", [
    ({"max_connections": "0"}, {}, "--max-connections"),
    ({"max_connections": "-5"}, {}, "--max-connections"),
    ({"max_connections": "many"}, {}, "--max-connections"),
    ({"max_connections": "1.5"}, {}, "--max-connections"),
    ({}, {"SPROX_MAX_CONNECTIONS": "lots"}, "SPROX_MAX_CONNECTIONS"),
])
def test_max_connections_must_be_a_positive_whole_number(flags, env, named):
    with pytest.raises(ConfigError) as info:
        load(flags, environ=env)
    assert named in str(info.value)
    with pytest.raises(ConfigError, match="--max-connections"):
        Config(max_connections=True)  # embedding code: a bool is not a count


def test_start_up_raises_the_open_file_limit_for_max_connections():
    """In a child process (limits are per process): a soft limit below what
    --max-connections needs is raised towards the hard limit, and never lowered."""
    script = """
import logging, resource, sys
from sprox.server import raise_open_file_limit, FD_RESERVE
logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(message)s")
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
got = raise_open_file_limit(500)
want = 3 * 500 + FD_RESERVE if hard == resource.RLIM_INFINITY else min(3 * 500 + FD_RESERVE, hard)
assert got == want == resource.getrlimit(resource.RLIMIT_NOFILE)[0], (got, want)
assert raise_open_file_limit(1) == want  # enough already: unchanged, never lowered
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "raised the open-file limit (RLIMIT_NOFILE) from 256" in result.stdout and result.stdout.endswith("ok\n")


def test_an_access_key_also_in_keys_is_refused(tmp_path: Path):
    """--access-key would silently replace a restricted [[keys]] entry with a full-rights
    key of the same id: refused instead."""
    cfg = tmp_path / "sprox.toml"
    cfg.write_text('[[keys]]\naccess_key = "reader"\nsecret_key = "s"\nbuckets = ["public"]\nwrite = false\n')
    with pytest.raises(ConfigError, match="--access-key"):
        load({"config": str(cfg)}, environ={"SPROX_ACCESS_KEY": "reader", "SPROX_SECRET_KEY": "x"})


def test_an_empty_admin_host_is_refused():
    with pytest.raises(ConfigError, match="--admin-host"):
        Config(admin_host="", admin_port=0)


def test_a_cache_directory_keeps_the_block_size_it_was_built_with(tmp_path: Path):
    import sqlite3

    from sprox.cache.index import SCHEMA

    cache = tmp_path / "cache"
    assert load({"cache_dir": str(cache)}, environ={}).block_size == 128 * 1024  # a new cache: the default
    cache.mkdir()
    db = sqlite3.connect(cache / "index.sqlite")
    db.executescript(SCHEMA)
    db.execute("INSERT INTO objects (id, bucket, key, etag, size, last_modified, headers, validated_at, block_size) "
                "VALUES (1, 'b', 'k', '\"e\"', 10, '', '[]', 0, ?)", (4 * 1024 * 1024,))
    db.commit()
    db.close()
    assert load({"cache_dir": str(cache)}, environ={}).block_size == 4 * 1024 * 1024
    assert load({"cache_dir": str(cache), "block_size": "256KiB"}, environ={}).block_size == 256 * 1024
    assert load({"cache_dir": str(cache)}, environ={"SPROX_BLOCK_SIZE": "64KiB"}).block_size == 64 * 1024


def test_peers_are_host_port_entries_from_flags_env_and_file(tmp_path: Path):
    keys = {"access_key": "a", "secret_key": "s"}
    c = load({"peers": "10.0.0.1:9000, sprox-tier.ns.svc:9000,[::1]:9001", **keys}, environ={})
    assert [(p.host, p.port) for p in c.peers] == [("10.0.0.1", 9000), ("sprox-tier.ns.svc", 9000), ("::1", 9001)]
    assert load(keys, environ={"SPROX_PEERS": "http://n1:9000/"}).peers[0].authority == "n1:9000"
    cfg = tmp_path / "sprox.toml"
    cfg.write_text('peers = ["n1:9000", "n2:9000"]\naccess_key = "a"\nsecret_key = "s"\n')
    assert [p.host for p in load({"config": str(cfg)}, environ={}).peers] == ["n1", "n2"]
    assert Config(peers="n1:1,n2:2", **keys).peers[1].port == 2  # embedding: a string too


@pytest.mark.parametrize("value", ["n1", "n1:port", "n1:0", "n1:70000", "https://n1:9000", "n1:9000/x", ",", "",
                                   "2001:db8::1:9000", "[::1:9000", "::1]:9000"])
def test_bad_peers_are_named(value: str):
    with pytest.raises(ConfigError, match="--peers"):
        load({"peers": value, "access_key": "a", "secret_key": "s"}, environ={})


def test_peers_need_a_key_that_may_sign_for_every_bucket(tmp_path: Path):
    cfg = tmp_path / "sprox.toml"
    cfg.write_text('peers = "n1:9000"\n[[keys]]\naccess_key = "r"\nsecret_key = "s"\nbuckets = ["data"]\n')
    with pytest.raises(ConfigError, match="--peers: needs a key that may use every bucket"):
        load({"config": str(cfg)}, environ={})
    assert load({"peers": "n1:9000"}, environ={}).peers  # no keys (loopback, --auth none): calls go unsigned
