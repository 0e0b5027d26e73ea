"""Benchmark inputs, generated once into bench/.data (gitignored) and reused.

- Hit benchmarks: self-checking objects (tests/data.py: the byte at offset i is a
  function of (key, i)), one large object read by random ranges and a few objects read
  whole, in ``hits/bench/``. nginx and Sprox's `--origin-dir` serve that same tree.
- OLAP benchmarks: TPC-H lineitem as Parquet, made by DuckDB's tpch extension
  (`pip install duckdb-extension-tpch==1.5.5`, loaded by path from the wheel, offline),
  in ``tpch-sf<SF>/tpch/lineitem/part-NNN.parquet``.

Files appear atomically (written aside, then renamed) and a dataset is complete only
once its manifest exists, so an interrupted generation is redone, never half-used.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from bench.harness import DATA_DIR, MiB, Settings, missing
from tests.data import check_bytes, expected_bytes

HITS_BUCKET = "bench"
TPCH_BUCKET = "tpch"


@dataclass(frozen=True)
class HitObject:
    key: str
    size: int


@dataclass(frozen=True)
class HitsData:
    root: Path  # served as buckets: root/<bucket>/<key>
    range_object: HitObject
    whole_objects: tuple[HitObject, ...]

    @property
    def objects(self) -> tuple[HitObject, ...]:
        return (self.range_object, *self.whole_objects)

    def path(self, obj: HitObject) -> Path:
        return self.root / HITS_BUCKET / obj.key


def _size_name(size: int) -> str:
    return f"{size // MiB}MiB"


def _write_object(path: Path, key: str, size: int) -> None:
    if path.exists() and path.stat().st_size == size:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    step = 8 * MiB
    with open(tmp, "wb") as out:
        out.writelines(expected_bytes(key, offset, min(step, size - offset)) for offset in range(0, size, step))
    os.replace(tmp, path)


def hits_data(settings: Settings) -> HitsData:
    """The hit benchmark objects for `settings` (generated on first use)."""
    root = DATA_DIR / "hits"
    range_object = HitObject(f"ranges-{_size_name(settings.range_object_size)}.bin", settings.range_object_size)
    whole = tuple(HitObject(f"whole-{_size_name(settings.whole_object_size)}-{i}.bin", settings.whole_object_size)
                  for i in range(settings.whole_object_count))
    data = HitsData(root, range_object, whole)
    for obj in data.objects:
        _write_object(data.path(obj), obj.key, obj.size)
    return data


class ByteChecker:
    """A `stream_get` sink asserting each piece is object `key` from `start`."""

    def __init__(self, key: str, start: int = 0):
        self.key = key
        self.start = start

    def __call__(self, offset: int, data: bytes) -> None:
        bad = check_bytes(self.key, self.start + offset, data)
        assert bad is None, f"{self.key}: wrong byte at offset {bad}"


# -- TPC-H --------------------------------------------------------------------------------


def duckdb_extension(name: str) -> Path:
    """The `.duckdb_extension` file shipped in the `duckdb-extension-<name>` wheel that
    matches the installed DuckDB (loaded by path: works offline)."""
    try:
        import duckdb
    except ImportError:
        missing("duckdb is not installed (pip install duckdb==1.5.5)")
    module_name = f"duckdb_extension_{name}"
    try:
        module = __import__(module_name)
    except ImportError:
        missing(f"{module_name} is not installed (pip install duckdb-extension-{name}=={duckdb.__version__})")
    base = Path(module.__file__).parent
    version = duckdb.__version__.lstrip("v")
    candidates = sorted(base.rglob(f"{name}.duckdb_extension"))
    exact = [p for p in candidates if f"v{version}" in p.parts]
    if not (exact or candidates):
        missing(f"no {name}.duckdb_extension inside {base}")
    return (exact or candidates)[0]


@dataclass(frozen=True)
class TpchData:
    root: Path  # served as buckets: root/tpch/lineitem/part-NNN.parquet
    sf: float
    files: tuple[Path, ...]
    rows: int
    total_bytes: int

    @property
    def local_dir(self) -> Path:
        return self.root / TPCH_BUCKET / "lineitem"

    @property
    def max_orderkey(self) -> int:
        return int(self.sf * 6_000_000)


def _sf_name(sf: float) -> str:
    return f"{sf:g}".replace(".", "p")


def tpch_data(settings: Settings) -> TpchData:
    """lineitem at scale factor `settings.tpch_sf` in `settings.tpch_files` Parquet files,
    generated step by step (DuckDB's dbgen `children`/`step`), so memory stays bounded
    to one step whatever the scale factor."""
    sf, parts = settings.tpch_sf, max(1, settings.tpch_files)
    root = DATA_DIR / f"tpch-sf{_sf_name(sf)}"
    manifest_path = root / "manifest.json"
    directory = root / TPCH_BUCKET / "lineitem"
    if manifest_path.exists():
        manifest = json.loads(manifest_path.read_text())
        files = tuple(directory / name for name in manifest["files"])
        if all(f.exists() for f in files):
            return TpchData(root, sf, files, manifest["rows"], sum(f.stat().st_size for f in files))
    import duckdb

    tpch = duckdb_extension("tpch")
    directory.mkdir(parents=True, exist_ok=True)
    scratch = root / "dbgen.duckdb"
    started = time.monotonic()
    names, rows = [], 0
    for step in range(parts):
        name = f"part-{step:03d}.parquet"
        target = directory / name
        scratch.unlink(missing_ok=True)
        # A file-backed database: dbgen's tables spill to disk rather than fill memory.
        con = duckdb.connect(str(scratch))
        try:
            con.execute("SET enable_progress_bar = false")
            con.execute(f"LOAD '{tpch}'")
            if parts > 1:
                con.execute(f"CALL dbgen(sf={sf}, children={parts}, step={step})")
            else:
                con.execute(f"CALL dbgen(sf={sf})")
            tmp = directory / f".{name}.tmp"
            con.execute(f"COPY (SELECT * FROM lineitem ORDER BY l_orderkey, l_linenumber) TO '{tmp}' "
                        "(FORMAT parquet, COMPRESSION snappy, ROW_GROUP_SIZE 122880)")
            rows += con.execute("SELECT count(*) FROM lineitem").fetchone()[0]
        finally:
            con.close()
        os.replace(tmp, target)
        names.append(name)
    for suffix in ("", ".wal"):
        Path(f"{scratch}{suffix}").unlink(missing_ok=True)
    files = tuple(directory / n for n in names)
    manifest_path.write_text(json.dumps({"sf": sf, "files": names, "rows": rows,
                                         "seconds": round(time.monotonic() - started, 1)}))
    return TpchData(root, sf, files, rows, sum(f.stat().st_size for f in files))


WIDE_COLUMNS = 240
WIDE_ROW_GROUP = 16_384  # rows: a column chunk of doubles is then ~128 KiB


def wide_table(data: TpchData) -> Path:
    """A wide table next to lineitem (served by the same upstream): `id` and 239 double
    columns in row groups of 16k rows, so a query over a third of its columns makes
    many small range reads (one per column chunk, ~128 KiB each), the OLAP access
    pattern where a per-request cost shows. 20 row groups at scale factor 1 and above,
    2 below. Returns its directory (one Parquet file)."""
    directory = data.root / TPCH_BUCKET / "wide"
    target = directory / "part-000.parquet"
    if target.exists():
        return directory
    import duckdb

    rows = WIDE_ROW_GROUP * (20 if data.sf >= 1 else 2)
    columns = ", ".join(f"(hash(i * {WIDE_COLUMNS} + {k}) % 1000000007)::DOUBLE / 7 AS c{k}"
                        for k in range(1, WIDE_COLUMNS))
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / ".part-000.parquet.tmp"
    con = duckdb.connect()
    try:
        con.execute("SET enable_progress_bar = false")
        con.execute(f"COPY (SELECT i AS id, {columns} FROM range({rows}) t(i)) TO '{tmp}' "
                    f"(FORMAT parquet, COMPRESSION snappy, ROW_GROUP_SIZE {WIDE_ROW_GROUP})")
    finally:
        con.close()
    os.replace(tmp, target)
    return directory
