"""The engine gate: the agent's side of a load that happens inside the engine's own processes.

For an engine that loads its weights itself from the agent's store (vLLM through ``vllm_loader``), the
agent's own checksums prove only the agent's copy. The gate makes the engine prove its own: every
engine rank maps the store, checksums the bytes it read, loads them, checksums its own parameters, and
reports both. The agent turns the attempt ``verified`` (and the pod Ready, and itself a seed) only when

- every rank of the engine reported (``tp * pp`` of them), each with the same world size;
- each rank read the manifest the agent verified (same digest, recomputed in the engine's process);
- each rank's parameter digest equals the seed's for the same rank (the fingerprint pins engine,
  version and parallelism, so the same bytes give the same parameters), or, for a pod loaded from
  storage, is what this pod publishes for its own clients to meet.

A rank that fails reports it and the wait ends at once; a rank that never reports ends it at the
set's timeout. A rank whose report is refused raises inside the engine, so the engine exits and its
container restarts: it never serves what it loaded. A restarted engine of a verified pod reloads and
must meet the digests this pod already published.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass


class EngineGateError(RuntimeError):
    """The engine did not prove it holds the verified weights; the message says which rank and why."""


@dataclass(frozen=True)
class RankReport:
    rank: int
    world_size: int
    manifest_digest: str  # the manifest digest with the checksums the engine computed itself
    params_digest: str  # the engine's own parameters after the load, as that rank holds them
    param_bytes: int
    loaded_tensors: int
    started_at: float | None = None  # epoch seconds when the engine asked for the weights (its init done)

    @classmethod
    def from_json(cls, body: object) -> RankReport:
        """Parse a loader's report; ``ValueError`` names the bad field (the agent answers 400)."""
        if not isinstance(body, dict):
            raise ValueError("the report must be a JSON object")
        fields = {
            "rank": int,
            "worldSize": int,
            "manifestDigest": str,
            "paramsDigest": str,
            "paramBytes": int,
            "loadedTensors": int,
        }
        values = {}
        for key, kind in fields.items():
            value = body.get(key)
            if not isinstance(value, kind) or isinstance(value, bool):
                raise ValueError(f"{key} must be {'an integer' if kind is int else 'a string'}")
            values[key] = value
        if not 0 <= values["rank"] < values["worldSize"]:
            raise ValueError("rank must lie in [0, worldSize)")
        started = body.get("startedAt")
        if started is not None and (not isinstance(started, int | float) or isinstance(started, bool)):
            raise ValueError("startedAt must be a number")
        return cls(
            rank=values["rank"],
            world_size=values["worldSize"],
            manifest_digest=values["manifestDigest"],
            params_digest=values["paramsDigest"],
            param_bytes=values["paramBytes"],
            loaded_tensors=values["loadedTensors"],
            started_at=float(started) if started is not None else None,
        )


class EngineGate:
    """Collects the engine ranks' load reports for one attempt and decides; thread-safe (the HTTP handlers
    report from the event loop while the attempt waits in a worker thread)."""

    def __init__(self, ranks: int) -> None:
        if ranks < 1:
            raise ValueError("an engine has at least one rank")
        self.ranks = ranks
        self._cond = threading.Condition()
        self._manifest_digest: str | None = None
        self._expected: dict[int, str] | None = None
        self._reports: dict[int, RankReport] = {}
        self._failure: str | None = None
        # What this pod publishes once verified: its clients' engines must hold the same.
        self.published: dict[int, str] = {}
        self.param_bytes: dict[int, int] = {}  # what each rank's parameters weigh, as the engine reported

    def open(self, manifest_digest: str, expected: dict[int, str] | None) -> None:
        """A new attempt: its verified manifest, and the seed's per-rank digests (None: loaded from storage)."""
        if expected is not None and set(expected) != set(range(self.ranks)):
            raise EngineGateError(
                f"the seed publishes engine digests for ranks {sorted(expected)}, this engine has {self.ranks}"
            )
        with self._cond:
            self._manifest_digest, self._expected = manifest_digest, expected
            self._reports, self._failure = {}, None
            self.published = {}
            self._cond.notify_all()

    @property
    def is_open(self) -> bool:
        return self._manifest_digest is not None

    def report(self, r: RankReport) -> str | None:
        """Record a rank's report; returns why it is refused, or None. A refusal fails the attempt."""
        with self._cond:
            reason = self._check(r)
            if reason is None:
                self._reports[r.rank] = r
            elif not self.published:  # during an attempt: fail it now; after, the restarted engine dies alone
                self._failure = reason
            self._cond.notify_all()
            return reason

    def fail(self, rank: int, reason: str) -> None:
        with self._cond:
            if not self.published:
                self._failure = f"engine rank {rank}: {reason}"
            self._cond.notify_all()

    def _check(self, r: RankReport) -> str | None:
        if self._manifest_digest is None:
            return "no verified weights are offered to the engine"
        if r.world_size != self.ranks:
            return f"engine rank {r.rank} reports world size {r.world_size}, the set has tp * pp = {self.ranks}"
        if r.manifest_digest != self._manifest_digest:
            return (
                f"engine rank {r.rank} read weights with manifest digest {r.manifest_digest[:16]}, "
                f"the agent verified {self._manifest_digest[:16]}"
            )
        want = self.published.get(r.rank) or (self._expected or {}).get(r.rank)
        if want is not None and r.params_digest != want:
            source = "this pod published" if self.published else "the seed's engine holds"
            return f"engine rank {r.rank} holds parameters with digest {r.params_digest[:16]}, {source} {want[:16]}"
        return None

    def wait(
        self, timeout_s: float, engine_gone: Callable[[], str | None] | None = None, poll_s: float = 2.0
    ) -> dict[int, RankReport]:
        """Until every rank reported well (then publish), one failed, or ``timeout_s`` passed. ``engine_gone``,
        asked every ``poll_s``, says why the engine can no longer report (its container exited), ending the
        wait at once rather than at the timeout."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while self._failure is None and len(self._reports) < self.ranks:
                left = deadline - time.monotonic()
                if left <= 0:
                    missing = sorted(set(range(self.ranks)) - set(self._reports))
                    raise EngineGateError(f"engine ranks {missing} did not report their load within {timeout_s:.0f}s")
                self._cond.wait(min(left, poll_s) if engine_gone else left)
                gone = engine_gone() if engine_gone and self._failure is None else None
                if gone and len(self._reports) < self.ranks:
                    raise EngineGateError(f"the engine exited before it proved its load: {gone}")
            if self._failure is not None:
                raise EngineGateError(self._failure)
            self.published = {r: rep.params_digest for r, rep in self._reports.items()}
            self.param_bytes = {r: rep.param_bytes for r, rep in self._reports.items()}
            return dict(self._reports)

    def close(self) -> None:
        """The attempt ended without weights (failed, released): nothing is offered any more."""
        with self._cond:
            self._manifest_digest, self._expected = None, None
            self._reports, self.published, self.param_bytes = {}, {}, {}
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
