"""The `sprox` command: a thin layer over `sprox.server.Sprox` and `sprox.config`."""

from __future__ import annotations

import argparse
import asyncio
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
    return parser


def version_text() -> str:
    from . import ranges

    native = "native extensions loaded" if ranges.NATIVE else "pure-Python (no native extensions)"
    return f"sprox {__version__} ({native})"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
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
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    cache = (f"{config.cache_path} ({config.cache_size / 2**30:g} GiB, {config.block_size // 1024} KiB blocks, "
             f"ttl {config.ttl:g} s)" if config.cache_path else "off (--no-cache)")
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
