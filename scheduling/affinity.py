"""Stream affinity inside a pool of pipeline replicas: which replica holds each stream. Pure logic.

A stream's state (KV caches, VAE caches, its stream-batch slots) lives on one replica of its pool, so
every call for it must reach that replica for as long as the stream lives, whatever replicas are added
or stopped meanwhile. `AffinityTable` is what one caller (one process holding a handle to the pool)
knows about that, from two sources:

    learned     the caller opened the stream itself on a named replica (`learn`), so it knows the owner
                before the replica has published anything; forgotten when the caller sees the stream
                end (`forget`), or when the replica, having listed the stream, stops listing it
    listed      each replica publishes the ids of the streams it holds (`update_listings`); they answer
                for streams that another caller opened

Replicas come and go. `advertised` is the set the orchestrator currently offers for routing; a replica
that left it while a learned stream still lives there is *retained* (`retained`): calls for its streams
keep going to it, new streams never do (`place` only looks at advertised replicas). A replica that died
is dropped with its streams (`drop_replica`).

Example: streams a, b learned on r1 and c on r2; r2 stops being advertised. owner("c") is still "r2",
retained({"r1"}) == {"r2"} and place({"r1": 1}) == "r1"; once c ends (forget("c")), r2 is released.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass


@dataclass
class _Entry:
    replica_id: str
    learned_s: float
    listed: bool = False
    """The replica has published this stream at least once (so an unlisting means it ended)."""


class AffinityTable:
    """stream id -> replica id for one caller (module docstring). Clock injected (seconds).

    `unlisted_grace_s`: a learned stream its replica never lists (the open failed there, or was
    refused) is forgotten after this long, >= 0.
    """

    def __init__(self, clock: Callable[[], float], *, unlisted_grace_s: float = 30.0) -> None:
        if unlisted_grace_s < 0:
            raise ValueError(f"unlisted_grace_s={unlisted_grace_s} must be >= 0")
        self.clock = clock
        self.unlisted_grace_s = unlisted_grace_s
        self._learned: dict[str, _Entry] = {}
        self._listed: dict[str, str] = {}

    def learn(self, stream_id: str, replica_id: str) -> None:
        """The caller opens `stream_id` on `replica_id`."""
        self._learned[stream_id] = _Entry(replica_id, self.clock())

    def forget(self, stream_id: str) -> str | None:
        """The stream ended (as the caller saw it); returns the replica it was learned on, if any."""
        entry = self._learned.pop(stream_id, None)
        return entry.replica_id if entry is not None else None

    def owner(self, stream_id: str) -> str | None:
        """The replica holding the stream, or None when neither source knows it."""
        entry = self._learned.get(stream_id)
        return entry.replica_id if entry is not None else self._listed.get(stream_id)

    def update_listings(self, listings: Mapping[str, Collection[str]]) -> None:
        """The latest stream lists of the advertised replicas (replica id -> stream ids).

        A learned stream whose replica lists it is confirmed; a confirmed one its (still advertised)
        replica no longer lists has ended; an unconfirmed one older than the grace is dropped. Learned
        streams on replicas missing from `listings` are kept (those replicas may be retained).
        """
        now = self.clock()
        self._listed = {sid: rid for rid, sids in listings.items() for sid in sids}
        for sid, entry in list(self._learned.items()):
            if entry.replica_id not in listings:
                continue
            if sid in listings[entry.replica_id]:
                entry.listed = True
            elif entry.listed or now - entry.learned_s > self.unlisted_grace_s:
                del self._learned[sid]

    def drop_replica(self, replica_id: str) -> None:
        """The replica died: its streams are gone."""
        for sid in [s for s, e in self._learned.items() if e.replica_id == replica_id]:
            del self._learned[sid]
        self._listed = {s: r for s, r in self._listed.items() if r != replica_id}

    def holds_streams(self, replica_id: str) -> bool:
        """Whether a learned stream still lives on the replica."""
        return any(e.replica_id == replica_id for e in self._learned.values())

    def retained(self, advertised: Collection[str]) -> set[str]:
        """Replicas outside `advertised` that a learned stream still lives on (they must stay reachable)."""
        return {e.replica_id for e in self._learned.values() if e.replica_id not in advertised}

    @staticmethod
    def place(free_slots: Mapping[str, int]) -> str | None:
        """Where a new stream goes when nobody named a replica: the advertised replica with the most
        free slots (ties: the smaller id), None when there is none. Example: {"r1": 1, "r2": 3} -> "r2"."""
        if not free_slots:
            return None
        return min(free_slots, key=lambda rid: (-free_slots[rid], rid))

    def __len__(self) -> int:
        return len(self._learned)
