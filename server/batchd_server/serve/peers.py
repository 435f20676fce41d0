"""Trainers of one job and how far each has got: what keeps a job's batches made once.

Several trainers asking for one job (same dataset, seed, epoch, pipeline ...) share its
bodies through the batch cache. Under a memory budget that cache holds a few bodies;
a trainer that runs ahead would push out bodies its peers have not taken yet, which are
then read from disk and made again (four trainers of one job read a pack twice, issue
14). :class:`Peers` tracks, per job, each trainer's furthest batch served, so that:

* the cache evicts bodies no close peer still needs before those one does
  (:meth:`Peers.wanted`);
* a trainer that is more than the cache's reach ahead of a peer waits, a bounded time,
  for that peer to take what it would push out (:meth:`Peers.behind`). A peer that does
  not catch up within the wait is let go: the others no longer wait for it, and its
  batches are made again, until it is back within reach.

Only trainers that take the same batches are peers: one was answered a batch another
was answered before. The workers of one DataLoader split a job's batches between them
(worker ``w`` of ``W`` takes ``w, w+W, ...``) and never wait for each other.

Everything here runs on the event loop, so nothing is locked; memory is bounded by the
number of jobs and trainers remembered.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

from .cache import LRU

__all__ = ["PEER_ACTIVE_S", "Peers"]

#: A trainer that was served a batch of its job this recently is counted as its peer.
PEER_ACTIVE_S = 5.0
_MAX_PEERS = 64  # trainers remembered per job
_MAX_JOBS = 256
_FIRSTS = 256  # per job, who was answered each of its latest batches first


@dataclass(slots=True)
class _Peer:
    seen: float
    pos: int  # the furthest batch served to it
    shares: bool = False  # it was answered a batch another trainer was answered too
    let_go: bool = False


@dataclass(slots=True)
class _Job:
    peers: dict[str, _Peer] = field(default_factory=dict)
    first: dict[int, str] = field(default_factory=dict)  # batch -> the first answered it


class Peers:
    """Per job, each trainer's furthest batch served (jobs are cache keys less ``k``)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._jobs: LRU[Hashable, _Job] = LRU(_MAX_JOBS)

    def served(self, job: Hashable, k: int, client: str, reach: int) -> None:
        """Note batch ``k`` of ``job`` answered to ``client``; ``reach`` as for :meth:`behind`."""
        found = self._jobs.get(job)
        if found is None:
            found = _Job()
            self._jobs.put(job, found)
        peers, now = found.peers, self._clock()
        peer = peers.get(client)
        if peer is None:
            if len(peers) >= _MAX_PEERS:  # forget the one seen longest ago
                del peers[min(peers, key=lambda c: peers[c].seen)]
            peer = peers[client] = _Peer(now, k)
        peer.seen, peer.pos = now, max(peer.pos, k)
        first = found.first.setdefault(k, client)
        if first != client and first in peers:
            peer.shares = peers[first].shares = True
        if len(found.first) > _FIRSTS:
            del found.first[min(found.first)]
        if peer.let_go and self._lead(peers, now) - peer.pos <= reach:
            peer.let_go = False  # back within the cache's reach of the others

    def _close(self, peers: dict[str, _Peer], now: float) -> list[tuple[str, _Peer]]:
        return [
            (c, p)
            for c, p in peers.items()
            if p.shares and not p.let_go and now - p.seen < PEER_ACTIVE_S
        ]

    def _lead(self, peers: dict[str, _Peer], now: float) -> int:
        return max((p.pos for _, p in self._close(peers, now)), default=-1)

    def wanted(self, job: Hashable, k: int, reach: int) -> bool:
        """Whether a close peer of ``job`` has yet to be served batch ``k``.

        A peer more than ``reach`` batches behind ``k`` is not counted: the cache could
        not keep everything between it and ``k`` anyway.
        """
        found = self._jobs.get(job)
        if found is None:
            return False
        return any(0 < k - p.pos <= reach for _, p in self._close(found.peers, self._clock()))

    def behind(self, job: Hashable, k: int, client: str, reach: int) -> list[str]:
        """The close peers of ``job`` that ``client``'s batch ``k`` would leave out of reach.

        The cache can hold ``reach`` bodies: a peer whose furthest batch is ``k - reach``
        or earlier would find the bodies it needs next pushed out by ``k``.
        """
        found = self._jobs.get(job)
        if found is None or client not in found.peers or not found.peers[client].shares:
            return []
        close = self._close(found.peers, self._clock())
        return [c for c, p in close if c != client and k - p.pos > reach]

    def let_go(self, job: Hashable, clients: list[str]) -> None:
        """Stop waiting for ``clients`` of ``job`` until they are back within reach."""
        found = self._jobs.get(job)
        for c in clients:
            if found is not None and c in found.peers:
                found.peers[c].let_go = True

    def describe(self, job: Hashable) -> dict[str, Any]:
        """The job's peers and their positions (for tests and debugging)."""
        found = self._jobs.get(job) or _Job()
        return {
            c: {"pos": p.pos, "shares": p.shares, "let_go": p.let_go}
            for c, p in found.peers.items()
        }
