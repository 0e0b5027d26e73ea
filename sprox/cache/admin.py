"""`sprox cache stats | purge | verify`: work on a cache directory from the command line.

`stats` reads the index (SQLite in WAL mode allows that while Sprox runs) and the
access log. `purge` and `verify` change the cache, so they need the directory's lock:
when a Sprox holds it, `purge` asks that process over its admin route instead, and
`verify` says to stop it first."""

from __future__ import annotations

import fcntl
import json
import os
import sqlite3
import urllib.parse
import urllib.request
from contextlib import contextmanager
from pathlib import Path

from .blockfiles import BlockFiles
from .index import CacheIndex


class CacheBusy(Exception):
    """A running Sprox holds the cache directory."""


@contextmanager
def exclusive(cache_dir: Path):
    fd = os.open(cache_dir / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise CacheBusy(str(cache_dir)) from None
        yield
    finally:
        os.close(fd)


def stats(cache_dir: Path, signer=None) -> dict:
    """`signer` (warm.RequestSigner) signs requests to a running Sprox's admin routes,
    which a Sprox with keys on its data port answers only when signed."""
    index = cache_dir / "index.sqlite"
    out = {"cache_dir": str(cache_dir), "objects": 0, "blocks": 0, "bytes": 0}
    if index.exists():
        db = sqlite3.connect(f"file:{index}?mode=ro", uri=True)
        try:
            out["objects"] = db.execute("SELECT count(*) FROM objects").fetchone()[0]
            blocks, size = db.execute(
                "SELECT count(*), coalesce(sum(min(o.block_size, o.size - b.idx * o.block_size)), 0) "
                "FROM blocks b JOIN objects o ON o.id = b.object_id").fetchone()
            out["blocks"], out["bytes"] = blocks, size
        finally:
            db.close()
    out.update(_hit_ratio(cache_dir / "logs"))
    out["live"] = _live_stats(cache_dir, signer)
    return out


def recorded_block_size(cache_dir: Path) -> int | None:
    """The block size most cached objects were stored with (objects keep the block size
    they were cached with), or None without an index or objects."""
    index = cache_dir / "index.sqlite"
    if not index.exists():
        return None
    db = sqlite3.connect(f"file:{index}?mode=ro", uri=True)
    try:
        row = db.execute("SELECT block_size FROM objects GROUP BY block_size "
                         "ORDER BY count(*) DESC, block_size LIMIT 1").fetchone()
    finally:
        db.close()
    return row[0] if row else None


def admin_endpoint(cache_dir: Path) -> str:
    """Where the admin routes of the Sprox running on `cache_dir` listen (OSError if
    none ever started there)."""
    return (cache_dir / "admin-endpoint").read_text().strip()


def data_endpoint(cache_dir: Path) -> str:
    """The S3 endpoint of the Sprox running on `cache_dir` (OSError if none started)."""
    return (cache_dir / "endpoint").read_text().strip()


def running(cache_dir: Path) -> bool:
    """Whether a Sprox runs on `cache_dir` (it holds the lock); when none does, the
    endpoint files it left say nothing."""
    try:
        with exclusive(cache_dir):
            return False
    except CacheBusy:
        return True


def _live_stats(cache_dir: Path, signer) -> dict | None:
    """Counters of the Sprox running on this directory, if one is (and answers)."""
    if not running(cache_dir):
        return None
    try:
        return admin_call(cache_dir, "GET", "/_sprox/cache/stats", signer, timeout=5)
    except (OSError, ValueError):
        return None


def admin_call(cache_dir: Path, method: str, path: str, signer, *, timeout: float) -> dict:
    """The JSON answer of the running Sprox's admin route `path` (with its query),
    signed by `signer` (warm.RequestSigner: `.headers(method, url)`) when one is given.
    urllib's errors are OSErrors."""
    url = admin_endpoint(cache_dir) + path
    headers = signer.headers(method, url) if signer is not None else {}
    with urllib.request.urlopen(urllib.request.Request(url, method=method, headers=headers),
                                timeout=timeout) as response:
        return json.load(response)


def _hit_ratio(logs: Path) -> dict:
    if not logs.is_dir():
        return {"requests": 0, "hit_ratio": None, "byte_hit_ratio": None}
    from ..analytics.accesslog import read_access_log

    table = read_access_log(logs).to_pydict()
    outcomes = [(c, b) for c, b in zip(table["cache"], table["bytes_sent"]) if c in ("HIT", "MISS", "PARTIAL")]
    if not outcomes:
        return {"requests": 0, "hit_ratio": None, "byte_hit_ratio": None}
    hits = sum(1 for c, _ in outcomes if c == "HIT")
    total_bytes = sum(b for _, b in outcomes)
    hit_bytes = sum(b for c, b in outcomes if c == "HIT")
    return {"requests": len(outcomes), "hit_ratio": hits / len(outcomes),
            "byte_hit_ratio": hit_bytes / total_bytes if total_bytes else None}


def purge(cache_dir: Path, bucket: str | None, prefix: str, signer=None) -> int:
    """Drop cached objects (all, a bucket, or a prefix of it); returns how many.
    `signer` signs the request to a running Sprox, as in `stats`."""
    try:
        with exclusive(cache_dir):
            index = CacheIndex(cache_dir / "index.sqlite")
            files = BlockFiles(cache_dir / "blocks", executor=None)  # type: ignore[arg-type]
            index.open()
            try:
                doomed = [r for r in index.records()
                          if (bucket is None or r.bucket == bucket) and r.key.startswith(prefix)]
                for record in doomed:
                    index.drop(record)
                    files.remove(record)
            finally:
                index.close()
            return len(doomed)
    except CacheBusy:
        # quote_via=quote: a space is %20, never `+`, which signers and S3 read differently.
        query = urllib.parse.urlencode({k: v for k, v in (("bucket", bucket), ("prefix", prefix)) if v},
                                       quote_via=urllib.parse.quote)
        return admin_call(cache_dir, "POST", f"/_sprox/cache/purge?{query}", signer, timeout=30)["purged"]


def verify(cache_dir: Path, progress=None, *, started=None, stop=None) -> dict:
    """Check every cached block against its CRC; drop damaged ones.

    `started(total_blocks)` is called once the index is loaded, `progress(checked,
    damaged)` after each block, and `stop()` before each block: when it returns true the
    check ends there (`interrupted` in the result). Either way the index is left
    consistent: every drop made so far is committed before returning, and blocks not
    reached are simply not checked (Sprox checks them on first use after a restart)."""
    with exclusive(cache_dir):
        index = CacheIndex(cache_dir / "index.sqlite")
        files = BlockFiles(cache_dir / "blocks", executor=None)  # type: ignore[arg-type]
        index.open()
        checked = damaged = 0
        interrupted = False
        try:
            records = list(index.records())
            total = sum(int.from_bytes(r.present, "little").bit_count() for r in records)
            if started is not None:
                started(total)
            for record in records:
                if interrupted:
                    break
                fd = files.acquire(record)
                try:
                    for i in record.present_blocks():
                        if stop is not None and stop():
                            interrupted = True
                            break
                        start, end = record.block_range(i)
                        checked += 1
                        if not BlockFiles.block_matches(fd, start, end - start, record.crcs[i]):
                            damaged += 1
                            index.drop_block(record, i)
                        if progress is not None:
                            progress(checked, damaged)
                finally:
                    files.release(record)
            index.flush_blocking()
        finally:
            files.close_all()
            index.close()  # commits whatever is still queued before it returns
        return {"checked": checked, "damaged": damaged, "total": total, "interrupted": interrupted}


def parse_s3_url(url: str | None) -> tuple[str | None, str]:
    """`s3://bucket/prefix` -> ("bucket", "prefix"); None -> everything."""
    if not url:
        return None, ""
    if not url.startswith("s3://") or len(url) <= 5:
        raise ValueError(f"{url!r} is not an s3://bucket[/prefix] URL")
    bucket, _, prefix = url[5:].partition("/")
    return bucket, prefix
