"""`LocalOrigin`: S3 operations answered from a local directory.

Each handler reads its parameters (`params`), does the blocking work on the origin's
worker threads (`store.DirectoryStore`, `multipart.UploadStore`, `listing`) and
answers with S3's headers or XML. Nothing here touches the disk directly.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import quote

from multidict import CIMultiDict

from ...ranges import RangeNotSatisfiable, content_range, parse_range
from ...s3 import checksums, errors
from ...s3 import xml as s3xml
from ...s3.conditions import apply_response_overrides, check_conditions, check_copy_source_conditions, http_date
from ...s3.request import S3Request
from ..base import OriginResponse, UpstreamBodyError
from . import params
from .integrity import ChecksumPlan
from .keys import key_to_names
from .listing import ListedObject, decode_token, encode_token, entry_name, list_entries, page_of_uploads
from .multipart import UploadStore
from .records import ObjectRecord, Representation, StoredChecksum, UploadRecord
from .store import CHUNK_SIZE, DirectoryStore, OpenObject, TempFile

# CompleteMultipartUpload lists up to 10,000 parts of ~100 bytes of XML each.
MAX_XML_BODY = 4 * 1024 * 1024
REGION = "us-east-1"
OWNER_ID = "75aa57f09aa0c8caeab4f8c24e99d10f8e7faeebf76c078efc7c6caea54ba06a"
OWNER_NAME = "sprox"


# --- response helpers ----------------------------------------------------------------


def iso8601(mtime_ns: int) -> str:
    """S3's timestamp in XML: ``2009-10-12T17:50:30.123Z``."""
    seconds, rest = divmod(mtime_ns, 1_000_000_000)
    moment = datetime.fromtimestamp(seconds, tz=timezone.utc)
    return f"{moment:%Y-%m-%dT%H:%M:%S}.{rest // 1_000_000:03d}Z"


def _owner() -> list[s3xml.Node]:
    return [("ID", OWNER_ID), ("DisplayName", OWNER_NAME)]


async def _one_chunk(data: bytes) -> AsyncIterator[bytes]:
    yield data


def _xml_response(root: str, children: list[s3xml.Node] | str, status: int = 200,
                  headers: dict[str, str] | None = None) -> OriginResponse:
    body = s3xml.render(root, children)
    out = CIMultiDict(headers or {})
    out["Content-Type"] = s3xml.CONTENT_TYPE
    out["Content-Length"] = str(len(body))
    return OriginResponse(status, out, _one_chunk(body))


def _empty_response(status: int = 200, headers: dict[str, str] | None = None) -> OriginResponse:
    out = CIMultiDict(headers or {})
    if status != 204:
        out["Content-Length"] = "0"
    return OriginResponse(status, out)


def _checksum_headers(checksum: StoredChecksum | None, *, with_type: bool = True) -> dict[str, str]:
    """`x-amz-checksum-<algorithm>` (and `x-amz-checksum-type`) for a stored checksum."""
    if not checksum:
        return {}
    algorithm, value = checksum
    headers = {checksums.header_name(algorithm): value}
    if with_type:
        headers["x-amz-checksum-type"] = "FULL_OBJECT"
    return headers


def _object_headers(record: ObjectRecord) -> CIMultiDict[str]:
    headers: CIMultiDict[str] = CIMultiDict()
    headers["Content-Type"] = record.content_type
    headers["ETag"] = record.quoted_etag
    headers["Last-Modified"] = http_date(record.last_modified)
    headers["Accept-Ranges"] = "bytes"
    headers.update(record.headers)
    headers.update(record.metadata)
    return headers


def _list_bucket_result(request: S3Request, query: params.ListParams, position: list[s3xml.Node],
                        entries: list[ListedObject | str], truncated: bool, *, owner: bool) -> OriginResponse:
    """A ListObjects (v1 or v2) answer; `position` holds the elements, between Prefix
    and MaxKeys, that say where this page starts and where the next one would."""
    encode = query.encode
    contents: list[s3xml.Node] = []
    prefixes: list[s3xml.Node] = []
    for entry in entries:
        if isinstance(entry, str):
            prefixes.append(("CommonPrefixes", [("Prefix", encode(entry))]))
            continue
        record = entry.record
        contents.append(("Contents", [
            ("Key", encode(entry.key)),
            ("LastModified", iso8601(record.mtime_ns)),
            ("ETag", record.quoted_etag),
            ("Size", record.size),
            ("Owner", _owner() if owner else None),
            ("StorageClass", "STANDARD"),
        ]))
    return _xml_response("ListBucketResult", [
        ("Name", request.bucket),
        ("Prefix", encode(query.prefix)),
        *position,
        ("MaxKeys", query.max_entries),
        ("Delimiter", encode(query.delimiter) if query.delimiter else None),
        ("EncodingType", "url" if query.url_encoded else None),
        ("IsTruncated", truncated),
        *contents,
        *prefixes,
    ])


def _read_answer(request: S3Request, record: ObjectRecord, part_number: int | None,
                 range_header: str | None) -> tuple[int, CIMultiDict[str], int, int]:
    """Status, headers, first byte and length of a GET or HEAD of `record`."""
    size = record.size
    check_conditions(request.headers, record.quoted_etag, record.last_modified)
    headers = _object_headers(record)
    status, first, length = 200, 0, size
    if part_number is not None:
        first, length = record.part_range(part_number)
        if record.part_sizes:
            headers["x-amz-mp-parts-count"] = str(len(record.part_sizes))
        if length:
            status = 206
            headers["Content-Range"] = content_range(first, first + length - 1, size)
    else:
        try:
            selected = parse_range(range_header, size)
        except RangeNotSatisfiable:
            raise errors.invalid_range(size, range_header or "") from None
        if selected is not None:
            status = 206
            first, length = selected[0], selected[1] - selected[0] + 1
            headers["Content-Range"] = content_range(selected[0], selected[1], size)
    headers["Content-Length"] = str(length)
    if status == 200 and request.headers.get("x-amz-checksum-mode", "").upper() == "ENABLED":
        headers.update(_checksum_headers(record.checksum))
    apply_response_overrides(request.query, headers)
    return status, headers, first, length


# --- the origin ----------------------------------------------------------------------


class LocalOrigin:
    """Serves a local directory with S3's semantics (see the package docstring).

    `LocalOrigin(root)`; `await start()` creates `root` and its state directory;
    `await send(request)` answers one request (raising `S3Error` for S3 errors);
    `await close()` waits for the file operations in flight on its worker threads.
    A GET's response holds an open file until `OriginResponse.close()`."""

    def __init__(self, root: Path | str, *, max_workers: int = 32) -> None:
        self.root = Path(root).expanduser().absolute()
        self.description = f"local directory {self.root}"
        self.store = DirectoryStore(self.root)
        self.uploads = UploadStore(self.store)
        self._executor = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="sprox-local")
        self._handlers: dict[str, Callable[[S3Request], Any]] = {
            "ListBuckets": self._list_buckets,
            "CreateBucket": self._create_bucket,
            "DeleteBucket": self._delete_bucket,
            "HeadBucket": self._head_bucket,
            "GetBucketLocation": self._get_bucket_location,
            "ListObjects": self._list_objects_v1,
            "ListObjectsV2": self._list_objects_v2,
            "GetObject": functools.partial(self._get_object, head=False),
            "HeadObject": functools.partial(self._get_object, head=True),
            "PutObject": self._put_object,
            "CopyObject": self._copy_object,
            "DeleteObject": self._delete_object,
            "DeleteObjects": self._delete_objects,
            "CreateMultipartUpload": self._create_multipart_upload,
            "UploadPart": self._upload_part,
            "UploadPartCopy": self._upload_part_copy,
            "CompleteMultipartUpload": self._complete_multipart_upload,
            "AbortMultipartUpload": self._abort_multipart_upload,
            "ListParts": self._list_parts,
            "ListMultipartUploads": self._list_multipart_uploads,
        }

    async def _run(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run blocking file-system work on this origin's threads, off the event loop."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(function, *args, **kwargs))

    async def start(self) -> None:
        await self._run(self.store.prepare)

    async def close(self) -> None:
        # Waiting for running file operations (they cannot be interrupted) must not
        # block the loop either.
        await asyncio.to_thread(self._executor.shutdown, True, cancel_futures=True)

    async def send(self, request: S3Request) -> OriginResponse:
        handler = self._handlers.get(request.operation)
        if handler is None:
            raise errors.not_implemented(f"{request.operation} is not supported by the local-directory origin")
        return await handler(request)

    # -- resources held across awaits -------------------------------------------------

    @contextlib.asynccontextmanager
    async def _temp_file(self, **kwargs: Any) -> AsyncIterator[TempFile]:
        """A new temp file (`DirectoryStore.new_temp` arguments), discarded on exit
        unless committed."""
        temp: TempFile = await self._run(self.store.new_temp, **kwargs)
        try:
            yield temp
        finally:
            await self._run(temp.discard)

    @contextlib.asynccontextmanager
    async def _copy_source(self, request: S3Request) -> AsyncIterator[OpenObject]:
        """The object `x-amz-copy-source` names, open, its conditions checked."""
        bucket, key = params.copy_source(request.headers)
        opened: OpenObject = await self._run(self.store.open_object, bucket, key)
        try:
            check_copy_source_conditions(request.headers, opened.record.quoted_etag, opened.record.last_modified)
            yield opened
        finally:
            await self._run(opened.close)

    # -- buckets ----------------------------------------------------------------------

    async def _bucket_must_exist(self, request: S3Request) -> None:
        await self._run(self.store.bucket_dir, request.bucket)

    async def _list_buckets(self, request: S3Request) -> OriginResponse:
        buckets = await self._run(self.store.list_buckets)
        return _xml_response("ListAllMyBucketsResult", [
            ("Owner", _owner()),
            ("Buckets", [("Bucket", [("Name", name), ("CreationDate", iso8601(created))])
                         for name, created in buckets]),
        ])

    async def _create_bucket(self, request: S3Request) -> OriginResponse:
        if request.body is not None:
            # The optional CreateBucketConfiguration names a region: one region here.
            await request.body.read_all(MAX_XML_BODY)
        await self._run(self.store.create_bucket, request.bucket)
        return _empty_response(200, {"Location": f"/{request.bucket}"})

    def _delete_bucket_blocking(self, bucket: str) -> None:
        self.store.delete_bucket(bucket)
        self.uploads.discard_bucket(bucket)

    async def _delete_bucket(self, request: S3Request) -> OriginResponse:
        await self._run(self._delete_bucket_blocking, request.bucket)
        return _empty_response(204)

    async def _head_bucket(self, request: S3Request) -> OriginResponse:
        await self._bucket_must_exist(request)
        return _empty_response(200, {"x-amz-bucket-region": REGION})

    async def _get_bucket_location(self, request: S3Request) -> OriginResponse:
        await self._bucket_must_exist(request)
        return _xml_response("LocationConstraint", "")  # empty means us-east-1

    # -- listing ----------------------------------------------------------------------

    async def _list_page(self, request: S3Request, query: params.ListParams,
                         start: str) -> tuple[list[ListedObject | str], bool]:
        """A page of ListObjects entries after `start`, and whether more follow."""
        if query.max_entries == 0:
            await self._bucket_must_exist(request)
            return [], False
        return await self._run(list_entries, self.store, request.bucket, query.prefix, query.delimiter, start,
                               query.max_entries)

    async def _list_objects_v2(self, request: S3Request) -> OriginResponse:
        query = params.ListParams.from_query(request.query)
        start_after = request.query.get("start-after")
        token = request.query.get("continuation-token")
        # The token wins over start-after, as in S3.
        start = decode_token(token) if token is not None else start_after or ""
        entries, truncated = await self._list_page(request, query, start)
        return _list_bucket_result(request, query, [
            ("ContinuationToken", token),
            ("NextContinuationToken", encode_token(entry_name(entries[-1])) if truncated else None),
            ("StartAfter", query.encode(start_after) if start_after is not None else None),
            ("KeyCount", len(entries)),
        ], entries, truncated, owner=request.query.get("fetch-owner") == "true")

    async def _list_objects_v1(self, request: S3Request) -> OriginResponse:
        query = params.ListParams.from_query(request.query)
        marker = request.query.get("marker", "")
        entries, truncated = await self._list_page(request, query, marker)
        # Without a delimiter S3 leaves NextMarker out: clients use the last key.
        next_marker = query.encode(entry_name(entries[-1])) if truncated and query.delimiter else None
        return _list_bucket_result(request, query, [
            ("Marker", query.encode(marker)),
            ("NextMarker", next_marker),
        ], entries, truncated, owner=True)

    # -- reading objects --------------------------------------------------------------

    async def _get_object(self, request: S3Request, *, head: bool) -> OriginResponse:
        part_number = params.part_number(request.query, required=False)
        range_header = request.headers.get("Range")
        if part_number is not None and range_header is not None:
            raise errors.invalid_request("Cannot specify both Range header and partNumber query parameter")
        opened: OpenObject = await self._run(self.store.open_object, request.bucket, request.key)
        try:
            status, headers, first, length = _read_answer(request, opened.record, part_number, range_header)
        except BaseException:
            await self._run(opened.close)
            raise
        if head:
            await self._run(opened.close)
            return OriginResponse(status, headers)

        async def close() -> None:
            await self._run(opened.close)

        return OriginResponse(status, headers, self._stream(opened, first, length), on_close=close)

    async def _stream(self, opened: OpenObject, offset: int, length: int) -> AsyncIterator[bytes]:
        end = offset + length
        while offset < end:
            chunk = await self._run(os.pread, opened.fd, min(CHUNK_SIZE, end - offset), offset)
            if not chunk:
                # Truncated in place by someone else after we sent Content-Length.
                raise UpstreamBodyError(f"local file shrank while being read ({offset} of {end} bytes)")
            offset += len(chunk)
            yield chunk

    # -- writing objects --------------------------------------------------------------

    async def _check_target(self, request: S3Request) -> None:
        """Fail before any reading or copying if the bucket is missing or the key
        could never be stored."""
        await self._bucket_must_exist(request)
        key_to_names(request.key)

    async def _receive(self, request: S3Request, temp: TempFile, plan: ChecksumPlan) -> StoredChecksum | None:
        """Stream the request payload into `temp`, in CHUNK_SIZE writes off the loop;
        the checksum to store with it, once `plan`'s checks pass."""
        body = request.body
        if body is not None:
            pending: list[bytes] = []
            pending_size = 0
            async for chunk in body.decoded():
                pending.append(chunk)
                pending_size += len(chunk)
                if pending_size >= CHUNK_SIZE:
                    await self._run(temp.write, pending)
                    pending, pending_size = [], 0
            if pending:
                await self._run(temp.write, pending)
        assert temp.md5 is not None
        computed = temp.checksum.b64digest() if temp.checksum is not None else None
        return plan.verify(temp.md5.digest(), body, computed)

    @contextlib.asynccontextmanager
    async def _received(self, request: S3Request) -> AsyncIterator[tuple[TempFile, StoredChecksum | None]]:
        """The payload in a temp file, its digests checked, with the checksum to store."""
        plan = ChecksumPlan.from_request(request.headers)
        async with self._temp_file(checksum=plan.hasher(request.body)) as temp:
            yield temp, await self._receive(request, temp, plan)

    async def _put_object(self, request: S3Request) -> OriginResponse:
        representation = Representation.from_request(request.headers)
        precondition = params.write_precondition(request.headers)
        await self._check_target(request)
        async with self._received(request) as (temp, checksum):
            etag = temp.md5.hexdigest()
            record = await self._run(
                self.store.commit_object, request.bucket, request.key, temp,
                lambda st: ObjectRecord.written(st, etag, representation, checksum=checksum), precondition)
        return _empty_response(200, {"ETag": record.quoted_etag, **_checksum_headers(checksum)})

    async def _copy_object(self, request: S3Request) -> OriginResponse:
        directive = params.metadata_directive(request.headers)
        if params.copy_source(request.headers) == (request.bucket, request.key) and directive == "COPY":
            raise errors.invalid_request(
                "This copy request is illegal because it is trying to copy an object to itself without "
                "changing the object's metadata, storage class, website redirect location or encryption "
                "attributes.")
        replacement = Representation.from_request(request.headers) if directive == "REPLACE" else None
        await self._check_target(request)
        async with self._copy_source(request) as opened:
            source = opened.record
            representation = replacement or Representation.of(source)
            # Same bytes, same MD5: only a multipart source needs hashing afresh.
            multipart = source.part_sizes is not None or "-" in source.etag
            async with self._temp_file(md5=multipart) as temp:
                await self._run(temp.copy_from, opened.fd, 0, source.size)
                etag = temp.md5.hexdigest() if temp.md5 is not None else source.etag
                checksum = source.checksum if not multipart else None
                record = await self._run(
                    self.store.commit_object, request.bucket, request.key, temp,
                    lambda st: ObjectRecord.written(st, etag, representation, checksum=checksum))
        return _xml_response("CopyObjectResult", [
            ("LastModified", iso8601(record.mtime_ns)),
            ("ETag", record.quoted_etag),
        ])

    async def _delete_object(self, request: S3Request) -> OriginResponse:
        await self._run(self.store.delete_object, request.bucket, request.key)
        return _empty_response(204)

    async def _delete_objects(self, request: S3Request) -> OriginResponse:
        await self._bucket_must_exist(request)
        if request.body is None:
            raise errors.malformed_xml()
        keys, quiet = params.delete_request(await request.body.read_all(MAX_XML_BODY))
        results = await self._run(self.store.delete_objects, request.bucket, keys)
        nodes: list[s3xml.Node] = []
        for key, error in results:
            if error is not None:
                nodes.append(("Error", [("Key", key), ("Code", error.code), ("Message", error.message)]))
            elif not quiet:
                nodes.append(("Deleted", [("Key", key)]))
        return _xml_response("DeleteResult", nodes)

    # -- multipart uploads ------------------------------------------------------------

    async def _create_multipart_upload(self, request: S3Request) -> OriginResponse:
        representation = Representation.from_request(request.headers)
        algorithm = (request.headers.get("x-amz-checksum-algorithm") or "").lower() or None
        upload = await self._run(self.uploads.create, request.bucket, request.key, representation, algorithm)
        return _xml_response("InitiateMultipartUploadResult", [
            ("Bucket", request.bucket),
            ("Key", request.key),
            ("UploadId", upload.upload_id),
        ])

    async def _get_upload(self, request: S3Request) -> UploadRecord:
        return await self._run(self.uploads.get, request.bucket, request.key, request.query.get("uploadId", ""))

    async def _upload_part(self, request: S3Request) -> OriginResponse:
        number = params.part_number(request.query, required=True)
        upload = await self._get_upload(request)
        async with self._received(request) as (temp, checksum):
            part = await self._run(self.uploads.commit_part, upload, number, temp, checksum)
        return _empty_response(200, {"ETag": part.quoted_etag, **_checksum_headers(checksum, with_type=False)})

    async def _upload_part_copy(self, request: S3Request) -> OriginResponse:
        number = params.part_number(request.query, required=True)
        upload = await self._get_upload(request)
        async with self._copy_source(request) as opened:
            offset, length = params.copy_source_range(request.headers, opened.record.size)
            async with self._temp_file() as temp:
                await self._run(temp.copy_from, opened.fd, offset, length)
                part = await self._run(self.uploads.commit_part, upload, number, temp, None)
        return _xml_response("CopyPartResult", [
            ("LastModified", iso8601(part.mtime_ns)),
            ("ETag", part.quoted_etag),
        ])

    async def _complete_multipart_upload(self, request: S3Request) -> OriginResponse:
        upload = await self._get_upload(request)
        if request.body is None:
            raise errors.malformed_xml()
        requested = params.complete_request(await request.body.read_all(MAX_XML_BODY))
        record = await self._run(self.uploads.complete, upload, requested)
        host = request.headers.get("Host", "localhost")
        location = f"http://{host}/{request.bucket}/{quote(request.key, safe='/~')}"
        return _xml_response("CompleteMultipartUploadResult", [
            ("Location", location),
            ("Bucket", request.bucket),
            ("Key", request.key),
            ("ETag", record.quoted_etag),
        ])

    async def _abort_multipart_upload(self, request: S3Request) -> OriginResponse:
        upload = await self._get_upload(request)
        await self._run(self.uploads.abort, upload)
        return _empty_response(204)

    async def _list_parts(self, request: S3Request) -> OriginResponse:
        upload = await self._get_upload(request)
        marker = params.int_param(request.query, "part-number-marker", 0, low=0, high=params.MAX_PART_NUMBER,
                                  message="Argument part-number-marker must be an integer between 0 and 10000")
        max_parts = params.page_size(request.query, "max-parts", params.MAX_LIST_PARTS)
        parts = [part for part in await self._run(self.uploads.list_parts, upload) if part.number > marker]
        truncated = len(parts) > max_parts
        parts = parts[:max_parts]
        return _xml_response("ListPartsResult", [
            ("Bucket", request.bucket),
            ("Key", request.key),
            ("UploadId", upload.upload_id),
            ("PartNumberMarker", marker),
            ("NextPartNumberMarker", parts[-1].number if parts else marker),
            ("MaxParts", max_parts),
            ("IsTruncated", truncated),
            *[("Part", [
                ("PartNumber", part.number),
                ("LastModified", iso8601(part.mtime_ns)),
                ("ETag", part.quoted_etag),
                ("Size", part.size),
            ]) for part in parts],
            ("Initiator", _owner()),
            ("Owner", _owner()),
            ("StorageClass", "STANDARD"),
        ])

    async def _list_multipart_uploads(self, request: S3Request) -> OriginResponse:
        query = params.ListParams.from_query(request.query, "max-uploads")
        encode = query.encode
        key_marker = request.query.get("key-marker", "")
        upload_id_marker = request.query.get("upload-id-marker", "")
        uploads = await self._run(self.uploads.list, request.bucket, query.prefix)
        entries, truncated = page_of_uploads(uploads, query.prefix, query.delimiter, key_marker, upload_id_marker,
                                             query.max_entries)
        next_key = next_id = None
        if truncated and entries:
            last = entries[-1]
            next_key = entry_name(last)
            next_id = "" if isinstance(last, str) else last.upload_id
        return _xml_response("ListMultipartUploadsResult", [
            ("Bucket", request.bucket),
            ("KeyMarker", encode(key_marker)),
            ("UploadIdMarker", upload_id_marker),
            ("NextKeyMarker", encode(next_key) if next_key is not None else None),
            ("NextUploadIdMarker", next_id),
            ("Prefix", encode(query.prefix)),
            ("Delimiter", encode(query.delimiter) if query.delimiter else None),
            ("MaxUploads", query.max_entries),
            ("EncodingType", "url" if query.url_encoded else None),
            ("IsTruncated", truncated),
            *[("Upload", [
                ("Key", encode(u.key)),
                ("UploadId", u.upload_id),
                ("Initiator", _owner()),
                ("Owner", _owner()),
                ("StorageClass", "STANDARD"),
                ("Initiated", iso8601(u.initiated_ns)),
            ]) for u in entries if isinstance(u, UploadRecord)],
            *[("CommonPrefixes", [("Prefix", encode(p))]) for p in entries if isinstance(p, str)],
        ])
