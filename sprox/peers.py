"""The other nodes of a tier (`--peers`): telling them that a write changed a key.

Several Sprox nodes behind a consistent-hash balancer each cache their share of the
objects, but a write may reach any node (a balancer hashes on the key, yet a
DeleteObjects names many keys, and listings of a bucket live on the node its name
hashes to). So a node that forwarded a write tells every peer, before the write's
answer leaves, to forget the keys it changed and the bucket's listings:

    POST /_sprox/peer/invalidate   {"bucket": ..., "keys": [...] or null, "node": ...}

on each peer's admin routes (the data port unless the peer serves them on
--admin-port), SigV4-signed with a key of the node's own configuration that may use
every bucket and write (`Config.admin_key`), as `sprox cache purge` signs. A peer
that does not answer within PEER_TIMEOUT_SECONDS does not hold the write back any
longer: it is logged, counted (`sprox_peer_invalidations_total{result="failed"}`) and
asked again in the background, RETRY_DELAYS apart, until it answers or the retries
run out (`result="given_up"`). An invalidation asked for twice is harmless (the next
read fetches the object again), so a late or repeated one costs a fetch, never a
wrong byte; the same invalidation waits for the same peer once, and one asked for
while its attempt is already at the peer is sent again after it.

`--peers` entries are host:port; a name that resolves to several addresses (a
Kubernetes headless Service) means each of them, resolved again at most every
RESOLVE_SECONDS. The node's own address may be among them: each node has a random id,
sent with every call, and a node that receives its own call answers `"self": true`
without doing anything, after which its callers skip that address.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import socket
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import aiohttp

log = logging.getLogger("sprox.peers")

INVALIDATE_PATH = "/_sprox/peer/invalidate"
NODE_HEADER = "X-Sprox-Node"
PEER_TIMEOUT_SECONDS = 2.0  # the longest a write waits for its peers
RETRY_DELAYS = (1.0, 2.0, 4.0, 8.0, 16.0, 30.0)  # then the invalidation is given up (and counted)
RESOLVE_SECONDS = 5.0
LOOKUP_REUSE_SECONDS = 1.0
MAX_KEYS = 1000  # a DeleteObjects names at most 1000 keys; a call carries at most that
MAX_BODY_BYTES = 512 * 1024  # a call's body at most, as sent
# ... and as taken: what nodes took before bodies were split (aiohttp's 1 MiB), so
# that during a rolling upgrade the older nodes' calls still land.
MAX_RECEIVED_BODY_BYTES = 1024 * 1024
PER_PEER_CONNECTIONS = 8
MAX_PENDING = 10_000  # invalidations waiting in the background for their peer, at most


@dataclass(frozen=True)
class PeerAddress:
    host: str
    port: int

    @property
    def authority(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_peers(text: str) -> tuple[PeerAddress, ...]:
    """`host:port,host:port` (http:// allowed, and spaces) -> addresses; ValueError
    naming the entry that is not one."""
    peers = []
    for raw in text.replace(" ", ",").split(","):
        entry = raw.strip()
        if not entry:
            continue
        bare = entry.removeprefix("http://").rstrip("/")
        if bare.startswith("https://") or "/" in bare or "@" in bare:
            raise ValueError(f"{entry!r} is not host:port (peers are reached over http on their admin routes)")
        host, sep, port = bare.rpartition(":")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]  # [IPv6]:port
        elif ":" in host or "[" in host or "]" in host:
            raise ValueError(f"{entry!r} is not host:port (an IPv6 address goes in brackets: [2001:db8::1]:9000)")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"{entry!r} is not host:port")
        peers.append(PeerAddress(host, int(port)))
    if not peers:
        raise ValueError("no peer given (host:port entries, comma-separated)")
    return tuple(peers)


class PeerStats:
    def __init__(self) -> None:
        self.ok = 0  # calls a peer answered
        self.failed = 0  # calls that failed (each attempt), names that did not resolve included
        self.given_up = 0  # invalidations a peer never took, after every retry
        self.retrying = 0  # invalidations waiting for their next attempt


class _Delivery:
    """An invalidation waiting in the background for one peer."""

    __slots__ = ("task", "again")

    def __init__(self) -> None:
        self.task: asyncio.Task
        self.again = False  # asked for again since its current attempt started


class Peers:
    """Sends invalidations to the peers in `spec`. `signer(method, url, body)` gives a
    call's signature headers ({} without keys).

    A write waits for its peers at most `timeout`, and waits only for peers that took
    their last call: a peer that failed (down, hung, unreachable) gets later
    invalidations in the background, by the retry schedule, until it answers again.
    So a hung peer costs one write `timeout`, not every write, and holds at most
    PER_PEER_CONNECTIONS connections: the healthy peers are never queued behind it."""

    def __init__(self, spec: Sequence[PeerAddress], signer, *, timeout: float = PEER_TIMEOUT_SECONDS,
                 retry_delays: Sequence[float] = RETRY_DELAYS) -> None:
        self.spec = tuple(spec)
        self.signer = signer
        self.timeout = timeout
        self.retry_delays = tuple(retry_delays)
        self.node_id = os.urandom(8).hex()
        self.stats = PeerStats()
        self._session: aiohttp.ClientSession | None = None
        # name -> its addresses when it last resolved (kept when a resolution fails)
        self._known: dict[PeerAddress, tuple[PeerAddress, ...]] = {}
        self._resolved_at = -RESOLVE_SECONDS
        self._resolving: asyncio.Task | None = None
        self._self_addresses: set[PeerAddress] = set()
        self._failing: set[PeerAddress] = set()  # peers whose last call failed
        self._pending: dict[tuple[PeerAddress, bytes], _Delivery] = {}  # background deliveries
        # name -> its lookup under way, or (when it ended, its result) for LOOKUP_REUSE_SECONDS:
        # background deliveries to a name that does not resolve share one lookup.
        self._lookups: dict[PeerAddress, asyncio.Task] = {}
        self._looked_up: dict[PeerAddress, tuple[float, tuple[PeerAddress, ...] | None]] = {}

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self.timeout),
            connector=aiohttp.TCPConnector(limit=0, limit_per_host=PER_PEER_CONNECTIONS, ttl_dns_cache=None))

    async def close(self) -> None:
        waiting = len(self._pending)  # (counted first: cancelled, they leave _pending)
        tasks = [delivery.task for delivery in self._pending.values()] + list(self._lookups.values())
        if self._resolving is not None:
            tasks.append(self._resolving)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if waiting:
            log.warning("%d invalidations were still waiting for their peer at shutdown", waiting)
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def invalidate(self, bucket: str, keys: Iterable[str] | None) -> None:
        """Tell every peer that `keys` of `bucket` (None: any key of it) changed; returns
        once each answered or `timeout` passed. Never raises: a peer's failure must not
        fail the write, which S3 has already done."""
        bodies = _bodies(bucket, None if keys is None else list(keys), self.node_id)
        unresolved, addresses = await self._addresses()
        for peer in unresolved:  # a name that never resolved: resolve it again later
            for body in bodies:
                self._later(peer, body, resolve=True)
        await self._deliver(addresses, bodies)

    async def _deliver(self, addresses: Iterable[PeerAddress], bodies: Sequence[bytes]) -> None:
        waited = []
        for address in addresses:
            if address in self._self_addresses:
                continue
            for body in bodies:
                if address in self._failing:
                    self._later(address, body, now=True)
                else:
                    waited.append((address, body))
        results = await asyncio.gather(*(self._call(address, body) for address, body in waited))
        for (address, body), ok in zip(waited, results):
            if not ok:
                self._later(address, body)

    def _later(self, address: PeerAddress, body: bytes, *, resolve: bool = False, now: bool = False) -> None:
        """Deliver in the background, by the retry schedule; the same invalidation to the
        same peer is pending once, and at most MAX_PENDING are."""
        pending = self._pending.get((address, body))
        if pending is not None:
            # Asked again: an attempt not started yet covers this write too; one already at
            # the peer may have landed before it (the peer could have cached the old
            # object again since), so another attempt follows it.
            pending.again = True
            return
        if len(self._pending) >= MAX_PENDING:
            self.stats.given_up += 1
            log.error("peer %s: %d invalidations already wait for their peers; this one is given up (%s)",
                      address.authority, MAX_PENDING, body[:200].decode(errors="replace"))
            return
        delays = ((0.0,) if now else ()) + self.retry_delays
        delivery = _Delivery()
        delivery.task = asyncio.get_running_loop().create_task(self._retry(address, body, delays, resolve, delivery))
        self._pending[(address, body)] = delivery
        self.stats.retrying += 1
        delivery.task.add_done_callback(lambda _t, k=(address, body): self._done(k))

    def _done(self, pending: tuple[PeerAddress, bytes]) -> None:
        self._pending.pop(pending, None)
        self.stats.retrying -= 1

    async def _retry(self, address: PeerAddress, body: bytes, delays: Sequence[float], resolve: bool,
                     delivery: _Delivery) -> None:
        attempt = 0
        while attempt < len(delays):
            await asyncio.sleep(delays[attempt])
            attempt += 1
            delivery.again = False  # this attempt covers every request made until now
            if resolve:
                found = await self._lookup(address)
                if found is None:
                    self.stats.failed += 1
                    continue
                # Each of the name's addresses gets the call (and, failing, its own retries).
                self._known[address] = found
                await self._deliver(found, [body])
                delivered = True
            else:
                delivered = await self._call(address, body)
            if delivered:
                if not delivery.again:
                    return
                attempt, delays = 0, (0.0, *self.retry_delays)  # asked again meanwhile: once more
        self.stats.given_up += 1
        log.error("peer %s never took an invalidation (%s); its cache may serve the old object until its --ttl",
                  address.authority, body[:200].decode(errors="replace"))

    async def _addresses(self) -> tuple[list[PeerAddress], list[PeerAddress]]:
        """(names that never resolved, every address known). Names are resolved again at
        most every RESOLVE_SECONDS, by one task at a time, each within `timeout`; a name
        that fails to resolve keeps the addresses it had."""
        if time.monotonic() - self._resolved_at >= RESOLVE_SECONDS:
            if self._resolving is None or self._resolving.done():
                self._resolving = asyncio.get_running_loop().create_task(self._resolve_all())
            try:  # (each name is given half the time; a write waits for resolving and then its calls)
                await asyncio.wait_for(asyncio.shield(self._resolving), self.timeout / 2 + 0.05)
            except asyncio.TimeoutError:
                pass  # still resolving: this write uses what is known
            except Exception as exc:  # noqa: BLE001 - never fail the write
                log.warning("resolving peers failed: %s", exc)
        unresolved, found = [], []
        for peer in self.spec:
            known = self._known.get(peer)
            if known is None:
                unresolved.append(peer)
                continue
            found.extend(a for a in known if a not in found)
        return unresolved, found

    async def _resolve_all(self) -> None:
        async def resolve(peer: PeerAddress) -> None:
            found = await self._resolve(peer)
            if found is not None:
                self._known[peer] = found  # at once: a slow name does not hold back the others

        await asyncio.gather(*(resolve(peer) for peer in self.spec))
        self._resolved_at = time.monotonic()

    async def _lookup(self, peer: PeerAddress) -> tuple[PeerAddress, ...] | None:
        """`_resolve` for background deliveries: one lookup of a name at a time, and its
        result reused for LOOKUP_REUSE_SECONDS, however many invalidations wait for it."""
        recent = self._looked_up.get(peer)
        if recent is not None and time.monotonic() - recent[0] < LOOKUP_REUSE_SECONDS:
            return recent[1]
        task = self._lookups.get(peer)
        if task is None:
            task = self._lookups[peer] = asyncio.get_running_loop().create_task(self._resolve(peer))

            def finished(done: asyncio.Task, peer: PeerAddress = peer) -> None:
                self._lookups.pop(peer, None)
                if not done.cancelled() and done.exception() is None:
                    self._looked_up[peer] = (time.monotonic(), done.result())

            task.add_done_callback(finished)
        # Shielded: a waiter cancelled (at shutdown) leaves the lookup to the others.
        return await asyncio.shield(task)

    async def _resolve(self, peer: PeerAddress) -> tuple[PeerAddress, ...] | None:
        """The addresses `peer` names now, or None when it does not resolve in time."""
        loop = asyncio.get_running_loop()
        try:
            infos = await asyncio.wait_for(loop.getaddrinfo(peer.host, peer.port, type=socket.SOCK_STREAM),
                                           self.timeout / 2)
        except (OSError, asyncio.TimeoutError) as exc:
            log.warning("peer %s does not resolve: %s", peer.authority, exc or "timed out")
            return None
        # Each node once: in a dual-stack cluster a name gives a node's IPv4 and IPv6
        # address, and nodes listen on one (0.0.0.0 by default): IPv4 when there is one.
        ipv4 = [info[4][0] for info in infos if info[0] == socket.AF_INET]
        found: list[PeerAddress] = []
        for host in ipv4 or [info[4][0] for info in infos]:
            address = PeerAddress(host, peer.port)
            if address not in found:
                found.append(address)
        return tuple(found)

    async def _call(self, address: PeerAddress, body: bytes) -> bool:
        assert self._session is not None, "Peers.start() first"
        url = f"http://{address.authority}{INVALIDATE_PATH}"
        try:
            headers = {"Content-Type": "application/json", NODE_HEADER: self.node_id,
                       **self.signer("POST", url, body)}
            async with self._session.post(url, data=body, headers=headers) as response:
                answer = await response.read()
                if response.status != 200:
                    raise OSError(f"HTTP {response.status}: {answer[:200].decode(errors='replace')}")
                data = json.loads(answer)
                if not isinstance(data, dict):
                    raise ValueError(f"not a JSON object: {answer[:200].decode(errors='replace')}")
                if data.get("self") is True:
                    self._self_addresses.add(address)  # this node: never called again
        except Exception as exc:  # noqa: BLE001 - whatever a peer does, the write stands
            self.stats.failed += 1
            self._failing.add(address)
            log.warning("peer %s did not take an invalidation: %s", address.authority, exc or type(exc).__name__)
            return False
        self.stats.ok += 1
        self._failing.discard(address)
        return True


def _body(bucket: str, keys: list[str] | None, node_id: str) -> bytes:
    return json.dumps({"bucket": bucket, "keys": keys, "node": node_id}, ensure_ascii=False).encode()


def _bodies(bucket: str, keys: list[str] | None, node_id: str) -> list[bytes]:
    """The calls' bodies for an invalidation: each names at most MAX_KEYS keys and
    stays under MAX_BODY_BYTES (1000 keys of up to 1 KiB each would not)."""
    if keys is None:
        return [_body(bucket, None, node_id)]
    if not keys:
        return [_body(bucket, [], node_id)]
    bodies, chunk, size = [], [], len(_body(bucket, [], node_id))
    for key in keys:
        key_size = len(json.dumps(key, ensure_ascii=False).encode()) + 2  # quotes escaped, ", "
        if chunk and (len(chunk) == MAX_KEYS or size + key_size > MAX_BODY_BYTES):
            bodies.append(_body(bucket, chunk, node_id))
            chunk, size = [], len(_body(bucket, [], node_id))
        chunk.append(key)
        size += key_size
    bodies.append(_body(bucket, chunk, node_id))
    return bodies


def parse_invalidation(body: bytes) -> tuple[str, list[str] | None, str]:
    """(bucket, keys or None for the whole bucket, sender's node id); ValueError when
    the body is not an invalidation."""
    try:
        data = json.loads(body)
    except ValueError:
        raise ValueError("the body is not JSON") from None
    if not isinstance(data, dict):
        raise ValueError("the body is not a JSON object")
    bucket, keys, node = data.get("bucket"), data.get("keys"), data.get("node", "")
    if not isinstance(bucket, str) or not bucket:
        raise ValueError("bucket: expected a bucket name")
    if keys is not None and (not isinstance(keys, list) or len(keys) > MAX_KEYS
                             or not all(isinstance(k, str) and k for k in keys)):
        raise ValueError(f"keys: expected null or a list of at most {MAX_KEYS} keys")
    if not isinstance(node, str):
        raise ValueError("node: expected a string")
    return bucket, keys, node


def body_digest(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()
