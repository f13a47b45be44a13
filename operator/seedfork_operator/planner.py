"""Seed choice, fan-out, retries and scaling as one pure function: (spec, pods, nodes, now) → Plan.

No I/O here: the reconciler feeds in what the API says and executes the plan.
Everything the planner needs to remember lives in the pods' annotations
(the Assignment with its attempt number and excluded seeds, the agent's
report), so a restarted operator plans exactly as the old one would have.

Rules (README, "How the operator fans out"; what each engine can do is its row of ``seedfork_api.engines``,
SGLang's from docs/sglang.md):
- A seed is Ready, has the same fingerprint, says it is serving, is not
  terminating and has a pod IP. Active clients of a seed are the pods whose
  current assignment names it and whose report for that attempt is neither
  verified nor failed. A seed takes at most ``maxClientsPerSeed`` of them.
- Preference: a seed sharing the first topology key's node label, then the
  next key, then the fewest active clients.
- NCCL: each concurrent group on a seed gets its own block of ``tp * pp``
  ports. Where the agent moves the bytes (not SGLang), pods needing a seed in
  the same pass are grouped into one cohort (one broadcast to k+1 ranks, the
  seed is rank 0).
- An engine's limits: NCCL clients per seed (SGLang: one); whether pods that
  loaded through TransferEngine can seed (SGLang: no, it does not republish
  their weights).
- No free seed slot → decide by expected time (``fanout``, rule "expected"): wait for a seed slot
  (``source: queued``) or load from storage, whichever is expected to verify sooner (storage by more
  than ``fanout.PREFER_SEED_S``), with at most
  ``maxConcurrentStorageLoads`` storage loads at once. Until its ``waitUntil`` (when storage would have
  verified it: the storage estimate plus the wait for a storage slot, plus ``fanout.PREFER_SEED_S``;
  counted from when its agent runs) a queued pod prefers seeds by ``PREFER_SEED_S``; after it, it takes
  storage as soon as storage is expected sooner at all; past the timeout it takes the next storage slot
  whatever the forecast says.
  Rule "legacy" (the planner before queuing, kept for comparison): no free seed slot → storage.
- Standby pods (``spec.standby``, module ``standby``) are no replicas: they are not counted, scaled down or
  chosen as seeds. A missing replica promotes a standby (warm first) before a new pod is created: it gets
  the assignment a new pod would (why ``promote``, ``promotes: true``); new standbys refill to
  ``spec.standby`` after the replicas got their names and once no promotion is on its way to Ready (a new
  engine's start would compete with it for the node's CPUs; at most the set's timeout); a failed standby
  is deleted and refilled.
- A failed or timed-out transfer (or a seed that
  vanished) is retried on another seed, excluding the failed ones, up to
  ``retries``; then storage (``fallback: storage``) or the pod is replaced
  (``fallback: fail``). A failed storage load replaces the pod.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

from seedfork_api import engines
from seedfork_api.contract import Assignment, ConcreteBackend, group_ports
from seedfork_api.spec import ModelReplicaSetSpec

from . import fanout
from .podview import PodView
from .standby import plan_standby, standby_assignment

Rule = Literal["expected", "legacy"]
STORAGE = "storage"
NO_LOCALITY = "remote"  # metric label when the seed shares none of the topology keys

NodeLabels = Mapping[str, Mapping[str, str]]


@dataclass(frozen=True)
class SeedChoice:
    """One decision the operator explains with an Event and a metric."""

    pod: str
    attempt: int
    seed: str | None  # None = storage
    locality: str  # the topology key shared with the seed, NO_LOCALITY, or STORAGE
    why: str  # initial | retry | fallback | locality | promote


@dataclass(frozen=True)
class Failure:
    pod: str
    attempt: int
    seed: str | None
    reason: str


@dataclass
class Plan:
    create: list[tuple[str, Assignment]] = field(default_factory=list)  # new pods, created with their assignment
    assign: list[tuple[str, Assignment]] = field(default_factory=list)  # new assignment for an existing pod
    gate: list[str] = field(default_factory=list)  # pods whose weights are verified: set the readiness gate
    delete: list[tuple[str, str]] = field(default_factory=list)  # (pod, reason)
    choices: list[SeedChoice] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)
    fell_back: int = 0  # storage chosen because seed transfers failed
    queued: list[str] = field(default_factory=list)  # pods newly queued for a seed or storage slot
    promoted: list[str] = field(default_factory=list)  # standbys that become replicas with their new assignment
    estimates: fanout.Estimates | None = None  # what the expected-time decisions were based on

    @property
    def empty(self) -> bool:
        return not (self.create or self.assign or self.gate or self.delete)


# ---------------------------------------------------------------- helpers


def resolve_backend(spec: ModelReplicaSetSpec) -> ConcreteBackend:
    return engines.resolve_backend(spec.transfer.backend, spec.engine.kind)


def client_limit(spec: ModelReplicaSetSpec) -> int:
    return engines.of(spec.engine.kind).client_limit(resolve_backend(spec), spec.transfer.max_clients_per_seed)


def uses_cohorts(spec: ModelReplicaSetSpec) -> bool:
    """One NCCL broadcast to many clients: the agent's own groups do it, an engine moving its own bytes not."""
    return resolve_backend(spec) == "nccl" and engines.of(spec.engine.kind).agent_moves_bytes


def verified_pods_seed(spec: ModelReplicaSetSpec) -> bool:
    """Whether a pod that loaded from a seed can seed in turn (with the set's backend)."""
    return engines.of(spec.engine.kind).seeds_after(resolve_backend(spec))


def seed_capacity(spec: ModelReplicaSetSpec, rule: Rule = "expected") -> int:
    """Readers one seed takes at once. By expected time, TransferEngine readers share the seed's link: a
    second concurrent reader verifies nobody sooner and delays the first one's becoming a seed, so one
    at a time (tree doubling); an NCCL cohort broadcasts to all its members at once."""
    if rule == "legacy" or uses_cohorts(spec):
        return client_limit(spec)
    return 1


def is_storage_load(spec: ModelReplicaSetSpec, pod: PodView, now: float) -> bool:
    """Holds one of the set's storage slots: assigned storage, not finished, and started or recently assigned
    (an agent that never starts frees its slot after the timeout, so it cannot block the set)."""
    a = pod.assignment
    if a is None or a.source != "storage" or pod.deleting or pod.state in ("verified", "failed"):
        return False
    r = pod.current_report
    return (r is not None and r.state == "transferring") or now - a.assigned_at <= spec.transfer.timeout_seconds


def port_blocks(spec: ModelReplicaSetSpec) -> list[list[int]]:
    """Disjoint blocks of one port per rank inside the rendezvous part of ``spec.transfer.ports``."""
    ranks = spec.engine.parallelism.tp * spec.engine.parallelism.pp
    engine = engines.of(spec.engine.kind)
    if not engine.agent_moves_bytes:  # the engine moves its bytes itself: the agent runs no TransferEngine there
        own = engine.own_ports.count if engine.own_ports else 0  # contract.sglang_own_ports
        start, end = spec.transfer.ports.start, spec.transfer.ports.end - own
    else:
        start, end = group_ports(spec.transfer.ports.start, spec.transfer.ports.end, ranks)
    return [list(range(p, p + ranks)) for p in range(start, end - ranks + 2, ranks)]


def locality(client: Mapping[str, str] | None, seed: Mapping[str, str] | None, keys: list[str]) -> tuple[int, str]:
    """(rank, label): rank is the index of the first topology key both nodes share, len(keys) for none."""
    if client and seed:
        for i, key in enumerate(keys):
            if key in client and client.get(key) == seed.get(key):
                return i, key
    return len(keys), NO_LOCALITY


def deadline(spec: ModelReplicaSetSpec, pod: PodView) -> float:
    """When a seed attempt without ``verified`` counts as failed.

    The clock starts at the assignment, restarts with each report of progress on this attempt
    (a transfer that moves is not stuck), and waits while the agent is still busy with an older
    attempt (its own timeout ends that one first), but never beyond two timeouts after assignment.
    """
    a, r, t = pod.assignment, pod.report, spec.transfer.timeout_seconds
    start = a.assigned_at
    if r is not None and r.state in ("pending", "transferring"):
        if r.attempt == a.attempt:
            start = max(start, r.updated_at)
        elif r.attempt < a.attempt:
            start = min(max(start, r.updated_at + t), a.assigned_at + t)
    return start + t


def timed_out(spec: ModelReplicaSetSpec, pod: PodView, now: float) -> bool:
    a = pod.assignment
    # Storage loads take as long as the disk needs; the transfer timeout bounds seed transfers only.
    return a is not None and a.source == "seed" and not pod.verified and now > deadline(spec, pod)


def is_active_client(spec: ModelReplicaSetSpec, pod: PodView, now: float) -> bool:
    a = pod.assignment
    return (
        a is not None
        and a.source == "seed"
        and not pod.deleting
        and pod.state not in ("verified", "failed")
        and not timed_out(spec, pod, now)
    )


def active_clients(spec: ModelReplicaSetSpec, pods: Iterable[PodView], now: float) -> dict[str, list[PodView]]:
    out: dict[str, list[PodView]] = {}
    for pod in pods:
        if is_active_client(spec, pod, now):
            out.setdefault(pod.assignment.seed_pod or "", []).append(pod)
    return out


def seed_check(spec: ModelReplicaSetSpec, fingerprint: str) -> Callable[[PodView], bool]:
    """Could a pod serve weights at all (capacity aside)? Built once per pass: it runs for every pod."""
    storage_only = not verified_pods_seed(spec)  # e.g. SGLang over TransferEngine (engines.Engine.te_clients_seed)

    def check(pod: PodView) -> bool:
        if pod.standby or pod.deleting or not pod.ready or not pod.ip or pod.fingerprint != fingerprint:
            return False
        if not pod.serving:
            return False
        return not storage_only or (pod.assignment is not None and pod.assignment.source == "storage")

    return check


def can_seed(spec: ModelReplicaSetSpec, fingerprint: str, pod: PodView) -> bool:
    return seed_check(spec, fingerprint)(pod)


def scale_down_order(pods: list[PodView], clients: Mapping[str, list[PodView]]) -> list[PodView]:
    """Deletion preference: not Ready first, then Ready pods seeding nobody, then busy seeds; newest first."""

    def key(pod: PodView) -> tuple[int, int, float, str]:
        busy = len(clients.get(pod.name, []))
        tier = 0 if not pod.ready else (1 if busy == 0 else 2)
        return tier, busy, -pod.created, pod.name  # name: a stable order within one second

    return sorted(pods, key=key)


def cohort_id(seed: str, members: list[str], now: float) -> str:
    digest = hashlib.sha256(f"{seed}|{','.join(members)}|{now}".encode()).hexdigest()[:10]
    return f"c-{digest}"


# ---------------------------------------------------------------- the plan


@dataclass
class _Need:
    pod: str
    node: str | None
    attempt: int
    excluded: list[str]
    why: str
    new: bool = False
    # The pod's agent is still inside an earlier attempt (e.g. joining a seed that just died) and starts this
    # one only when that ends, up to a timeout later: in a cohort it would hold every other member waiting.
    late: bool = False
    storage_only: bool = False  # retries ran out and fallback is storage
    queued: Assignment | None = None  # the pod waits in the queue already (since assigned_at, until wait_until)
    agent_up: float | None = None  # queued: since when its agent runs (it reported), None while it starts


def plan(
    spec: ModelReplicaSetSpec,
    fingerprint: str,
    pods: list[PodView],
    nodes: NodeLabels,
    now: float,
    new_name: Callable[[], str | None],
    template_node: str | None = None,
    estimates: fanout.Estimates | None = None,
    rule: Rule = "expected",
    replace: Mapping[str, str] | None = None,
    avoid: Collection[str] = (),
) -> Plan:
    """``estimates``: the set's transfer and storage-load times (default: measured from the pods' timing).

    ``replace``: pods whose weights the set cannot trust (``trust.judge``), deleted and replaced with the reason;
    ``avoid``: pods not to choose as seeds now. ``new_name`` returns None when no pod name is free (the pod is
    then created on a later pass)."""
    out = Plan()
    replace = replace or {}
    live = [p for p in pods if not p.deleting]
    by_name = {p.name: p for p in live}
    clients = active_clients(spec, live, now)
    standbys = [p for p in live if p.standby]
    members = [p for p in live if not p.standby]  # the replicas, whatever their state

    # 1. scale down: pick victims before anything else, so we assign nothing to them
    excess = len(members) - spec.replicas
    victims: set[str] = set()
    if excess > 0:
        for pod in scale_down_order(members, clients)[:excess]:
            victims.add(pod.name)
            out.delete.append((pod.name, "scale down"))
    survivors = [p for p in members if p.name not in victims]
    gone = {p.name for p in pods if p.deleting} | victims | set(replace)
    unchosen = gone | set(avoid)  # never a seed for a new assignment; avoided seeds keep their current clients

    # 2. per pod: verified → gate; failed / timed out / seed gone → retry, fall back or replace
    needs: list[_Need] = []
    replaced = 0
    for pod in survivors:
        a = pod.assignment
        if pod.name in replace:
            out.delete.append((pod.name, replace[pod.name]))
            replaced += 1
            continue
        if a is None:
            needs.append(_Need(pod.name, pod.node, 1, [], "initial"))
            continue
        if pod.verified:
            if not pod.gate:
                out.gate.append(pod.name)
            continue
        if a.source == "queued":  # decided again every pass, until a slot is its
            exhausted = len(a.excluded_seeds) > spec.transfer.retries
            why = "fallback" if exhausted else ("retry" if a.excluded_seeds else "initial")
            up = max(a.assigned_at, pod.report.updated_at) if pod.report is not None else None
            need = _Need(pod.name, pod.node, a.attempt + 1, list(a.excluded_seeds), why, queued=a, agent_up=up)
            need.storage_only = exhausted
            needs.append(need)
            continue
        reason = None
        if pod.state == "failed":
            reason = (pod.current_report.error or "transfer failed") if pod.current_report else "transfer failed"
        elif timed_out(spec, pod, now):
            reason = f"no verified weights within {spec.transfer.timeout_seconds}s"
        elif a.source == "seed" and (a.seed_pod in gone or a.seed_pod not in by_name):
            reason = f"seed {a.seed_pod} went away"
        if reason is None:
            candidates = [p for p in live if p.name not in unchosen]
            upgrade = _locality_upgrade(spec, fingerprint, pod, candidates, nodes, clients, now)
            if upgrade:
                needs.append(_Need(pod.name, pod.node, a.attempt + 1, list(a.excluded_seeds), "locality"))
            continue
        out.failures.append(Failure(pod.name, a.attempt, a.seed_pod if a.source == "seed" else None, reason))
        if a.source == "storage":
            out.delete.append((pod.name, f"loading from storage failed: {reason}"))
            replaced += 1
            continue
        excluded = [*a.excluded_seeds, *([a.seed_pod] if a.seed_pod and a.seed_pod not in a.excluded_seeds else [])]
        if len(excluded) <= spec.transfer.retries:
            busy = pod.report is not None and pod.report.state == "transferring"
            needs.append(_Need(pod.name, pod.node, a.attempt + 1, excluded, "retry", late=busy))
        elif spec.transfer.fallback == "storage" and rule == "expected":  # through the storage fan-in limit
            needs.append(_Need(pod.name, pod.node, a.attempt + 1, excluded, "fallback", storage_only=True))
        elif spec.transfer.fallback == "storage":
            storage = Assignment(attempt=a.attempt + 1, source="storage", excluded_seeds=excluded, assigned_at=now)
            out.assign.append((pod.name, storage))
            out.choices.append(SeedChoice(pod.name, a.attempt + 1, None, STORAGE, "fallback"))
            out.fell_back += 1
        else:
            out.delete.append((pod.name, f"{len(excluded)} seed transfers failed and fallback is fail"))
            replaced += 1

    # 3. scale up (replacing pods deleted above, too): standbys first, then new pods
    missing = spec.replicas - (len(survivors) - replaced)
    standby = plan_standby([p for p in standbys if p.name not in replace], spec.standby, missing)
    for pod in standby.promote:
        a = pod.assignment
        needs.append(_Need(pod.name, pod.node, a.attempt + 1, [], "promote"))
        out.promoted.append(pod.name)
    out.delete += [(name, why) for name, why in standby.delete]
    out.delete += [(name, replace[name]) for name in (p.name for p in standbys) if name in replace]
    names = [name for name in (new_name() for _ in range(max(missing - len(standby.promote), 0))) if name]
    needs += [_Need(name, template_node, 1, [], "initial", new=True) for name in names]

    def refill() -> None:
        # After the replicas took their names (a replica is worth more than a standby), and only once no
        # promotion is loading: a new standby's engine start competes with it for the node's CPUs.
        promoting = any(_promoting(spec, p, now) for p in survivors) or bool(standby.promote)
        for name in (new_name() for _ in range(0 if promoting else standby.create)):
            if name:
                out.create.append((name, standby_assignment(now)))

    # 4. seeds for everyone who needs one, in one pass so cohorts can form
    def replacement() -> _Need | None:
        name = new_name()
        return _Need(name, template_node, 1, [], "initial", new=True) if name else None

    if rule == "legacy":
        _assign(spec, fingerprint, needs, live, unchosen, nodes, clients, now, out, replacement, client_limit(spec))
        refill()
        return out
    est = out.estimates = estimates or fanout.measure(live)
    # Locality moves first (a closer slot is free for them), then the longest-waiting pods, then the rest.
    needs.sort(key=lambda n: (0, 0.0) if n.why == "locality" else ((1, n.queued.assigned_at) if n.queued else (2, 0.0)))
    # A free seed slot is taken at once: it costs the shared storage nothing. Storage is weighed against waiting.
    to_seed: list[_Need] = []
    waiting: list[_Need] = []
    for n in needs:
        (waiting if n.storage_only else to_seed).append(n)
    _assign(
        spec, fingerprint, to_seed, live, unchosen, nodes, clients, now, out, replacement, seed_capacity(spec), waiting
    )
    _wait_or_storage(spec, est, waiting, live, clients, gone, now, out, replacement)
    refill()
    return out


def _storage_allowed(spec: ModelReplicaSetSpec, need: _Need) -> bool:
    """A pod's first load may always come from storage; a retry only with ``fallback: storage``."""
    return need.why != "retry" or spec.transfer.fallback == "storage"


def _wait_or_storage(
    spec: ModelReplicaSetSpec,
    est: fanout.Estimates,
    needs: list[_Need],
    live: list[PodView],
    clients: Mapping[str, list[PodView]],
    gone: set[str],
    now: float,
    out: Plan,
    replacement: Callable[[], _Need | None],
) -> None:
    """No seed slot is free for these pods: queue each for the slot (seed or storage) expected to verify it
    first, or load it from storage now. In need order, so the forecast books slots first come, first served."""
    if not needs:
        return
    grows = verified_pods_seed(spec)
    forecast = fanout.Forecast(now, est, seed_capacity(spec), grows)
    moving = {n.pod for n in needs}
    for seed, group in clients.items():  # seed transfers in flight free their slot and add a seed
        if seed in gone:
            continue
        for c in group:
            if c.name not in moving:
                forecast.seed_transfer(fanout.expected_end(c, est.seed_s, now))
    loads = 0
    for pod in live:
        if pod.name in gone or pod.name in moving:
            continue
        if is_storage_load(spec, pod, now):
            loads += 1
            forecast.storage_load(fanout.expected_end(pod, est.storage_s, now))
        elif pod.verified and pod.serving and not pod.ready and (grows or pod.assignment.source == "storage"):
            forecast.add_seed_slots(now + fanout.DISPATCH_S, forecast.capacity)  # a seed once its gate is set
    for _, a in [*out.create, *out.assign]:  # what this pass already decided
        if a.source == "seed":
            forecast.seed_transfer(now + est.seed_s)
        elif a.source == "storage":
            loads += 1
            forecast.storage_load(now + est.storage_s)
    forecast.free_storage(spec.transfer.max_concurrent_storage_loads - loads)

    def overdue(n: _Need) -> bool:
        """Its wait counts from when its agent runs: before that it could not have loaded storage either."""
        q = n.queued
        if q is None or q.wait_until is None or n.agent_up is None:
            return False
        return now >= n.agent_up + (q.wait_until - q.assigned_at)

    order = sorted(needs, key=lambda n: not overdue(n))  # overdue pods first in the storage line
    for need in order:  # may grow: a pod replaced here gets its successor in the same pass
        if need.why == "locality":  # keeps the seed it has
            continue
        storage_ok = _storage_allowed(spec, need)
        seed_eta = float("inf") if need.storage_only else forecast.seed_eta()
        storage_eta = forecast.storage_eta() if storage_ok else float("inf")
        # Past waitUntil a pod no longer prefers seeds: storage as soon as it is expected sooner at all. Past the
        # timeout it takes the next storage slot whatever the forecast says.
        late = need.queued is not None and now >= need.queued.assigned_at + spec.transfer.timeout_seconds
        margin = 0.0 if overdue(need) else fanout.PREFER_SEED_S
        if storage_ok and (late or storage_eta + margin < seed_eta):
            storage_now = forecast.next_storage_slot() == now
            forecast.take_storage()
            if not storage_now:
                _queue(spec, need, now, storage_eta, out)  # storage is sooner, once a storage slot frees
                continue
            _emit(
                out,
                need,
                Assignment(attempt=need.attempt, source="storage", excluded_seeds=need.excluded, assigned_at=now),
            )
            fallback = need.why in ("retry", "fallback")
            out.choices.append(SeedChoice(need.pod, need.attempt, None, STORAGE, "fallback" if fallback else need.why))
            out.fell_back += int(fallback)
            continue
        if late or seed_eta == float("inf"):  # no seed to come, and storage is not allowed
            out.delete.append((need.pod, "no seed to retry on and fallback is fail"))
            successor = replacement()
            if successor is not None:
                order.append(successor)
            continue
        forecast.take_seed()
        _queue(spec, need, now, storage_eta, out)


def _queue(spec: ModelReplicaSetSpec, need: _Need, now: float, storage_eta: float, out: Plan) -> None:
    """Queue the pod. It prefers a seed until storage would have verified it (its storage estimate plus the wait
    for a storage slot) plus PREFER_SEED_S, and never past the timeout."""
    if need.queued is not None:  # already waiting: nothing to write
        return
    until = min(storage_eta + fanout.PREFER_SEED_S, now + spec.transfer.timeout_seconds)
    queued = Assignment(
        attempt=need.attempt, source="queued", excluded_seeds=need.excluded, assigned_at=now, wait_until=until
    )
    _emit(out, need, queued)
    out.queued.append(need.pod)


def _locality_upgrade(
    spec: ModelReplicaSetSpec,
    fingerprint: str,
    pod: PodView,
    live: list[PodView],
    nodes: NodeLabels,
    clients: Mapping[str, list[PodView]],
    now: float,
) -> bool:
    """A pod assigned before it was scheduled may now have a closer seed; switch before its agent starts."""
    a = pod.assignment
    if a is None or a.source != "seed" or pod.node is None or pod.report is not None or (a.cohort_size or 0) > 2:
        return False
    keys = spec.transfer.topology_keys
    client = nodes.get(pod.node)
    current = next((p for p in live if p.name == a.seed_pod), None)
    current_rank = locality(client, nodes.get(current.node or ""), keys)[0] if current else len(keys)
    # Up to the user's limit: a closer seed is usually another link (NVLink, the same zone's network).
    limit = client_limit(spec)
    for seed in live:
        if seed.name == a.seed_pod or seed.name in a.excluded_seeds or not can_seed(spec, fingerprint, seed):
            continue
        if len(clients.get(seed.name, [])) >= limit:
            continue
        if locality(client, nodes.get(seed.node or ""), keys)[0] < current_rank:
            return True
    return False


@dataclass(slots=True)
class _SeedSlot:
    pod: PodView
    active: int
    used_blocks: set[tuple[int, ...]]
    cohort: list[_Need] = field(default_factory=list)  # cohort opened in this pass
    cohort_ports: list[int] = field(default_factory=list)


def _assign(
    spec: ModelReplicaSetSpec,
    fingerprint: str,
    needs: list[_Need],
    live: list[PodView],
    gone: set[str],
    nodes: NodeLabels,
    clients: Mapping[str, list[PodView]],
    now: float,
    out: Plan,
    replacement: Callable[[], _Need | None],
    limit: int,
    leftover: list[_Need] | None = None,
) -> None:
    """Free seed slots to the needs, in order. No slot: storage, or into ``leftover`` when given."""
    if not needs:
        return
    backend = resolve_backend(spec)
    cohorts = uses_cohorts(spec)
    blocks = port_blocks(spec) if backend == "nccl" else []
    keys = spec.transfer.topology_keys
    moving = {n.pod for n in needs}
    check = seed_check(spec, fingerprint)
    seeds = [p for p in live if check(p) and p.name not in gone and p.name not in moving]
    # Per-seed bookkeeping only for seeds that serve someone: at 1,000 pods most seeds are idle.
    slots: dict[str, _SeedSlot] = {}

    def slot_of(seed: PodView) -> _SeedSlot:
        slot = slots.get(seed.name)
        if slot is None:
            staying = [c for c in clients.get(seed.name, ()) if c.name not in moving]
            used = {tuple(c.assignment.group_ports) for c in staying if c.assignment.group_ports}
            slot = slots[seed.name] = _SeedSlot(seed, len(staying), used)
        return slot

    by_node: dict[str | None, list[PodView]] = {}
    for seed in seeds:
        by_node.setdefault(seed.node, []).append(seed)
        if seed.name in clients:
            slot_of(seed)

    plain: list[tuple[_Need, _SeedSlot | None, str, list[int]]] = []
    user_limit = client_limit(spec)
    for need in needs:  # may grow: a replaced pod's successor is planned in the same pass
        cap = user_limit if need.why == "locality" else limit  # as _locality_upgrade found the room
        # Locality depends only on the seed's node: rank the nodes, then scan seeds best level first.
        client_labels = nodes.get(need.node or "")
        levels: dict[int, list[tuple[str | None, str]]] = {}
        for node in by_node:
            rank, label = locality(client_labels, nodes.get(node or ""), keys)
            levels.setdefault(rank, []).append((node, label))
        best: tuple | None = None
        for rank in sorted(levels):
            for node, label in levels[rank]:
                for seed in by_node[node]:
                    slot = slots.get(seed.name)
                    active = slot.active if slot else 0
                    if active >= cap or seed.name in need.excluded:
                        continue
                    joins = cohorts and not need.late and slot is not None and bool(slot.cohort)
                    if blocks and not joins and slot and _free_block(blocks, slot.used_blocks) is None:
                        continue
                    key = (0 if joins else 1, active, seed.name)
                    if best is None or key < best[0]:
                        best = (key, seed, label)
            if best is not None:
                break
        if best is None and leftover is not None:
            leftover.append(need)
            continue
        if best is None:
            fallback = need.why == "retry"
            if fallback and spec.transfer.fallback == "fail":
                out.delete.append((need.pod, "no other seed to retry on and fallback is fail"))
                successor = replacement()
                if successor is not None:
                    needs.append(successor)  # planned in this same loop
                continue
            assignment = Assignment(
                attempt=need.attempt, source="storage", excluded_seeds=need.excluded, assigned_at=now
            )
            _emit(out, need, assignment)
            out.choices.append(SeedChoice(need.pod, need.attempt, None, STORAGE, "fallback" if fallback else need.why))
            out.fell_back += int(fallback)
            continue
        _, seed, label = best
        slot = slot_of(seed)
        slot.active += 1
        out.choices.append(SeedChoice(need.pod, need.attempt, slot.pod.name, label, need.why))
        if cohorts and not need.late:
            if not slot.cohort:
                slot.cohort_ports = _free_block(blocks, slot.used_blocks) or []
                slot.used_blocks.add(tuple(slot.cohort_ports))
            slot.cohort.append(need)
            continue
        ports: list[int] = []
        if backend == "nccl":
            ports = _free_block(blocks, slot.used_blocks) or []
            slot.used_blocks.add(tuple(ports))
        plain.append((need, slot, label, ports))

    for need, slot, _, ports in plain:
        _emit(out, need, _seed_assignment(spec, need, slot.pod, backend, ports, now))
    for slot in slots.values():
        if not slot.cohort:
            continue
        cid = cohort_id(slot.pod.name, [n.pod for n in slot.cohort], now)
        size = len(slot.cohort) + 1
        for rank, need in enumerate(slot.cohort, start=1):
            assignment = _seed_assignment(spec, need, slot.pod, backend, slot.cohort_ports, now)
            assignment.cohort_id, assignment.cohort_rank, assignment.cohort_size = cid, rank, size
            _emit(out, need, assignment)


def _free_block(blocks: list[list[int]], used: set[tuple[int, ...]]) -> list[int] | None:
    return next((b for b in blocks if tuple(b) not in used), None)


def _seed_assignment(
    spec: ModelReplicaSetSpec, need: _Need, seed: PodView, backend: ConcreteBackend, ports: list[int], now: float
) -> Assignment:
    return Assignment(
        attempt=need.attempt,
        source="seed",
        backend=backend,
        seed_pod=seed.name,
        seed_ip=seed.ip,
        seed_agent_port=spec.transfer.agent_port,
        group_ports=list(ports),
        excluded_seeds=need.excluded,
        assigned_at=now,
    )


def _emit(out: Plan, need: _Need, assignment: Assignment) -> None:
    assignment.promotes = need.why == "promote"
    (out.create if need.new else out.assign).append((need.pod, assignment))


def _promoting(spec: ModelReplicaSetSpec, pod: PodView, now: float) -> bool:
    """A standby's promotion not yet Ready: loading, or verified and waiting for its gate and probe. Bounded
    by the set's timeout from the promotion, so an engine that never turns Ready holds no refill for long."""
    a = pod.assignment
    if a is None or not a.promotes or pod.ready or pod.state == "failed":
        return False
    return now - a.assigned_at <= spec.transfer.timeout_seconds
