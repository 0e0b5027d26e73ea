"""The `sprox` command: a thin layer over `sprox.server.Sprox` and `sprox.config`."""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import signal
import sys

from . import config as config_mod
from ._version import __version__
from .config import SETTINGS, Config, ConfigError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sprox", description="Sprox: a drop-in S3 caching proxy.")
    parser.add_argument("--version", action="version", version=version_text())
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    serve = commands.add_parser(
        "serve", help="run the S3 endpoint",
        description="Run the S3 endpoint. Every option is also an environment variable "
                    "(SPROX_<OPTION>, e.g. SPROX_PORT) and a key in the --config TOML file; "
                    "flags win over the environment, which wins over the file.",
    )
    for setting in SETTINGS:
        if setting.file_only:
            continue
        if setting.switch:
            serve.add_argument(setting.flag, dest=setting.name, default=None, action="store_const",
                               const="true", help=f"{setting.help} [{setting.env}]")
            continue
        serve.add_argument(setting.flag, dest=setting.name, default=None, metavar=setting.metavar,
                           choices=setting.choices, help=f"{setting.help} [{setting.env}]")
    cache = commands.add_parser("cache", help="inspect or change the block cache",
                                description="Work on a cache directory (--cache-dir, SPROX_CACHE_DIR, "
                                            "the --config file, else the default).")
    cache_commands = cache.add_subparsers(dest="cache_command", metavar="ACTION", required=True)
    for name, text in (("stats", "objects, blocks, bytes and hit ratio"),
                       ("purge", "drop cached objects: all, or those under s3://bucket[/prefix]"),
                       ("verify", "check every cached block against its checksum; drop damaged ones")):
        sub = cache_commands.add_parser(name, help=text, description=text)
        sub.add_argument("--cache-dir", dest="cache_dir", metavar="DIR", help="[SPROX_CACHE_DIR]")
        sub.add_argument("--config", dest="config", metavar="FILE", help="[SPROX_CONFIG]")
        if name == "purge":
            sub.add_argument("target", nargs="?", metavar="s3://bucket[/prefix]")
    return parser


def version_text() -> str:
    from . import ranges

    native = "native extensions loaded" if ranges.NATIVE else "pure-Python (no native extensions)"
    return f"sprox {__version__} ({native})"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "cache":
        return cache_command(args)
    if args.command != "serve":
        parser.print_help()
        return 2
    flags = {s.name: getattr(args, s.name) for s in SETTINGS if not s.file_only}
    try:
        config = config_mod.load(flags)
    except ConfigError as exc:
        print(f"sprox: error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=config.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return asyncio.run(serve(config))
    except KeyboardInterrupt:
        return 130


def cache_command(args: argparse.Namespace) -> int:
    from .cache import admin

    try:
        config = config_mod.load({"cache_dir": args.cache_dir, "config": args.config})
    except ConfigError as exc:
        print(f"sprox: error: {exc}", file=sys.stderr)
        return 2
    cache_dir = config.cache_dir or config_mod.default_cache_dir()
    if not (cache_dir / "index.sqlite").exists():
        print(f"sprox: error: --cache-dir: no cache in {str(cache_dir)!r}", file=sys.stderr)
        return 2
    if args.cache_command == "stats":
        s = admin.stats(cache_dir)
        ratio = "n/a" if s["hit_ratio"] is None else f"{s['hit_ratio']:.1%}"
        byte_ratio = "n/a" if s["byte_hit_ratio"] is None else f"{s['byte_hit_ratio']:.1%}"
        print(f"cache:     {s['cache_dir']}\nobjects:   {s['objects']}\nblocks:    {s['blocks']}\n"
              f"bytes:     {s['bytes']} ({s['bytes'] / 2**30:.2f} GiB)\n"
              f"hit ratio: {ratio} of {s['requests']} object reads ({byte_ratio} of bytes), "
              f"from closed access-log files")
        live = s.get("live")
        if live:
            reads = live["hits"] + live["misses"] + live["partial"]
            live_ratio = f"{live['hits'] / reads:.1%}" if reads else "n/a"
            print(f"running:   {live_ratio} hits of {reads} object reads since start "
                  f"({live['hits']} hit, {live['partial']} partial, {live['misses']} miss, "
                  f"{live['bypass']} bypass; {live.get('fast_lane_hits', 0)} hits by the fast lane; "
                  f"{live['evicted_blocks']} blocks evicted)")
        return 0
    if args.cache_command == "purge":
        try:
            bucket, prefix = admin.parse_s3_url(args.target)
        except ValueError as exc:
            print(f"sprox: error: {exc}", file=sys.stderr)
            return 2
        purged = admin.purge(cache_dir, bucket, prefix)
        print(f"purged {purged} object{'' if purged == 1 else 's'}")
        return 0
    try:
        result = admin.verify(cache_dir)
    except admin.CacheBusy:
        print(f"sprox: error: a running Sprox uses {str(cache_dir)!r}: stop it first "
              "(Sprox re-checks blocks against their checksums after every restart)", file=sys.stderr)
        return 1
    print(f"checked {result['checked']} blocks, dropped {result['damaged']} damaged")
    return 0


async def serve(config: Config) -> int:
    from .server import Sprox

    sprox = Sprox(config)
    try:
        await sprox.start()
    except ConfigError as exc:
        print(f"sprox: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"sprox: error: --port: cannot listen on {config.host}:{config.port}: {exc.strerror or exc}",
              file=sys.stderr)
        return 1
    # Everything loaded so far (aiohttp, botocore, pyarrow, ...) lives as long as the
    # process: keep it out of the collector's way, or every full collection walks it
    # again (a few percent of each cache hit's CPU, measured).
    gc.freeze()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    io = sprox.cache.io.name if sprox.cache is not None and sprox.cache.io is not None else ""
    cache = (f"{config.cache_path} ({config.cache_size / 2**30:g} GiB, {config.block_size // 1024} KiB blocks, "
             f"ttl {config.ttl:g} s, {io} I/O{', O_DIRECT' if config.direct_io else ''})"
             if config.cache_path else "off (--no-cache)")
    print(f"Sprox listening on {sprox.endpoint}\n  fronting {sprox.origin.description}\n"
          f"  cache: {cache}\n  auth: {config.auth_mode}", flush=True)
    try:
        await stop.wait()
    finally:
        logging.getLogger("sprox").info("shutting down")
        await sprox.stop()
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
