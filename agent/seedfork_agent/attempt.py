"""Where the pod's agent stands in its current attempt: the pod contract's report and the attempt's phases.

One ``AttemptState`` per agent, owned by what runs the attempts (``agent.Agent``, or ``engines.sglang_pod``
where SGLang moves its own bytes) and changed only through the methods below. Everything that says where
the pod stands renders from it: the pod's report annotation (``published``), the HTTP API's ``/readyz`` and
``/v1/progress`` (``progress``), and the lines the command line prints.

Every change of state calls ``on_change`` once, from whatever thread made it (the pod loop's ``notify`` is
thread-safe). Byte counts and phase marks do not: the pod loop re-reads the report every second anyway,
and an attempt's phases are published with the state that ends it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from seedfork_api.contract import AgentReport, PodTiming, Source, TransferState

# The report's fields ``/v1/progress`` shows, by their contract names (it shows the seed's address besides).
PROGRESS_FIELDS = frozenset(
    {"state", "attempt", "source", "backend", "bytes_done", "bytes_total", "error", "serving", "active_clients"}
)


class AttemptState:
    def __init__(self, fingerprint: str | None = None, on_change: Callable[[], None] | None = None) -> None:
        # Replaced whole on every change, never edited in place: a reader on another thread sees one state.
        self.report = AgentReport(attempt=0, state="pending", fingerprint=fingerprint)
        # The attempt's phases (transfer, verification, engine, cache fetch); the pod's own are the pod loop's.
        self.timing = PodTiming()
        self.seed: str | None = None  # the seed's agent (ip:port) a pull reads from; the report names its pod
        self._checking = False
        # A warm standby's engine, and its promotion until that fails: the agent's probe passes (``warm_engine``).
        self._warm = False
        self.on_change = on_change

    # ---- reading -------------------------------------------------------------
    @property
    def state(self) -> TransferState:
        return self.report.state

    @property
    def serving(self) -> bool:
        """Verified weights are served to others (also while a self-check runs, see ``published``)."""
        return self.report.serving

    @property
    def checking(self) -> bool:
        return self._checking

    @property
    def warm_engine(self) -> bool:
        """A warm standby, or its first promotion while that has not failed: ``/readyz`` passes without
        weights. The pod is still not Ready (its readiness gate is True only on verified weights); it turns
        Ready the moment the gate does, not one probe period later (at least 1 s on a kubelet)."""
        return self._warm and self.report.state != "failed"

    def published(self) -> AgentReport:
        """The report for the pod's annotation. A seed re-checking its store after a client's checksum
        mismatch says ``serving: false`` meanwhile, so that the operator offers it to no new client."""
        r = self.report
        return r.model_copy(update={"serving": r.serving and not self._checking, "updated_at": time.time()})

    def progress(self) -> dict[str, Any]:
        """``GET /v1/progress``: the report's fields by their contract names, the seed's address and the
        attempt's phases (the names of the pod's timing annotation)."""
        body = self.report.model_dump(mode="json", by_alias=True, include=PROGRESS_FIELDS)
        return {**body, "seed": self.seed, "timing": self.phases(by_alias=True)}

    def phases(self, by_alias: bool = False) -> dict[str, float | None]:
        """The phases this attempt's owner marked (and only those): for the pod's timing annotation."""
        return self.timing.model_dump(by_alias=by_alias, exclude_unset=True)

    # ---- changes -------------------------------------------------------------
    def begin(
        self,
        attempt: int,
        source: Source,
        backend: str | None = None,
        seed: str | None = None,
        seed_pod: str | None = None,
    ) -> None:
        """An attempt starts moving bytes: nothing of the previous attempt's bytes, error or weights is kept."""
        self.seed = seed
        self._warm = self._warm and self.report.state == "standby"  # only the promotion of a warm standby
        self._set(
            attempt=attempt,
            state="transferring",
            source=source,
            backend=backend,
            seed_pod=_seed_pod(source, seed_pod),
            bytes_done=0,
            bytes_total=0,
            error=None,
            serving=False,
            digest=None,
        )

    def moved(self, done: int, total: int) -> None:
        """Bytes of the attempt landed so far (called from the pull's thread, often: no ``on_change``)."""
        self.report = self.report.model_copy(update={"bytes_done": done, "bytes_total": total})

    def mark(self, *, publish: bool = False, **phases: float | None) -> None:
        """Record the attempt's phases (``PodTiming``'s field names), e.g. ``mark(verified=time.time())``.
        ``publish``: a phase after the state that ended the attempt (the engine's API up) must still land."""
        for name, value in phases.items():
            setattr(self.timing, name, value)  # a name PodTiming does not have raises
        if publish:
            self._changed()

    def verified(self, nbytes: int, digest: str | None, serving: bool = True) -> None:
        """The attempt's weights are verified; ``serving``: whether this pod can seed others with them."""
        self._set(state="verified", bytes_done=nbytes, bytes_total=nbytes, digest=digest, serving=serving)

    def fail(self, reason: str) -> None:
        """The attempt failed (or the verified weights no longer hold): nothing is served; the digest of
        the weights it had stays, so the operator sees which weights failed."""
        self._warm = False
        self._set(state="failed", error=reason, serving=False)

    def refused(self, attempt: int, source: Source | None, reason: str, seed_pod: str | None = None) -> None:
        """An assigned attempt failed before it ran (a bad assignment, or one an earlier process had)."""
        seed_pod = _seed_pod(source, seed_pod)
        self._warm = False
        self._set(attempt=attempt, source=source, seed_pod=seed_pod, state="failed", error=reason, serving=False)

    def standby(self, attempt: int) -> None:
        """A standby attempt starts: no weights, the engine is being brought up warm."""
        self._warm = False
        self._set(attempt=attempt, source="standby", seed_pod=None, state="pending", error=None, serving=False)

    def warm(self) -> None:
        """The standby's engine is up and warm: it waits for its promotion."""
        self._warm = True
        self._set(state="standby")

    def released(self) -> None:
        """The weights were given up (freed): back to no attempt's weights."""
        self._warm = False
        self._set(state="pending", serving=False, digest=None)

    def clients(self, delta: int) -> None:
        """Transfers this pod serves now went up or down by ``delta``."""
        self._set(active_clients=self.report.active_clients + delta)

    def check_started(self) -> None:
        """A client saw a checksum mismatch: the seed re-checks its store (``published`` says not serving)."""
        self._checking = True
        self._changed()

    def check_ended(self, failure: str | None) -> None:
        """The re-check ended; ``failure``: why the store no longer matches its manifest (it stops serving)."""
        self._checking = False
        values: dict[str, Any] = {"self_checks": self.report.self_checks + 1}
        if failure is not None:
            values.update(state="failed", error=failure, serving=False)
        self._set(**values)

    def _set(self, **values: Any) -> None:
        self.report = self.report.model_copy(update=values)
        self._changed()

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change()


def _seed_pod(source: Source | None, seed_pod: str | None) -> str | None:
    return seed_pod if source == "seed" else None
