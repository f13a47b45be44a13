"""Expected times for the planner: take a seed slot now, wait for one, or load from storage. Pure.

The planner asks, for every pod that needs weights and finds no free seed slot, which of two waits ends
with verified weights sooner: the next seed slot (the set grows while it waits: every verified pod is a
seed) or storage (bounded by the set's storage fan-in limit). This module holds what that answer needs:

- ``Estimates``: how long one seed transfer and one storage load take, measured from the agents' timing
  annotations (``transferStart`` to ``verified`` of every verified pod that is still there, by source),
  with a documented default before anything is measured.
- ``Forecast``: when seed slots and storage slots are expected to free, from the transfers and loads in
  flight; taking a slot in the forecast books it, so a burst of pods is planned as one queue.

The shape of the fan-out follows from the backend (``planner.seed_capacity``): TransferEngine's one-sided reads
share the seed's link, so a second concurrent reader verifies nobody sooner and delays the first reader
becoming a seed; each seed serves one reader at a time and the set doubles every transfer time (tree
doubling). An NCCL cohort broadcasts to all its members at once, so a seed serves up to
``maxClientsPerSeed`` per transfer time.
"""

from __future__ import annotations

import heapq
import itertools
import statistics
from collections.abc import Iterable
from dataclasses import dataclass, field

from .podview import PodView

# Before the set has measured anything: a seed transfer is assumed SEED_SPEEDUP times faster than a storage
# load (measured here: 16 GB in 0.32 s over a 50 GB/s NIC, 75 ms over NVLink, 11.1 s from local disk: 35x
# and 148x), and a storage load DEFAULT_STORAGE_S seconds. One measured side gives the other through the same
# ratio. The default leans towards seeds on purpose: a queued pod is decided again on every pass (the first
# completed transfer corrects the estimate within one transfer time), a storage load is not.
SEED_SPEEDUP = 30.0
DEFAULT_STORAGE_S = 60.0
# From a freed slot to the queued pod's transfer start: the watch event, a planning pass, the agent's watch.
DISPATCH_S = 0.5
# Storage is taken over waiting for a seed only when expected this much sooner. With small weights on fast
# storage the difference is a few seconds, as large as what the forecast does not see (pods starting,
# handshakes on a loaded node), and a seed costs the shared storage nothing. Found on the local cluster:
# 0.5 MB loads from a local directory in 0.11 s, a TransferEngine pull over TCP took about 1 s.
PREFER_SEED_S = 10.0


@dataclass(frozen=True)
class Estimates:
    seed_s: float  # one seed transfer, from its start to verified weights
    storage_s: float  # one storage load, from its start to verified weights
    seed_samples: int = 0  # how many completed transfers the figures come from (0: the default)
    storage_samples: int = 0
    bytes: int = 0  # the weights' size as the agents reported it (0: unknown)

    @classmethod
    def from_samples(cls, seed: list[float], storage: list[float], size: int = 0) -> Estimates:
        seed_s = statistics.median(seed) if seed else None
        storage_s = statistics.median(storage) if storage else None
        if seed_s is None and storage_s is None:
            storage_s = DEFAULT_STORAGE_S
        if seed_s is None:
            seed_s = storage_s / SEED_SPEEDUP
        if storage_s is None:
            storage_s = seed_s * SEED_SPEEDUP
        return cls(seed_s, storage_s, len(seed), len(storage), size)


def measure(pods: Iterable[PodView]) -> Estimates:
    """The set's estimates from the timing its agents wrote for their verified attempts."""
    seed: list[float] = []
    storage: list[float] = []
    size = 0
    for pod in pods:
        t, r = pod.timing, pod.report
        if t is None or r is None or r.state != "verified" or t.transfer_start is None or t.verified is None:
            continue
        seconds = t.verified - t.transfer_start
        if seconds <= 0:
            continue
        (seed if r.source == "seed" else storage).append(seconds)
        size = max(size, t.bytes)
    return Estimates.from_samples(seed, storage, size)


def expected_end(pod: PodView, seconds: float, now: float) -> float:
    """When a transfer or load in flight is expected to verify: by its reported progress, else from its start."""
    r = pod.current_report
    if r is not None and r.state == "transferring":
        if r.bytes_total > 0:
            return now + seconds * max(0.0, 1.0 - r.bytes_done / r.bytes_total)
        return max(now, r.updated_at + seconds)
    return now + seconds  # the agent has not started it yet


@dataclass
class Forecast:
    """Seed and storage slots over time. A slot taken in the forecast is booked for the pod that takes it."""

    now: float
    estimates: Estimates
    capacity: int  # readers per seed at once
    grows: bool  # verified seed clients become seeds
    _seed: list[list[float]] = field(default_factory=list)  # heap of [time, seq, free slots]
    _storage: list[float] = field(default_factory=list)  # heap of times a storage slot frees
    _seq: itertools.count = field(default_factory=itertools.count)

    def add_seed_slots(self, at: float, count: int) -> None:
        if count > 0:
            heapq.heappush(self._seed, [at, next(self._seq), count])

    def seed_transfer(self, end: float) -> None:
        """A seed transfer ending at ``end``: its slot frees then, and the client may become a seed."""
        self.add_seed_slots(end, 1 + (self.capacity if self.grows else 0))

    def storage_load(self, end: float, *, holds_slot: bool = True) -> None:
        """A storage load ending at ``end``: its storage slot frees then, and the pod becomes a seed."""
        if holds_slot:
            heapq.heappush(self._storage, end)
        self.add_seed_slots(end, self.capacity)

    def free_storage(self, count: int) -> None:
        for _ in range(max(count, 0)):
            heapq.heappush(self._storage, self.now)

    def next_seed_slot(self) -> float | None:
        return max(self._seed[0][0], self.now) if self._seed else None

    def next_storage_slot(self) -> float | None:
        return max(self._storage[0], self.now) if self._storage else None

    def seed_eta(self) -> float:
        t = self.next_seed_slot()
        if t is None:
            return float("inf")
        return t + (DISPATCH_S if t > self.now else 0.0) + self.estimates.seed_s

    def storage_eta(self) -> float:
        t = self.next_storage_slot()
        if t is None:
            return float("inf")
        return t + (DISPATCH_S if t > self.now else 0.0) + self.estimates.storage_s

    def take_seed(self) -> float:
        """Book the next seed slot; returns when the pod is expected to verify."""
        eta = self.seed_eta()
        top = self._seed[0]
        top[2] -= 1
        if top[2] == 0:
            heapq.heappop(self._seed)
        self.seed_transfer(eta)
        return eta

    def take_storage(self) -> float:
        eta = self.storage_eta()
        heapq.heappop(self._storage)
        self.storage_load(eta)
        return eta
