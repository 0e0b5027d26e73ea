"""The hit kernel's mirror of the cache: what a hit needs per object, in C.

The kernel (`sprox._native.kernel.HitKernel`) answers a cache hit without Python, so
it cannot ask the cache anything; it reads entries this class keeps for it:

  - installed (`offer`) after the Python lane planned a hit for a key, with the access
    key whose rights that plan checked; a hit for the key by another access key takes
    the Python lane once, which adds that key;
  - forgotten (`forget`) whenever the cache index replaces or drops the key's record,
    or the record learns its checksums (the index calls it), so no entry outlives the
    record it describes;
  - block presence is read by the kernel from the record's own bitmaps, so filling or
    evicting a block needs no call; freshness is a deadline (validated_at + ttl) no
    later than the cache's own, refreshed when the Python lane serves the key again.

Each entry holds a descriptor of the record's block file (`BlockFiles.acquire`), given
back on forget; at most MAX_ENTRIES are kept (the oldest goes first), so the kernel's
descriptors stay bounded. Memory: an entry is about 200 bytes plus its key and
rendered headers; the block bitmaps are the record's own (one bit per block).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import TYPE_CHECKING

from ..hithead import record_head

if TYPE_CHECKING:
    from .records import ObjectRecord
    from .service import HitPlan, ObjectCache

MAX_ENTRIES = 1024


class HitMirror:
    def __init__(self, kernel, cache: ObjectCache) -> None:
        self.kernel = kernel
        self.cache = cache
        self._held: OrderedDict[tuple[str, str], ObjectRecord] = OrderedDict()
        cache.index.on_key_change = self.forget

    def offer(self, plan: HitPlan, access_key: str | None) -> None:
        """The Python lane planned `plan` for a request signed by `access_key` (None
        under --auth none): mirror its record, so the kernel answers the next ones."""
        record = plan.record
        slot = -1
        if access_key is not None:
            slot = self.kernel.key_slot(access_key)
            if slot < 0:
                return  # a key the kernel does not check: its hits stay in Python
        name = (record.bucket, record.key)
        held = self._held.get(name)
        cache = self.cache
        fresh_until = record.validated_at + cache.ttl
        if held is record:
            self._held.move_to_end(name)
            self.kernel.install(record.bucket, record.key, record, -1, fresh_until, b"", None, slot)
            return
        if held is not None:
            self.forget(*name)
        while len(self._held) >= MAX_ENTRIES:
            self.forget(*next(iter(self._held)))
        template, template_ck = record_head(record), record_head(record, with_checksums=True)
        fd = cache.files.acquire(record)
        try:
            self.kernel.install(record.bucket, record.key, record, fd, fresh_until, template, template_ck, slot)
        except BaseException:
            cache.files.release(record)
            raise
        self._held[name] = record

    def forget(self, bucket: str, key: str) -> None:
        record = self._held.pop((bucket, key), None)
        if record is None:
            return
        self.kernel.forget(bucket, key)
        self.cache.files.release(record)

    def clear(self) -> None:
        for bucket, key in list(self._held):
            self.forget(bucket, key)

    def __len__(self) -> int:
        return len(self._held)
