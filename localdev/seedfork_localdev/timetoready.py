"""Time-to-Ready breakdown of one pod, and percentiles over pods. Pure functions (no I/O).

Inputs, all on one wall clock (one machine):
- ``seen``: when a watcher first saw the pod created, scheduled (``spec.nodeName``), Running, its
  readiness-gate condition True and its Ready condition True (``pods.PodTracker``);
- ``timing``: the agent's ``seedfork.io/timing`` annotation (``contract.PodTiming``): agent start,
  assignment time, transfer start/end, verified;
- ``engine``: the engine's own attach and re-check durations (reference engine ``/v1/engine`` timings).

The overhead is everything between creation and Ready that is not moving, verifying or attaching the
weights; ``control_plane`` is that overhead less the pod's own process start (interpreter and torch
imports): scheduling, waiting for the assignment, reporting, the readiness gate and the probe.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Breakdown:
    """Seconds, per pod. ``None`` where a milestone was not observed."""

    pod: str
    source: str
    total: float | None  # created -> Ready
    schedule: float | None  # created -> bound to a node
    start: float | None  # bound -> Running (processes started, status written)
    process_start: float | None  # Running -> agent up (Python and torch imports, agent HTTP server)
    handshake: float | None  # agent up -> transfer starts (read the assignment, seed manifest, transport set-up)
    transfer: float | None
    verify: float | None
    attach: float | None  # engine maps the agent's store and re-checks it
    ready_lag: float | None  # verified + attach -> Ready (report, gate, probe)
    overhead: float | None  # total - transfer - verify - attach
    control_plane: float | None  # overhead - process_start: scheduling, assignment, reporting, gate, probe
    bytes: int = 0

    def as_dict(self) -> dict:
        return asdict(self)


def _diff(end: float | None, start: float | None) -> float | None:
    if end is None or start is None:
        return None
    return max(0.0, end - start)


def breakdown(
    pod: str,
    source: str,
    seen: Mapping[str, float],
    timing: Mapping[str, float | int | None],
    engine: Mapping[str, float] | None = None,
) -> Breakdown:
    created, ready = seen.get("created"), seen.get("ready")
    running = seen.get("running")
    t_start, t_end = timing.get("transferStart"), timing.get("transferEnd")
    verified = timing.get("verified")
    transfer = _diff(t_end, t_start)
    verify = _diff(verified, t_end)
    attach = None
    if engine and engine.get("attach_ms") is not None:
        attach = (float(engine.get("attach_ms") or 0) + float(engine.get("verify_ms") or 0)) / 1000
    total = _diff(ready, created)
    moved = [x for x in (transfer, verify, attach) if x is not None]
    overhead = None if total is None or transfer is None else max(0.0, total - sum(moved))
    ready_lag = _diff(ready, verified)
    if ready_lag is not None and attach is not None:
        ready_lag = max(0.0, ready_lag - attach)
    process_start = _diff(timing.get("started"), running)
    control_plane = None if overhead is None or process_start is None else max(0.0, overhead - process_start)
    return Breakdown(
        pod=pod,
        source=source,
        total=total,
        schedule=_diff(seen.get("scheduled"), created),
        start=_diff(running, seen.get("scheduled")),
        process_start=process_start,
        handshake=_diff(t_start, timing.get("started")),
        transfer=transfer,
        verify=verify,
        attach=attach,
        ready_lag=ready_lag,
        overhead=overhead,
        control_plane=control_plane,
        bytes=int(timing.get("bytes") or 0),
    )


def percentile(values: Iterable[float], q: float) -> float | None:
    """Nearest-rank percentile (q in [0, 100]); with few samples p99 is the maximum, as it should be."""
    xs = sorted(v for v in values if v is not None)
    if not xs:
        return None
    rank = max(1, math.ceil(q / 100 * len(xs)))
    return xs[rank - 1]


FIGURES = (
    "total",
    "schedule",
    "start",
    "process_start",
    "handshake",
    "transfer",
    "verify",
    "attach",
    "ready_lag",
    "overhead",
    "control_plane",
)


def summary(rows: Iterable[Breakdown]) -> dict[str, dict[str, float | None]]:
    """p50 / p99 / max of every figure over the pods."""
    rows = list(rows)
    out = {}
    for name in FIGURES:
        vals = [getattr(r, name) for r in rows if getattr(r, name) is not None]
        out[name] = {
            "p50": percentile(vals, 50),
            "p99": percentile(vals, 99),
            "max": max(vals) if vals else None,
            "n": len(vals),
        }
    return out
