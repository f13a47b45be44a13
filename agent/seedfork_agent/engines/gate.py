"""The engine gate: the agent's side of a load that happens inside the engine's own processes.

The agent's own checksums prove only the agent's copy of the weights. The gate makes the pod's engine prove
its own before the agent reports the attempt verified, so the readiness gate stands for the weights inside
the engine, and the engine's own probe need only say that its API is up (a promoted standby's pod turns
Ready when the gate does, not one probe period later).

An engine that maps the agent's store as it is (the reference engine, ``engine_layout=False``) re-checks
every tensor it mapped and reports one rank whose manifest digest carries the checksums it computed
itself (phase ``engine``, from storage and from a seed alike).

An engine that loads its weights itself into its own layout (vLLM through ``vllm_loader``,
``engine_layout=True``) also keeps the pod at one copy of the weights (``engine_store``): what the agent
serves afterwards is the engine's own parameters. An attempt takes one of two paths:

- **From the checkpoint** (a pod loaded from storage). Every rank maps the checkpoint store, checksums
  the bytes it read, loads its shard with the engine's own ``load_weights`` and reports its parameters'
  layout (phase ``checkpoint``). When every rank has, the agent frees the checkpoint store and offers an
  empty engine-layout store (phase ``fill``); every rank copies its parameters in, makes them views of
  that memory and reports their digest. The agent checksums the store and requires each rank's digest
  to be the store's for that rank.
- **From an engine-layout store** (a pod seeded by another engine, or an engine restarted in a verified
  pod; phase ``engine``). Every rank maps its part, checksums it, makes its parameters views of it and
  reports their digest, which must equal the seed's for that rank (the fingerprint pins engine,
  version and parallelism, so the same layout and bytes give the same parameters) or what this pod
  already published.

In both, every rank (``tp * pp`` of them) must report the same world size and the manifest the agent
offered. A rank that fails reports it and the wait ends at once; a rank that never reports ends it at
the set's timeout; an engine container that exits ends it at its next status read. A rank whose report
is refused raises inside the engine, so the engine exits and its container restarts: it never serves
what it loaded.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from .engine_store import RankLayout, parse_layout

CHECKPOINT, FILL, ENGINE, STANDBY = "checkpoint", "fill", "engine", "standby"


class EngineGateError(RuntimeError):
    """The engine did not prove it holds the verified weights; the message says which rank and why."""


def _fields(body: object, fields: Mapping[str, type]) -> dict[str, Any]:
    """The typed fields of a loader's JSON body; ``ValueError`` names the bad one (the agent answers 400)."""
    if not isinstance(body, dict):
        raise ValueError("the report must be a JSON object")
    values = {}
    for key, kind in fields.items():
        value = body.get(key)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise ValueError(f"{key} must be {'an integer' if kind is int else 'a string'}")
        values[key] = value
    if not 0 <= values["rank"] < values["worldSize"]:
        raise ValueError("rank must lie in [0, worldSize)")
    return values


@dataclass(frozen=True)
class RankLayoutReport:
    """A rank loaded its shard from the checkpoint: the parameters it holds, to be given their store."""

    rank: int
    world_size: int
    manifest_digest: str  # the checkpoint's manifest digest with the checksums the engine computed itself
    tensors: RankLayout

    @classmethod
    def from_json(cls, body: object) -> RankLayoutReport:
        values = _fields(body, {"rank": int, "worldSize": int, "manifestDigest": str})
        return cls(values["rank"], values["worldSize"], values["manifestDigest"], parse_layout(body.get("tensors")))


@dataclass(frozen=True)
class RankReport:
    rank: int
    world_size: int
    manifest_digest: str  # the offered manifest's digest, its tensors checksummed in the engine's process
    params_digest: str  # the engine's own parameters after the load, as that rank holds them
    param_bytes: int
    loaded_tensors: int
    started_at: float | None = None  # epoch seconds when the engine asked for the weights (its init done)
    # Parameter bytes this rank holds outside the offered store (a private or repacked copy): 0 for one copy.
    private_bytes: int = 0

    @classmethod
    def from_json(cls, body: object) -> RankReport:
        """Parse a loader's report; ``ValueError`` names the bad field (the agent answers 400)."""
        values = _fields(
            body,
            {
                "rank": int,
                "worldSize": int,
                "manifestDigest": str,
                "paramsDigest": str,
                "paramBytes": int,
                "loadedTensors": int,
            },
        )
        started = body.get("startedAt")
        if started is not None and (not isinstance(started, int | float) or isinstance(started, bool)):
            raise ValueError("startedAt must be a number")
        private = body.get("privateBytes", 0)
        if not isinstance(private, int) or isinstance(private, bool) or private < 0:
            raise ValueError("privateBytes must be a non-negative integer")
        return cls(
            rank=values["rank"],
            world_size=values["worldSize"],
            manifest_digest=values["manifestDigest"],
            params_digest=values["paramsDigest"],
            param_bytes=values["paramBytes"],
            loaded_tensors=values["loadedTensors"],
            started_at=float(started) if started is not None else None,
            private_bytes=private,
        )


class EngineGate:
    """Collects the engine ranks' reports for one attempt and decides; thread-safe (the HTTP handlers
    report from the event loop while the attempt waits in a worker thread)."""

    def __init__(self, ranks: int, engine_layout: bool = True) -> None:
        """``engine_layout``: the engine loads into a layout of its own (a checkpoint load goes through
        ``CHECKPOINT`` and ``FILL``, a seed serves an engine-layout store); else it maps the store as it is."""
        if ranks < 1:
            raise ValueError("an engine has at least one rank")
        self.ranks = ranks
        self.engine_layout = engine_layout
        self._cond = threading.Condition()
        self.phase: str | None = None  # what the offered store holds: CHECKPOINT, FILL or ENGINE; None: nothing
        self._manifest_digest: str | None = None
        self._expected: dict[int, str] | None = None
        self._layouts: dict[int, RankLayoutReport] = {}
        self._reports: dict[int, RankReport] = {}
        self._failure: str | None = None
        # What this pod publishes once verified: its clients' engines must hold the same.
        self.published: dict[int, str] = {}
        self.param_bytes: dict[int, int] = {}  # what each rank's parameters weigh, as the engine reported
        self.private_bytes: dict[int, int] = {}  # what each rank holds outside the store

    def open(self, manifest_digest: str, expected: dict[int, str] | None, layout: str) -> None:
        """A new attempt: its verified manifest, the seed's per-rank digests (None: loaded from storage),
        and whether the store is a checkpoint or an engine-layout store."""
        if layout not in (CHECKPOINT, ENGINE):
            raise ValueError(f"an attempt offers a {CHECKPOINT} or an {ENGINE} store, not {layout!r}")
        if expected is not None and set(expected) != set(range(self.ranks)):
            raise EngineGateError(
                f"the seed publishes engine digests for ranks {sorted(expected)}, this engine has {self.ranks}"
            )
        with self._cond:
            self.phase, self._manifest_digest, self._expected = layout, manifest_digest, expected
            self._layouts, self._reports, self._failure = {}, {}, None
            self.published, self.param_bytes, self.private_bytes = {}, {}, {}
            self._cond.notify_all()

    def standby(self) -> None:
        """A warm standby: the engine starts without weights, warms up, and waits for its promotion's store
        (the next ``open``). Nothing is offered and nothing is accepted meanwhile."""
        with self._cond:
            self.phase, self._manifest_digest, self._expected = STANDBY, None, None
            self._layouts, self._reports, self._failure = {}, {}, None
            self.published, self.param_bytes, self.private_bytes = {}, {}, {}
            self._cond.notify_all()

    def fill(self, manifest_digest: str) -> None:
        """Every rank reported its layout: offer the empty engine-layout store for the ranks to fill."""
        with self._cond:
            if self.phase != CHECKPOINT:
                raise EngineGateError(f"an engine store is filled after a checkpoint load, not in phase {self.phase}")
            self.phase, self._manifest_digest, self._reports = FILL, manifest_digest, {}
            self._cond.notify_all()

    def settle(self, manifest_digest: str) -> None:
        """The filled store is checksummed and served: a restarted engine maps it as an engine-layout store."""
        with self._cond:
            self.phase, self._manifest_digest = ENGINE, manifest_digest

    @property
    def is_open(self) -> bool:
        return self._manifest_digest is not None

    def layout(self, r: RankLayoutReport) -> str | None:
        """Record a rank's layout after its checkpoint load; returns why it is refused, or None."""
        with self._cond:
            reason = self._check_common(r.rank, r.world_size, r.manifest_digest)
            if reason is None and self.phase != CHECKPOINT:
                reason = f"engine rank {r.rank} reported a layout, but the offered store is {self.phase}"
            self._record(reason, self._layouts, r)
            return reason

    def report(self, r: RankReport) -> str | None:
        """Record a rank's report; returns why it is refused, or None. A refusal fails the attempt."""
        with self._cond:
            reason = self._check(r)
            self._record(reason, self._reports, r)
            return reason

    def _record(self, reason: str | None, into: dict[int, Any], r: Any) -> None:
        if reason is None:
            into[r.rank] = r
        elif not self.published:  # during an attempt: fail it now; after, the restarted engine dies alone
            self._failure = reason
        self._cond.notify_all()

    def fail(self, rank: int, reason: str) -> None:
        with self._cond:
            if not self.published:
                self._failure = f"engine rank {rank}: {reason}"
            self._cond.notify_all()

    def _check_common(self, rank: int, world_size: int, manifest_digest: str) -> str | None:
        if self._manifest_digest is None:
            return "no verified weights are offered to the engine"
        if world_size != self.ranks:
            return f"engine rank {rank} reports world size {world_size}, the set has tp * pp = {self.ranks}"
        if manifest_digest != self._manifest_digest:
            return (
                f"engine rank {rank} read weights with manifest digest {manifest_digest[:16]}, "
                f"the agent offered {self._manifest_digest[:16]}"
            )
        return None

    def _check(self, r: RankReport) -> str | None:
        reason = self._check_common(r.rank, r.world_size, r.manifest_digest)
        if reason is not None:
            return reason
        if self.phase == CHECKPOINT:
            return f"engine rank {r.rank} must report its layout first: the offered store is a checkpoint"
        want = self.published.get(r.rank) or (self._expected or {}).get(r.rank)
        if want is not None and r.params_digest != want:
            source = "this pod published" if self.published else "the seed's engine holds"
            return f"engine rank {r.rank} holds parameters with digest {r.params_digest[:16]}, {source} {want[:16]}"
        return None

    def _wait(
        self,
        got: Callable[[], dict[int, Any]],
        what: str,
        timeout_s: float,
        engine_gone: Callable[[], str | None] | None,
        poll_s: float,
    ) -> dict[int, Any]:
        deadline = time.monotonic() + timeout_s
        while self._failure is None and len(got()) < self.ranks:
            left = deadline - time.monotonic()
            if left <= 0:
                missing = sorted(set(range(self.ranks)) - set(got()))
                raise EngineGateError(f"engine ranks {missing} did not report their {what} within {timeout_s:.0f}s")
            self._cond.wait(min(left, poll_s) if engine_gone else left)
            gone = engine_gone() if engine_gone and self._failure is None else None
            if gone and len(got()) < self.ranks:
                raise EngineGateError(f"the engine exited before it proved its load: {gone}")
        if self._failure is not None:
            raise EngineGateError(self._failure)
        return dict(got())

    def wait_layouts(
        self, timeout_s: float, engine_gone: Callable[[], str | None] | None = None, poll_s: float = 2.0
    ) -> dict[int, RankLayout]:
        """Until every rank reported the layout of what it loaded from the checkpoint (see ``wait``)."""
        with self._cond:
            layouts = self._wait(lambda: self._layouts, "layout", timeout_s, engine_gone, poll_s)
            return {rank: r.tensors for rank, r in layouts.items()}

    def wait(
        self, timeout_s: float, engine_gone: Callable[[], str | None] | None = None, poll_s: float = 2.0
    ) -> dict[int, RankReport]:
        """Until every rank reported well (then publish), one failed, or ``timeout_s`` passed. ``engine_gone``,
        asked every ``poll_s``, says why the engine can no longer report (its container exited), ending the
        wait at once rather than at the timeout."""
        with self._cond:
            reports = self._wait(lambda: self._reports, "load", timeout_s, engine_gone, poll_s)
            self.published = {r: rep.params_digest for r, rep in reports.items()}
            self.param_bytes = {r: rep.param_bytes for r, rep in reports.items()}
            self.private_bytes = {r: rep.private_bytes for r, rep in reports.items()}
            return reports

    def close(self) -> None:
        """The attempt ended without weights (failed, released): nothing is offered any more."""
        with self._cond:
            self.phase, self._manifest_digest, self._expected = None, None, None
            self._layouts, self._reports = {}, {}
            self.published, self.param_bytes, self.private_bytes = {}, {}, {}
            self._cond.notify_all()


class EngineWatch:
    """Whether an engine container exited during this attempt, from successive reads of the pod's status.

    Only an instance seen running during the attempt counts: the one that failed the previous attempt may
    still be terminated, or restart late (the kubelet backs off), and its replacement will report."""

    def __init__(self) -> None:
        self._running: dict[str, int] = {}  # container -> restart count when last seen running

    def exited(self, now: Mapping[str, tuple[int, bool]]) -> str | None:
        """``now`` maps each engine container to (restart count, terminated now)."""
        for name, (restarts, terminated) in sorted(now.items()):
            seen = self._running.get(name)
            if seen is not None and (restarts > seen or terminated):
                return f"container {name} {'terminated' if terminated else 'restarted'} ({restarts} restarts)"
            if not terminated:
                self._running[name] = restarts
        return None


def seed_engine_digests(seed_url: str, token: str, timeout_s: float = 30.0) -> dict[int, str]:
    """The seed's published per-rank parameter digests (``GET /v1/engine`` on its agent)."""
    import httpx

    try:
        r = httpx.get(
            f"{seed_url.rstrip('/')}/v1/engine",
            headers={"Authorization": f"Bearer {token}"},
            timeout=min(30, timeout_s),
        )
    except httpx.HTTPError as e:
        raise OSError(f"could not read the seed's engine digests: {e!r}") from e
    if r.status_code != 200:
        raise OSError(f"the seed's engine digests: HTTP {r.status_code}: {r.text[:200]}")
    ranks = r.json().get("ranks")
    if not isinstance(ranks, dict) or not ranks:
        raise ValueError("the seed publishes no engine digests: its engine did not load from its store")
    return {int(k): str(v) for k, v in ranks.items()}
