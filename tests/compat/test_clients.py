"""Real S3 clients, pointed at Sprox the way CLIENTS.md says users point them.

Every client lists a prefix and reads a Parquet and a CSV file; boto3, awscli and minio
also upload (single PUT and multipart) and download. All run through Sprox over a local
directory; boto3, pyarrow and DuckDB also through Sprox over moto and over SeaweedFS.

Each origin gets one bucket, seeded once through Sprox with boto3 (`Store`).
"""

from __future__ import annotations

import io
import json
import subprocess
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.data import TableFacts, assert_bytes, make_csv, make_parquet, object_bytes, table_facts
from tests.servers import (
    TEST_ACCESS_KEY,
    TEST_REGION,
    TEST_SECRET_KEY,
    SproxUnderTest,
    find_script,
    s3_client,
)

MiB = 1024 * 1024

# What every store holds. Keys under "listing/" plus one key that only shares the
# prefix's first letters, so a client listing "listing/" must not return it.
LISTING = {"listing/a.bin": 1024, "listing/b.bin": 70_000, "listing/sub/c.bin": 10}
OUTSIDE_LISTING = "listing-other.bin"
PARQUET_KEY = "table/part-0.parquet"  # 100k rows in 4 row groups
PARQUET_SMALL_KEY = "table/part-1.parquet"  # 1k rows, so table/ holds two files
CSV_KEY = "csv/table.csv"
PARQUET = table_facts(100_000)
PARQUET_DIR = TableFacts(rows=PARQUET.rows + 1_000, id_sum=PARQUET.id_sum + table_facts(1_000).id_sum,
                         value_sum=PARQUET.value_sum + table_facts(1_000).value_sum)
CSV = table_facts(10_000)

# "tier": three Sprox nodes over moto behind nginx (deploy/nginx/sprox-tier.conf).
ALL_ORIGINS = ["local", "moto", pytest.param("seaweedfs", marks=pytest.mark.seaweedfs), "tier"]
on_all_origins = pytest.mark.parametrize("store", ALL_ORIGINS, indirect=True)
on_local_origin_and_tier = pytest.mark.parametrize("store", ["local", "tier"], indirect=True)


@dataclass
class Store:
    """A bucket, seeded with the objects above, reached through a running Sprox."""

    target: SproxUnderTest
    bucket: str
    files: Path  # local copies of the seeded Parquet and CSV files

    @property
    def endpoint(self) -> str:
        return self.target.endpoint

    @property
    def port(self) -> int:
        return self.target.port

    def url(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"

    def log(self) -> str:
        return self.target.sprox.log_text()


def _create_bucket(target: SproxUnderTest, bucket: str) -> None:
    # Buckets are made at the origin: these tests are about clients reading and
    # writing objects, not about bucket administration through Sprox.
    if target.origin == "local":
        assert target.origin_dir is not None
        (target.origin_dir / bucket).mkdir()
    else:
        assert target.upstream is not None
        client = s3_client(target.upstream.endpoint)
        client.create_bucket(Bucket=bucket)
        client.close()


@pytest.fixture(scope="module")
def store(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Store:
    origin = request.param
    target: SproxUnderTest = request.getfixturevalue(
        {"local": "sprox_local_sigv4", "moto": "sprox_moto", "seaweedfs": "sprox_seaweed",
         "tier": "sprox_tier"}[origin])
    bucket = f"compat-clients-{uuid.uuid4().hex[:10]}"
    _create_bucket(target, bucket)

    files = tmp_path_factory.mktemp(f"seed-{origin}")
    make_parquet(files / "part-0.parquet", rows=PARQUET.rows, row_groups=4)
    make_parquet(files / "part-1.parquet", rows=1_000, row_groups=1)
    make_csv(files / "table.csv", rows=CSV.rows)
    seed = {key: object_bytes(key, size) for key, size in LISTING.items()}
    seed[OUTSIDE_LISTING] = object_bytes(OUTSIDE_LISTING, 100)
    seed[PARQUET_KEY] = (files / "part-0.parquet").read_bytes()
    seed[PARQUET_SMALL_KEY] = (files / "part-1.parquet").read_bytes()
    seed[CSV_KEY] = (files / "table.csv").read_bytes()

    client = s3_client(target.endpoint)
    for key, body in seed.items():
        client.put_object(Bucket=bucket, Key=key, Body=body)
    client.close()
    return Store(target, bucket, files)


def origin_bytes(store: Store, key: str) -> bytes:
    """The object's bytes as stored at the origin, read around Sprox."""
    target = store.target
    if target.origin == "local":
        assert target.origin_dir is not None
        return (target.origin_dir / store.bucket / key).read_bytes()  # plain keys map to paths
    assert target.upstream is not None
    client = s3_client(target.upstream.endpoint)
    try:
        return client.get_object(Bucket=store.bucket, Key=key)["Body"].read()
    finally:
        client.close()


@on_all_origins
def test_seeded_objects_reached_the_origin(store: Store) -> None:
    for key, size in LISTING.items():
        assert_bytes(key, 0, origin_bytes(store, key), size)
    assert origin_bytes(store, PARQUET_KEY) == (store.files / "part-0.parquet").read_bytes()


def _sum_rows(table) -> tuple[int, int]:
    """(row count, sum of the value column) of a pyarrow Table."""
    import pyarrow.compute as pc

    return table.num_rows, pc.sum(table.column("value")).as_py()


# -- boto3 -------------------------------------------------------------------------------


@pytest.fixture
def boto3_client(store: Store):
    client = s3_client(store.endpoint)
    yield client
    client.close()


@on_all_origins
def test_boto3_lists_a_prefix(store: Store, boto3_client) -> None:
    page = boto3_client.list_objects_v2(Bucket=store.bucket, Prefix="listing/")
    assert {o["Key"]: o["Size"] for o in page["Contents"]} == LISTING
    page = boto3_client.list_objects_v2(Bucket=store.bucket, Prefix="listing/", Delimiter="/")
    assert sorted(o["Key"] for o in page["Contents"]) == ["listing/a.bin", "listing/b.bin"]
    assert [p["Prefix"] for p in page["CommonPrefixes"]] == ["listing/sub/"]


@on_all_origins
def test_boto3_reads_parquet_and_csv(store: Store, boto3_client) -> None:
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    body = boto3_client.get_object(Bucket=store.bucket, Key=PARQUET_KEY)["Body"].read()
    assert _sum_rows(pq.read_table(io.BytesIO(body))) == (PARQUET.rows, PARQUET.value_sum)
    body = boto3_client.get_object(Bucket=store.bucket, Key=CSV_KEY)["Body"].read()
    assert _sum_rows(pacsv.read_csv(io.BytesIO(body))) == (CSV.rows, CSV.value_sum)


@on_all_origins
def test_boto3_uploads_and_downloads(store: Store, boto3_client) -> None:
    from boto3.s3.transfer import TransferConfig

    small_key, big_key = "uploads/boto3/small.bin", "uploads/boto3/multipart.bin"
    small, big = object_bytes(small_key, 1000), object_bytes(big_key, 12 * MiB)
    boto3_client.put_object(Bucket=store.bucket, Key=small_key, Body=small)
    five_mib_parts = TransferConfig(multipart_threshold=5 * MiB, multipart_chunksize=5 * MiB,
                                    max_concurrency=4)
    boto3_client.upload_fileobj(io.BytesIO(big), store.bucket, big_key, Config=five_mib_parts)
    assert_bytes(big_key, 0, origin_bytes(store, big_key), len(big))

    got = boto3_client.get_object(Bucket=store.bucket, Key=small_key)["Body"].read()
    assert_bytes(small_key, 0, got, len(small))
    head = boto3_client.head_object(Bucket=store.bucket, Key=big_key)
    assert head["ContentLength"] == len(big)
    assert head["ETag"].endswith('-3"'), f"multipart ETag should end with -3: {head['ETag']}"
    # A multipart download: HEAD, then 5 MiB ranges (with If-Match) in parallel.
    out = io.BytesIO()
    boto3_client.download_fileobj(store.bucket, big_key, out, Config=five_mib_parts)
    assert_bytes(big_key, 0, out.getvalue(), len(big))


# -- awscli ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def aws_cli(make_client_env, tmp_path_factory: pytest.TempPathFactory):
    """`aws_cli(store, *args) -> stdout` runs the `aws` console script against Sprox,
    with 5 MB multipart threshold and parts set by `aws configure set`."""
    aws = find_script("aws")
    assert aws is not None, "the aws console script (awscli) is not installed"
    config = tmp_path_factory.mktemp("awscli") / "config"
    config.write_text("")

    def run(store: Store | None, *args: str) -> str:
        env = make_client_env(store.endpoint if store else "http://127.0.0.1:1",
                              AWS_CONFIG_FILE=str(config))
        result = subprocess.run([aws, *args], env=env, capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            sprox_log = store.log()[-4000:] if store else ""
            pytest.fail(f"aws {' '.join(args)} exited {result.returncode}\nstdout: {result.stdout}\n"
                        f"stderr: {result.stderr}\nsprox log (tail):\n{sprox_log}")
        return result.stdout

    for setting, value in [("default.s3.multipart_threshold", "5MB"),
                           ("default.s3.multipart_chunksize", "5MB"),
                           ("default.s3.addressing_style", "path")]:
        run(None, "configure", "set", setting, value)
    return run


@on_local_origin_and_tier
def test_awscli_lists_a_prefix(store: Store, aws_cli) -> None:
    out = aws_cli(store, "s3", "ls", "--recursive", f"s3://{store.bucket}/listing/")
    # Lines: "<date> <time> <size> <key>"
    listed = {line.split()[3]: int(line.split()[2]) for line in out.splitlines() if line.strip()}
    assert listed == LISTING
    out = aws_cli(store, "s3api", "list-objects-v2", "--bucket", store.bucket, "--prefix", "listing/",
                  "--output", "json")
    assert {o["Key"]: o["Size"] for o in json.loads(out)["Contents"]} == LISTING


@on_local_origin_and_tier
def test_awscli_reads_parquet_and_csv(store: Store, aws_cli, tmp_path: Path) -> None:
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    aws_cli(store, "s3", "cp", store.url(PARQUET_KEY), str(tmp_path / "t.parquet"))
    assert _sum_rows(pq.read_table(tmp_path / "t.parquet")) == (PARQUET.rows, PARQUET.value_sum)
    aws_cli(store, "s3", "cp", store.url(CSV_KEY), str(tmp_path / "t.csv"))
    assert _sum_rows(pacsv.read_csv(tmp_path / "t.csv")) == (CSV.rows, CSV.value_sum)


@on_local_origin_and_tier
def test_awscli_uploads_and_downloads(store: Store, aws_cli, tmp_path: Path) -> None:
    for name, size, parts in [("small.bin", 2000, None), ("multipart.bin", 12 * MiB, 3)]:
        key = f"uploads/awscli/{name}"
        (tmp_path / name).write_bytes(object_bytes(key, size))
        aws_cli(store, "s3", "cp", str(tmp_path / name), store.url(key))
        head = json.loads(aws_cli(store, "s3api", "head-object", "--bucket", store.bucket, "--key", key,
                                  "--output", "json"))
        assert head["ContentLength"] == size
        if parts:
            assert head["ETag"].endswith(f'-{parts}"'), f"multipart ETag: {head['ETag']}"
        aws_cli(store, "s3", "cp", store.url(key), str(tmp_path / f"down-{name}"))
        assert_bytes(key, 0, (tmp_path / f"down-{name}").read_bytes(), size)


# -- s3fs --------------------------------------------------------------------------------


@pytest.fixture
def s3fs_fs(store: Store):
    import s3fs

    return s3fs.S3FileSystem(key=TEST_ACCESS_KEY, secret=TEST_SECRET_KEY, endpoint_url=store.endpoint,
                             client_kwargs={"region_name": TEST_REGION},
                             config_kwargs={"s3": {"addressing_style": "path"}},
                             skip_instance_cache=True, use_listings_cache=False)


@on_local_origin_and_tier
def test_s3fs_lists_a_prefix(store: Store, s3fs_fs) -> None:
    found = s3fs_fs.find(f"{store.bucket}/listing/", detail=True)
    assert {path.split("/", 1)[1]: info["size"] for path, info in found.items()} == LISTING
    top = s3fs_fs.ls(f"{store.bucket}/listing/", detail=False)
    assert sorted(p.split("/", 1)[1] for p in top) == ["listing/a.bin", "listing/b.bin", "listing/sub"]


@on_local_origin_and_tier
def test_s3fs_reads_parquet_and_csv(store: Store, s3fs_fs) -> None:
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    table = pq.read_table(f"{store.bucket}/{PARQUET_KEY}", filesystem=s3fs_fs)
    assert _sum_rows(table) == (PARQUET.rows, PARQUET.value_sum)
    with s3fs_fs.open(f"{store.bucket}/{CSV_KEY}", "rb") as f:
        assert _sum_rows(pacsv.read_csv(f)) == (CSV.rows, CSV.value_sum)


# -- pyarrow -----------------------------------------------------------------------------


@pytest.fixture
def arrow_fs(store: Store):
    from pyarrow.fs import S3FileSystem

    return S3FileSystem(access_key=TEST_ACCESS_KEY, secret_key=TEST_SECRET_KEY, region=TEST_REGION,
                        endpoint_override=f"127.0.0.1:{store.port}", scheme="http")


@on_all_origins
def test_pyarrow_lists_a_prefix(store: Store, arrow_fs) -> None:
    from pyarrow.fs import FileSelector, FileType

    infos = arrow_fs.get_file_info(FileSelector(f"{store.bucket}/listing", recursive=True))
    files = {i.path.split("/", 1)[1]: i.size for i in infos if i.type == FileType.File}
    assert files == LISTING


@on_all_origins
def test_pyarrow_reads_parquet_and_csv(store: Store, arrow_fs) -> None:
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    table = pq.read_table(f"{store.bucket}/{PARQUET_KEY}", filesystem=arrow_fs)
    assert _sum_rows(table) == (PARQUET.rows, PARQUET.value_sum)
    table = pq.read_table(f"{store.bucket}/table", filesystem=arrow_fs)  # lists, then reads both
    assert _sum_rows(table) == (PARQUET_DIR.rows, PARQUET_DIR.value_sum)
    with arrow_fs.open_input_stream(f"{store.bucket}/{CSV_KEY}") as f:
        assert _sum_rows(pacsv.read_csv(f)) == (CSV.rows, CSV.value_sum)


# -- DuckDB ------------------------------------------------------------------------------


def _httpfs_extension() -> Path:
    """The httpfs extension shipped in the duckdb-extension-httpfs wheel (loads offline)."""
    import duckdb
    import duckdb_extension_httpfs

    root = Path(duckdb_extension_httpfs.__file__).parent / "extensions"
    path = root / f"v{duckdb.__version__}" / "httpfs.duckdb_extension"
    assert path.is_file(), f"no httpfs extension for duckdb {duckdb.__version__} under {root}: " \
                           f"{sorted(p.name for p in root.rglob('*'))}"
    return path


@pytest.fixture
def duck(store: Store):
    import duckdb

    con = duckdb.connect(":memory:", config={"autoinstall_known_extensions": False,
                                             "autoload_known_extensions": False})
    con.execute(f"LOAD '{_httpfs_extension()}'")
    con.execute(f"""CREATE SECRET sprox (TYPE s3, KEY_ID '{TEST_ACCESS_KEY}', SECRET '{TEST_SECRET_KEY}',
                    REGION '{TEST_REGION}', ENDPOINT '127.0.0.1:{store.port}', URL_STYLE 'path',
                    USE_SSL false)""")
    yield con
    con.close()


@on_all_origins
def test_duckdb_lists_a_prefix(store: Store, duck) -> None:
    rows = duck.execute(f"SELECT file FROM glob('s3://{store.bucket}/listing/**') ORDER BY file").fetchall()
    assert [r[0] for r in rows] == [store.url(k) for k in sorted(LISTING)]


@on_all_origins
def test_duckdb_reads_parquet_and_csv(store: Store, duck) -> None:
    query = "SELECT count(*), sum(value) FROM {}"
    assert duck.execute(query.format(f"read_parquet('{store.url(PARQUET_KEY)}')")).fetchone() == \
        (PARQUET.rows, PARQUET.value_sum)
    assert duck.execute(query.format(f"read_parquet('s3://{store.bucket}/table/*.parquet')")).fetchone() == \
        (PARQUET_DIR.rows, PARQUET_DIR.value_sum)
    assert duck.execute(query.format(f"read_csv('{store.url(CSV_KEY)}')")).fetchone() == \
        (CSV.rows, CSV.value_sum)


# -- DataFusion --------------------------------------------------------------------------


@pytest.fixture
def datafusion_ctx(store: Store):
    from datafusion import SessionContext
    from datafusion.object_store import AmazonS3

    s3 = AmazonS3(bucket_name=store.bucket, region=TEST_REGION, access_key_id=TEST_ACCESS_KEY,
                  secret_access_key=TEST_SECRET_KEY, endpoint=store.endpoint, allow_http=True)
    ctx = SessionContext()
    ctx.register_object_store("s3://", s3, store.bucket)
    return ctx


def _datafusion_totals(ctx, table: str) -> tuple[int, int]:
    result = ctx.sql(f'SELECT count(*) AS n, sum(value) AS s FROM "{table}"').to_pydict()
    return result["n"][0], result["s"][0]


@on_local_origin_and_tier
def test_datafusion_lists_and_reads_parquet(store: Store, datafusion_ctx) -> None:
    datafusion_ctx.register_parquet("one", store.url(PARQUET_KEY))
    assert _datafusion_totals(datafusion_ctx, "one") == (PARQUET.rows, PARQUET.value_sum)
    # A directory table: DataFusion lists the prefix and reads every file under it.
    datafusion_ctx.register_parquet("dir", f"s3://{store.bucket}/table/")
    assert _datafusion_totals(datafusion_ctx, "dir") == (PARQUET_DIR.rows, PARQUET_DIR.value_sum)


@on_local_origin_and_tier
def test_datafusion_reads_csv(store: Store, datafusion_ctx) -> None:
    datafusion_ctx.register_csv("csv", store.url(CSV_KEY))
    assert _datafusion_totals(datafusion_ctx, "csv") == (CSV.rows, CSV.value_sum)


# -- Polars ------------------------------------------------------------------------------


def _polars_options(store: Store) -> dict[str, str]:
    return {"aws_endpoint_url": store.endpoint, "aws_allow_http": "true", "aws_region": TEST_REGION,
            "aws_access_key_id": TEST_ACCESS_KEY, "aws_secret_access_key": TEST_SECRET_KEY}


@on_local_origin_and_tier
def test_polars_lists_and_reads_parquet(store: Store) -> None:
    import polars as pl

    options = _polars_options(store)
    frame = pl.read_parquet(store.url(PARQUET_KEY), storage_options=options)
    assert (frame.height, frame["value"].sum()) == (PARQUET.rows, PARQUET.value_sum)
    # A glob: Polars lists table/ and reads both files.
    frame = pl.scan_parquet(f"s3://{store.bucket}/table/*.parquet", storage_options=options,
                            include_file_paths="path").collect()
    assert (frame.height, frame["value"].sum()) == (PARQUET_DIR.rows, PARQUET_DIR.value_sum)
    assert sorted(frame["path"].unique()) == [store.url(PARQUET_KEY), store.url(PARQUET_SMALL_KEY)]


@on_local_origin_and_tier
def test_polars_reads_csv(store: Store) -> None:
    import polars as pl

    frame = pl.read_csv(store.url(CSV_KEY), storage_options=_polars_options(store))
    assert (frame.height, frame["value"].sum()) == (CSV.rows, CSV.value_sum)


# -- obstore -----------------------------------------------------------------------------


@pytest.fixture
def obstore_store(store: Store):
    from obstore.store import S3Store

    return S3Store(store.bucket, endpoint=store.endpoint, access_key_id=TEST_ACCESS_KEY,
                   secret_access_key=TEST_SECRET_KEY, region=TEST_REGION,
                   client_options={"allow_http": True})


@on_local_origin_and_tier
def test_obstore_lists_a_prefix(store: Store, obstore_store) -> None:
    import obstore

    listed = {meta["path"]: meta["size"] for batch in obstore.list(obstore_store, prefix="listing/")
              for meta in batch}
    assert listed == LISTING
    top = obstore.list_with_delimiter(obstore_store, prefix="listing/")
    assert sorted(m["path"] for m in top["objects"]) == ["listing/a.bin", "listing/b.bin"]
    assert top["common_prefixes"] == ["listing/sub"]


@on_local_origin_and_tier
def test_obstore_reads_parquet_and_csv(store: Store, obstore_store) -> None:
    import obstore
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    body = obstore.get(obstore_store, PARQUET_KEY).bytes()
    assert _sum_rows(pq.read_table(io.BytesIO(bytes(body)))) == (PARQUET.rows, PARQUET.value_sum)
    # Footer and column chunks by range, as query engines built on obstore read.
    expected = (store.files / "part-0.parquet").read_bytes()
    size = len(expected)
    ranges = obstore.get_ranges(obstore_store, PARQUET_KEY, starts=[0, size - 65536, 100],
                                ends=[4, size, 300_000])
    assert [bytes(r) for r in ranges] == [expected[0:4], expected[size - 65536:], expected[100:300_000]]
    body = obstore.get(obstore_store, CSV_KEY).bytes()
    assert _sum_rows(pacsv.read_csv(io.BytesIO(bytes(body)))) == (CSV.rows, CSV.value_sum)


# -- minio -------------------------------------------------------------------------------


@on_local_origin_and_tier
def test_minio_lists_uploads_and_downloads(store: Store) -> None:
    from minio import Minio

    client = Minio(f"127.0.0.1:{store.port}", access_key=TEST_ACCESS_KEY, secret_key=TEST_SECRET_KEY,
                   secure=False, region=TEST_REGION)
    listed = {o.object_name: o.size for o in client.list_objects(store.bucket, prefix="listing/",
                                                                 recursive=True)}
    assert listed == LISTING
    for name, size in [("small.bin", 3000), ("multipart.bin", 12 * MiB)]:
        key = f"uploads/minio/{name}"
        data = object_bytes(key, size)
        client.put_object(store.bucket, key, io.BytesIO(data), length=size, part_size=5 * MiB)
        assert client.stat_object(store.bucket, key).size == size
        response = client.get_object(store.bucket, key)
        try:
            assert_bytes(key, 0, response.read(), size)
        finally:
            response.close()
            response.release_conn()
