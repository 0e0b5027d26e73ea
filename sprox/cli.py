"""The `sprox` command: a thin layer over `sprox.server.Sprox` and `sprox.config`."""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import signal
import sys
import urllib.error
from datetime import datetime, timedelta, timezone
from pathlib import Path

from . import config as config_mod
from ._version import __version__
from .config import SETTINGS, Config, ConfigError
from .eventloop import loop_factory
from .s3.numbers import decimal

CACHE_EPILOGUES = {
    "verify": ". Shows progress on standard error (a bar on a terminal, plain lines otherwise). "
              "Ctrl-C stops it with the index consistent: damaged blocks dropped so far stay dropped, "
              "blocks not reached are checked by Sprox on first use.",
    "warm": ". Lists the prefix (ListObjectsV2) and GETs every object whole, discarding the bytes, "
            "with AWS credentials from the usual places (none: unsigned). Shows progress on standard "
            "error and ends with a summary; exit status 1 if any object failed. Ctrl-C stops it "
            "(exit status 130): reads in flight are cancelled, and since Sprox publishes a cached block "
            "only once all its bytes are written, nothing half-written is left in the cache.",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sprox", description="Sprox: a drop-in S3 caching proxy.")
    parser.add_argument("--version", action=_Version, nargs=0, help="show the version, whether the native "
                        "extensions and io_uring work here, and exit")
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
                       ("verify", "check every cached block against its checksum; drop damaged ones"),
                       ("warm", ("read every object under s3://bucket[/prefix] through the running Sprox, "
                                 "so that it is cached"))):
        sub = cache_commands.add_parser(name, help=text, description=text + CACHE_EPILOGUES.get(name, ""))
        where = sub.add_mutually_exclusive_group() if name == "warm" else sub
        where.add_argument("--cache-dir", dest="cache_dir", metavar="DIR", help="[SPROX_CACHE_DIR]")
        sub.add_argument("--config", dest="config", metavar="FILE", help="[SPROX_CONFIG]")
        if name == "purge":
            sub.add_argument("target", nargs="?", metavar="s3://bucket[/prefix]")
        if name == "warm":
            sub.add_argument("target", metavar="s3://bucket[/prefix]")
            where.add_argument("--endpoint", metavar="URL",
                               help="the Sprox S3 endpoint (default: the one running on the cache directory)")
            sub.add_argument("--concurrency", type=int, default=8, metavar="N",
                             help="objects read at once (default 8)")
    report = commands.add_parser(
        "report", help="what the cache did and saved, from the access log (DataFusion)",
        description="Hit ratios (by requests, bytes, time, bucket, prefix, client), upstream GETs and "
                    "bytes avoided, dollars saved, latency, the most-read objects, and the hit ratio "
                    "other cache sizes would have had on the same trace.")
    source = report.add_mutually_exclusive_group()
    source.add_argument("--cache-dir", dest="cache_dir", metavar="DIR",
                        help="the cache whose logs/ to read [SPROX_CACHE_DIR]")
    source.add_argument("--logs", metavar="DIR", nargs="+",
                        help="a directory of access-log files; several (the nodes of a tier, e.g. copied "
                             "or mounted from each) give the tier's figures and a per-node table")
    report.add_argument("--config", dest="config", metavar="FILE", help="[SPROX_CONFIG]")
    report.add_argument("--since", metavar="WHEN", help="ISO 8601 time (UTC unless a zone is given) or an age: "
                        "30m, 24h, 7d")
    report.add_argument("--until", metavar="WHEN", help="same forms as --since")
    report.add_argument("--format", choices=("text", "json", "html"), default="text")
    report.add_argument("--output", metavar="FILE", help="write here instead of standard output")
    report.add_argument("--get-price", type=float, metavar="DOLLARS",
                        help="dollars per 1,000 upstream GET requests (default 0.0004, S3 Standard)")
    report.add_argument("--transfer-price", type=float, metavar="DOLLARS",
                        help="dollars per GB fetched from the upstream (default 0.09, S3 transfer out)")
    report.add_argument("--block-size", metavar="SIZE",
                        help="block size for the what-if simulation (default: the configured one)")
    return parser


class _Version(argparse.Action):
    """--version, computed only when asked (it probes io_uring), printed unwrapped."""

    def __call__(self, parser, namespace, values, option_string=None):
        print(version_text())
        parser.exit()


def version_text() -> str:
    """The version, and what this install runs: native extensions or their pure-Python
    twins, and whether io_uring works here (and why not)."""
    from . import kernel, lane, ranges, uring

    if ranges.NATIVE and lane.NATIVE:
        native = "native extensions loaded"
        if kernel.NATIVE:
            native += ", hit kernel loaded"
        else:
            native += ("; no hit kernel (it needs OpenSSL's libcrypto at build time, Debian: libssl-dev): "
                       "the Python lane answers every hit, at several times the CPU")
    else:
        native = ("pure-Python build (no native extensions: cache hits cost more CPU; "
                  "see the install log, or reinstall with a C compiler)")
    works, reason = uring.available()
    io = "io_uring available" if works else f"io_uring not available: {reason}"
    return f"sprox {__version__} ({native}; {io})"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "cache":
        return cache_command(args)
    if args.command == "report":
        return report_command(args)
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
        make_loop, loop_name = loop_factory(config.event_loop)
    except RuntimeError as exc:
        print(f"sprox: error: --event-loop: {exc}", file=sys.stderr)
        return 2
    try:
        with asyncio.Runner(loop_factory=make_loop) as runner:
            return runner.run(serve(config, loop_name))
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
    if args.cache_command == "warm":
        return warm_command(args, cache_dir)
    if not (cache_dir / "index.sqlite").exists():
        print(f"sprox: error: --cache-dir: no cache in {str(cache_dir)!r}", file=sys.stderr)
        return 2
    if args.cache_command == "stats":
        s = admin.stats(cache_dir, admin_signer(config))
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
        try:
            purged = admin.purge(cache_dir, bucket, prefix, admin_signer(config))
        except urllib.error.HTTPError as exc:
            hint = ""
            if exc.code == 403:
                hint = (" (the running Sprox verifies keys on its data port: give `sprox cache purge` the same "
                        "--config, SPROX_ACCESS_KEY/SPROX_SECRET_KEY or AWS credentials with a key that may use "
                        "every bucket and write, or serve the admin routes on --admin-port)")
            print(f"sprox: error: the running Sprox refused the purge: HTTP {exc.code}{hint}", file=sys.stderr)
            return 1
        print(f"purged {purged} object{'' if purged == 1 else 's'}")
        return 0
    return verify_command(cache_dir)


def admin_signer(config: Config):
    """What `sprox cache stats|purge` sign a running Sprox's admin routes with: a key of
    the configuration that may use every bucket and write, else the AWS credentials
    (botocore's chain, as `sprox cache warm` signs its reads)."""
    from .warm import RequestSigner

    key = config.admin_key
    return RequestSigner(key=(key.access_key, key.secret_key) if key is not None else None)


def verify_command(cache_dir: Path) -> int:
    import threading
    import time

    from .cache import admin
    from .progress import Progress

    progress = Progress("verify", "blocks")
    stop = threading.Event()
    started = time.monotonic()

    def index_loaded(total: int) -> None:
        progress.set_total(total)
        progress.update(note="")

    def checked(count: int, damaged: int) -> None:
        progress.update(count, note=f"{damaged} damaged" if damaged else "")

    def busy() -> int:
        print(f"sprox: error: a running Sprox uses {str(cache_dir)!r}: stop it first "
              "(Sprox re-checks blocks against their checksums after every restart)", file=sys.stderr)
        return 1

    try:  # before any progress is shown (verify takes the lock again for itself)
        with admin.exclusive(cache_dir):
            pass
    except admin.CacheBusy:
        return busy()
    # Ctrl-C asks the check to stop between two blocks, so the index is never left
    # halfway through an update.
    previous = signal.signal(signal.SIGINT, lambda *_: stop.set())
    try:
        progress.start(note="reading the index")
        result = admin.verify(cache_dir, started=index_loaded, progress=checked, stop=stop.is_set)
    except admin.CacheBusy:  # a Sprox started in between
        progress.close()
        return busy()
    finally:
        signal.signal(signal.SIGINT, previous)
    progress.close()
    seconds = time.monotonic() - started
    if result["interrupted"]:
        print(f"interrupted: checked {result['checked']} of {result['total']} blocks, dropped "
              f"{result['damaged']} damaged in {seconds:.1f} s; the index is consistent (blocks not "
              "reached are checked by Sprox on first use)")
        return 130
    print(f"checked {result['checked']} blocks, dropped {result['damaged']} damaged (in {seconds:.1f} s)")
    return 0


def warm_command(args: argparse.Namespace, cache_dir: Path) -> int:
    import aiohttp

    from . import warm
    from .cache import admin
    from .progress import Progress

    try:
        bucket, prefix = admin.parse_s3_url(args.target)
        if not bucket:
            raise ValueError(f"{args.target!r} names no bucket")
    except ValueError as exc:
        print(f"sprox: error: {exc}", file=sys.stderr)
        return 2
    if args.concurrency < 1:
        print(f"sprox: error: --concurrency: {args.concurrency} must be at least 1", file=sys.stderr)
        return 2
    endpoint = args.endpoint or warm.running_endpoint(cache_dir)
    if endpoint is None:
        print(f"sprox: error: no Sprox is running on the cache {str(cache_dir)!r}: start one "
              "(sprox serve --cache-dir DIR) or name its endpoint with --endpoint URL", file=sys.stderr)
        return 1
    progress = Progress("warm", "objects")
    try:
        result = asyncio.run(warm.warm(endpoint, bucket, prefix, concurrency=args.concurrency, progress=progress,
                                       report=progress.message, interrupt_signal=signal.SIGINT))
    except warm.WarmError as exc:
        progress.close()
        print(f"sprox: error: {exc}", file=sys.stderr)
        return 1
    except (OSError, aiohttp.ClientError, TimeoutError) as exc:
        progress.close()
        print(f"sprox: error: cannot reach Sprox at {endpoint}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # before the warm took over Ctrl-C: nothing was read
        progress.close()
        print(f"interrupted before reading s3://{bucket}/{prefix}: nothing read")
        return 130
    if result.interrupted:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # one Ctrl-C was enough: let the summary out
    progress.close()
    print(warm.summary(result))
    if result.interrupted:
        return 130
    return 1 if result.failed else 0


def report_command(args: argparse.Namespace) -> int:
    from .analytics import report

    try:
        config = config_mod.load({"cache_dir": args.cache_dir, "config": args.config,
                                  "block_size": args.block_size})
        since = parse_when(args.since, "--since")
        until = parse_when(args.until, "--until")
        prices = report.Prices(*(
            _non_negative(value, flag, default) for value, flag, default in (
                (args.get_price, "--get-price", report.DEFAULT_GET_PRICE),
                (args.transfer_price, "--transfer-price", report.DEFAULT_TRANSFER_PRICE))))
    except ConfigError as exc:
        print(f"sprox: error: {exc}", file=sys.stderr)
        return 2
    logs = [Path(d) for d in args.logs] if args.logs else [config.logs_path]
    for directory in logs:
        if not directory.is_dir():
            print(f"sprox: error: {'--logs' if args.logs else '--cache-dir'}: no access log in {str(directory)!r}",
                  file=sys.stderr)
            return 2
    block_size = config.block_size
    if args.block_size is None and not args.logs:  # what this cache used, when it says
        from .cache import admin

        block_size = admin.recorded_block_size(config.cache_dir or config_mod.default_cache_dir()) or block_size
    result = report.build_report(logs if len(logs) > 1 else logs[0], since=since, until=until, prices=prices, block_size=block_size,
                                 cache_size=config.cache_size)
    render = {"text": report.render_text, "json": report.to_json, "html": report.render_html}[args.format]
    output = render(result)
    if args.output:
        Path(args.output).write_text(output, encoding="utf-8")
        print(f"report written to {args.output}", file=sys.stderr)
    else:
        sys.stdout.write(output)
    return 0


def parse_when(text: str | None, flag: str) -> datetime | None:
    """An ISO 8601 time (UTC unless it names a zone), or an age such as 30m, 24h, 7d."""
    if text is None:
        return None
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    age = decimal(text[:-1])
    if age is not None and text[-1:] in units:
        return datetime.now(timezone.utc) - timedelta(seconds=age * units[text[-1]])
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ConfigError(flag, f"{text!r} is neither an ISO 8601 time nor an age like 24h") from None
    return when if when.tzinfo is not None else when.replace(tzinfo=timezone.utc)


def _non_negative(value: float | None, flag: str, default: float) -> float:
    if value is None:
        return default
    if not value >= 0:
        raise ConfigError(flag, f"{value!r} must be 0 or more")
    return value


async def serve(config: Config, loop_name: str = "asyncio") -> int:
    from .server import ADMIN_PREFIX, Sprox

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
          f"  cache: {cache}\n  auth: {config.auth_mode}\n  event loop: {loop_name}"
          + (f"\n  admin: {sprox.admin_endpoint}{ADMIN_PREFIX} (not on the data port)"
             if config.admin_port is not None else "")
          + (f"\n  peers: {', '.join(p.authority for p in config.peers)} (told about every write)"
             if config.peers else ""), flush=True)
    from . import lane, ranges

    if not (ranges.NATIVE and lane.NATIVE):
        logging.getLogger("sprox").warning(
            "running the pure-Python build (native extensions not loaded): cache hits cost more CPU; "
            "`sprox --version` says more")
    try:
        await stop.wait()
    finally:
        logging.getLogger("sprox").info("shutting down")
        await sprox.stop()
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
