"""sprox/cache/invalidations.py and its users: a read that began before a write never
stores what it fetched."""

from __future__ import annotations

import asyncio

from multidict import CIMultiDict, CIMultiDictProxy

from sprox.cache.invalidations import Invalidations
from sprox.cache.listings import ListingCache
from sprox.s3.request import S3Request, parse_request
from sprox.upstream.base import OriginResponse


def test_a_moment_sees_the_keys_and_buckets_changed_after_it():
    inv = Invalidations()
    before = inv.now()
    inv.key("b", "k")
    assert inv.changed_since(before, "b", "k")
    assert not inv.changed_since(before, "b", "other") and not inv.changed_since(before, "b")
    assert not inv.changed_since(inv.now(), "b", "k")  # a read that began after the write
    middle = inv.now()
    inv.bucket("b")
    assert inv.changed_since(middle, "b", "other") and inv.changed_since(middle, "b")
    assert not inv.changed_since(middle, "c", "k")


def test_memory_is_bounded_and_forgetting_errs_on_the_side_of_not_caching():
    inv = Invalidations(max_entries=100)
    before = inv.now()
    for i in range(1000):
        inv.key("b", f"k{i}")
    assert len(inv._keys) + len(inv._buckets) <= 100
    assert inv.changed_since(before, "b", "k0")  # forgotten, still counted as changed
    assert inv.changed_since(before, "other-bucket", "x")  # (the price: in-flight reads go uncached)
    assert not inv.changed_since(inv.now(), "b", "k0")


def _listing_request(bucket: str = "bkt") -> S3Request:
    return parse_request("GET", f"/{bucket}?list-type=2", CIMultiDictProxy(CIMultiDict(Host="localhost")))


async def _body(response: OriginResponse) -> bytes:
    return b"".join([chunk async for chunk in response.iter_body()])


def test_a_listing_fetched_across_a_write_is_sent_but_not_kept():
    async def scenario():
        listings = ListingCache(ttl=3600)
        since = listings.now()
        listings.drop_bucket("bkt")  # a write to the bucket while the listing was being fetched
        answer = await listings.put(_listing_request(), OriginResponse(200, CIMultiDict(), _once(b"<old/>")), since)
        assert await _body(answer) == b"<old/>"
        assert listings.get(_listing_request()) is None
        since = listings.now()
        await listings.put(_listing_request(), OriginResponse(200, CIMultiDict(), _once(b"<new/>")), since)
        assert await _body(listings.get(_listing_request())) == b"<new/>"

    asyncio.run(scenario())


async def _once(body: bytes):
    yield body
