"""A local directory served as S3: the embedded default origin of `sprox serve`.

Every subdirectory of the root whose name is a valid bucket name is a bucket, and
every regular file below it is an object, so files a user drops into
``<root>/<bucket>/`` are served as they are. Sprox's own state lives in
``<root>/.sprox/`` (no bucket name starts with a dot)::

    <root>/<bucket>/<encoded key>                 the object's bytes, a plain file
    <root>/.sprox/meta/<bucket>/bucket.json       bucket creation time
    <root>/.sprox/meta/<bucket>/<hh>/<sha256>.json  object sidecar (see ObjectRecord)
    <root>/.sprox/tmp/                            files being written
    <root>/.sprox/uploads/<upload id>/            multipart uploads in progress

Keys map to paths segment by segment (split on "/"), see `encode_segment`: a
segment is kept as it is except that "%" is escaped where it could be read as an
escape, control characters are percent-encoded, and the segments "", "." and ".."
become "%", "%2E" and "%2E%2E". The mapping is injective and every encoded segment
is a plain file name, so no key (``../x``, ``a//b``, ``/x``, ``x/``, NUL, ...) can
reach outside its bucket directory. Names on disk that no key encodes to (invalid
UTF-8, ``a%2Fb``, ``%2e``) are neither listed nor served.

Sidecars are keyed by a hash of the key rather than mirroring the object tree: a
mirrored sidecar ``x.json`` would need to be a file for object ``x`` and a directory
for object ``x.json/y``, and the suffix would shorten the longest storable name. A
sidecar is valid only for the (size, mtime_ns) it records; a file changed or added by
hand gets its ETag recomputed (the MD5 of its bytes) and its content type guessed
from its name, and the result is cached in a new sidecar. Sprox keeps each key's
mtimes strictly increasing across its own writes, so two versions never share a
sidecar even when written within one tick of the file-system clock.

Every write goes to a temporary file in ``.sprox/tmp/`` and is renamed into place
(`os.replace`), so readers see the old object or the new one, never a mix. Deleting
an object removes the directories it leaves empty, as S3 has no empty folders.

Limitations of this layout, and where it differs from S3:

- An object and a "folder" of the same name cannot coexist: objects ``a`` and
  ``a/b`` would need ``a`` to be a file and a directory at once. Writing the second
  one fails with 409 ``ObjectConflict`` (a Sprox code, not an S3 one). ``a/`` (a
  folder marker) and ``a/b`` coexist fine.
- A key segment whose encoded form exceeds 255 bytes (the file-name limit of
  common file systems) fails with 400 ``KeyTooLongError``.
- Buckets that are symlinks to another file system cannot be written to (the
  atomic rename would cross file systems).
- No versioning, ACLs, tagging, object lock or bucket configuration: those
  operations answer 501 NotImplemented.
- `x-amz-checksum-*` values (every algorithm S3 offers) are verified by
  `RequestBody` as the body is read, stored, and returned on GET and HEAD with
  `x-amz-checksum-mode: ENABLED`. Multipart uploads keep no composite checksum.

Modules, from the bottom up:

- `keys`: keys <-> file names (`encode_segment`, `decode_segment`, `key_to_names`)
  and the KeyTooLongError / ObjectConflict errors of that mapping.
- `records`: what is stored beside the bytes (`ObjectRecord`, `Representation`,
  `UploadRecord`, `PartRecord`) and its JSON form.
- `store`: `DirectoryStore`, the blocking file-system layer: buckets, object files and
  sidecars, `TempFile`, the atomic commit, striped locks.
- `multipart`: `UploadStore`, multipart uploads in ``.sprox/uploads/`` (on the store).
- `listing`: the key walk in S3 order, common prefixes, pages, continuation tokens.
- `integrity`: `ChecksumPlan`, a write's Content-MD5 and checksum headers.
- `params`: what operations read from a request (query, copy source, XML bodies).
- `origin`: `LocalOrigin`, the async operation handlers and their S3 responses.
"""

from .keys import decode_segment, encode_segment, key_to_names
from .origin import OWNER_ID, LocalOrigin
from .params import s3_url_encode
from .records import Representation
from .store import CHUNK_SIZE

__all__ = [
    "CHUNK_SIZE",
    "OWNER_ID",
    "LocalOrigin",
    "Representation",
    "decode_segment",
    "encode_segment",
    "key_to_names",
    "s3_url_encode",
]
