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
wrong byte.

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
MAX_KEYS = 1000  # a DeleteObjects names at most 1000 keys; a call carries at most that


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
        host = host.strip("[]")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"{entry!r} is not host:port")
        peers.append(PeerAddress(host, int(port)))
    if not peers:
        raise ValueError("no peer given (host:port entries, comma-separated)")
    return tuple(peers)


class PeerStats:
    def __init__(self) -> None:
        self.ok = 0  # calls a peer answered
        self.failed = 0  # calls that failed (each attempt)
        self.given_up = 0  # invalidations a peer never took, after every retry
        self.retrying = 0  # invalidations waiting for their next attempt


class Peers:
    """Sends invalidations to the peers in `spec`. `signer(method, url, body)` gives a
    call's signature headers ({} without keys)."""

    def __init__(self, spec: Sequence[PeerAddress], signer, *, timeout: float = PEER_TIMEOUT_SECONDS,
                 retry_delays: Sequence[float] = RETRY_DELAYS) -> None:
        self.spec = tuple(spec)
        self.signer = signer
        self.timeout = timeout
        self.retry_delays = tuple(retry_delays)
        self.node_id = os.urandom(8).hex()
        self.stats = PeerStats()
        self._session: aiohttp.ClientSession | None = None
        self._resolved: tuple[PeerAddress, ...] = ()
        self._resolved_at = -RESOLVE_SECONDS
        self._self_addresses: set[PeerAddress] = set()
        self._retries: set[asyncio.Task] = set()

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout),
                                              connector=aiohttp.TCPConnector(limit=64, ttl_dns_cache=None))

    async def close(self) -> None:
        for task in list(self._retries):
            task.cancel()
        if self._retries:
            await asyncio.gather(*self._retries, return_exceptions=True)
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def invalidate(self, bucket: str, keys: Iterable[str] | None) -> None:
        """Tell every peer that `keys` of `bucket` (None: any key of it) changed; returns
        once each answered or PEER_TIMEOUT_SECONDS passed."""
        key_list = None if keys is None else list(keys)
        bodies = [_body(bucket, None, self.node_id)] if key_list is None else \
            [_body(bucket, key_list[i:i + MAX_KEYS], self.node_id) for i in range(0, max(len(key_list), 1), MAX_KEYS)]
        addresses = [a for a in await self._addresses() if a not in self._self_addresses]
        if not addresses:
            return
        calls = [(address, body) for address in addresses for body in bodies]
        results = await asyncio.gather(*(self._call(address, body) for address, body in calls))
        for (address, body), ok in zip(calls, results):
            if not ok:
                task = asyncio.get_running_loop().create_task(self._retry(address, body))
                self._retries.add(task)
                task.add_done_callback(self._retries.discard)

    async def _addresses(self) -> tuple[PeerAddress, ...]:
        now = time.monotonic()
        if now - self._resolved_at < RESOLVE_SECONDS:
            return self._resolved
        loop = asyncio.get_running_loop()
        found: list[PeerAddress] = []
        for peer in self.spec:
            try:
                infos = await loop.getaddrinfo(peer.host, peer.port, type=socket.SOCK_STREAM)
            except OSError as exc:
                log.warning("peer %s does not resolve: %s", peer.authority, exc)
                continue
            # Each node once: in a dual-stack cluster a name gives a node's IPv4 and IPv6
            # address, and nodes listen on one (0.0.0.0 by default): IPv4 when there is one.
            ipv4 = [info[4][0] for info in infos if info[0] == socket.AF_INET]
            for host in ipv4 or [info[4][0] for info in infos]:
                address = PeerAddress(host, peer.port)
                if address not in found:
                    found.append(address)
        self._resolved, self._resolved_at = tuple(found), now
        return self._resolved

    async def _call(self, address: PeerAddress, body: bytes) -> bool:
        assert self._session is not None, "Peers.start() first"
        url = f"http://{address.authority}{INVALIDATE_PATH}"
        headers = {"Content-Type": "application/json", NODE_HEADER: self.node_id,
                   **self.signer("POST", url, body)}
        try:
            async with self._session.post(url, data=body, headers=headers) as response:
                answer = await response.read()
                if response.status != 200:
                    raise OSError(f"HTTP {response.status}: {answer[:200].decode(errors='replace')}")
                if json.loads(answer).get("self"):
                    self._self_addresses.add(address)  # this node: never called again
        except (OSError, asyncio.TimeoutError, aiohttp.ClientError, ValueError) as exc:
            self.stats.failed += 1
            log.warning("peer %s did not take an invalidation: %s", address.authority, exc or type(exc).__name__)
            return False
        self.stats.ok += 1
        return True

    async def _retry(self, address: PeerAddress, body: bytes) -> None:
        self.stats.retrying += 1
        try:
            for delay in self.retry_delays:
                await asyncio.sleep(delay)
                if await self._call(address, body):
                    return
            self.stats.given_up += 1
            log.error("peer %s never took an invalidation (%s); its cache may serve the old object until its --ttl",
                      address.authority, body[:200].decode(errors="replace"))
        finally:
            self.stats.retrying -= 1


def _body(bucket: str, keys: list[str] | None, node_id: str) -> bytes:
    return json.dumps({"bucket": bucket, "keys": keys, "node": node_id}).encode()


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
