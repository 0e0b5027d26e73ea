"""sprox/peers.py: what a node does when its peers misbehave. Each peer here is a real
aiohttp server on 127.0.0.1 (the functional tests, tests/functional/test_peers.py and
test_tier.py, run whole Sprox nodes)."""

from __future__ import annotations

import asyncio
import json
import socket

import pytest
from aiohttp import web

from sprox.peers import (INVALIDATE_PATH, MAX_BODY_BYTES, MAX_KEYS, PeerAddress, Peers, _bodies,
                         parse_invalidation)
from tests.waiting import until

HOST = "127.0.0.1"


class Peer:
    """A loopback HTTP server on the invalidation route that answers as `answer` says
    ("ok", "hang", a status number, or raw bytes)."""

    def __init__(self, answer="ok") -> None:
        self.answer = answer
        self.calls: list[dict] = []
        self.release = asyncio.Event()
        self.runner: web.AppRunner | None = None
        self.address: PeerAddress | None = None

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.calls.append(json.loads(await request.read()))
        if self.answer == "hang":
            await self.release.wait()
        if isinstance(self.answer, int):
            return web.Response(status=self.answer, text="no")
        if isinstance(self.answer, bytes):
            return web.Response(body=self.answer, content_type="application/json")
        return web.json_response({"invalidated": 1})

    async def __aenter__(self) -> "Peer":
        app = web.Application()
        app.router.add_post(INVALIDATE_PATH, self._handle)
        self.runner = web.AppRunner(app, shutdown_timeout=0.1)
        await self.runner.setup()
        site = web.TCPSite(self.runner, HOST, 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.address = PeerAddress(HOST, port)
        return self

    async def __aexit__(self, *exc) -> None:
        self.release.set()
        assert self.runner is not None
        await self.runner.cleanup()


def unsigned(method, url, body):
    return {}


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))  # a bound, not a measurement


@pytest.mark.parametrize("answer", [b"[]", b'"self"', b"not json", 500])
def test_a_peer_answering_nonsense_never_fails_the_write_and_is_retried(answer):
    async def scenario():
        async with Peer(answer) as bad, Peer() as good:
            peers = Peers([bad.address, good.address], unsigned, retry_delays=(3600.0,))
            await peers.start()
            try:
                await peers.invalidate("b", ["k"])  # does not raise
                assert peers.stats.failed == 1 and peers.stats.ok == 1
                assert [c["keys"] for c in good.calls] == [["k"]]
                assert peers.stats.retrying == 1  # the bad peer is asked again later
            finally:
                await peers.close()
            assert peers.stats.retrying == 0
    run(scenario())


def test_a_hung_peer_holds_back_one_write_and_never_the_healthy_peers():
    async def scenario():
        async with Peer("hang") as hung, Peer() as good:
            peers = Peers([hung.address, good.address], unsigned, timeout=0.5, retry_delays=(3600.0,))
            await peers.start()
            try:
                await peers.invalidate("b", ["first"])  # waits for the hung peer, up to the timeout
                assert hung.address in peers._failing
                await peers.invalidate("b", ["second"])  # a failing peer is not waited on
                await peers.invalidate("b", ["second"])  # the same invalidation is pending once
                assert [c["keys"] for c in good.calls] == [["first"], ["second"], ["second"]]
                pending = sorted(json.loads(body)["keys"][0] for address, body in peers._pending)
                assert pending == ["first", "second"]
            finally:
                await peers.close()
    run(scenario())


def test_a_failing_peer_that_answers_again_is_waited_on_again():
    async def scenario():
        async with Peer(503) as flaky:
            peers = Peers([flaky.address], unsigned, retry_delays=(0.0,))
            await peers.start()
            try:
                await peers.invalidate("b", ["k1"])
                flaky.answer = "ok"
                while peers._pending:  # the retry, at once
                    await asyncio.sleep(0.01)
                assert flaky.address not in peers._failing and peers.stats.ok == 1
                await peers.invalidate("b", ["k2"])
                assert flaky.calls[-1]["keys"] == ["k2"] and not peers._pending
            finally:
                await peers.close()
    run(scenario())


def test_a_name_that_does_not_resolve_in_time_does_not_hold_back_the_write(monkeypatch):
    async def scenario():
        async with Peer() as good:
            loop = asyncio.get_running_loop()
            real = loop.getaddrinfo
            never = asyncio.Event()

            async def getaddrinfo(host, *args, **kwargs):
                if host == "stuck.example":
                    await never.wait()  # a resolver that does not answer
                return await real(host, *args, **kwargs)

            monkeypatch.setattr(loop, "getaddrinfo", getaddrinfo)
            peers = Peers([PeerAddress("stuck.example", 9000), good.address], unsigned, timeout=0.3,
                          retry_delays=(3600.0,))
            await peers.start()
            try:
                await peers.invalidate("b", ["k"])  # returns: the healthy peer was told
                assert [c["keys"] for c in good.calls] == [["k"]]
                # The name is asked for again in the background, with the invalidation.
                assert [a.host for a, _ in peers._pending] == ["stuck.example"]
            finally:
                await peers.close()
    run(scenario())


def test_a_name_keeps_its_addresses_while_its_resolver_fails(monkeypatch):
    async def scenario():
        async with Peer() as node:
            loop = asyncio.get_running_loop()
            real = loop.getaddrinfo
            failing = False

            async def getaddrinfo(host, port, *args, **kwargs):
                if host == "nodes.example":
                    if failing:
                        raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
                    host = HOST
                return await real(host, port, *args, **kwargs)

            monkeypatch.setattr(loop, "getaddrinfo", getaddrinfo)
            peers = Peers([PeerAddress("nodes.example", node.address.port)], unsigned, retry_delays=(3600.0,))
            await peers.start()
            try:
                await peers.invalidate("b", ["k1"])
                failing = True
                peers._resolved_at = -1e9  # due again
                await peers.invalidate("b", ["k2"])
                assert [c["keys"] for c in node.calls] == [["k1"], ["k2"]]
            finally:
                await peers.close()
    run(scenario())


def test_invalidation_bodies_stay_under_the_limit_whatever_the_keys():
    keys = [f"{i:04d}-" + "é" * 500 for i in range(2500)]  # ~1 KiB of UTF-8 each
    bodies = _bodies("bkt", keys, "node")
    assert len(bodies) > 3 and all(len(body) <= MAX_BODY_BYTES for body in bodies)
    parsed = [parse_invalidation(body) for body in bodies]
    assert all(len(k) <= MAX_KEYS for _, k, _ in parsed)
    assert [key for _, k, _ in parsed for key in k] == keys
    quoted = ['"\\' + "\x01" * 150 + str(i) for i in range(3000)]  # JSON escapes grow them sixfold
    assert all(len(body) <= MAX_BODY_BYTES for body in _bodies("bkt", quoted, "node"))
    assert [key for body in _bodies("bkt", quoted, "node") for key in parse_invalidation(body)[1]] == quoted
    assert _bodies("bkt", None, "n") == [b'{"bucket": "bkt", "keys": null, "node": "n"}']
    assert [parse_invalidation(b)[1] for b in _bodies("bkt", ["a"] * 2001, "n")] == [["a"] * 1000, ["a"] * 1000, ["a"]]


def test_a_write_during_a_retry_at_the_peer_is_delivered_after_it():
    """The retry of write 1 has reached the peer (which may cache the old object again
    right after it): write 2 to the same key must reach the peer after that, not be
    dropped as a duplicate of the retry."""
    async def scenario():
        async with Peer(503) as peer:
            peers = Peers([peer.address], unsigned, timeout=5.0, retry_delays=(0.05,))
            await peers.start()
            try:
                await peers.invalidate("b", ["k"])  # write 1: fails, retried in the background
                peer.answer = "hang"
                await until(lambda: len(peer.calls) == 2, 30, "the retry at the peer")
                await peers.invalidate("b", ["k"])  # write 2: the peer is failing, so in the background
                assert len(peer.calls) == 2
                peer.release.set()
                await until(lambda: not peers._pending, 30, "no invalidation waiting")
                assert len(peer.calls) == 3 and peer.calls[2]["keys"] == ["k"]
            finally:
                await peers.close()
    run(scenario())


def test_invalidations_waiting_at_shutdown_are_logged(caplog):
    async def scenario():
        async with Peer(503) as peer:
            peers = Peers([peer.address], unsigned, retry_delays=(3600.0,))
            await peers.start()
            await peers.invalidate("b", ["k"])
            await peers.close()
    with caplog.at_level("WARNING", logger="sprox.peers"):
        run(scenario())
    assert "1 invalidations were still waiting for their peer at shutdown" in caplog.text


def test_a_name_that_does_not_resolve_is_looked_up_once_for_all_waiting_writes(monkeypatch):
    """500 writes while the peers' name does not resolve (a headless Service with no
    endpoints yet): their background deliveries share lookups, rather than each asking
    the resolver on each retry (which would tie up the default thread pool)."""
    lookups = []

    async def scenario():
        loop = asyncio.get_running_loop()

        async def getaddrinfo(host, *args, **kwargs):
            lookups.append(host)
            await asyncio.sleep(0.01)
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

        monkeypatch.setattr(loop, "getaddrinfo", getaddrinfo)
        peers = Peers([PeerAddress("nodes.example", 9000)], unsigned, retry_delays=(0.01, 0.01))
        await peers.start()
        try:
            for i in range(500):
                await peers.invalidate("b", [f"k{i}"])
            await until(lambda: not peers._pending, 30, "no invalidation waiting")
            assert peers.stats.given_up == 500
        finally:
            await peers.close()
    run(scenario())
    assert 0 < len(lookups) < 50, len(lookups)
