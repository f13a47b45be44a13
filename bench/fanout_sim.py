"""Fan-out simulator: the real planner, simulated time and links, 1 -> N scale-ups.

Every planning pass calls ``seedfork_operator.planner.plan`` exactly as the reconciler does (pods as
``PodView``s with their assignment, report and timing annotations; the estimates measured from those
timings); only the kubelet, the agents and the links are simulated:

- links (fluid model, rates re-shared at every event): a seed's NIC (50 GB/s) is shared by the
  TransferEngine readers it serves at once; an NCCL cohort is one pipelined broadcast to all its members
  at the NIC rate / 1.15 (measured: a cohort of 3 takes 1.1-1.2x one pull); storage gives each reader
  1.45 GB/s (measured: 16 GB cold from local disk in 11.1 s) up to a shared-storage cap for everyone;
- after the last byte: GPU verification at 2 TB/s (measured 1.6-2.4 TB/s); then the agent reports
  ``verified`` with its timing, the planner's next pass gates the pod, and it serves as a seed;
- the operator reacts at once to every event (the planner runs on every change; the real operator's
  debounce and watch latency are the planner's own ``DISPATCH_S`` allowance).

Policies, side by side from the same simulator: ``storage-only`` (every new pod reads storage),
``one-by-one`` (the first seed serves one pod after another), ``legacy`` (the planner's old rule, kept as
``rule="legacy"``: no free seed slot -> storage), ``planner`` (the planner by expected time) with
TransferEngine, and ``planner-nccl`` (NCCL cohorts of ``maxClientsPerSeed``). ``chain`` is on paper: a
pipelined chain where each new replica forwards chunks as they land finishes after one transfer time
plus one chunk time per hop.

    .venv/bin/python bench/fanout_sim.py                # the issue's cases (1 -> 10, 100, 1000; 100 x 100)
    .venv/bin/python bench/fanout_sim.py --quick        # small cases only

Prints a table and writes ``bench/results/fanout_sim.json``.
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from seedfork_api.contract import AgentReport, Assignment, PodTiming
from seedfork_api.spec import ModelReplicaSetSpec
from seedfork_operator import planner
from seedfork_operator.podview import PodView

RESULTS = Path(__file__).resolve().parent / "results"
GB = 1e9
NIC_BPS = 50 * GB  # 400 Gb/s per GPU
NVLINK_BPS = 392 * GB  # measured TransferEngine nvlink_intra data phase (for reference; cases use the NIC)
STORAGE_READER_BPS = 1.45 * GB
STORAGE_CAP_BPS = 20 * GB  # shared storage for everyone (assumption: a large parallel file system's share)
VERIFY_BPS = 2000 * GB
COHORT_FACTOR = 1.15  # an NCCL cohort broadcast takes this many times one pull
CHAIN_CHUNK = 64 * 2**20  # the on-paper chain's chunk


@dataclass
class Links:
    nic: float = NIC_BPS
    storage_reader: float = STORAGE_READER_BPS
    storage_cap: float = STORAGE_CAP_BPS
    verify: float = VERIFY_BPS


@dataclass
class SimPod:
    name: str
    set: str
    ip: str
    created: float
    assignment: Assignment | None = None
    report: AgentReport | None = None
    timing: PodTiming | None = None
    ready: bool = False
    gate: bool = False
    handled: int = 0  # the last attempt the agent started
    bytes_done: float = 0.0

    def view(self, fp: str) -> PodView:
        report = self.report
        if report is not None and report.state == "transferring":
            report = report.model_copy(update={"bytes_done": int(self.bytes_done)})
        return PodView(
            name=self.name,
            created=self.created,
            node=self.name,  # one GPU per node: every transfer crosses the NIC
            ip=self.ip,
            fingerprint=fp,
            ready=self.ready,
            gate=self.gate,
            assignment=self.assignment,
            report=report,
            timing=self.timing,
        )


@dataclass
class Flow:
    """Bytes moving to one or more pods: a seed read, a cohort broadcast, or a storage load."""

    kind: str  # seed | cohort | storage
    seed: str | None
    members: list[SimPod]
    remaining: float
    started: float
    rate: float = 0.0


@dataclass
class SetState:
    name: str
    spec: ModelReplicaSetSpec
    fp: str
    pods: dict[str, SimPod] = field(default_factory=dict)
    names: Callable[[], str] = field(default=lambda: "")


class Sim:
    def __init__(self, size: int, links: Links) -> None:
        self.size = size
        self.links = links
        self.now = 0.0
        self.flows: list[Flow] = []
        self.verifies: list[tuple[float, int, SimPod]] = []
        self.seq = itertools.count()
        self.storage_bytes = 0.0
        self.peak_storage = 0
        self.passes = 0
        self.plan_s = 0.0

    # ---- agents -------------------------------------------------------------
    def start(self, s: SetState, pod: SimPod) -> None:
        a = pod.assignment
        if a is None or a.source == "queued" or a.attempt <= pod.handled or (pod.report and pod.report.serving):
            return
        if a.cohort_id:
            members = [
                p for p in s.pods.values()
                if p.assignment and p.assignment.cohort_id == a.cohort_id and p.assignment.attempt > p.handled
            ]  # fmt: skip
            if len(members) < (a.cohort_size or 1) - 1:
                return  # the cohort starts when all its members have joined
        else:
            members = [pod]
        for m in members:
            m.handled = m.assignment.attempt
            m.bytes_done = 0.0
            m.report = AgentReport(
                attempt=m.handled, state="transferring", source=m.assignment.source, bytesTotal=self.size,
                updatedAt=self.now,
            )  # fmt: skip
            m.timing = PodTiming(started=m.created, assigned=m.assignment.assigned_at, transferStart=self.now)
        kind = "storage" if a.source == "storage" else ("cohort" if a.cohort_id else "seed")
        self.flows.append(Flow(kind, a.seed_pod, members, float(self.size), self.now))
        if kind == "storage":
            self.storage_bytes += self.size

    def rates(self) -> None:
        storage = [f for f in self.flows if f.kind == "storage"]
        self.peak_storage = max(self.peak_storage, len(storage))
        per_reader = min(self.links.storage_reader, self.links.storage_cap / max(len(storage), 1))
        by_seed: dict[tuple[str, str | None], int] = {}
        for f in self.flows:
            if f.kind != "storage":
                key = (f.members[0].set, f.seed)
                by_seed[key] = by_seed.get(key, 0) + 1
        for f in self.flows:
            if f.kind == "storage":
                f.rate = per_reader
            else:
                f.rate = self.links.nic / by_seed[(f.members[0].set, f.seed)]
                if f.kind == "cohort":
                    f.rate /= COHORT_FACTOR

    def next_event(self) -> float | None:
        times = [self.now + f.remaining / f.rate for f in self.flows if f.rate > 0]
        if self.verifies:
            times.append(self.verifies[0][0])
        return min(times) if times else None

    def advance(self, to: float) -> list[SimPod]:
        """Move to ``to``; returns the pods whose weights were verified then."""
        dt = to - self.now
        self.now = to
        done: list[SimPod] = []
        for f in list(self.flows):
            f.remaining -= f.rate * dt
            for m in f.members:
                m.bytes_done = self.size - max(f.remaining, 0.0)
            if f.remaining <= 1e-6 * self.size:
                self.flows.remove(f)
                for m in f.members:
                    heapq.heappush(self.verifies, (self.now + self.size / self.links.verify, next(self.seq), m))
        while self.verifies and self.verifies[0][0] <= self.now + 1e-9:
            _, _, m = heapq.heappop(self.verifies)
            m.report = AgentReport(
                attempt=m.handled, state="verified", source=m.assignment.source, serving=True,
                bytesDone=self.size, bytesTotal=self.size, updatedAt=self.now,
            )  # fmt: skip
            m.timing = m.timing.model_copy(update={"transfer_end": self.now, "verified": self.now, "bytes": self.size})
            done.append(m)
        return done


# ---- policies: what each pass decides for one set ---------------------------
def planner_pass(rule: planner.Rule) -> Callable[[Sim, SetState], None]:
    def run(sim: Sim, s: SetState) -> None:
        while True:
            views = [p.view(s.fp) for p in s.pods.values()]
            t0 = time.perf_counter()
            plan = planner.plan(s.spec, s.fp, views, {}, sim.now, s.names, None, rule=rule)
            sim.plan_s += time.perf_counter() - t0
            sim.passes += 1
            for name, a in plan.create:
                s.pods[name] = SimPod(name, s.name, f"ip-{name}", sim.now, assignment=a)
            for name, a in plan.assign:
                s.pods[name].assignment = a
            for name in plan.gate:
                s.pods[name].gate = s.pods[name].ready = True
            if plan.delete:
                raise RuntimeError(f"the simulated scale-up deleted pods: {plan.delete}")
            for name, _ in [*plan.create, *plan.assign]:
                sim.start(s, s.pods[name])
            if not plan.gate:  # a gated pod is Ready: the next pass may use it as a seed
                return

    return run


def fixed_pass(kind: str) -> Callable[[Sim, SetState], None]:
    """Baselines without the planner: every pod from storage, or one pod after another from the first seed."""

    def run(sim: Sim, s: SetState) -> None:
        missing = s.spec.replicas - len(s.pods)
        for _ in range(missing):
            name = s.names()
            s.pods[name] = SimPod(name, s.name, f"ip-{name}", sim.now)
        if kind == "storage-only":
            for p in s.pods.values():
                if p.assignment is None:
                    p.assignment = Assignment(attempt=1, source="storage", assigned_at=sim.now)
                    sim.start(s, p)
            return
        busy = any(f.members[0].set == s.name for f in sim.flows) or any(v[2].set == s.name for v in sim.verifies)
        waiting = [p for p in s.pods.values() if p.assignment is None]
        if not busy and waiting:
            seed = next(p for p in s.pods.values() if p.report and p.report.serving)
            p = waiting[0]
            p.assignment = Assignment(attempt=1, source="seed", backend="transfer_engine", seedPod=seed.name)
            sim.start(s, p)

    return run


POLICIES: dict[str, tuple[str, Callable[[Sim, SetState], None]]] = {
    "storage-only": ("transfer_engine", fixed_pass("storage-only")),
    "one-by-one": ("transfer_engine", fixed_pass("one-by-one")),
    "legacy": ("transfer_engine", planner_pass("legacy")),
    "planner": ("transfer_engine", planner_pass("expected")),
    "planner-nccl": ("nccl", planner_pass("expected")),
}


def make_set(name: str, n_new: int, size: int, backend: str, links: Links, transfer: dict, seeded: bool) -> SetState:
    spec = ModelReplicaSetSpec.model_validate(
        {
            "replicas": n_new + 1,
            "model": {"name": "m", "uri": "/m"},
            "engine": {"kind": "reference"},
            "transfer": {"backend": backend, "timeoutSeconds": 600, **transfer},
        }
    )
    counter = itertools.count()
    s = SetState(name, spec, spec.fingerprint(), names=lambda: f"{name}-{next(counter)}")
    if not seeded:
        spec.replicas = n_new
        return s
    storage_s = size / links.storage_reader  # the seed's own load, as its agent recorded it
    seed = SimPod(
        f"{name}-seed", name, f"ip-{name}-seed", -storage_s, ready=True, gate=True, handled=1,
        assignment=Assignment(attempt=1, source="storage", assigned_at=-storage_s),
        report=AgentReport(attempt=1, state="verified", source="storage", serving=True, bytesTotal=size),
        timing=PodTiming(transferStart=-storage_s, transferEnd=0.0, verified=0.0, bytes=size),
    )  # fmt: skip
    s.pods[seed.name] = seed
    return s


def simulate(
    policy: str, sets: int, n_new: int, size: int, links: Links, transfer: dict | None = None, seeded: bool = True
) -> dict:
    """``seeded``: each set starts with one Ready seed (else from nothing: every first load is from storage)."""
    backend, step = POLICIES[policy]
    sim = Sim(size, links)
    states = {f"s{i}": make_set(f"s{i}", n_new, size, backend, links, transfer or {}, seeded) for i in range(sets)}
    for s in states.values():
        step(sim, s)
    sim.rates()
    verified_at: list[float] = []
    while True:
        to = sim.next_event()
        if to is None:
            break
        done = sim.advance(to)
        verified_at += [sim.now] * len(done)
        for name in sorted({p.set for p in done}):
            step(sim, states[name])
        sim.rates()
    pods = [p for s in states.values() for p in s.pods.values() if not p.name.endswith("-seed")]
    unverified = [p.name for p in pods if not (p.report and p.report.state == "verified")]
    if unverified:
        raise RuntimeError(f"{policy}: {len(unverified)} pods never verified, e.g. {unverified[:3]}")
    one = size / links.nic + size / links.verify  # one transfer over the NIC, verified
    total = max(verified_at)
    return {
        "policy": policy,
        "sets": sets,
        "new_pods_per_set": n_new,
        "all_verified_s": total,
        "transfer_times": total / one,
        "storage_loads": sum(1 for p in pods if p.assignment.source == "storage"),
        "storage_bytes": sim.storage_bytes,
        "peak_storage_readers": sim.peak_storage,
        "planner_passes": sim.passes,
        "planner_ms_per_pass": sim.plan_s / sim.passes * 1e3 if sim.passes else 0.0,
    }


def chain_on_paper(n_new: int, size: int, links: Links) -> dict:
    """Pipelined chain: each replica forwards each chunk as it lands, so the last one is verified after one
    transfer plus one chunk per hop (plus its verification)."""
    one = size / links.nic + size / links.verify
    total = one + (n_new - 1) * CHAIN_CHUNK / links.nic
    return {
        "policy": "chain (on paper)",
        "sets": 1,
        "new_pods_per_set": n_new,
        "all_verified_s": total,
        "transfer_times": total / one,
        "storage_loads": 0,
        "storage_bytes": 0.0,
        "peak_storage_readers": 0,
    }


def cases(quick: bool) -> list[tuple[str, int, int, int, bool]]:
    """(label, sets, new pods per set, bytes, seeded)."""
    b70 = 140 * GB  # 70B in bfloat16
    if quick:
        return [("1->10 70B", 1, 10, b70, True), ("0->10 70B", 1, 10, b70, False)]
    return [
        ("1->10 70B", 1, 10, b70, True),
        ("1->100 70B", 1, 100, b70, True),
        ("1->1000 70B", 1, 1000, b70, True),
        ("100 sets x 1->100 70B", 100, 100, b70, True),
        ("0->100 70B", 1, 100, b70, False),
    ]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small cases only")
    ap.add_argument("--out", type=Path, default=RESULTS / "fanout_sim.json")
    args = ap.parse_args(argv)
    links = Links()
    rows = []
    for label, sets, n_new, size, seeded in cases(args.quick):
        for policy in POLICIES:
            if policy == "one-by-one" and not seeded:
                continue  # no seed to serve one by one
            t0 = time.perf_counter()
            row = simulate(policy, sets, n_new, size, links, seeded=seeded)
            row["case"], row["wall_s"] = label, time.perf_counter() - t0
            rows.append(row)
            print_row(row)
        if sets == 1 and seeded:
            row = chain_on_paper(n_new, size, links)
            row["case"] = label
            rows.append(row)
            print_row(row)
    out = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "links_GBps": {
            "nic": links.nic / GB,
            "storage_per_reader": links.storage_reader / GB,
            "storage_cap": links.storage_cap / GB,
            "verify": links.verify / GB,
        },
        "cohort_factor": COHORT_FACTOR,
        "chain_chunk_bytes": CHAIN_CHUNK,
        "transfer": {"maxClientsPerSeed": 4, "maxConcurrentStorageLoads": 2},
        "rows": rows,
    }
    args.out.parent.mkdir(exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    return 0


_HEADER = False


def print_row(r: dict) -> None:
    global _HEADER
    if not _HEADER:
        print(f"{'case':<22} {'policy':<17} {'all verified':>12} {'transfers':>9} {'storage loads':>13} "
              f"{'storage TB':>10} {'peak readers':>12}")  # fmt: skip
        _HEADER = True
    print(
        f"{r['case']:<22} {r['policy']:<17} {r['all_verified_s']:>10.1f} s {r['transfer_times']:>9.2f} "
        f"{r['storage_loads']:>13} {r['storage_bytes'] / 1e12:>10.2f} {r['peak_storage_readers']:>12}",
        flush=True,
    )


if __name__ == "__main__":
    sys.exit(main())
